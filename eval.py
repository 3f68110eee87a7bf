"""Held-out metrics of a distilled student (the papers' offline metrics), and a CLI printing them as
a table, one column per model:

    python eval.py --model out/gad/final --compare smollm2-135m --data teacher.jsonl \
        --teacher qwen2.5-7b --discriminator out/gad/discriminator"""

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import sys
import time
from collections import Counter

import torch

import common
import files
from common import print0
import data as data_lib
import discriminator
import fast_losses
import judge
import losses
import models
import sample

# --------------------------------------------------------------------------------------------------
# text metrics

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def words(text):
    """rouge-score's default tokenizer: lower-case, split at every run of non-[a-z0-9]."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists, bit-parallel (Allison & Dix
    1986; Hyyro 2004): O(len(b)) big-int operations instead of the DP's O(len(a) * len(b))."""
    # bit i of v stays 1 while row i of the DP table has not gained its increment
    match = {}  # token -> bitmask of the positions where a has it
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(prediction, reference):
    """ROUGE-L F1 in [0, 1] (rouge-score's RougeL fmeasure, no stemming) over word tokens."""
    pred, ref = words(prediction), words(reference)
    lcs = lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def distinct_n(texts, n=2):
    """Unique word n-grams / all word n-grams over the texts (none crossing two texts)."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# --------------------------------------------------------------------------------------------------
# model metrics

@torch.no_grad()
def nll_sums(model, prompts, responses, batch_size=8):
    """[(summed NLL in nats, token count)] of each response given its prompt, batch_size rows a
    forward pass laid out as generate() lays them out; an empty response is (0.0, 0)."""
    device = next(model.parameters()).device
    out = [(0.0, 0)] * len(responses)
    rows = [i for i in range(len(responses)) if responses[i]]
    for b in range(0, len(rows), batch_size):
        idx = rows[b:b + batch_size]
        batch = sample.pack([prompts[i] for i in idx], [responses[i] for i in idx], pad_id=0,
                            device=device)
        logprobs = sample.sequence_logprobs(model, batch).double()          # [B, T], 0 at padding
        for i, s, n in zip(idx, (-logprobs.sum(-1)).tolist(), batch.response_mask.sum(-1).tolist()):
            out[i] = (s, n)
    return out


def pooled(sums):
    """The token-mean of (sum, count) pairs (long responses weigh more, as in the SFT loss)."""
    total, count = sum(s for s, _ in sums), sum(n for _, n in sums)
    return total / count if count else float("nan")


def response_nll(model, prompts, responses, batch_size=8):
    """(Token-mean NLL in nats, tokens) of the responses given their prompts; (nan, 0) if none."""
    sums = nll_sums(model, prompts, responses, batch_size)
    return pooled(sums), sum(n for _, n in sums)


@torch.no_grad()
def heldout_divergence(student, teacher, rows, pad, chunk_size=128, batch_size=8):
    """Token-mean forward and reverse KL of a white-box pair on fixed responses (rows {"prompt",
    "y_t"}); the batches spread over the ranks, every rank returning one process's numbers."""
    device = next(student.parameters()).device
    tokens = sum(len(r["y_t"]) for r in rows)
    names = {"heldout_fkl": losses.forward_kl, "heldout_rkl": losses.reverse_kl}

    def batch_sums(b):
        batch = rows[b:b + batch_size]
        ro = sample.pack([r["prompt"] for r in batch], [r["y_t"] for r in batch], pad, device)
        weight = ro.response_mask.float() / max(tokens, 1)                   # the global token mean
        s_h, s_head = sample.response_hidden(student, ro)
        t_h, t_head = sample.response_hidden(teacher, ro)
        return [fast_losses.kd_loss_chunked(fn, s_h, s_head, t_h, t_head, weight,
                                            chunk_size=chunk_size)[0].item()
                for fn in names.values()]
    parts = common.shard_map(batch_sums, range(0, len(rows), batch_size))
    return {name: sum(part[i] for part in parts) for i, name in enumerate(names)}


def held_out_responses(teacher, val, gen, batch_size=8, **sampling):
    """The teacher's response ids to val's prompts, sampled over the ranks: a fixed yardstick."""
    def chunk(i):
        rows = val[i:i + batch_size]
        return sample.rollout(teacher, [r["prompt"] for r in rows],
                              [f"val|{r['id']}" for r in rows], **gen, **sampling).responses()
    return [y for part in common.shard_map(chunk, range(0, len(val), batch_size)) for y in part]


