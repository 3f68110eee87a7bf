"""An LLM judge over an OpenAI-compatible chat endpoint (eval.py --judge api:URL:MODEL): GAD's
1-10 scores against the reference answer (MiniLLM's protocol) and DistiLLM-2's pairwise win rate."""

import argparse
import functools
import hashlib
import json
import os
import re
import sys

import common
import files
import teacher
from teacher import parse_spec

PROTOCOLS = ("score", "pairwise")

SYSTEM = "You are a careful, impartial judge of the quality of answers written by AI assistants."

# a judge's prompt: the question and the two answers, then its protocol's instructions
ANSWERS = """[Question]
{question}

[The Start of Assistant {a}'s Answer]
{first}
[The End of Assistant {a}'s Answer]

[The Start of Assistant {b}'s Answer]
{second}
[The End of Assistant {b}'s Answer]

[Instructions]
"""

SCORE_INSTRUCTIONS = """\
Rate how well each assistant answered the question above: how helpful, relevant and accurate the \
answer is, and how much useful detail it gives. Give each assistant one overall score from 1 \
to 10; higher is better.
On the first line write only the two scores, Assistant 1's then Assistant 2's, separated by a \
space. From the second line on, explain your ratings. Judge without bias, and do not let the \
order in which the answers appear change your ratings."""

PAIRWISE_INSTRUCTIONS = """\
Decide which assistant answered the question above better: consider helpfulness, relevance, \
accuracy and useful detail. Do not let the order of the answers, their length or the assistants' \
names sway you. Explain your comparison briefly, then end with your verdict in exactly this \
form: [[A]] if Assistant A is better, [[B]] if Assistant B is better, [[C]] for a tie."""

# protocol -> the orders a pair is asked in: which of (reference, model) comes first (judges
# favour a position, so a pairwise verdict is asked both ways)
ORDERS = {"score": ("reference_first",), "pairwise": ("model_first", "reference_first")}


def judge_messages(protocol, order, messages, reference, response):
    # the question: one user turn as it is, a conversation as a transcript
    question = (messages[0]["content"] if len(messages) == 1 else
                "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages))
    first, second = (reference, response) if order == "reference_first" else (response, reference)
    a, b, instructions = (("1", "2", SCORE_INSTRUCTIONS) if protocol == "score"
                          else ("A", "B", PAIRWISE_INSTRUCTIONS))
    prompt = ANSWERS.format(question=question, a=a, b=b, first=first, second=second)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt + instructions}]


_NUMBER = r"(10(?:\.0+)?|[0-9](?:\.[0-9]+)?)"
_SCORES = re.compile(rf"^\s*\**\s*{_NUMBER}\s*(?:,|/|\s)\s*{_NUMBER}\s*\**\s*$")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_scores(text):
    """The first non-empty line '7 9' (or '7, 9', '**7 9**') -> (7.0, 9.0); else None."""
    line = next((l for l in text.splitlines() if l.strip()), "")
    m = _SCORES.match(line)
    return (float(m.group(1)), float(m.group(2))) if m else None


def parse_verdict(text):
    """The last [[A]] / [[B]] / [[C]] in the reply -> 'A' / 'B' / 'C'; none -> None."""
    found = _VERDICT.findall(text)
    return found[-1] if found else None


def outcome(protocol, order, parsed):
    """The model's result: [reference rating, model rating] (score), or win 1 / tie 0.5 / loss 0."""
    if protocol == "score":
        return list(parsed if order == "reference_first" else parsed[::-1])
    if parsed == "C":
        return 0.5
    model_letter = "A" if order == "model_first" else "B"
    return 1.0 if parsed == model_letter else 0.0


def sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_cache(path):
    """{key: row} of a judgement cache; a torn last line (a kill mid-write) is cut off, redone."""
    if not teacher.scan_output(path):   # no file, or no row in it
        return {}
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["id"]: row for row in rows}


def ask(endpoint, task, retries, max_tokens):
    """One judgement, asked until the reply parses (at most 1 + retries times) -> its cache row."""
    protocol, order = task["protocol"], task["order"]
    parse = parse_scores if protocol == "score" else parse_verdict
    for attempt in range(1 + retries):
        text = endpoint.chat(task["messages"], n=1, max_tokens=max_tokens,
                             temperature=0.0 if attempt == 0 else 0.7,  # a retry can differ
                             top_p=1.0)[0]
        parsed = parse(text)
        if parsed is not None:
            break
    return {"id": task["id"], "prompt_id": task["prompt_id"], "protocol": protocol,
            "order": order, "valid": parsed is not None,
            "outcome": outcome(protocol, order, parsed) if parsed else None,
            "attempts": attempt + 1, "reply": text[:2000]}


