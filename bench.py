"""Performance benchmarks. Compare as ratios measured in one run (shared machines are noisy);
absolute times only mean something on a GPU.

    python bench.py sample                 # sample.generate vs HF generate(num_return_sequences=n)
    python bench.py sample --models smollm2-135m --stop eos --max-new-tokens 128
    python bench.py losses                 # full-vocab KD losses: naive vs losses.kd_loss_chunked
    python bench.py losses --vocab 151936 --seq 1024 --batch 1 --hidden 896 --chunk 128 \
        --losses skl,srkl
    python bench.py train                  # tokens/s and MFU of a PPO update, a DistiLLM-2 step
    python bench.py quality --budget tiny  # every distillation method, one table (quality.py)
    python bench.py gpu                    # the trainers under torchrun, bf16: s/step, memory;
                                           # sampling and training speed at 1.5B
    python bench.py gpu --device cpu       # the same on tiny models (a test runs it)
    python bench.py gpu --predict-only     # the memory arithmetic of a GAD step at 1.5B
"""

import argparse
import functools
import gc
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import data as data_lib
import losses
import models
import sample


def bench_prompts(tokenizer, num_prompts, prompt_len):
    """Real ShareGPT prompts when the package is installed (else fixed text), cut to exactly
    prompt_len tokens so both engines see the same work."""
    try:
        recs, _ = data_lib.read_records(data_lib.resolve_data_path("sharegpt"), skip_bad=True,
                                        limit=4 * num_prompts)
        texts = [r["messages"][-1]["content"] for r in recs]
    except Exception:
        texts = [(f"Question {i}: explain the history of distillation in machine learning, "
                  f"in detail. ") * 40
                 for i in range(num_prompts)]
    texts = sorted(texts, key=len, reverse=True)[:num_prompts]
    prompts = []
    for t in texts:
        ids = data_lib.encode_prompt(tokenizer, [{"role": "user", "content": t * 8}])
        prompts.append(ids[-prompt_len:])
    return prompts


def time_call(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def memory_bandwidth(device, gib=1.0):
    """Bytes/s of a device-to-device copy (read + write), the decode roofline's denominator,
    measured in the same run as what it divides."""
    x = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    seconds = min(time_call(lambda: y.copy_(x), device) for _ in range(3))
    return 2 * x.numel() * 4 / seconds


def decode_bytes(model, prompt_len, lengths):
    """Bytes a decode must read at least: every step reads the weights once and the KV cache of the
    rows still going, up to the step's position (ideal: no padding, no finished rows). lengths:
    each sample's response length in tokens."""
    c = model.config
    kv_dim = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    total = 0
    for t in range(1, max(lengths)):               # token t is fed at step t (token 0: prefill)
        rows = sum(1 for n in lengths if n > t)
        total += weights + rows * (prompt_len + t) * c.num_hidden_layers * 2 * kv_dim * elem
    return total


def sampling_engines(model, prompts, pad, n, max_new_tokens, eos_ids, device, hf_static=False):
    """{engine: function returning [lengths]}: ours on each decode path, and HF generate with
    num_return_sequences=n (and its static-cache generate, which compiles the decode step on a
    GPU), all with the same settings."""
    ids, mask = sample.left_pad(prompts, pad, device)

    def ours(decode):
        return sample.generate(model, prompts, n=n, max_new_tokens=max_new_tokens,
                               temperature=0.8, top_p=1.0, eos_ids=eos_ids, pad_id=pad, seed=0,
                               decode=decode).response_mask.sum(1).tolist()
    engines = {d: functools.partial(ours, d)
               for d in ["static", "plain"] + (["compiled"] if device.type == "cuda" else [])}
    stop = list(eos_ids) or None

    def hf(**extra):
        @torch.no_grad()
        def run():
            # top_k=0 and no repetition penalty: HF's defaults (top_k 50) would make it do other
            # work and sample another distribution than ours
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=0.8, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                 max_new_tokens=max_new_tokens,
                                 min_new_tokens=0 if stop else max_new_tokens,
                                 num_return_sequences=n, pad_token_id=pad, eos_token_id=stop,
                                 **extra)[:, ids.shape[1]:]
            ended = torch.isin(out, torch.tensor(stop or [-1], device=out.device))
            # up to and including the first stop token, as ours counts
            first = torch.where(ended.any(1), ended.float().argmax(1) + 1, out.shape[1])
            return first.tolist()
        return run
    engines["hf"] = hf()
    if hf_static:
        engines["hf-static"] = hf(cache_implementation="static")
    return engines


