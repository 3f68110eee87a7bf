"""Performance benchmarks. Compare as ratios measured in one run (shared machines are noisy);
absolute times only mean something on a GPU. Notes: docs/implementation-notes.md (dev/bench.py).

    python dev/bench.py sample                 # sample.generate vs HF generate, n samples a prompt
    python dev/bench.py sample --models smollm2-135m --stop eos --max-new-tokens 128
    python dev/bench.py losses                 # full-vocab KD losses: naive vs chunked
    python dev/bench.py train                  # tokens/s and MFU of a PPO update, a DistiLLM-2 step
    python dev/bench.py quality --budget tiny  # every distillation method, one table (quality.py)
    python dev/bench.py gpu                    # trainers under torchrun in bf16; sampling, MFU
    python dev/bench.py gpu --device cpu       # the same on tiny models (a test runs it)
    python dev/bench.py gpu --predict-only     # per-rank memory of every GPU command, by phase
"""

import argparse
import contextlib
import functools
import gc
import importlib.util
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # the project's modules, run as `python dev/bench.py` from anywhere

import amm
import common
import data as data_lib
import discriminator
import distillm2
import fast_decode
import fast_losses
import gad
import losses
import models
import ppo
import sample
from dev import fork, quality

TRAINERS = {"gad.py": gad, "distillm2.py": distillm2, "amm.py": amm}


def default_device(name=None):
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_dtype(device):
    return "bfloat16" if device.type == "cuda" else "float32"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def time_call(fn, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# sample: our generate on each decode path against HF generate, tokens/s and memory roofline

@dataclass
class Sampling:
    """What every engine of one sampling benchmark is asked to do, and how often it is timed."""
    n: int
    max_new_tokens: int
    pad: int
    eos_ids: list
    repeats: int
    hf_static: bool
    bandwidth: float   # bytes/s of a copy: the roofline's denominator


def bench_prompts(tokenizer, num_prompts, prompt_len):
    """ShareGPT prompts when installed (else fixed text), cut to exactly prompt_len tokens."""
    try:
        recs, _ = data_lib.read_records(data_lib.resolve_data_path("sharegpt"), skip_bad=True,
                                        limit=4 * num_prompts)
        texts = [r["messages"][-1]["content"] for r in recs]
    except Exception:
        texts = [(f"Question {i}: explain the history of distillation in machine learning, "
                  f"in detail. ") * 40 for i in range(num_prompts)]
    texts = sorted(texts, key=len, reverse=True)[:num_prompts]
    return [data_lib.encode_prompt(tokenizer, [{"role": "user", "content": t * 8}])[-prompt_len:]
            for t in texts]


def memory_bandwidth(device, gib=1.0):
    """Bytes/s of a device-to-device copy (read + write), measured in the same run."""
    x = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    seconds = min(time_call(lambda: y.copy_(x), device) for _ in range(3))
    return 2 * x.numel() * 4 / seconds


def decode_bytes(model, prompt_len, lengths):
    """Bytes a decode reads at least: the weights a step, the KV cache of the rows still going."""
    c = model.config
    kv_dim = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    total = 0
    for t in range(1, max(lengths)):               # token t is fed at step t (token 0: prefill)
        rows = sum(1 for n in lengths if n > t)
        total += weights + rows * (prompt_len + t) * c.num_hidden_layers * 2 * kv_dim * elem
    return total


def our_generate(model, prompts, s, decode):
    return sample.generate(model, prompts, n=s.n, max_new_tokens=s.max_new_tokens,
                           temperature=0.8, top_p=1.0, eos_ids=s.eos_ids, pad_id=s.pad, seed=0,
                           decode=decode).response_mask.sum(1).tolist()


@torch.no_grad()
def hf_generate(model, ids, mask, s, **extra):
    """HF generate with our settings -> each sample's length up to its first stop token."""
    stop = list(s.eos_ids) or None
    # top_k=0, no repetition penalty: HF's defaults (top_k 50) would do other work and sample
    # another distribution than ours
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8,
                         top_p=1.0, top_k=0, repetition_penalty=1.0, num_return_sequences=s.n,
                         max_new_tokens=s.max_new_tokens, pad_token_id=s.pad, eos_token_id=stop,
                         min_new_tokens=0 if stop else s.max_new_tokens, **extra)[:, ids.shape[1]:]
    ended = torch.isin(out, torch.tensor(stop or [-1], device=out.device))
    # up to and including the first stop token, as ours counts
    first = torch.where(ended.any(1), ended.float().argmax(1) + 1, out.shape[1])
    return first.tolist()


def time_engines(engines, device, repeats):
    """Each engine's median run after a warm-up, runs interleaved (a noisy neighbour hits all)."""
    runs, res = {k: [] for k in engines}, {k: None for k in engines}
    for name, fn in engines.items():
        try:
            fn()
        except torch.OutOfMemoryError as e:
            res[name] = {"error": f"out of memory ({str(e).splitlines()[0][:60]})"}
            torch.cuda.empty_cache()
    for _ in range(repeats):
        for name, fn in engines.items():
            if res[name] is None:
                out = []
                seconds = time_call(lambda: out.append(fn()), device)
                runs[name].append((sum(out[0]) / seconds, seconds, out[0]))
    for name in engines:
        if res[name] is None:
            # the median by tokens/s: HF draws from the global RNG, so with stops its runs differ
            tok_s, seconds, lengths = sorted(runs[name])[len(runs[name]) // 2]
            res[name] = {"seconds": seconds, "tokens": sum(lengths), "lengths": lengths,
                         "tok_s": tok_s}
    return res


def sampling_bench(model, prompts, s, device):
    """Every engine's tokens/s (ours on each decode path, HF's), its ratios and memory roofline."""
    ids, mask = sample.left_pad(prompts, s.pad, device)
    engines = {d: functools.partial(our_generate, model, prompts, s, d)
               for d in ["static", "plain"] + (["compiled"] if device.type == "cuda" else [])}
    engines["hf"] = functools.partial(hf_generate, model, ids, mask, s)
    if s.hf_static:
        engines["hf-static"] = functools.partial(hf_generate, model, ids, mask, s,
                                                 cache_implementation="static")
    res = time_engines(engines, device, s.repeats)
    for r in res.values():
        for base in ("hf", "plain"):
            if "tok_s" in r and "tok_s" in res[base]:
                r[f"vs_{base}"] = r["tok_s"] / res[base]["tok_s"]
    for name in ("static", "compiled"):
        if "seconds" in res.get(name, {}):
            ideal = decode_bytes(model, len(prompts[0]), res[name]["lengths"]) / s.bandwidth
            res[name]["roofline"] = ideal / res[name]["seconds"]
    for r in res.values():
        r.pop("lengths", None)
    return res


def print_sampling(title, res):
    print(title)
    print(f"  {'engine':<10} {'tok/s':>9} {'vs HF':>7} {'vs plain':>9} {'roofline':>9}")
    for name, r in res.items():
        if "error" in r:
            print(f"  {name:<10} {r['error']}")
            continue
        vs = [f"{r[k]:.2f}x" if k in r else "-" for k in ("vs_hf", "vs_plain")]
        roofline = f"{100 * r['roofline']:.0f}%" if "roofline" in r else "-"
        print(f"  {name:<10} {r['tok_s']:>9.0f} {vs[0]:>7} {vs[1]:>9} {roofline:>9}", flush=True)


def bench_sample(args):
    device = default_device(args.device)
    dtype = default_dtype(device)
    bandwidth = memory_bandwidth(device)
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} n={args.n} "
          f"prompts={args.prompts} prompt_len={args.prompt_len} "
          f"max_new_tokens={args.max_new_tokens} stop={args.stop} repeats={args.repeats} "
          f"copy bandwidth={bandwidth / 1e9:.0f} GB/s")
    for name in args.models.split(","):
        model, tok = models.load(name, dtype=dtype, device=device)
        model.eval()
        prompts = bench_prompts(tok, args.prompts, args.prompt_len)
        # --stop none: every sample makes max_new_tokens (the same work for every engine); eos:
        # rows end at their end-of-turn token, as in training
        eos = sample.stop_ids(tok, model) if args.stop == "eos" else []
        s = Sampling(args.n, args.max_new_tokens, tok.pad_token_id, eos, args.repeats,
                     args.hf_static, bandwidth)
        print_sampling(name, sampling_bench(model, prompts, s, device))


# --------------------------------------------------------------------------------------------------
# losses: forward + backward of a full-vocabulary KD loss, naive [B, T, V] logits vs chunked

