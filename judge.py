"""An LLM judge over an OpenAI-compatible chat endpoint (eval.py --judge api:URL:MODEL): GAD's
1-10 scores against the reference answer (MiniLLM's protocol) and DistiLLM-2's pairwise win rate."""

import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

import common
import files
import teacher
from teacher import parse_spec

PROTOCOLS = ("score", "pairwise")

SYSTEM = "You are a careful, impartial judge of the quality of answers written by AI assistants."

SCORE_PROMPT = """[Question]
{question}

[The Start of Assistant 1's Answer]
{first}
[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{second}
[The End of Assistant 2's Answer]

[Instructions]
Rate how well each assistant answered the question above: how helpful, relevant and accurate the \
answer is, and how much useful detail it gives. Give each assistant one overall score from 1 \
to 10; higher is better.
On the first line write only the two scores, Assistant 1's then Assistant 2's, separated by a \
space. From the second line on, explain your ratings. Judge without bias, and do not let the \
order in which the answers appear change your ratings."""

PAIRWISE_PROMPT = """[Question]
{question}

[The Start of Assistant A's Answer]
{first}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{second}
[The End of Assistant B's Answer]

[Instructions]
Decide which assistant answered the question above better: consider helpfulness, relevance, \
accuracy and useful detail. Do not let the order of the answers, their length or the assistants' \
names sway you. Explain your comparison briefly, then end with your verdict in exactly this \
form: [[A]] if Assistant A is better, [[B]] if Assistant B is better, [[C]] for a tie."""

# protocol -> the orders a pair is asked in: which of (reference, model) comes first (judges
# favour a position, so a pairwise verdict is asked both ways)
ORDERS = {"score": ("reference_first",), "pairwise": ("model_first", "reference_first")}


def question_text(messages):
    """The prompt as the judge reads it: one user turn as it is, a conversation as a transcript."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def judge_messages(protocol, order, question, reference, response):
    first, second = (reference, response) if order == "reference_first" else (response, reference)
    prompt = SCORE_PROMPT if protocol == "score" else PAIRWISE_PROMPT
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt.format(question=question, first=first,
                                                      second=second)}]


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
        ref, model = parsed if order == "reference_first" else parsed[::-1]
        return [ref, model]
    if parsed == "C":
        return 0.5
    model_letter = "A" if order == "model_first" else "B"
    return 1.0 if parsed == model_letter else 0.0


def sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def task_key(judge_model, prompt_id, reference, response, protocol, order):
    # hashes of the texts: an identical response (two checkpoints that agree) is judged once
    return "|".join([judge_model, str(prompt_id), sha(reference), sha(response), protocol, order])


def read_cache(path):
    """{key: row} of a judgement cache; a torn last line (a kill mid-write) is cut off, redone."""
    teacher.scan_output(path)
    rows = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[row["id"]] = row
    return rows


def ask(endpoint, messages, protocol, retries, max_tokens):
    """One judgement, asked until the reply parses -> (parsed or None, the last reply, attempts)."""
    parse = parse_scores if protocol == "score" else parse_verdict
    for attempt in range(1 + retries):
        text = endpoint.chat(messages, n=1, max_tokens=max_tokens,
                             temperature=0.0 if attempt == 0 else 0.7,  # a retry can differ
                             top_p=1.0)[0]
        parsed = parse(text)
        if parsed is not None:
            return parsed, text, attempt + 1
    return None, text, 1 + retries


def run(endpoint, items, protocols, cache_path, *, concurrency=8, retries=2, max_tokens=512):
    """Judge items [(prompt id, messages, reference, response)] in each protocol and order, asking
    only what cache_path lacks -> (the items' cache rows, counts: asked, cached, failed)."""
    with files.lock_output(cache_path):  # one writer per cache
        cache = read_cache(cache_path)
        keys, todo, planned = [], [], set()
        for prompt_id, messages, reference, response in items:
            for protocol in protocols:
                for order in ORDERS[protocol]:
                    key = task_key(endpoint.model, prompt_id, reference, response, protocol, order)
                    keys.append(key)
                    if key in cache or key in planned:
                        continue  # judged before, or the same pair twice in this run
                    planned.add(key)
                    todo.append((key, prompt_id, protocol, order,
                                 judge_messages(protocol, order, question_text(messages),
                                                reference, response)))
        counts = {"asked": len(todo), "cached": len(keys) - len(todo), "failed": 0}
        writer = teacher.RowWriter(cache_path)
        try:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                futures = {pool.submit(ask, endpoint, msgs, protocol, retries, max_tokens):
                           (key, prompt_id, protocol, order)
                           for key, prompt_id, protocol, order, msgs in todo}
                for fut in as_completed(futures):
                    key, prompt_id, protocol, order = futures[fut]
                    try:
                        parsed, text, attempts = fut.result()
                    except teacher.ApiError as e:  # not cached: a rerun asks again
                        counts["failed"] += 1
                        print(f"judge: failed: id={prompt_id} {protocol}/{order}: {e}",
                              file=sys.stderr)
                        continue
                    row = {"id": key, "prompt_id": prompt_id, "protocol": protocol,
                           "order": order, "valid": parsed is not None,
                           "outcome": outcome(protocol, order, parsed) if parsed else None,
                           "attempts": attempts, "reply": text[:2000]}
                    writer.write(row)  # only this thread writes
                    cache[key] = row
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
    import argparse
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
    g.add_argument("--judge-cache", default=None,
                   help="jsonl of judgements, reused by reruns (default: beside --out)")
    g.add_argument("--judge-concurrency", type=int, default=8, help="requests in flight")
    g.add_argument("--judge-retries", type=int, default=2,
                   help="times to ask again when a reply does not parse")
    g.add_argument("--judge-max-tokens", type=int, default=512, help="max tokens of a reply")
    return g


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