def time_engines(engines, device, repeats):
    """Each engine's median seconds, and the tokens of its median run (HF draws from the global
    RNG, so with end-of-turn stops its runs differ in length: tokens/s is per run), warm-up first,
    runs interleaved so a noisy neighbour hits all alike. An engine that runs out of memory is
    reported as such."""
    runs, failed = {k: [] for k in engines}, {}
    for name, fn in engines.items():
        try:
            fn()
        except torch.OutOfMemoryError as e:
            failed[name] = f"out of memory ({str(e).splitlines()[0][:60]})"
            torch.cuda.empty_cache()
    for _ in range(repeats):
        for name, fn in engines.items():
            if name not in failed:
                out = []
                seconds = time_call(lambda: out.append(fn()), device)
                runs[name].append((sum(out[0]) / seconds, seconds, out[0]))
    res = {}
    for name in engines:
        if name in failed:
            res[name] = {"error": failed[name]}
            continue
        tok_s, seconds, lengths = sorted(runs[name])[len(runs[name]) // 2]
        res[name] = {"seconds": seconds, "tokens": sum(lengths), "lengths": lengths,
                     "tok_s": tok_s}
    return res


def sampling_bench(model, prompts, pad, n, max_new_tokens, eos_ids, device, repeats,
                   hf_static=False, bandwidth=None):
    """Tokens/s of every engine (generated tokens, end-of-turn tokens included, over the median
    time), each engine's speed against HF generate and ours on the plain path, and the static
    path's fraction of the decode's memory roofline (decode_bytes over the measured bandwidth)."""
    engines = sampling_engines(model, prompts, pad, n, max_new_tokens, eos_ids, device, hf_static)
    res = time_engines(engines, device, repeats)
    for name, r in res.items():
        for base in ("hf", "plain"):
            if "tok_s" in r and "tok_s" in res[base]:
                r[f"vs_{base}"] = r["tok_s"] / res[base]["tok_s"]
    if bandwidth:
        for name in ("static", "compiled"):
            if "seconds" in res.get(name, {}):
                ideal = decode_bytes(model, len(prompts[0]), res[name]["lengths"]) / bandwidth
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
        cols = [f"{r['tok_s']:.0f}"] + [f"{r[k]:.2f}x" if k in r else "-"
                                        for k in ("vs_hf", "vs_plain")]
        cols.append(f"{100 * r['roofline']:.0f}%" if "roofline" in r else "-")
        print(f"  {name:<10} {cols[0]:>9} {cols[1]:>7} {cols[2]:>9} {cols[3]:>9}", flush=True)


def bench_sample(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    bandwidth = memory_bandwidth(device)
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} n={args.n} "
          f"prompts={args.prompts} prompt_len={args.prompt_len} "
          f"max_new_tokens={args.max_new_tokens} stop={args.stop} repeats={args.repeats} "
          f"copy bandwidth={bandwidth / 1e9:.0f} GB/s")
    for name in args.models.split(","):
        model, tok = models.load(name, dtype=dtype, device=device)
        model.eval()
        prompts = bench_prompts(tok, args.prompts, args.prompt_len)
        # --stop none: every sample makes max_new_tokens (same work for every engine); eos: rows
        # end at their end-of-turn token, as in training (where finished rows cost the plain loop)
        eos = sample.stop_ids(tok, model) if args.stop == "eos" else []
        res = sampling_bench(model, prompts, tok.pad_token_id, args.n, args.max_new_tokens, eos,
                             device, args.repeats, hf_static=args.hf_static, bandwidth=bandwidth)
        print_sampling(name, res)


KD_LOSSES = {   # name -> (loss_fn, kwargs): DistiLLM's alpha 0.1 (arXiv 2402.03898),
                # GKD's beta 0.5 (arXiv 2306.13649)
    "skl": (losses.skl, {"alpha": 0.1}), "srkl": (losses.srkl, {"alpha": 0.1}),
    "jsd": (losses.jsd, {"beta": 0.5}),
    "forward_kl": (losses.forward_kl, {}), "reverse_kl": (losses.reverse_kl, {}),
}