KD_LOSSES = {   # name -> (loss_fn, kwargs): DistiLLM's alpha 0.1 (arXiv 2402.03898),
                # GKD's beta 0.5 (arXiv 2306.13649)
    "skl": (losses.skl, {"alpha": 0.1}), "srkl": (losses.srkl, {"alpha": 0.1}),
    "jsd": (losses.jsd, {"beta": 0.5}),
    "forward_kl": (losses.forward_kl, {}), "reverse_kl": (losses.reverse_kl, {}),
}
LOSS_FLAGS = ("vocab", "seq", "batch", "hidden", "teacher_hidden", "chunk", "repeats", "device")


def peak_memory_mb(device):
    """Peak since the process started: resident set on CPU (ru_maxrss: KiB), allocated on GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def kd_step(variant, loss, student_hidden, student_weight, teacher_hidden, teacher_weight, chunk):
    """One forward + backward of `loss` (a KD_LOSSES name) -> its per-position values."""
    loss_fn, kwargs = KD_LOSSES[loss]
    if variant == "naive":
        student_logits = F.linear(student_hidden, student_weight)                    # [B, T, V]
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden, teacher_weight)                # [B, T, V]
        values = loss_fn(student_logits, teacher_logits, **kwargs)                  # [B, T]
        values.mean().backward()
        return values.detach()
    shape = student_hidden.shape[:2]
    weights = torch.full(shape, 1.0 / shape.numel(), device=student_hidden.device)  # the same mean
    total, values = fast_losses.kd_loss_chunked(loss_fn, student_hidden, student_weight,
                                                teacher_hidden, teacher_weight, weights,
                                                chunk_size=chunk, **kwargs)
    total.backward()
    return values.detach()


def losses_worker(args):
    """One variant of one loss in a fresh process (a process's peak memory cannot be reset)."""
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)   # the same inputs in every variant's process
    randn = functools.partial(torch.randn, generator=g, device=device)
    V, H, Ht = args.vocab, args.hidden, args.teacher_hidden or args.hidden
    # scaled so that logits have std ~ 2, like a trained LM head's (unit weights: std ~ 30)
    student_weight = (randn(V, H) * 2 / H**0.5).requires_grad_(True)
    teacher_weight = randn(V, Ht) * 2 / Ht**0.5
    student_hidden = randn(args.batch, args.seq, H).requires_grad_(True)
    teacher_hidden = randn(args.batch, args.seq, Ht)
    inputs_mb = peak_memory_mb(device)
    times, out = [], []
    for _ in range(args.repeats):
        student_weight.grad = student_hidden.grad = None
        times.append(time_call(lambda: out.append(kd_step(
            args.worker, args.loss, student_hidden, student_weight, teacher_hidden, teacher_weight,
            args.chunk)), device))
    # a fixed subset of the weight gradient's rows: the whole [V, H] is too big to pass around
    rows = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:4096].to(device)
    torch.save({"values": out[-1].cpu(), "grad_hidden": student_hidden.grad.cpu(),
                "grad_weight_rows": student_weight.grad[rows].cpu(),
                "peak_mb": peak_memory_mb(device), "inputs_mb": inputs_mb,
                "seconds": statistics.median(times)}, args.worker_out)


def losses_variant(args, name, variant, tmp):
    """losses_worker in a subprocess -> its figures and tensors."""
    out = os.path.join(tmp, f"{name}_{variant}")
    cmd = ([sys.executable, os.path.abspath(__file__), "losses", "--worker", variant,
            "--worker-out", out, "--loss", name]
           + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in LOSS_FLAGS])
    # blocks above 1 MB straight from mmap, so that a freed block leaves the resident set at once
    # (why: docs/implementation-notes.md)
    subprocess.run(cmd, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
    return torch.load(out)


def bench_losses(args):
    """Peak memory and time of each loss's forward + backward, naive vs chunked."""
    if args.worker:
        return losses_worker(args)
    args.device = str(default_device(args.device))
    unit = "allocated" if args.device == "cuda" else "RSS"
    print(f"device={args.device} threads={torch.get_num_threads()} vocab={args.vocab} "
          f"seq={args.seq} batch={args.batch} hidden={args.hidden} "
          f"teacher_hidden={args.teacher_hidden or args.hidden} "
          f"chunk={args.chunk} fp32 repeats={args.repeats}; one fp32 [B, T, V] tensor = "
          f"{args.batch * args.seq * args.vocab * 4 / 2**20:.0f} MB; memory is peak {unit}, "
          f"'above inputs' excludes the interpreter, the heads and the hidden states")
    print(f"{'loss':<11} {'variant':<8} {'peak MB':>8} {'above inputs MB':>16} {'seconds':>8} "
          f"{'peak ratio':>10} {'above ratio':>11} {'time ratio':>11} {'max|d values|':>14} "
          f"{'max|d grad h|':>14} {'max|d grad W|':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.losses.split(","):
            n, c = (losses_variant(args, name, v, tmp) for v in ("naive", "chunked"))
            diffs = [(n[k] - c[k]).abs().max().item()
                     for k in ("values", "grad_hidden", "grad_weight_rows")]
            for variant, r in (("naive", n), ("chunked", c)):
                above = r["peak_mb"] - r["inputs_mb"]
                line = (f"{name:<11} {variant:<8} {r['peak_mb']:>8.0f} {above:>16.0f} "
                        f"{r['seconds']:>8.2f}")
                if variant == "chunked":
                    above_ratio = (n["peak_mb"] - n["inputs_mb"]) / max(above, 1.0)
                    line += (f" {n['peak_mb'] / r['peak_mb']:>9.1f}x {above_ratio:>10.1f}x "
                             f"{n['seconds'] / r['seconds']:>10.2f}x "
                             f"{diffs[0]:>14.2e} {diffs[1]:>14.2e} {diffs[2]:>14.2e}")
                print(line, flush=True)


# --------------------------------------------------------------------------------------------------
# gpu: the three trainers on Qwen2.5-shaped random models, under torchrun, bf16 with
# fp32 master weights

GPU_SIZES = {   # --size: the models and step shapes of each run
    "qwen": dict(student="random-qwen2.5-0.5b", teacher="random-qwen2.5-1.5b",
                 big="random-qwen2.5-1.5b", prompt_len=256, new_tokens=256, prompts=16, n=8,
                 eval_prompts=8, peak_prompts=64, peak_n=8, peak_new_tokens=1024,
                 peak_prompt_len=256, sample_prompts=(64, 256), sample_n=8,
                 sample_new_tokens=512, sample_prompt_len=256, train_rows=16, train_seq_len=2048,
                 train_micro_batch_tokens=12288),
    "tiny": dict(student="tiny", teacher="tiny-teacher", big="tiny", prompt_len=24, new_tokens=8,
                 prompts=4, n=2, eval_prompts=2, peak_prompts=8, peak_n=4, peak_new_tokens=16,
                 peak_prompt_len=24, sample_prompts=(2, 4), sample_n=2, sample_new_tokens=8,
                 sample_prompt_len=16, train_rows=2, train_seq_len=32,
                 train_micro_batch_tokens=64),
}
PHASES = {"gad.py": ["sampling", "scoring", "d_update", "g_update"],
          "distillm2.py": ["sampling", "curriculum", "losses", "update"],
          "amm.py": ["sampling", "scoring", "adversary", "student"]}
WORDS = ("the of and to in is that for it as with was on be by this are from at or an but not "
         "which have").split()


def random_text(rng, n):
    words = []
    while sum(len(w) + 1 for w in words) < n:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:n]


def synthetic_data(path, rows, prompt_len, response_len, seed=0):
    """Random-word prompts and responses of about the given lengths in byte-tokenizer tokens."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"bench{i}", "prompt": random_text(rng, prompt_len),
                                "response": random_text(rng, response_len)}) + "\n")


def torchrun(script, args, log_path):
    """`torchrun --standalone --nproc_per_node=1 script args`: the collectives run as on a node."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                        "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("TORCHELASTIC")}
    # the KV cache grows by a torch.cat a decode step: without expandable segments it fragments
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(ROOT, script)] + args
    with open(log_path, "a") as log:
        print("$ " + " ".join(cmd), file=log, flush=True)
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {done.returncode}); its output is in {log_path}")