def run(endpoint, items, protocols, cache_path, *, concurrency=8, retries=2, max_tokens=512):
    """Judge items [(prompt id, messages, reference, response)] in each protocol and order, asking
    only what cache_path lacks -> (the items' cache rows, counts: asked, cached, failed)."""
    with files.lock_output(cache_path):  # one writer per cache
        cache = read_cache(cache_path)
        keys, todo = [], {}
        for prompt_id, messages, reference, response in items:
            for protocol in protocols:
                for order in ORDERS[protocol]:
                    # hashed texts: an identical response (checkpoints that agree) is judged once
                    key = "|".join([endpoint.model, str(prompt_id), sha(reference), sha(response),
                                    protocol, order])
                    keys.append(key)
                    if key in cache or key in todo:
                        continue  # judged before, or the same pair twice in this run
                    todo[key] = {"id": key, "prompt_id": prompt_id, "protocol": protocol,
                                 "order": order, "messages": judge_messages(
                                     protocol, order, messages, reference, response)}
        counts = {"asked": len(todo), "cached": len(keys) - len(todo), "failed": 0}
        ask_one = functools.partial(ask, endpoint, retries=retries, max_tokens=max_tokens)
        writer = teacher.RowWriter(cache_path)
        try:
            for task, row in teacher.map_concurrent(ask_one, todo.values(), concurrency):
                if isinstance(row, teacher.ApiError):  # not cached: a rerun asks again
                    counts["failed"] += 1
                    print(f"judge: failed: id={task['prompt_id']} {task['protocol']}/"
                          f"{task['order']}: {row}", file=sys.stderr)
                    continue
                writer.write(row)  # only this thread writes
                cache[row["id"]] = row
        finally:
            writer.close()
    return [cache[k] for k in keys if k in cache], counts


def aggregate(rows):
    """Cache rows -> the table's judge_* numbers; invalid judgements are counted, not averaged."""
    metrics = {"judge_invalid": sum(not r["valid"] for r in rows)}
    scores = [r["outcome"] for r in rows if r["protocol"] == "score" and r["valid"]]
    if scores:
        # MiniLLM's ratio: 100 * sum(model ratings) / sum(reference ratings)
        metrics["judge_score"] = 100.0 * sum(m for _, m in scores) / sum(ref for ref, _ in scores)
        metrics["judge_rating"] = sum(m for _, m in scores) / len(scores)
    wins = [r["outcome"] for r in rows if r["protocol"] == "pairwise" and r["valid"]]
    if wins:
        metrics["judge_winrate"] = 100.0 * sum(wins) / len(wins)
    return metrics


# --------------------------------------------------------------------------------------------------
# what eval.py and the trainers call

def judge_spec(spec):
    """argparse type of --judge: the spec, checked at startup (not after a run's training)."""
    try:
        parse_spec(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def add_flags(parser):
    """The --judge flags, the same on eval.py and the three trainers."""
    g = parser.add_argument_group("LLM judge (judge.py)")
    g.add_argument("--judge", metavar="api:URL:MODEL", type=judge_spec,
                   help="judge the samples with an OpenAI-compatible endpoint, e.g. "
                        "api:http://localhost:8080/v1:gpt-4o (key in $OPENAI_API_KEY)")
    g.add_argument("--judge-protocol", default="both", choices=["score", "pairwise", "both"],
                   help="score: GAD's 1-10 ratings against the reference (1 request a sample); "
                        "pairwise: DistiLLM-2's win rate, both orders (2 requests)")
    g.add_argument("--judge-cache", help="jsonl of judgements for reruns (default: beside --out)")
    g.add_argument("--judge-concurrency", type=int, default=8, help="requests in flight")
    g.add_argument("--judge-retries", type=int, default=2, help="re-asks after an unparsable reply")
    g.add_argument("--judge-max-tokens", type=int, default=512, help="max tokens of a reply")


def judge_samples(args, records, samples, cache_path):
    """Judge eval.evaluate's samples (n a record) against the records' teacher responses."""
    url, model = parse_spec(args.judge)
    endpoint = teacher.Endpoint(url, model, os.environ.get("OPENAI_API_KEY"))
    n = len(samples) // len(records)
    items = [(rec["id"], rec["messages"], rec["teacher_response"], samples[i * n + j])
             for i, rec in enumerate(records) if rec.get("teacher_response") for j in range(n)]
    protocols = PROTOCOLS if args.judge_protocol == "both" else (args.judge_protocol,)
    rows, counts = run(endpoint, items, protocols, cache_path, concurrency=args.judge_concurrency,
                       retries=args.judge_retries, max_tokens=args.judge_max_tokens)
    common.print0(f"judge: {counts['asked']} asked, {counts['cached']} from {cache_path}, "
                  f"{counts['failed']} failed")
    return {**aggregate(rows), "judge_failed": counts["failed"]}