def peak_memory_mb(device):
    """Peak since the process started: the resident set on CPU (ru_maxrss is in KiB on Linux),
    allocated on GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def losses_worker(args):
    """One variant of one loss in this (fresh) process: a process's peak memory cannot be reset, so
    each variant gets its own. Writes its figures and outputs to args.worker_out for the parent to
    compare."""
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)   # the same inputs in every variant's process
    V, H, Ht = args.vocab, args.hidden, args.teacher_hidden or args.hidden
    # Scaled so logits have std ~ 2, like a trained LM head's (unit-variance weights would give
    # std ~ 30).
    student_weight = (torch.randn(V, H, generator=g, device=device)
                      * 2 / H**0.5).requires_grad_(True)
    teacher_weight = torch.randn(V, Ht, generator=g, device=device) * 2 / Ht**0.5
    student_hidden = torch.randn(args.batch, args.seq, H, generator=g,
                                 device=device).requires_grad_(True)
    teacher_hidden = torch.randn(args.batch, args.seq, Ht, generator=g, device=device)
    loss_fn, kwargs = KD_LOSSES[args.loss]
    values_shape = torch.Size((args.batch, args.seq))
    inputs_mb = peak_memory_mb(device)

    def step():
        if args.worker == "naive":
            student_logits = F.linear(student_hidden, student_weight)                    # [B, T, V]
            with torch.no_grad():
                teacher_logits = F.linear(teacher_hidden, teacher_weight)                # [B, T, V]
            values = loss_fn(student_logits, teacher_logits, **kwargs)                  # [B, T]
            values.mean().backward()
        else:
            weights = torch.full(values_shape, 1.0 / values_shape.numel(),
                                 device=device)  # the same mean
            loss, values = losses.kd_loss_chunked(loss_fn, student_hidden, student_weight,
                                                  teacher_hidden, teacher_weight, weights,
                                                  chunk_size=args.chunk, **kwargs)
            loss.backward()
        return values.detach()

    times = []
    for _ in range(args.repeats):
        student_weight.grad = student_hidden.grad = None
        t0 = time.perf_counter()
        values = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # A fixed subset of the weight gradient's rows: the whole [V, H] is too big to pass between
    # processes.
    rows = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:4096].to(device)
    torch.save({"values": values.cpu(), "grad_hidden": student_hidden.grad.cpu(),
                "grad_weight_rows": student_weight.grad[rows].cpu()}, args.worker_out + ".pt")
    with open(args.worker_out, "w") as f:
        json.dump({"peak_mb": peak_memory_mb(device), "inputs_mb": inputs_mb,
                   "seconds": statistics.median(times)}, f)


def bench_losses(args):
    """Peak memory and time of forward + backward of each loss, naive (full [B, T, V] logits) vs
    chunked, each variant in a fresh subprocess (see losses_worker)."""
    if args.worker:
        return losses_worker(args)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
            res = {}
            for variant in ("naive", "chunked"):
                out = os.path.join(tmp, f"{name}_{variant}")
                cmd = [sys.executable, os.path.abspath(__file__), "losses", "--worker", variant,
                       "--worker-out", out, "--loss", name, "--vocab", str(args.vocab),
                       "--seq", str(args.seq), "--batch", str(args.batch),
                       "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden),
                       "--chunk", str(args.chunk), "--repeats", str(args.repeats),
                       "--device", args.device]
                # Blocks above 1 MB straight from mmap, so a freed block leaves the resident set at
                # once. By default glibc raises that threshold after the first big free (up to
                # 32 MB) and serves chunk-sized blocks from its heap, whose freed pages stay
                # resident: ru_maxrss would then count memory already freed.
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
                subprocess.run(cmd, check=True, env=env)
                with open(out) as f:
                    res[variant] = json.load(f)
                res[variant]["tensors"] = torch.load(out + ".pt")
            n, c = res["naive"], res["chunked"]
            diffs = [(n["tensors"][k] - c["tensors"][k]).abs().max().item()
                     for k in ("values", "grad_hidden", "grad_weight_rows")]
            for variant, r in res.items():
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


def synthetic_data(path, rows, prompt_len, response_len, seed=0):
    """Prompts and teacher responses of about the given lengths in tokens of the byte tokenizer (one
    per byte): random words, so that rows differ; what they say does not matter to a speed or memory
    benchmark."""
    rng = random.Random(seed)

    def text(n):
        words = []
        while sum(len(w) + 1 for w in words) < n:
            words.append(rng.choice(WORDS))
        return " ".join(words)[:n]
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"bench{i}", "prompt": text(prompt_len),
                                "response": text(response_len)}) + "\n")


def torchrun(script, args, log_path):
    """`torchrun --standalone --nproc_per_node=1 script args` (so NCCL and every collective run, as
    on a node), in a process of its own (its peak memory is its own), with any torchrun variables of
    ours removed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                        "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("TORCHELASTIC")}
    # the KV cache grows by a torch.cat a decode step: without expandable segments the freed
    # blocks fragment
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           script] + args
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        done = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {done.returncode}); its output is in {log_path}")