def print_phases(title, rows, phases, cuda):
    """Print a run's median s/step and largest peak GiB a phase (the whole step last) -> them."""
    later = rows[1:] if len(rows) > 1 else rows   # the first step warms the allocator up
    table = []
    for phase in phases + ["step"]:
        key = "s_per_step" if phase == "step" else f"t_{phase}"
        times = [r[key] for r in later if key in r]
        peaks = [r[f"mem_{phase}"] for r in rows if f"mem_{phase}" in r] if cuda else []
        if times:
            table.append((phase, statistics.median(times), max(peaks) if peaks else None))
    print(f"\n{title}")
    print(f"  {'phase':<12} {'s/step':>8} {'peak GiB':>9}")
    for phase, seconds, peak in table:
        print(f"  {phase:<12} {seconds:>8.3f} {'-' if peak is None else f'{peak:.1f}':>9}")
    return table


def gpu_runs(size, device, data, fsdp=False):
    """[(script, arguments, --stop-after of the first run; the second resumes it)]."""
    shared = ["--dtype", "bfloat16", "--device", device, "--data", data, "--max-prompt-len", "1024",
              "--eval-prompts", str(size["eval_prompts"]), "--save-every", "1",
              "--student", size["student"], "--max-new-tokens", str(size["new_tokens"])]
    shared += ["--fsdp"] if fsdp else []
    white_box = ["--teacher", size["teacher"], "--val-fraction", "0.2",
                 "--gen-batch-size", str(size["prompts"])]
    return [
        ("gad.py", shared + ["--stage", "all", "--warmup-steps", "2", "--gad-steps", "3",
                             "--freeze-g-steps", "0", "--prompts-per-step", str(size["prompts"]),
                             "--samples-per-prompt", str(size["n"]),
                             "--max-response-len", str(size["new_tokens"]),
                             "--eval-max-new-tokens", "32"], 3),
        ("distillm2.py", shared + white_box + [
            "--epochs", "2", "--limit", str(2 * size["prompts"] + 16),
            "--prompts-per-step", str(size["prompts"]), "--lora-r", "0",   # the heavier step
            "--max-len", str(1024 + size["new_tokens"])], 3),
        ("amm.py", shared + white_box + [
            "--epochs", "1", "--limit", str(3 * size["prompts"] // 2 + 16),
            "--prompts-per-step", str(size["prompts"] // 2), "--samples-per-prompt", "4"], 2),
    ]


def gad_peak_runs(size, device, work, log, fsdp=False):
    """GAD steps at the big shape -> {optimizer: measured peak GiB a phase}, and the arithmetic."""
    cuda, data = device == "cuda", os.path.join(work, "peak.jsonl")
    synthetic_data(data, 2 * size["peak_prompts"] + 16, size["peak_prompt_len"],
                   size["peak_new_tokens"])
    variants = [("AdamW", [])]
    if not cuda:   # nothing is measured on a CPU: one run shows the path works
        print("\n8-bit AdamW: measured on CUDA only")
    elif importlib.util.find_spec("bitsandbytes") is not None:
        variants.append(("8-bit AdamW", ["--adam8bit"]))
    else:
        print("\n8-bit AdamW: not measured (bitsandbytes is not installed)")
    run_args = ["--student", size["big"], "--stage", "gad", "--gad-steps", "2",
                "--dtype", "bfloat16", "--device", device, "--data", data,
                "--prompts-per-step", str(size["peak_prompts"]),
                "--samples-per-prompt", str(size["peak_n"]),
                "--max-new-tokens", str(size["peak_new_tokens"]),
                "--max-response-len", str(size["peak_new_tokens"]),
                "--max-prompt-len", "2048", "--eval-prompts", "0", "--save-every", "100"]
    run_args += ["--fsdp"] if fsdp else []
    # the byte tokenizer's prompts: a token a character, and the chat template's few more
    lengths = (size["peak_prompt_len"] + 32, size["peak_new_tokens"])
    results = {}
    for label, extra in variants:
        out = os.path.join(work, "gad_peak" + ("_8bit" if extra else ""))
        torchrun("gad.py", run_args + extra + ["--out", out], log)
        rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
        print_phases(f"GAD steps at {size['big']}, {label}: {size['peak_prompts']} prompts x "
                     f"{size['peak_n']} samples x {size['peak_new_tokens']} new tokens",
                     rows, PHASES["gad.py"], cuda)
        # the second step: both optimizers' state exists through all of it
        measured = results[label] = {p: rows[-1].get(f"mem_{p}") for p in PHASES["gad.py"]}
        print_memory(f"the same steps, {label}: the memory arithmetic (prompts of at most "
                     f"{lengths[0]} tokens) and the measured peaks, GiB",
                     command_phases("gad.py", run_args + extra, 1, lengths)[1], measured)
    return results


def gpu_sampling(size, device):
    """Every engine at the big shape (random weights: no row ends early), at each batch size."""
    model = models.load_model(size["big"], dtype=default_dtype(device), device=device).eval()
    bandwidth = memory_bandwidth(device)
    out = {"bandwidth": bandwidth}
    s = Sampling(size["sample_n"], size["sample_new_tokens"], model.config.pad_token_id, [],
                 repeats=2, hf_static=device.type == "cuda", bandwidth=bandwidth)
    g = torch.Generator().manual_seed(0)
    for prompts in size["sample_prompts"]:
        ids = torch.randint(0, 256, (prompts, size["sample_prompt_len"]), generator=g).tolist()
        res = out[str(prompts)] = sampling_bench(model, ids, s, device)
        print_sampling(f"\nsampling {size['big']}: {prompts} prompts x {size['sample_n']} "
                       f"samples, {size['sample_prompt_len']} prompt + "
                       f"{size['sample_new_tokens']} new tokens (copy bandwidth "
                       f"{bandwidth / 1e9:.0f} GB/s)", res)
        torch.cuda.empty_cache()   # (nothing on a CPU)
    # HF's compiled generate keeps the model in a reference cycle, dynamo its graphs: free both
    # before the training benchmark builds a model with its optimizer
    del model
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def bench_gpu(args):
    """The trainers under torchrun, stopped once and resumed; GAD's peak memory; sampling, MFU."""
    if args.predict_only:
        return print_predictions()
    device = str(default_device(args.device))
    cuda = device == "cuda"
    name = args.size or ("qwen" if cuda else "tiny")
    size = GPU_SIZES[name]
    work = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench-gpu-"))
    os.makedirs(work, exist_ok=True)
    log, data = os.path.join(work, "runs.log"), os.path.join(work, "data.jsonl")
    synthetic_data(data, 256, size["prompt_len"], size["new_tokens"])
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"bench gpu: device {gpu}, torch {torch.__version__}, size {name}, "
          f"runs under torchrun --nproc_per_node=1 (logs: {log})", flush=True)
    results = {"device": gpu, "torch": torch.__version__, "trainers": {}, "gad_peak": {}}
    for script, run_args, stop in gpu_runs(size, device, data, args.fsdp):
        out, t0 = os.path.join(work, script.replace(".py", "")), time.time()
        torchrun(script, run_args + ["--out", out, "--stop-after", str(stop)], log)
        torchrun(script, run_args + ["--out", out, "--resume"], log)
        rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
        steps = [(r.get("stage"), r["step"]) for r in rows]
        assert len(set(steps)) == len(steps) and len(rows) > stop, f"{script}: resumed log {steps}"
        wall = time.time() - t0
        table = print_phases(f"{script}: {len(rows)} steps, stopped after {stop} and resumed "
                             f"({wall:.0f} s with model builds and evaluation)", rows,
                             PHASES[script], cuda)
        results["trainers"][script] = {"phases": table, "steps": len(rows), "wall_s": wall}
    if not args.skip_peak:
        results["gad_peak"] = gad_peak_runs(size, device, work, log, args.fsdp)
    results["sampling"] = gpu_sampling(size, torch.device(device))
    print()
    results["train"] = bench_train(argparse.Namespace(
        model=size["big"], teacher=size["big"], rows=size["train_rows"],
        seq_len=size["train_seq_len"], micro_batch_tokens=size["train_micro_batch_tokens"],
        dtype=None, repeats=3, device=device))
    path = os.path.join(work, "bench_gpu.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nresults: {path}")


# --------------------------------------------------------------------------------------------------
# train: tokens/s and MFU of GAD's PPO update and of a DistiLLM-2 step

def matmul_peak(device, dtype):
    """FLOP/s of a large matmul in `dtype`, the MFU denominator, measured in the same run."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    seconds = min(time_call(lambda: [a @ b for _ in range(10)], device) for _ in range(3))
    return 10 * 2 * n**3 / seconds


def synthetic_rollout(rows, prompt_len, response_len, vocab, device, seed=0):
    """rows x (prompt_len + response_len) random token ids, every position real (no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, prompt_len + response_len), generator=g)
    ones = torch.ones_like(ids)
    return sample.Rollout(ids[:, :prompt_len].to(device), ones[:, :prompt_len].to(device),
                          ids[:, prompt_len:].to(device), ones[:, prompt_len:].to(device))


def distillm2_step(model, teacher, opt, rollouts, rows, micro_batch_tokens, amp):
    """distillm2.accumulate's passes and the optimizer step, without its bookkeeping."""
    for ro, fn, kw in ((rollouts[0], losses.skl, {"alpha": 0.1}),
                       (rollouts[1], losses.srkl, {"alpha": 0.1, "stop_grad": True})):
        for _, part in ro.micro_batches(rows, micro_batch_tokens // 2):
            weights = distillm2.token_weights(part, "sequence", 2 * rows, None)
            with amp:
                loss, _ = distillm2.divergence(fn, model, teacher, part, weights, chunk_size=128,
                                               **kw)
            loss.backward()
    common.clip_and_step(list(model.parameters()), opt, 1.0, sync=None)


def bench_train(args):
    """Tokens/s and MFU of a PPO update and a DistiLLM-2 step: 6 N FLOPs a trained token."""
    device = default_device(args.device)
    dtype = args.dtype or default_dtype(device)
    peak = matmul_peak(device, models.to_dtype(dtype))
    half, tokens = args.seq_len // 2, args.rows * args.seq_len
    print(f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"dtype={dtype} rows={args.rows} x {args.seq_len} tokens ({half} prompt + {half} "
          f"response), micro-batches of {args.micro_batch_tokens} tokens; matmul peak "
          f"{peak / 1e12:.3f} TFLOP/s")
    # the student as the trainers train it: fp32, AdamW, activation checkpointing, autocast
    model = models.load_model(args.model, device=device, seed=0)
    models.checkpoint_activations(model)
    model.train()
    opt = common.make_optimizer(model.parameters(), lr=1e-6, weight_decay=0.0)
    N, V = models.num_params(model), model.config.vocab_size
    ro = synthetic_rollout(args.rows, half, args.seq_len - half, V, device)
    adv = torch.randn(args.rows, device=device)
    teacher = models.load_model(args.teacher or args.model, dtype=dtype, device=device, seed=1)
    teacher.eval().requires_grad_(False)
    student_ro = synthetic_rollout(args.rows, half, args.seq_len - half, V, device, seed=1)
    cfg = ppo.PPOConfig(micro_batch_tokens=args.micro_batch_tokens, dtype=dtype)
    steps = [("PPO update", functools.partial(ppo.ppo_update, model, opt, ro, adv, None, cfg=cfg),
              6 * N * tokens, tokens),
             ("DistiLLM-2 step", functools.partial(
                 distillm2_step, model, teacher, opt, (ro, student_ro), args.rows,
                 args.micro_batch_tokens, models.autocast(device, dtype)),
              2 * (6 * N + 2 * models.num_params(teacher)) * tokens, 2 * tokens)]
    # MFU* against the matmul peak measured above, not the spec sheet's (see the notes)
    print(f"  {'step':<16} {'s/step':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU*':>6}")
    results = {"peak_flops": peak}
    for label, fn, flops, n_tokens in steps:
        fn()                                                    # warm-up: allocator, kernels
        seconds = statistics.median(time_call(fn, device) for _ in range(args.repeats))
        results[label] = {"seconds": seconds, "tok_s": n_tokens / seconds,
                          "mfu": flops / seconds / peak}
        print(f"  {label:<16} {seconds:>8.3f} {n_tokens / seconds:>9.0f} "
              f"{flops / seconds / 1e12:>8.3f} {100 * flops / seconds / peak:>5.1f}%", flush=True)
    return results


# --------------------------------------------------------------------------------------------------
# memory arithmetic: the per-rank peak of every GPU command, phase by phase, from the model configs
# (built on the meta device). Each phase lists the tensors alive at its largest moment ({term:
# bytes}); tests/test_memory_model.py checks them against each phase's own code at a small shape.
# How each term is counted: docs/implementation-notes.md. GiB = 2^30 bytes throughout.

GiB = 2**30
# An 80 GB A100 / H100 offers 79.2 GiB (torch.cuda.mem_get_info); the headroom is for what the
# arithmetic does not see (CUDA context, workspaces, NCCL buffers, fragmentation)
GPU_GIB, HEADROOM_GIB = 79.2, 8.0
# the presets' model names -> their shapes (models.RANDOM_QWEN: the hub configs, random weights)
SHAPES = {f"qwen2.5-{s}": f"random-qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b")}
# every GPU command of the README: (label, script, arguments, ranks)
GPU_COMMANDS = [
    ("gad.py, 8 GPUs", "gad.py", ["--student", "qwen2.5-1.5b"], 8),
    ("gad.py, 1 GPU", "gad.py", ["--student", "qwen2.5-1.5b", "--prompts-per-step", "64"], 1),
    ("distillm2.py, 8 GPUs", "distillm2.py",
     ["--teacher", "qwen2.5-7b", "--student", "qwen2.5-1.5b"], 8),
    ("amm.py, 8 GPUs", "amm.py", ["--teacher", "qwen2.5-7b", "--student", "qwen2.5-1.5b"], 8),
    ("gad.py 3B --fsdp, 8 GPUs", "gad.py", ["--student", "qwen2.5-3b"], 8),
    ("gad.py 7B --fsdp, 8 GPUs", "gad.py", ["--student", "qwen2.5-7b"], 8),
    ("gad.py 14B --fsdp, 32 GPUs", "gad.py", ["--student", "qwen2.5-14b"], 32),
]
# ... and what does not fit: 14B on two nodes (its final evaluation: the initial student whole
# beside D gathered, and every rank's whole LM head)
BEYOND = [("gad.py 14B --fsdp, 16 GPUs", "gad.py", ["--student", "qwen2.5-14b"], 16)]
# peft's LoRA dropout keeps a mask for backward: CUDA's a 1-byte one, the CPU's fp32 (the CPU
# test sets 4)
LORA_MASK_BYTES = 1
# bytes per [chunk, V] number alive at once in a chunk of full-vocabulary work, counted op by op
# (tests/test_memory_model.py; the ops: docs/implementation-notes.md)
CHUNK_BYTES = {"logprobs": 8, "logprobs+entropy": 21, "logprobs backward": 8, "kd": 44,
               "amm": 28, "moments": 24, "adversary": 25}


@dataclass(frozen=True)
class Arch:
    """What the arithmetic reads of a model: its config's sizes and its parameters' numbers."""
    layers: int
    hidden: int
    inter: int
    vocab: int
    head_dim: int
    q_dim: int          # attention heads x head_dim
    kv_dim: int         # KV heads x head_dim: a token's keys (or values) in one layer
    params: int
    embed: int          # the input embedding (and the LM head when tied)
    head: int           # an untied LM head (0 when tied)
    layer_linear: int   # the decoder layers' matmul weights and biases: what autocast casts
    tensors: int        # parameter tensors (AdamW keeps a step count for each)
    buckets: tuple      # the numbers of each gradient all-reduce bucket (common.all_reduce_grads)
    layer_shapes: tuple = ()   # a decoder layer's parameters: (dim 0, numbers a dim-0 row, matmul?)
    tied: bool = True   # the LM head is the embedding (D: False, no head shares its embedding)

    @classmethod
    def of(cls, model):
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        embed, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        sizes = [p.numel() for p in model.parameters()]
        linear = sum(p.numel() for m in model.model.layers.modules()
                     if isinstance(m, torch.nn.Linear) for p in m.parameters())
        layer = model.model.layers[0]
        matmul = {id(p) for m in layer.modules() if isinstance(m, torch.nn.Linear)
                  for p in m.parameters()}
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, out.shape[0],
                   head_dim, c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim,
                   sum(sizes), embed.numel(), 0 if out is embed else out.numel(), linear,
                   len(sizes), all_reduce_buckets(sizes),
                   tuple((p.shape[0], p[0].numel(), id(p) in matmul) for p in layer.parameters()),
                   out is embed)


def all_reduce_buckets(sizes, bucket_numel=2**24):
    """common.all_reduce_grads' buckets: gradients in order until one reaches bucket_numel."""
    buckets, size = [], 0
    for n in sizes:
        size += n
        if size >= bucket_numel:
            buckets, size = buckets + [size], 0
    return tuple(buckets + ([size] if size else []))


def arch(name):
    """The Arch of a preset's model name, built on the meta device; any other name is loaded."""
    name = SHAPES.get(name, name)
    if name in models.RANDOM_QWEN:
        return Arch.of(models.random_qwen(name, device="meta"))
    return Arch.of(models.load_model(name))


@dataclass(frozen=True)
class Net:
    """A model as a phase runs it: bytes a weight (wb), a residual (rb), a matmul number (cb)."""
    arch: Arch
    wb: int
    rb: int
    cb: int
    lora: int = 0       # peft's adapter rank (0: none)
    fsdp: bool = False  # decoder layers gathered in the compute dtype (common.shard), the rest fp32

    @property
    def casts(self):   # autocast keeps a bf16 copy of the layers' fp32 weights
        return self.cb < self.wb and not self.fsdp

    @property
    def rope(self):   # keys and queries out of the rotary embedding: a bf16 key x fp32 cos is fp32
        return max(self.rb, self.cb)

    @property
    def head_cast(self):
        """The chunked paths' cast of the LM head to the compute dtype, when stored in another."""
        a = self.arch
        stored = self.rb if a.head == 0 and not self.fsdp else self.wb
        return 0 if stored == self.cb else self.cb * a.vocab * a.hidden


@dataclass(frozen=True)
class Batch:
    """One forward pass: rows x seq padded tokens, `resp` positions a row through the LM head."""
    rows: int
    seq: int
    resp: int

    @property
    def tokens(self):
        return self.rows * self.seq


def largest(moments):
    """The moment whose tensors add up to the most ({term: bytes})."""
    return max(moments, key=lambda m: sum(m.values()))


def cb_of(args):   # the bytes of a matmul's element under --dtype (bf16 autocast, else fp32)
    return 2 if args.dtype in ("bfloat16", "bf16") else 4


# --- model states ---------------------------------------------------------------------------------

def trained(a, who, adam8bit=False):
    """fp32 master weights and fused AdamW's two moments (8-bit: 1 B each) and step counts."""
    return {f"{who}: fp32 weights": 4 * a.params,
            f"{who}: AdamW state": (2 if adam8bit else 8) * a.params + 4 * a.tensors}


def reference_bytes(a, world=None):
    """models.frozen_copy: the matmul weights in bf16, the embedding and the norms in fp32 (--fsdp:
    rank 0's share of the layers and of an untied embedding)."""
    matmul = a.layer_linear + a.head
    whole = 2 * matmul + 4 * (a.params - matmul)
    if world is None:
        return whole
    layer = lambda w: sum((2 if mm else 4) * -(-d0 // w) * row for d0, row, mm in a.layer_shapes)
    return (whole - a.layers * (layer(1) - layer(world))
            - 4 * (embed_numel(a) - embed_numel(a, world)))


def discriminator_arch(a):
    """GAD's D: the student's backbone with a scalar head instead of the LM head."""
    return replace(a, params=a.params - a.head + a.hidden, head=0,
                   tensors=a.tensors + (0 if a.head else 1), tied=False)


def lora_params(a, r):
    """peft's LoRA adapters on the 7 projections of every layer: r x (in + out) numbers each."""
    h, i, q, kv = a.hidden, a.inter, a.q_dim, a.kv_dim
    return r * a.layers * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 3)


def adversary_params(st, te, args):
    """amm.Adversary's numbers: W = U A of rank r (U [V, r], A [r, H]) or a full [V, H], and b."""
    a, vocab, rank = te if args.adv_input == "teacher" else st, st.vocab, args.adv_rank
    return (rank * (a.hidden + vocab) if 0 < rank < a.hidden else a.hidden * vocab) + vocab


def autocast_copy(a, with_head, fsdp=False):
    """autocast's cached bf16 casts of the trained weights (sampling's: the head's too; --fsdp:
    the layers are gathered in bf16 already)."""
    return 2 * ((0 if fsdp else a.layer_linear) + ((a.head or a.embed) if with_head else 0))


def gradients(a, who):
    return {f"{who}: fp32 gradients": 4 * a.params}


def all_reduce(a):
    """common.clip_and_step: a bucket's flat copy (torch.cat), then each gradient's norm."""
    return {"gradient all-reduce bucket": 4 * max(a.buckets) + 8 * a.tensors}


# --- --fsdp: FSDP2 over the decoder layers (common.shard) ----------------------------------------

def layer_numel(a, world=1):
    """A decoder layer's numbers on one rank of `world`: each parameter split on dim 0, rank 0's
    ceil(dim 0 / world) rows (FSDP2 pads the other ranks' to it)."""
    return sum(-(-d0 // world) * row for d0, row, _ in a.layer_shapes)


def embed_numel(a, world=1):
    """The embedding's numbers on one rank of `world` (--fsdp shards it unless the head is it)."""
    return a.embed if a.tied else -(-a.embed // a.hidden // world) * a.hidden


def rank_share(a, world):
    """--fsdp: what one rank holds of `a` (rank 0's, the largest share): its shards of the layers
    and of an untied embedding, the final norm and heads whole (what common.all_reduce_grads
    sums)."""
    rest = a.params - a.layers * layer_numel(a) - a.embed   # the final norm and heads
    sizes = [n for n in ((a.embed,) if a.tied else ()) + (rest - a.head, a.head) if n]
    return replace(a, params=embed_numel(a, world) + rest + a.layers * layer_numel(a, world),
                   buckets=all_reduce_buckets(sizes))


def held_share(a, args, world):
    """What a rank holds of a trained model: rank_share under --fsdp, else all of it."""
    return rank_share(a, world) if args.fsdp else a


def gathered_layers(a, world, cb, who):
    """common.gathered: every layer (and a sharded embedding) all-gathered in the compute dtype,
    padding included, and while it gathers, a unit's flat all-gather output and input (its shard)
    not yet freed."""
    shard, embed = layer_numel(a, world), 0 if a.tied else embed_numel(a, world)
    return {f"{who}: layers gathered": cb * world * (a.layers * shard + embed),
            f"{who}: a unit's all-gather buffers": cb * (world + 1) * max(shard, embed)}


def layers_in_flight(a, world, cb, fsdp=True):
    """A sharded training pass: two units gathered (the next one's all-gather overlaps), and one
    unit's gradient in the compute dtype with its fp32 reduce-scatter input (a sharded embedding is
    the largest unit)."""
    unit = max(layer_numel(a, world), 0 if a.tied else embed_numel(a, world))
    return ({"FSDP: two units gathered, a unit's gradient and its fp32 copy":
             (3 * cb + 4) * world * unit} if fsdp else {})


# --- forward and backward passes ------------------------------------------------------------------

def residual_stream(net, b):
    """A pass's embeddings and layer input, the small tensors every layer reads (ids, mask,
    positions, rotary cos and sin) and the 4D boolean mask."""
    small = 32 + 2 * net.rb * net.arch.head_dim
    return b.tokens * (2 * net.rb * net.arch.hidden + small) + b.rows * b.seq * b.seq


def layer_forward(net, b):
    """The most a decoder layer's forward without a graph makes at once beyond its input."""
    a, rb, cb, rope = net.arch, net.rb, net.cb, net.rope
    attention = rb * a.hidden + a.q_dim * (2 * rope + 4 * cb) + a.kv_dim * (rope + cb)
    mlp = 2 * rb * a.hidden + (cb + 10 + LORA_MASK_BYTES if net.lora else 3 * cb) * a.inter
    return b.tokens * max(attention, mlp)


def layer_recompute(net, b):
    """What a checkpointed layer's recompute keeps, and its backward's first gradients."""
    a, cb = net.arch, net.cb
    saved = b.tokens * (cb * (4 * a.inter + 11 * a.hidden + 2 * a.kv_dim) + 8 * a.hidden)
    if net.lora:
        adapters = (LORA_MASK_BYTES + 2) * (5 * a.hidden + a.q_dim + a.inter) + 8 * a.inter
        return saved + b.tokens * adapters
    weights = cb * a.layer_linear // a.layers if net.casts else 0
    return saved + weights + b.tokens * cb * a.inter + 6 * a.hidden * a.inter


def checkpoints(net, b):
    """Activation checkpointing: each layer's input, the final norm's products, the small ones."""
    return residual_stream(net, b) + b.tokens * net.arch.hidden * (net.rb * net.arch.layers + 8)


def chunk_work(net, b, chunk, kind):
    """CHUNK_BYTES[kind] a number of [chunk, V] (fewer rows when the pass has fewer positions)."""
    return CHUNK_BYTES[kind] * min(chunk, b.rows * b.resp) * net.arch.vocab


def scoring_pass(net, b, chunk, head=True):
    """The largest moment of a pass without grad (head: logprobs at the response positions)."""
    a = net.arch
    stream = {"pass: residual stream": residual_stream(net, b)}
    hidden = {"pass: final norm, hidden states": 8 * b.tokens * a.hidden}
    moments = [stream | {"pass: a layer's forward": layer_forward(net, b)}, stream | hidden]
    if head:
        moments.append(hidden | {"pass: response hidden states [M, H]":
                                 4 * b.rows * b.resp * a.hidden,
                                 "pass: LM head cast": net.head_cast,
                                 "pass: [chunk, V] work": chunk_work(net, b, chunk, "logprobs")})
    return largest(moments)


def training_pass(net, b, chunk, head=True, passes=1):
    """The largest moment of a micro-batch's checkpointed forward and backward, of `passes`."""
    a, M = net.arch, b.rows * b.resp
    ckpt = {"pass: checkpointed layer inputs": passes * checkpoints(net, b)}
    cache = {"pass: autocast bf16 copy": autocast_copy(a, False)} if net.casts else {}
    waiting = {"pass: LM head's fp32 gradient, waiting": 4 * a.vocab * a.hidden} if head else {}
    summed = passes + len(waiting) > 1      # autograd adds the embedding's gradients up first
    moments = [ckpt | cache | {"pass: a layer's forward": layer_forward(net, b)},
               ckpt | waiting | {"pass: a layer's recompute and backward": layer_recompute(net, b)},
               waiting | {"pass: the embedding's dense gradients and their sum":
                          4 * a.embed * (passes + summed)}]
    if head:
        resp = {"pass: response hidden states [M, H]": 4 * M * a.hidden,
                "pass: LM head cast": net.head_cast}
        moments += [ckpt | cache | resp | {"pass: [chunk, V] work":
                                           chunk_work(net, b, chunk, "logprobs+entropy")},
                    ckpt | resp | {"pass: d hidden states [M, H]": 4 * M * a.hidden,
                                   "pass: LM head gradient (fp32 sum, bf16 product)":
                                   (4 + net.cb) * a.vocab * a.hidden,
                                   "pass: [chunk, V] work":
                                   chunk_work(net, b, chunk, "logprobs backward")}]
    return largest(moments)


def kd_pass(s, t, b, chunk, kind="kd", teacher_forward=True):
    """The largest moment of a white-box micro-batch (fast_losses.kd_loss_chunked), s and t the
    student's and the teacher's Net (teacher_forward False: its hidden states were stored)."""
    a, M = s.arch, b.rows * b.resp
    ckpt = {"pass: checkpointed layer inputs": checkpoints(s, b)}
    cache = {"pass: autocast bf16 copy": (2 * lora_params(a, s.lora) if s.lora      # adapters
                                          else autocast_copy(a, False) if s.casts else 0)}
    waiting = {} if s.lora else {"pass: LM head's fp32 gradient, waiting": 4 * a.vocab * a.hidden}
    teacher = ({"KD: teacher's final hidden states": t.rb * b.tokens * t.arch.hidden}
               if teacher_forward else {})
    kd = {"KD: hidden states, flat copies": (s.rb * a.hidden + t.rb * t.arch.hidden) * M,
          "KD: d hidden states": s.rb * M * a.hidden, "KD: head casts": s.head_cast + t.head_cast,
          "KD: [chunk, V] work": chunk_work(s, b, chunk, kind)}
    if waiting:   # (each chunk's bf16 product comes once the chunk's work is freed)
        kd["KD: LM head's fp32 gradient sum"] = 4 * a.vocab * a.hidden
    moments = [ckpt | cache | {"pass: a layer's forward": layer_forward(s, b)},
               ckpt | cache | teacher | kd,
               ckpt | waiting | {"KD: d hidden states": s.rb * M * a.hidden,
                                 "pass: a layer's recompute and backward": layer_recompute(s, b)}]
    if teacher_forward:
        moments.append(ckpt | cache | scoring_pass(t, b, chunk, head=False))
    if waiting:
        moments.append(waiting | {"pass: the embedding's dense gradient and the sum": 8 * a.embed})
    return largest(moments)


# --- sampling -------------------------------------------------------------------------------------

def generate_call(prompts, n, prompt_len, new_tokens, batch_size=None, max_tokens=None):
    """The prompts of sample.rollout's largest generate() call, all at prompt_len tokens."""
    calls = sample.split_by_budget([(n, prompt_len, new_tokens)] * prompts,
                                   n * (batch_size or prompts), max_tokens)
    return max(b - a for a, b in calls)


def noise_chunk(vocab, new_tokens):
    """sample.generate draws each row's Gumbel noise this many steps at a time."""
    return min(max(1, (1 << 18) // vocab), new_tokens)


def decode_step(rows, vocab, new_tokens, temperature, top_p):
    """sample.generate's per-step [rows, V] work beyond the logits (greedy: none)."""
    if temperature == 0:
        return {}
    chunk = noise_chunk(vocab, new_tokens)
    noise = 4 * chunk * rows * vocab
    return largest([{"decode: Gumbel noise": noise,
                     "decode: sample_token's fp32 [rows, V]": (29 if top_p < 1 else 12)
                     * rows * vocab},
                    {"decode: Gumbel noise, stacked": (3 if new_tokens > chunk else 2) * noise}])


def compaction(net, rows, new_tokens, temperature, cache):
    """fast_decode.StaticKV.select: a layer's keys (or values) of the kept rows, the noise's."""
    kept = {"compaction: a layer's kept rows": int(cache * fast_decode.COMPACT_AT)
            // (2 * net.arch.layers)}
    if temperature > 0:
        noise = 4 * noise_chunk(net.arch.vocab, new_tokens) * rows * net.arch.vocab
        kept["compaction: the noise and its kept rows"] = int(noise * (1 + fast_decode.COMPACT_AT))
    return kept


def kv_bytes(net, rows, tokens):
    """A KV cache of rows x tokens in the compute dtype: every layer's keys and values."""
    return rows * tokens * net.arch.layers * 2 * net.arch.kv_dim * net.cb


def generate_peak(net, prompts, n, prompt_len, new_tokens, temperature=1.0, top_p=1.0):
    """The largest moment of one sample.generate call on the static path."""
    a, rows = net.arch, prompts * n
    kv = kv_bytes(net, rows, prompt_len + new_tokens)
    static = {"KV cache (StaticKV)": kv}
    prefill = {"prefill: DynamicCache": prompts * prompt_len * a.layers * a.kv_dim
               * (net.rope + net.cb)}
    logits = {"decode: [rows, V] logits, [V] end-of-turn table": (rows * net.cb + 1) * a.vocab}
    build = {"StaticKV build: a layer's keys x n": rows * prompt_len * a.kv_dim * net.rope}
    return largest([
        prefill | scoring_pass(net, Batch(prompts, prompt_len, 1), 0, head=False),
        static | prefill | logits | build,
        static | logits | decode_step(rows, a.vocab, new_tokens, temperature, top_p),
        static | logits | compaction(net, rows, new_tokens, temperature, kv)])


def rollout_ids(rows, seq):
    """A rollout's int64 ids and masks, and sample.rollout's earlier calls' while it samples."""
    return {"rollout: ids and masks": 2 * 16 * rows * seq}


# --- the trainers ---------------------------------------------------------------------------------

def micro_batch(items, max_rows, max_tokens):
    """The largest micro-batch of sample.split_by_budget over items alike."""
    groups = sample.split_by_budget(items, max_rows, max_tokens)
    rows, p, r = items[0]
    return Batch(max(b - a for a, b in groups), p + r, r)


def gad_states(g, args, world=1):
    """What a GAD step holds throughout: G and D (fp32, AdamW) and the reference policy (--fsdp:
    a rank's share of each)."""
    d = discriminator_arch(g)
    return (trained(held_share(g, args, world), "G", args.adam8bit)
            | trained(held_share(d, args, world), "D", args.adam8bit)
            | {"reference policy": reference_bytes(g, world if args.fsdp else None)})


def gad_phases(args, world, g, prompt_len, response_len):
    """[(phase, {term: bytes})] of a GAD step and evaluation on one of `world` ranks."""
    d, cb, new, fsdp = discriminator_arch(g), cb_of(args), args.max_new_tokens, args.fsdp
    prompts, n = args.prompts_per_step // world, args.samples_per_prompt
    G, D = Net(g, 4, cb if fsdp else 4, cb, fsdp=fsdp), Net(d, 4, cb if fsdp else 4, cb, fsdp=fsdp)
    ref = Net(g, cb, 4, cb)
    gs, ds = held_share(g, args, world), held_share(d, args, world)
    gather = (lambda a, who: gathered_layers(a, world, cb, who)) if fsdp else (lambda a, who: {})
    held = gad_states(g, args, world) | rollout_ids(prompts * (n + 1), prompt_len + response_len)
    call = generate_call(prompts, n, prompt_len, new, None, args.gen_batch_tokens)
    mb = micro_batch([(1, prompt_len, response_len)] * (prompts * n), args.micro_batch_size,
                     args.micro_batch_tokens)
    # D's step: discriminator.pair_batches' largest pass (the student's rows the larger)
    pairs = discriminator.pair_batches([prompt_len] * prompts, [response_len] * prompts,
                                       [response_len] * (prompts * n), n,
                                       args.micro_batch_size or prompts * (n + 1),
                                       args.micro_batch_tokens)
    pair = Batch(max(len(rows) for rows in pairs), prompt_len + response_len, 1)
    # G's own logprobs before the update, unless PPO is on-policy (GAD's one epoch, one batch)
    old_logprobs = ([] if (args.ppo_epochs, args.mini_batches) == (1, 1) else
                    [{"G: autocast bf16 copy": autocast_copy(g, False, fsdp)} | gather(g, "G")
                     | scoring_pass(G, mb, args.chunk_size)])
    return [
        ("sampling", held | {"G: autocast bf16 copy": autocast_copy(g, True, fsdp)}
         | gather(g, "G") | generate_peak(G, call, n, prompt_len, new, args.temperature,
                                          args.top_p)),
        ("scoring", held | largest([
            {"D: autocast bf16 copy": autocast_copy(d, False, fsdp)} | gather(d, "D")
            | scoring_pass(D, mb, args.chunk_size, head=False),
            gather(g, "reference") | scoring_pass(ref, mb, args.chunk_size)] + old_logprobs)),
        ("d_update", held | gradients(ds, "D") | layers_in_flight(d, world, cb, fsdp) | largest([
            training_pass(D, pair, args.chunk_size, head=False, passes=2), all_reduce(ds)])),
        ("g_update", held | gradients(gs, "G") | layers_in_flight(g, world, cb, fsdp)
         | largest([training_pass(G, mb, args.chunk_size), all_reduce(gs)])),
        ("eval", gad_eval(args, g, prompt_len, world)),
    ]


def gad_eval(args, g, prompt_len, world=1):
    """gad.evaluate after training: G, D, a local teacher and the initial student in --dtype
    (--fsdp: G's and D's fp32 shards, D gathered throughout, G once the initial student is
    freed)."""
    wb, new, d = cb_of(args), args.eval_max_new_tokens, discriminator_arch(g)
    b = Batch(8, prompt_len + new, new)
    before = ({"initial student": wb * g.params}
              | eval_passes(Net(g, wb, wb, wb), b, args.chunk_size))
    # without --fsdp "before" is the larger moment: the initial student is held while its passes run
    held, moments = {"G: weights in --dtype": wb * g.params,
                     "D: weights in --dtype": wb * d.params}, [before]
    if args.fsdp:
        held = ({"G: fp32 weights": 4 * rank_share(g, world).params,
                 "D: fp32 weights": 4 * rank_share(d, world).params}
                | gathered_layers(d, world, wb, "D"))
        moments.append(gathered_layers(g, world, wb, "G")
                       | eval_passes(Net(g, 4, wb, wb, fsdp=True), b, args.chunk_size))
    if args.teacher and not args.teacher.startswith("api:"):
        held["teacher: weights"] = wb * arch(args.teacher).params
    return held | largest(moments)


def eval_passes(net, b, chunk):
    """eval.evaluate's largest moment with one model: greedy decoding, or a pass over the rows."""
    return largest([generate_peak(net, b.rows, 1, b.seq - b.resp, b.resp, temperature=0),
                    scoring_pass(net, b, chunk)])


def distillm2_states(st, te, args):
    """What a DistiLLM-2 step holds throughout: the teacher, the student (or its LoRA)."""
    teacher = {"teacher: weights": cb_of(args) * te.params}
    if not args.lora_r:
        return teacher | trained(st, "student")
    return teacher | {"student: frozen base": cb_of(args) * st.params,
                      "student: LoRA adapters and AdamW state": 12 * lora_params(st, args.lora_r)
                      + 4 * 14 * st.layers}   # A and B of 7 projections a layer: a step count each


def distillm2_phases(args, world, st, te, prompt_len, response_len):
    """[(phase, {term: bytes})] of a DistiLLM-2 step and evaluation on one of `world` ranks."""
    cb, r, new = cb_of(args), args.lora_r, args.max_new_tokens
    student, teacher = Net(st, cb if r else 4, cb if r else 4, cb, r), Net(te, cb, cb, cb)
    trains = (replace(st, params=lora_params(st, r), buckets=(lora_params(st, r),),
                      tensors=14 * st.layers) if r else st)
    call = generate_call(args.gen_batch_size, 1, prompt_len, new, args.gen_batch_size,
                         args.gen_batch_tokens)
    if args.max_len and prompt_len + response_len > args.max_len:   # distillm2.fit_length
        response_len = args.max_len - args.max_prompt_len
    prompts = args.prompts_per_step // world
    mb = micro_batch([(2, prompt_len, response_len)] * prompts, args.micro_batch_size,
                     args.micro_batch_tokens)
    states = distillm2_states(st, te, args)
    held = states | rollout_ids(prompts, prompt_len + response_len)
    cache = {"student: autocast bf16 copy": 2 * lora_params(st, r) if r
             else autocast_copy(st, False)}
    grads = gradients(trains, "student")
    sampling = [generate_peak(teacher, call, 1, prompt_len, new, args.temperature, args.top_p),
                cache | generate_peak(student, call, 1, prompt_len, new, args.temperature,
                                      args.top_p)]
    return [
        ("sampling", states | rollout_ids(2 * call, prompt_len + new) | largest(sampling)),
        ("curriculum", held | cache | largest([scoring_pass(net, mb, args.chunk_size)
                                               for net in (teacher, student)])),
        ("losses", held | grads | kd_pass(student, teacher, mb, args.chunk_size)),
        ("update", held | grads | all_reduce(trains)),
        ("eval", white_box_eval(args, st, te, prompt_len)),
    ]


def amm_states(st, te, args):
    """What an AMM step holds throughout: the student, the teacher, the two adversaries."""
    return trained(st, "student") | {"teacher: weights": cb_of(args) * te.params,
                                     "adversaries: fp32 weights and AdamW state":
                                     24 * adversary_params(st, te, args) + 24}


def amm_phases(args, world, st, te, prompt_len, response_len):
    """[(phase, {term: bytes})] of an AMM step and evaluation on one of `world` ranks."""
    cb, k, new = cb_of(args), args.samples_per_prompt, args.max_new_tokens
    student, teacher = Net(st, 4, 4, cb), Net(te, cb, cb, cb)
    prompts = args.prompts_per_step // world
    adv = adversary_params(st, te, args)
    held = amm_states(st, te, args) | rollout_ids(prompts * (k + 1), prompt_len + new)
    # each side keeps its models' hidden states at the response positions (amm.make_sides), and
    # the loop keeps the previous step's until make_sides returns
    sides = prompts * (k + 1) * new * (cb * te.hidden + 4 * st.hidden + 8)
    previous = {"the previous step's sides": sides}
    current = {"sides: the samples' hidden states": sides}
    calls = [(net, generate_call(prompts, n, prompt_len, new, args.gen_batch_size,
                                 args.gen_batch_tokens), n)
             for net, n in ((student, k), (teacher, 1))]
    mb = micro_batch([(1, prompt_len, new)] * (prompts * k), args.micro_batch_size,
                     args.micro_batch_tokens)
    # scoring: both models' hidden states by passes without grad, then the moments by chunks
    moments = {"moments: student head cast": student.head_cast,
               "moments: adversary's autocast copy": 2 * adv,
               "moments: [chunk, V] work": chunk_work(student, mb, args.chunk_size, "moments")}
    scoring = largest([scoring_pass(net, mb, args.chunk_size, head=False)
                       for net in (student, teacher)] + [moments])
    # amm.adversary_backward on the on-policy side (the larger)
    positions = prompts * k * new
    adversary = {"adversary: hidden states at response positions":
                 positions * (4 * st.hidden + 2 * teacher.rb * te.hidden + 4),
                 "adversary: student head's autocast copy": 2 * st.vocab * st.hidden,
                 "adversary: adversary's autocast copy": 2 * adv,
                 "adversary: [chunk, V] work": CHUNK_BYTES["adversary"]
                 * min(args.chunk_size, positions) * st.vocab}
    adv_step = [{"adversaries: foreach AdamW's sqrt(v)": 8 * adv},
                {"gradient all-reduce bucket": 4 * max(all_reduce_buckets(
                    [adv - st.vocab, st.vocab] * 2))}]
    return [
        ("sampling", held | previous | {"student: autocast bf16 copy": autocast_copy(st, True)}
         | largest([generate_peak(net, c, n, prompt_len, new) for net, c, n in calls])),
        ("scoring", held | previous | current
         | {"student: autocast bf16 copy": autocast_copy(st, False)} | scoring),
        ("adversary", held | current | {"adversaries: fp32 gradients": 8 * adv}
         | largest([adversary] + adv_step)),
        ("student", held | current | gradients(st, "student") | largest([
            kd_pass(student, teacher, mb, args.chunk_size, "amm", teacher_forward=False),
            all_reduce(st)])),
        ("eval", white_box_eval(args, st, te, prompt_len)),
    ]


def white_box_eval(args, st, te, prompt_len):
    """eval.white_box_final after training: both students and the teacher in --dtype."""
    cb, new = cb_of(args), args.max_new_tokens
    held = {"trained student": cb * st.params, "initial student": cb * st.params,
            "teacher: weights": cb * te.params}
    student, teacher = Net(st, cb, cb, cb), Net(te, cb, cb, cb)
    b = Batch(8, prompt_len + new, new)
    kd = {"eval: both models' final hidden states": b.tokens * cb * (st.hidden + te.hidden),
          "eval: [chunk, V] work": chunk_work(student, b, args.chunk_size, "kd")}
    return held | largest([eval_passes(student, b, args.chunk_size),
                           scoring_pass(teacher, b, args.chunk_size), kd])


# --- the commands ---------------------------------------------------------------------------------

def command_phases(script, argv, world, lengths=None):
    """(parsed arguments, phases) of `torchrun --nproc_per_node=world script argv`; lengths:
    (longest prompt, longest response), by default the worst case."""
    with contextlib.redirect_stdout(io.StringIO()):     # the preset it prints
        args = TRAINERS[script].parse_args(argv)
    prompt_len, response_len = lengths or (args.max_prompt_len, args.max_new_tokens)
    if script == "gad.py":
        return args, gad_phases(args, world, arch(args.student), prompt_len, response_len)
    phases = distillm2_phases if script == "distillm2.py" else amm_phases
    return args, phases(args, world, arch(args.student), arch(args.teacher), prompt_len,
                        response_len)


def peak(phases):   # -> (phase, GiB)
    name, terms = max(phases, key=lambda p: sum(p[1].values()))
    return name, sum(terms.values()) / GiB


def print_row(label, cells):
    print(f"  {label[:52]:<52}" + "".join(f"{c:>11}" for c in cells))


def print_memory(title, phases, measured=None):
    """A command's phases in GiB, a row a term and a column a phase; measured: {phase: GiB}."""
    top = peak(phases)[0]
    print(f"\n{title}")
    print_row("GiB", [p for p, _ in phases])
    for t in dict.fromkeys(t for _, d in phases for t in d):
        print_row(t, [f"{d[t] / GiB:.2f}" if t in d else "" for _, d in phases])
    print_row("predicted (* the peak)", [f"{sum(d.values()) / GiB:.2f}" + ("*" if p == top else " ")
                                         for p, d in phases])
    if measured is not None:
        print_row("measured (max_memory_allocated)",
                  ["-" if measured.get(p) is None else f"{measured[p]:.2f}" for p, _ in phases])


def print_predictions():
    """gpu --predict-only: each README GPU command's phases, then their peaks."""
    rows = []
    for label, script, argv, world in GPU_COMMANDS + BEYOND:
        args, phases = command_phases(script, argv, world)
        n = getattr(args, "samples_per_prompt", None)
        print_memory(f"torchrun --nproc_per_node={world} {script} {' '.join(argv)}\n"
                     f"  {args.prompts_per_step // world} prompts a rank"
                     f"{f' x {n} samples' if n else ''}, {args.max_prompt_len} prompt + "
                     f"{args.max_new_tokens} new tokens (the worst case), --gen-batch-tokens "
                     f"{args.gen_batch_tokens}, --micro-batch-tokens {args.micro_batch_tokens}",
                     phases)
        rows.append((label,) + peak(phases))
    limit = GPU_GIB - HEADROOM_GIB
    print(f"\nper-rank peaks, GiB (2^30 B), against an 80 GB card's {GPU_GIB} GiB less "
          f"{HEADROOM_GIB:.0f} of headroom: {limit:.1f}")
    for label, phase, total in rows:
        print(f"  {label:<26} {total:>6.1f}  {phase:<10} {'fits' if total <= limit else 'OVER'}")


# --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s = sub.add_parser("sample", parents=[device], help="tokens/s of sample.generate vs HF's")
    s.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated")
    s.add_argument("--n", type=int, default=8, help="samples per prompt")
    s.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    s.add_argument("--prompt-len", type=int, default=256, help="ShareGPT prompts cut to this")
    s.add_argument("--max-new-tokens", type=int, default=64, help="tokens per sample")
    s.add_argument("--repeats", type=int, default=3, help="timed runs per engine (the median)")
    s.add_argument("--stop", choices=["none", "eos"], default="none",
                   help="none: every sample makes --max-new-tokens; eos: ends at end-of-turn")
    s.add_argument("--hf-static", action="store_true", help="also HF's static-cache generate")
    k = sub.add_parser("losses", parents=[device], help="full-vocab KD losses, naive vs chunked")
    k.add_argument("--vocab", type=int, default=151936, help="(Qwen2.5's)")
    k.add_argument("--seq", type=int, default=1024, help="positions (DistiLLM-2's max length)")
    k.add_argument("--batch", type=int, default=1, help="sequences")
    k.add_argument("--hidden", type=int, default=896, help="student's (Qwen2.5-0.5B's)")
    k.add_argument("--teacher-hidden", type=int, default=0, help="0: --hidden")
    k.add_argument("--chunk", type=int, default=128, help="positions per chunk")
    k.add_argument("--losses", default="skl,srkl", help=f"from {','.join(KD_LOSSES)}")
    k.add_argument("--repeats", type=int, default=1, help="timed runs per variant (the median)")
    k.add_argument("--worker", choices=["naive", "chunked"], default=None, help=argparse.SUPPRESS)
    k.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    k.add_argument("--loss", default=None, help=argparse.SUPPRESS)
    tr = sub.add_parser("train", parents=[device], help="tokens/s and MFU of PPO and DistiLLM-2")
    tr.add_argument("--model", default="tiny", help="student (random-qwen2.5-1.5b on a GPU)")
    tr.add_argument("--teacher", default=None, help="DistiLLM-2's (default: --model)")
    tr.add_argument("--rows", type=int, default=4, help="sequences per optimizer step")
    tr.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (half prompt)")
    tr.add_argument("--micro-batch-tokens", type=int, default=128, help="the trainers' GPU: 12288")
    tr.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    tr.add_argument("--repeats", type=int, default=3, help="timed steps (the median)")
    quality.add_arguments(sub.add_parser("quality", help="every distillation method, one table"))
    fork.add_arguments(sub.add_parser("fork", help="does GAD's adversarial phase help? (fork.py)"))
    gp = sub.add_parser("gpu", help="the trainers under torchrun: s/step, memory a phase")
    gp.add_argument("--device", default=None, help="cuda or cpu (cpu: the tiny size, for tests)")
    gp.add_argument("--size", choices=list(GPU_SIZES), default=None,
                    help="default: qwen on cuda, tiny on cpu")
    gp.add_argument("--out", default=None, help="working folder (default: a new temporary one)")
    gp.add_argument("--skip-peak", action="store_true", help="leave out the GAD peak-memory runs")
    gp.add_argument("--predict-only", action="store_true", help="print the memory arithmetic only")
    gp.add_argument("--fsdp", action="store_true",
                    help="the trainers with --fsdp: on one GPU, the sharded path's cost")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.cmd == "quality":
        sys.exit(quality.main(args))
    if args.cmd == "fork":
        sys.exit(fork.main(args))
    {"sample": bench_sample, "losses": bench_losses, "train": bench_train,
     "gpu": bench_gpu}[args.cmd](args)
