"""An LLM judge over any OpenAI-compatible chat endpoint, for eval.py --judge api:URL:MODEL.

Two protocols, the two papers' headline numbers:
  score     GAD (arXiv 2511.10643) reports "GPT-4o scores" on LMSYS-Chat, Dolly, SelfInst and
            Vicuna, the GPT-4 feedback protocol of MiniLLM (arXiv 2306.08543, appendix; the prompt
            descends from Vicuna's GPT-4 review prompt in lm-sys/FastChat): the judge sees the
            question, the reference answer as assistant 1 and the model's answer as assistant 2, and
            rates each 1-10 on the first line of its reply. Reported: judge_score = 100 * sum(model
            ratings) / sum(reference ratings) (MiniLLM's ratio) and judge_rating = the model's mean
            rating.
  pairwise  DistiLLM-2 (arXiv 2503.07067) reports win rates against a reference model's responses:
            the judge says which of two answers is better, or a tie ([[A]], [[B]], [[C]], MT-Bench's
            pairwise verdict format). Every pair is judged in both orders (judges favour a
            position); a win counts 1, a tie 0.5. Reported: judge_winrate = 100 * mean over the
            valid verdicts.

The released GAD code (microsoft/LMOps gad/) has no judge script; the score protocol follows
MiniLLM, from the same repository (LMOps minillm/). Check the GAD paper's evaluation section for its
exact prompt and normalisation before putting these numbers beside the paper's.

The reference answer is the record's teacher_response (the teacher the student was distilled from).

Choices where the papers are silent, and why:
  - The prompts are ours, written to each protocol's contract (MiniLLM's two scores on the first
    line, MT-Bench's bracketed verdict); paste a paper's exact prompt into SCORE_PROMPT /
    PAIRWISE_PROMPT to reproduce it word for word.
  - The judge samples at temperature 0. A reply that does not parse is asked again (at temperature
    0.7, so the retry can differ), up to --judge-retries times; after that it is recorded as invalid
    and counted (judge_invalid), and left out of the means.
  - Judgements are cached in a jsonl keyed by (judge model, prompt id, hash of the reference, hash
    of the model's response, protocol, order): a rerun, or a run after a crash, asks only what is
    missing; an identical response (two checkpoints that agree) is judged once. A request that fails
    after the endpoint's retries (429s, 5xx, timeouts) is not cached, so a rerun asks it again; it
    is counted (judge_failed) and eval.py exits 1.
"""

import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

import common
import sample

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

# protocol -> the orders a pair is asked in: which of (reference, model) comes first
ORDERS = {"score": ("reference_first",), "pairwise": ("model_first", "reference_first")}


def parse_spec(spec, flag="--judge"):
    """'api:URL:MODEL' -> (URL, MODEL), for --judge and gad.py's --teacher. The model is after the
    last colon (URLs have colons)."""
    if not spec.startswith("api:") or spec.count(":") < 2:
        raise ValueError(f"{flag} {spec!r}: expected api:URL:MODEL, e.g. "
                         "api:http://localhost:8080/v1:gpt-4o")
    url, model = spec[len("api:"):].rsplit(":", 1)
    if not url or not model:
        raise ValueError(f"{flag} {spec!r}: expected api:URL:MODEL")
    return url, model


def question_text(messages):
    """The prompt as the judge reads it: a single user turn as it is, a longer conversation as a
    transcript (the answer continues it)."""
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
    """The model's result in one judgement: [reference rating, model rating] (score), or 1 / 0.5 / 0
    (pairwise: win / tie / loss)."""
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
    return "|".join([judge_model, str(prompt_id), sha(reference), sha(response), protocol, order])


def read_cache(path):
    """{key: row} of a judgement cache; a torn last line (a kill mid-write) is cut off, redone."""
    sample.scan_output(path)
    rows = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[row["id"]] = row
    return rows


def ask(endpoint, messages, protocol, retries, max_tokens):
    """One judgement: asks until the reply parses (at most 1 + retries times) -> (parsed or None,
    the last reply, attempts)."""
    parse = parse_scores if protocol == "score" else parse_verdict
    for attempt in range(1 + retries):
        text = endpoint.chat(messages, n=1, max_tokens=max_tokens,
                             temperature=0.0 if attempt == 0 else 0.7, top_p=1.0)[0]
        parsed = parse(text)
        if parsed is not None:
            return parsed, text, attempt + 1
    return None, text, 1 + retries


def run(endpoint, items, protocols, cache_path, *, concurrency=8, retries=2, max_tokens=512):
    """Judge items = [(prompt id, messages, reference, response)] under each protocol and order,
    asking only what cache_path lacks; each new judgement is appended as it arrives. Returns (the
    cache rows of these items, in order; counts: asked, cached, failed)."""
    with common.lock_output(cache_path):  # one writer per cache
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
        writer = sample.RowWriter(cache_path)
        try:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                futures = {pool.submit(ask, endpoint, msgs, protocol, retries, max_tokens):
                           (key, prompt_id, protocol, order)
                           for key, prompt_id, protocol, order, msgs in todo}
                for fut in as_completed(futures):
                    key, prompt_id, protocol, order = futures[fut]
                    try:
                        parsed, text, attempts = fut.result()
                    except sample.ApiError as e:
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
    """Cache rows -> the table's numbers (see the header). Invalid judgements are counted, not
    averaged; a protocol with no valid judgement gives no number."""
    metrics = {"judge_invalid": sum(not r["valid"] for r in rows)}
    scores = [r["outcome"] for r in rows if r["protocol"] == "score" and r["valid"]]
    if scores:
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
    """Judge eval.evaluate's samples (prompt-major, n per record) of the records that have a
    teacher_response -> the table's judge_* numbers (with judge_failed: requests that failed)."""
    url, model = parse_spec(args.judge)
    endpoint = sample.Endpoint(url, model, os.environ.get("OPENAI_API_KEY"))
    n = len(samples) // len(records)
    items = [(rec["id"], rec["messages"], rec["teacher_response"], samples[i * n + j])
             for i, rec in enumerate(records) if rec.get("teacher_response") for j in range(n)]
    protocols = PROTOCOLS if args.judge_protocol == "both" else (args.judge_protocol,)
    rows, counts = run(endpoint, items, protocols, cache_path, concurrency=args.judge_concurrency,
                       retries=args.judge_retries, max_tokens=args.judge_max_tokens)
    common.print0(f"judge: {counts['asked']} asked, {counts['cached']} from {cache_path}, "
                  f"{counts['failed']} failed")
    return {**aggregate(rows), "judge_failed": counts["failed"]}