def phase_table(rows, phases, cuda):
    """Per phase: the median seconds over the steps that ran it (the first step is left out when
    there are more: it pays for allocator warm-up) and the largest peak memory; and the step as a
    whole."""
    later = rows[1:] if len(rows) > 1 else rows
    out = []
    for phase in phases + ["step"]:
        key = "s_per_step" if phase == "step" else f"t_{phase}"
        times = [r[key] for r in later if key in r]
        peaks = [r[f"mem_{phase}"] for r in rows if f"mem_{phase}" in r] if cuda else []
        if times:
            out.append((phase, statistics.median(times), max(peaks) if peaks else None))
    return out


def print_phases(title, table):
    print(f"\n{title}")
    print(f"  {'phase':<12} {'s/step':>8} {'peak GiB':>9}")
    for phase, seconds, peak in table:
        print(f"  {phase:<12} {seconds:>8.3f} {'-' if peak is None else f'{peak:.1f}':>9}")


def gad_step_memory(name, rows, prompt_len, new_tokens, micro_batch_tokens, adam8bit, chunk=128):
    """Predicted bytes of what a GAD step at `name` holds, from its config (arithmetic, nothing
    allocated): G and D with fp32 weights (4 B/param) and AdamW state (8 B/param; 8-bit: 2; the
    fused kernel makes no temporaries), the reference (linear weights bf16, embeddings fp32),
    autocast's bf16 copy of the weights in use, the KV cache of the rollout, the decode step's
    [rows, V] fp32 temporaries; while G updates, its fp32 gradients (freed after each step), the LM
    head's backward (a bf16 copy of the head and a bf16 product next to the fp32 gradient), the
    gradient all-reduce's copy of the largest gradient (the embeddings), the activations of one
    micro-batch of micro_batch_tokens tokens with checkpointing (each layer's fp32 input kept, one
    layer's activations recomputed at a time) and a few [chunk, V] fp32 logits. Returns (held
    throughout, while sampling, while updating G, activations without checkpointing)."""
    model = (models.random_qwen(name, device="meta") if name in models.RANDOM_QWEN
             else models.load_model(name))
    c, P = model.config, models.num_params(model)
    L, H, I, V = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    E = model.get_input_embeddings().weight.numel()
    kv_dim = c.num_key_value_heads * (H // c.num_attention_heads)
    opt = 2 if adam8bit else 8
    layer = 2 * (4 * H + 2 * kv_dim + 4 * I) + 4 * 3 * H        # bf16 matmul inputs/outputs,
                                                                 # fp32 residual and norms
    held = {"G: fp32 weights + optimizer state": (4 + opt) * P,
            "D: fp32 weights + optimizer state": (4 + opt) * P,
            "reference (bf16 linear, fp32 embeddings)":
                sum(p.numel() * p.element_size()
                    for p in models.frozen_copy(model, "bfloat16").parameters()),
            "autocast bf16 weight copy": 2 * P}
    sampling = {"KV cache": rows * (prompt_len + new_tokens) * L * 2 * kv_dim * 2,
                "decode logits, 4 fp32 [rows, V]": 4 * rows * V * 4}
    update = {"G gradients (fp32)": 4 * P, "LM head backward (bf16 head + product)": 4 * E,
              "all-reduce copy of the largest gradient": 4 * E,
              "activations, checkpointed": micro_batch_tokens * (L * H * 4 + layer),
              "LM head chunk, fp32 [chunk, V] x 4": 4 * chunk * V * 4}
    return held, sampling, update, micro_batch_tokens * L * layer


def print_memory_model(name, rows, prompt_len, new_tokens, micro_batch_tokens, measured=None):
    """The arithmetic of gad_step_memory next to the measured peaks
    {optimizer: (sampling GiB, update GiB)}."""
    parts = gad_step_memory(name, rows, prompt_len, new_tokens, micro_batch_tokens, False)
    unit, scale = ("GiB", 2**30) if sum(parts[0].values()) > 2**30 else ("MiB", 2**20)
    print(f"\nGAD step at {name}: {rows} rollout rows x ({prompt_len} prompt + {new_tokens} new) "
          f"tokens, micro-batches of {micro_batch_tokens} tokens; predicted {unit} "
          f"(measured: the largest peak of a phase)")
    for label, adam8bit in (("AdamW", False), ("8-bit AdamW", True)):
        held, sampling, update, no_ckpt = gad_step_memory(name, rows, prompt_len, new_tokens,
                                                          micro_batch_tokens, adam8bit)
        print(f"  {label}:")
        for part, value in list(held.items()) + list(sampling.items()) + list(update.items()):
            print(f"    {part:<42} {value / scale:>9.2f}")
        got = (measured or {}).get(label)
        for what, extra, i in (("sampling", sampling, 0), ("updating G", update, 1)):
            total = (sum(held.values()) + sum(extra.values())) / scale
            got_s = "-" if got is None or got[i] is None else f"{got[i] * 2**30 / scale:.2f}"
            print(f"    {'= peak while ' + what:<42} {total:>9.2f}   measured {got_s}")
        print(f"    {'(activations without checkpointing)':<42} {no_ckpt / scale:>9.2f}")


def gpu_runs(size, device, data):
    """[(script, arguments, --stop-after of the first run; the second resumes it)] of bench gpu.
    DistiLLM-2 trains all weights (--lora-r 0: its reference preset's LoRA needs peft, and full
    fine-tuning is the heavier step)."""
    common = ["--dtype", "bfloat16", "--device", device, "--data", data, "--max-prompt-len", "1024",
              "--eval-prompts", str(size["eval_prompts"]), "--save-every", "1"]
    return [
        ("gad.py", common + ["--student", size["student"], "--stage", "all", "--warmup-steps", "2",
                             "--gad-steps", "3",
                             "--freeze-g-steps", "0", "--prompts-per-step", str(size["prompts"]),
                             "--samples-per-prompt", str(size["n"]),
                             "--max-new-tokens", str(size["new_tokens"]),
                             "--max-response-len", str(size["new_tokens"]),
                             "--eval-max-new-tokens", "32"], 3),
        ("distillm2.py", common + ["--teacher", size["teacher"], "--student", size["student"],
                                   "--epochs", "2", "--limit", str(2 * size["prompts"] + 16),
                                   "--val-fraction", "0.2",
                                   "--prompts-per-step", str(size["prompts"]), "--lora-r", "0",
                                   "--max-new-tokens", str(size["new_tokens"]),
                                   "--max-len", str(1024 + size["new_tokens"]),
                                   "--gen-batch-size", str(size["prompts"])], 3),
        ("amm.py", common + ["--teacher", size["teacher"], "--student", size["student"],
                             "--epochs", "1", "--limit", str(3 * size["prompts"] // 2 + 16),
                             "--val-fraction", "0.2",
                             "--prompts-per-step", str(size["prompts"] // 2),
                             "--samples-per-prompt", "4",
                             "--max-new-tokens", str(size["new_tokens"]),
                             "--gen-batch-size", str(size["prompts"])], 2),
    ]


def gpu_sampling(size, device):
    """Sampling at the 1.5B shape (random weights: no row ends early, so every engine makes the
    same tokens): ours on each decode path against HF generate(num_return_sequences=n) and its
    static-cache generate, at each batch of size["sample_prompts"] prompts."""
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = models.load_model(size["big"], dtype=dtype, device=device).eval()
    bandwidth = memory_bandwidth(device)
    out = {"bandwidth": bandwidth}
    g = torch.Generator().manual_seed(0)
    for prompts in size["sample_prompts"]:
        ids = torch.randint(0, 256, (prompts, size["sample_prompt_len"]), generator=g).tolist()
        res = sampling_bench(model, ids, model.config.pad_token_id, size["sample_n"],
                             size["sample_new_tokens"], [], device, repeats=2,
                             hf_static=device.type == "cuda", bandwidth=bandwidth)
        print_sampling(f"\nsampling {size['big']}: {prompts} prompts x {size['sample_n']} "
                       f"samples, {size['sample_prompt_len']} prompt + "
                       f"{size['sample_new_tokens']} new tokens (copy bandwidth "
                       f"{bandwidth / 1e9:.0f} GB/s)", res)
        out[str(prompts)] = res
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # HF's compiled generate keeps the model in a reference cycle, and dynamo its graphs: free both
    # before the training benchmark builds a 1.5B model with its optimizer
    del model
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def bench_gpu(args):
    """A few steps of gad.py (warmup + GAD), distillm2.py and amm.py, each stopped once and resumed,
    then the peak memory of GAD steps at the 1.5B shape, all in bf16 with fp32 master weights under
    torchrun; then, in this process, sampling speed against HF generate (gpu_sampling) and the
    training steps' MFU (bench_train) at the 1.5B shape."""
    if args.predict_only:
        size = GPU_SIZES["qwen"]
        print_memory_model(size["big"], size["peak_prompts"] * size["peak_n"],
                           size["peak_prompt_len"], size["peak_new_tokens"], 12288)
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    size = GPU_SIZES[args.size or ("qwen" if cuda else "tiny")]
    work = args.out or tempfile.mkdtemp(prefix="bench-gpu-")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "runs.log")
    data = os.path.join(work, "data.jsonl")
    synthetic_data(data, 256, size["prompt_len"], size["new_tokens"])
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"bench gpu: device {gpu}, torch {torch.__version__}, "
          f"size {args.size or ('qwen' if cuda else 'tiny')}, "
          f"runs under torchrun --nproc_per_node=1 (logs: {log})", flush=True)
    runs = gpu_runs(size, device, data)
    results = {"device": gpu, "torch": torch.__version__, "trainers": {}, "gad_peak": {}}
    for script, run_args, stop in runs:
        out = os.path.join(work, script.replace(".py", ""))
        t0 = time.time()
        torchrun(script, run_args + ["--out", out, "--stop-after", str(stop)], log)
        torchrun(script, run_args + ["--out", out, "--resume"], log)
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        steps = [(r.get("stage"), r["step"]) for r in rows]
        assert len(set(steps)) == len(steps) and len(rows) > stop, f"{script}: resumed log {steps}"
        table = phase_table(rows, PHASES[script], cuda)
        results["trainers"][script] = {"phases": table, "steps": len(rows),
                                       "wall_s": time.time() - t0}
        print_phases(f"{script}: {len(rows)} steps, stopped after {stop} and resumed "
                     f"({time.time() - t0:.0f} s with model builds and evaluation)", table)
    if not args.skip_peak:
        rows = size["peak_prompts"] * size["peak_n"]
        peak_data = os.path.join(work, "peak.jsonl")
        synthetic_data(peak_data, 2 * size["peak_prompts"] + 16, size["peak_prompt_len"],
                       size["peak_new_tokens"])
        variants = [("AdamW", [])]
        if importlib.util.find_spec("bitsandbytes") is not None:
            variants.append(("8-bit AdamW", ["--adam8bit"]))
        else:
            print("\n8-bit AdamW: not measured (bitsandbytes is not installed)")
        for label, extra in variants:
            out = os.path.join(work, "gad_peak" + ("_8bit" if extra else ""))
            torchrun("gad.py", ["--student", size["big"], "--stage", "gad", "--gad-steps", "2",
                                "--dtype", "bfloat16", "--device", device, "--data", peak_data,
                                "--prompts-per-step", str(size["peak_prompts"]),
                                "--samples-per-prompt", str(size["peak_n"]),
                                "--max-new-tokens", str(size["peak_new_tokens"]),
                                "--max-response-len", str(size["peak_new_tokens"]),
                                "--max-prompt-len", "2048", "--eval-prompts", "0",
                                "--save-every", "100", "--out", out] + extra, log)
            step_rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
            table = phase_table(step_rows, PHASES["gad.py"], cuda)
            print_phases(f"GAD steps at {size['big']}, {label}: {size['peak_prompts']} prompts x "
                         f"{size['peak_n']} samples x {size['peak_new_tokens']} new tokens", table)
            last = step_rows[-1]  # the second step: both optimizers' state exists through all of it
            results["gad_peak"][label] = (last.get("mem_sampling"),
                                          max(last.get(f"mem_{p}", 0.0)
                                              for p in ("scoring", "d_update", "g_update")))
        print_memory_model(size["big"], rows, size["peak_prompt_len"], size["peak_new_tokens"],
                           12288 if cuda else 256, results["gad_peak"])
    results["sampling"] = gpu_sampling(size, torch.device(device))
    print()
    results["train"] = bench_train(argparse.Namespace(
        model=size["big"], teacher=size["big"], rows=size["train_rows"],
        seq_len=size["train_seq_len"], micro_batch_tokens=size["train_micro_batch_tokens"],
        dtype=None, repeats=3, device=device))
    with open(os.path.join(work, "bench_gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nresults: {os.path.join(work, 'bench_gpu.json')}")


def matmul_peak(device, dtype):
    """FLOP/s of a large matmul in `dtype`: the MFU denominator, measured in the same run (the
    spec sheet's number is not what a given GPU sustains)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    seconds = min(time_call(lambda: [a @ b for _ in range(10)], device) for _ in range(3))
    return 10 * 2 * n**3 / seconds


def synthetic_rollout(rows, prompt_len, response_len, vocab, device, seed=0):
    """rows x (prompt_len + response_len) random token ids, every position real (no padding):
    the tokens a training benchmark counts are all computed on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, prompt_len + response_len), generator=g)
    ones = torch.ones_like(ids)
    return sample.Rollout(ids[:, :prompt_len].to(device), ones[:, :prompt_len].to(device),
                          ids[:, prompt_len:].to(device), ones[:, prompt_len:].to(device))