def write_table(table, records, judge_args, out_path):
    """A trainer's last table: rank 0 judges it (if asked), prints it, writes it without samples."""
    if common.get_rank() == 0:
        add_judgements(table, records, judge_args,
                       os.path.join(os.path.dirname(out_path), "judge.jsonl"))
        print0(format_table(table))
    summary = {when: {k: v for k, v in d.items() if k not in ("samples", "teacher_nll_sums")}
               for when, d in table.items()}
    if common.get_rank() == 0:
        files.atomic_write_text(out_path, json.dumps(summary, indent=1))
    return summary


def add_judgements(table, records, args, cache_path):
    """With --judge, each column's samples judged against the records' teacher responses: the
    judge_* numbers join the column (cached in --judge-cache, else cache_path)."""
    if not getattr(args, "judge", None):
        return
    cache_path = args.judge_cache or cache_path
    by_id = {rec["id"]: rec for rec in records}
    for metrics in table.values():
        kept = [by_id[i] for i in metrics["prompt_ids"]]
        metrics.update(judge.judge_samples(args, kept, metrics["samples"], cache_path))


def white_box_final(student, teacher, tok, val, val_records, pad, args, device):
    """The end of a white-box trainer: the student exported to OUT/student, then the before/after
    table on held-out prompts with fixed teacher responses (val rows {"id", "prompt", "y_t"})."""
    models.save_hf(student, tok, os.path.join(args.out, "student"), args.dtype)
    if not val:
        return
    # the initial student loaded as the run started it, so both columns are computed alike
    fresh = models.load_model(args.student, dtype=args.dtype, device=device, seed=args.seed,
                              layers=args.student_layers).eval()
    by_id = {r["id"]: r for r in val_records}
    recs = [dict(by_id[r["id"]], teacher_response=tok.decode(r["y_t"], skip_special_tokens=True))
            for r in val]
    kw = dict(teacher=teacher, max_new_tokens=args.max_new_tokens,
              max_prompt_len=args.max_prompt_len)
    with common.gathered(student):   # --fsdp: no collective in a shared evaluation
        table = {when: {**heldout_divergence(model.eval(), teacher, val, pad, args.chunk_size),
                        **evaluate(model, tok, recs, **kw)}
                 for when, model in (("before", fresh), ("after", student))}
    write_table(table, recs, args, os.path.join(args.out, "eval.json"))


def score_pairs(score_fn, prompts, responses, pad_id, batch_size, device):
    """score_fn over (prompt, response) token lists in batches -> [N] floats on the CPU."""
    out = []
    for b in range(0, len(prompts), batch_size):
        batch = sample.pack(prompts[b:b + batch_size], responses[b:b + batch_size], pad_id, device)
        out.append(score_fn(batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                            batch.response_mask).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@contextlib.contextmanager
def eval_mode(*modules):
    """eval() for the duration (no dropout), then each module back to the mode it was in."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


@dataclasses.dataclass
class Settings:
    """evaluate()'s sampling and length limits (eval.py's flags of the same names)."""
    max_new_tokens: int = 64
    temperature: float = 0.0   # greedy: deterministic metrics
    n: int = 1                 # samples per prompt
    batch_size: int = 8
    seed: int = 0
    max_prompt_len: int | None = None    # longer prompts skipped: a cut prompt is another question
    max_response_len: int | None = None  # teacher responses cut for student_nll, as in training


@torch.no_grad()
def evaluate(student, tokenizer, records, *, teacher=None, score_fn=None, **settings):
    """The student sampled on each record's prompt and measured -> {metric: value}, with the
    "samples" prompt-major. teacher: for teacher_nll; score_fn(prompt_ids, prompt_mask,
    response_ids, response_mask) -> [N] (a discriminator); settings: Settings' fields."""
    s = Settings(**settings)
    n, batch_size = s.n, s.batch_size
    if s.max_new_tokens < 1 or n < 1 or batch_size < 1:
        raise ValueError("max_new_tokens, n and batch_size must be >= 1")
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else data_lib.end_of_turn_id(tokenizer))
    prompts, kept = [], []
    for rec in records:
        ids = data_lib.encode_prompt(tokenizer, rec["messages"])
        if s.max_prompt_len is None or len(ids) <= s.max_prompt_len:
            prompts.append(ids)
            kept.append(rec)
    if len(kept) < len(records):
        print0(f"eval: skipped {len(records) - len(kept)} prompts over "
               f"max_prompt_len={s.max_prompt_len} tokens")
    if not kept:
        raise ValueError("no prompts to evaluate")
    # the teacher's responses, tokenized as for training (None: the record has none)
    refs = [data_lib.encode_response(tokenizer, r["teacher_response"], s.max_response_len)[0]
            if r.get("teacher_response") else None for r in kept]
    eos = sample.stop_ids(tokenizer, student)
    gen = dict(n=n, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=1.0,
               eos_ids=eos, pad_id=pad_id, seed=s.seed)
    # every rank evaluates every world-th batch and gets the whole table: the same batches as one
    # process, so the same numbers
    batch = functools.partial(batch_metrics, student, teacher, score_fn, tokenizer,
                              list(zip(prompts, refs)), gen, batch_size)
    with eval_mode(*[m for m in (student, teacher) if m is not None]):
        parts = common.shard_map(batch, list(range(0, len(prompts), batch_size)),
                                 desc="eval: batches")
    rows = {k: [x for part in parts for x in part.get(k, [])] for k in set().union(*parts)}
    responses, texts = rows["responses"], rows["texts"]

    with_ref = [i for i, r in enumerate(refs) if r is not None]
    metrics = {}
    if with_ref:
        metrics["rouge_l"] = _mean(rouge_l(texts[i * n + j], kept[i]["teacher_response"])
                                   for i in with_ref for j in range(n))
        metrics["student_nll"] = pooled(rows["student_nll"])
    if teacher is not None:
        metrics["teacher_nll"] = pooled(rows["teacher_nll"])
        # each sample's (NLL sum, tokens): a benchmark's paired bootstrap resamples prompts
        metrics["teacher_nll_sums"] = rows["teacher_nll"]
    if score_fn is not None:
        scores = rows["disc"]                                                    # [N*n]
        metrics["disc_score"] = _mean(scores)
        if with_ref:
            metrics["disc_score_teacher"] = _mean(rows["disc_teacher"])
            # each sample against its own prompt's teacher response: the pairs L_D is trained on
            metrics["disc_acc"] = _mean(float(t > scores[i * n + j])
                                        for t, i in zip(rows["disc_teacher"], with_ref)
                                        for j in range(n))
    metrics["length"] = _mean(len(r) for r in responses)
    metrics["truncated"] = _mean(float(r[-1] not in eos) for r in responses)
    metrics["distinct_2"] = distinct_n(texts, 2)
    metrics["num_prompts"] = len(kept)
    metrics["samples"] = texts
    metrics["prompt_ids"] = [rec["id"] for rec in kept]  # the samples' records (a judge needs them)
    return metrics


def batch_metrics(student, teacher, score_fn, tokenizer, items, gen, batch_size, start):
    """Samples and measures of the (prompt, teacher response or None) items from `start`."""
    ps = [p for p, _ in items[start:start + batch_size]]
    rs = [r for _, r in items[start:start + batch_size]]
    # keyed by the prompt's index: a sample does not depend on the batching
    ro = sample.generate(student, ps, prompt_keys=range(start, start + len(ps)), **gen)
    out = {"responses": ro.responses(), "texts": ro.texts(tokenizer)}
    sample_prompts = [p for p in ps for _ in range(gen["n"])]
    ref_prompts, ref_ids = [p for p, r in zip(ps, rs) if r], [r for r in rs if r]
    device = next(student.parameters()).device
    if teacher is not None:
        out["teacher_nll"] = nll_sums(teacher, sample_prompts, out["responses"], batch_size)
    if ref_ids:
        out["student_nll"] = nll_sums(student, ref_prompts, ref_ids, batch_size)
    if score_fn is not None:
        out["disc"] = score_pairs(score_fn, sample_prompts, out["responses"], gen["pad_id"],
                                  batch_size, device).tolist()
        if ref_ids:
            out["disc_teacher"] = score_pairs(score_fn, ref_prompts, ref_ids, gen["pad_id"],
                                              batch_size, device).tolist()
    return out


def format_table(rows, keys=None):
    """{column name: metrics} -> a markdown table, one metric a line; a missing metric is "-"."""
    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def cell(v):
        if not is_number(v):
            return "-"
        return str(v) if isinstance(v, int) else f"{v:.4f}"

    if keys is None:   # every numeric metric, in order of first appearance
        keys = list(dict.fromkeys(k for m in rows.values() for k, v in m.items() if is_number(v)))
    names = list(rows)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {k} | " + " | ".join(cell(rows[name].get(k)) for name in names) + " |"
              for k in keys]
    return "\n".join(lines)


def load_discriminator(path, dtype, device):
    """A GAD discriminator folder, scored by discriminator.score as in training."""
    from transformers import AutoModelForSequenceClassification
    d = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
    if d.config.num_labels != 1 or not hasattr(d, "score"):
        raise ValueError(f"{path}: expected a sequence-classification model with num_labels=1 "
                         "and a `score` head")
    return d