def train_models(name, device, dtype):
    """A trainable model as the trainers build it: fp32 weights and (fused, on CUDA) AdamW,
    activation checkpointing, forward passes under `dtype` autocast."""
    import common
    model = models.load_model(name, device=device, seed=0)
    models.checkpoint_activations(model)
    model.train()
    opt = common.make_optimizer(model.parameters(), lr=1e-6, weight_decay=0.0)
    return model, opt, models.autocast(device, dtype)


def bench_train(args):
    """Tokens/s and MFU of the two training steps that dominate: GAD's PPO update (one optimizer
    step over rows of prompt + response tokens) and a DistiLLM-2 step (SKL on the teacher's
    responses + SRKL on the student's, the teacher frozen in bf16). Model FLOPs: 6 N per trained
    token (2 N forward, 4 N backward; activation checkpointing's recomputed forward is not counted,
    as MFU conventions do not), + 2 N_teacher per teacher token."""
    import common
    import distillm2   # its own step functions: the benchmark measures what the trainer runs
    import ppo
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    peak = matmul_peak(device, models.to_dtype(dtype))
    half = args.seq_len // 2
    print(f"device={torch.cuda.get_device_name() if cuda else 'cpu'} dtype={dtype} "
          f"rows={args.rows} x {args.seq_len} tokens ({half} prompt + {half} response), "
          f"micro-batches of {args.micro_batch_tokens} tokens; matmul peak {peak / 1e12:.3f} "
          f"TFLOP/s")
    results = {"peak_flops": peak}
    model, opt, amp = train_models(args.model, device, dtype)
    N, V = models.num_params(model), model.config.vocab_size
    ro = synthetic_rollout(args.rows, half, args.seq_len - half, V, device)
    adv = torch.randn(args.rows, device=device)

    def ppo_step():
        ppo.ppo_update(model, opt, ro, adv, None, micro_batch_tokens=args.micro_batch_tokens,
                       amp=amp)
    tokens = args.rows * args.seq_len
    rows = [("PPO update", ppo_step, 6 * N * tokens, tokens)]

    teacher = models.load_model(args.teacher or args.model, dtype=dtype, device=device, seed=1)
    teacher.eval().requires_grad_(False)
    student_ro = synthetic_rollout(args.rows, half, args.seq_len - half, V, device, seed=1)

    def distillm2_step():   # distillm2.accumulate's passes, without its bookkeeping
        for ro_, fn, kw in ((ro, losses.skl, {"alpha": 0.1}),
                            (student_ro, losses.srkl, {"alpha": 0.1, "stop_grad": True})):
            for _, part in ro_.micro_batches(args.rows, args.micro_batch_tokens // 2):
                weights = distillm2.token_weights(part, "sequence", 2 * args.rows, None)
                with amp:
                    loss, _ = distillm2.divergence(fn, model, teacher, part, weights, 128, **kw)
                loss.backward()
        common.clip_and_step(list(model.parameters()), opt, 1.0, sync=None)
    N_t = models.num_params(teacher)
    rows.append(("DistiLLM-2 step", distillm2_step, 2 * (6 * N + 2 * N_t) * tokens, 2 * tokens))
    # MFU against the matmul peak measured above, not the spec sheet's (not comparable to
    # published MFU); 6 N counts the LM head at prompt positions too, where it does not run
    # (~8% over at 1.5B), and leaves attention's own FLOPs out (~6% at 2K tokens)
    print(f"  {'step':<16} {'s/step':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU*':>6}")
    for label, fn, flops, n_tokens in rows:
        fn()                                                    # warm-up: allocator, kernels
        seconds = statistics.median(time_call(fn, device) for _ in range(args.repeats))
        results[label] = {"seconds": seconds, "tok_s": n_tokens / seconds,
                          "mfu": flops / seconds / peak}
        print(f"  {label:<16} {seconds:>8.3f} {n_tokens / seconds:>9.0f} "
              f"{flops / seconds / 1e12:>8.3f} {100 * flops / seconds / peak:>5.1f}%", flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample",
                       help="tokens/s of sample.generate vs HF generate(num_return_sequences=n)")
    s.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated model names")
    s.add_argument("--n", type=int, default=8, help="samples per prompt")
    s.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    s.add_argument("--prompt-len", type=int, default=256,
                   help="prompt tokens (ShareGPT prompts cut to this)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per sample")
    s.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median reported)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--stop", choices=["none", "eos"], default="none",
                   help="none: every sample makes --max-new-tokens; eos: samples end at their "
                        "end-of-turn token")
    s.add_argument("--hf-static", action="store_true",
                   help="also HF generate(cache_implementation='static')")
    k = sub.add_parser("losses",
                       help="peak memory and time of the full-vocab KD losses, naive vs chunked")
    k.add_argument("--vocab", type=int, default=151936,
                   help="vocabulary size (Qwen2.5 student: 151936)")
    k.add_argument("--seq", type=int, default=1024,
                   help="positions per sequence (DistiLLM-2 max length 1024)")
    k.add_argument("--batch", type=int, default=1, help="sequences")
    k.add_argument("--hidden", type=int, default=896,
                   help="student hidden size (Qwen2.5-0.5B: 896)")
    k.add_argument("--teacher-hidden", type=int, default=0,
                   help="teacher hidden size (0: same as --hidden)")
    k.add_argument("--chunk", type=int, default=128, help="positions per chunk of the chunked path")
    k.add_argument("--losses", default="skl,srkl",
                   help=f"comma-separated, from {','.join(KD_LOSSES)}")
    k.add_argument("--repeats", type=int, default=1,
                   help="timed forward+backward per variant (median reported)")
    k.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    k.add_argument("--worker", choices=["naive", "chunked"], default=None, help=argparse.SUPPRESS)
    k.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    k.add_argument("--loss", default=None, help=argparse.SUPPRESS)
    tr = sub.add_parser("train", help="tokens/s and MFU of the PPO update and a DistiLLM-2 step")
    tr.add_argument("--model", default="tiny", help="student (random-qwen2.5-1.5b on a GPU)")
    tr.add_argument("--teacher", default=None, help="DistiLLM-2's teacher (default: --model)")
    tr.add_argument("--rows", type=int, default=4, help="sequences per optimizer step")
    tr.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (half prompt)")
    tr.add_argument("--micro-batch-tokens", type=int, default=128,
                    help="padded tokens per forward/backward (the trainers' 12288 on a GPU)")
    tr.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    tr.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    import quality
    quality.add_arguments(sub.add_parser(
        "quality", help="every distillation method on one teacher / student pair, one table"))
    gp = sub.add_parser("gpu", help="the three trainers under torchrun in bf16: s/step and peak "
                                    "memory per phase")
    gp.add_argument("--device", default=None, help="cuda or cpu (cpu: the tiny size, for tests)")
    gp.add_argument("--size", choices=list(GPU_SIZES), default=None,
                    help="default: qwen on cuda, tiny on cpu")
    gp.add_argument("--out", default=None, help="working folder (default: a new temporary one)")
    gp.add_argument("--skip-peak", action="store_true", help="leave out the GAD peak-memory runs")
    gp.add_argument("--predict-only", action="store_true",
                    help="print the memory arithmetic at 1.5B and stop")
    args = p.parse_args()
    if args.cmd == "quality":
        import quality
        sys.exit(quality.main(args))
    {"sample": bench_sample, "losses": bench_losses, "train": bench_train,
     "gpu": bench_gpu}[args.cmd](args)


if __name__ == "__main__":
    main()