# --------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate one or more students on held-out prompts "
                                            "and print a table (one column per model).")
    m = p.add_argument_group("models")
    m.add_argument("--model", required=True, help="student: alias (tiny, smollm2-135m) or folder")
    m.add_argument("--compare", nargs="+", default=[], metavar="MODEL",
                   help="more models for more columns, e.g. the checkpoint before training")
    m.add_argument("--teacher",
                   help="white-box teacher for teacher_nll (must share the students' tokenizer)")
    m.add_argument("--discriminator", help="GAD discriminator folder (sequence classification, "
                                           "num_labels=1) for disc_score / disc_acc")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True,
                   help="records with teacher responses: jsonl, parquet, ShareGPT json")
    d.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "sharegpt"],
                   help="input format")
    d.add_argument("--skip-bad", action="store_true",
                   help="skip bad rows (counted), as the trainers do with the ShareGPT file")
    d.add_argument("--split", default="val", choices=["val", "train", "all"],
                   help="which side of data.train_val_split (val: the trainers' held-out prompts)")
    d.add_argument("--val-fraction", type=float, default=0.1, help="as given to the trainer")
    d.add_argument("--split-seed", type=int, default=0, help="the trainer's --seed (its split)")
    d.add_argument("--limit", type=int, default=None, help="first L records of the split")
    d.add_argument("--max-prompt-len", type=int, default=1024, help="skip longer prompts (counted)")
    d.add_argument("--max-response-len", type=int, default=1024,
                   help="cut teacher responses for student_nll")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="max response tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--batch-size", type=int, default=8,
                   help="prompts per generate() call and rows per forward pass")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    c = p.add_argument_group("compute and output")
    c.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    c.add_argument("--dtype", default="auto",
                   help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    c.add_argument("--out", help="also write {model: metrics, with the samples} to this json file")
    judge.add_flags(p)
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction <= 1.0:
        p.error("--val-fraction must be in [0, 1]")
    if min(args.max_new_tokens, args.n, args.batch_size) < 1:
        p.error("--max-new-tokens, --n and --batch-size must be >= 1")
    return args


def load_split(args):
    records, bad = data_lib.read_records(data_lib.resolve_data_path(args.data), fmt=args.format,
                                         skip_bad=args.skip_bad)
    if bad:
        print0(f"eval: skipped {len(bad)} bad rows (first: {bad[0]})")
    if args.split != "all":
        train, val = data_lib.train_val_split(records, args.val_fraction, seed=args.split_seed)
        records = val if args.split == "val" else train
    return records[:args.limit] if args.limit is not None else records


def same_vocabulary(a, b):
    """Whether two token -> id maps tokenize alike: shared tokens have one id, the others come
    past the other's ids (a reloaded Qwen2Tokenizer appends an unk token no model produces)."""
    shared = a.keys() & b.keys()
    return (all(a[t] == b[t] for t in shared) and all(a[t] >= len(b) for t in a.keys() - shared)
            and all(b[t] >= len(a) for t in b.keys() - shared))


def column_names(names):
    """The model names as given, made unique (a folder compared with itself gets '#2')."""
    seen, out = Counter(), []
    for name in names:
        base = name.rstrip("/") or name
        seen[base] += 1
        out.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return out


def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda")
                                                     else "float32")
    try:
        records = load_split(args)
    except data_lib.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: no records in the {args.split} split of {args.data} (try --split all)",
              file=sys.stderr)
        return 2
    print0(f"eval: {len(records)} prompts ({args.split} split of {args.data})")
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}   # its flags

    teacher = teacher_vocab = score_fn = None
    if args.teacher:
        teacher = models.load_model(args.teacher, dtype=dtype, device=device)
        teacher_vocab = models.load_tokenizer(args.teacher).get_vocab()
    if args.discriminator:
        disc = load_discriminator(args.discriminator, models.DTYPES[dtype], device)
        score_fn = functools.partial(discriminator.score, disc)

    results = {}
    for name, col in zip([args.model] + args.compare, column_names([args.model] + args.compare)):
        t0 = time.time()
        student, tokenizer = models.load(name, dtype=dtype, device=device)
        if teacher_vocab is not None and not same_vocabulary(tokenizer.get_vocab(), teacher_vocab):
            print(f"error: {name} and the teacher {args.teacher} have different tokenizers: "
                  f"teacher_nll needs one vocabulary", file=sys.stderr)
            return 2
        results[col] = evaluate(student, tokenizer, records, teacher=teacher, score_fn=score_fn,
                                **settings)
        print0(f"eval: {col} done in {time.time() - t0:.1f}s; first sample: "
               f"{results[col]['samples'][0][:200]!r}")
        del student
    cache = os.path.splitext(args.out)[0] + ".judge.jsonl" if args.out else "judge.jsonl"
    try:
        add_judgements(results, records, args, cache)   # --judge-cache, else `cache`
    except files.OutputLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        files.atomic_write_text(args.out, json.dumps(results, ensure_ascii=False, indent=1))
    print(format_table(results), flush=True)
    return 1 if any(r.get("judge_failed") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
