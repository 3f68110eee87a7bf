"""Performance benchmarks. Compare as ratios measured in one run (shared machines are noisy); absolute times
only mean something on a GPU.

    python bench.py sample                      # sample.generate vs HF generate(num_return_sequences=n)
    python bench.py sample --models tiny --n 8 --prompt-len 256 --max-new-tokens 64
    python bench.py losses                      # full-vocab KD losses: naive logits vs losses.kd_loss_chunked
    python bench.py losses --vocab 151936 --seq 1024 --batch 1 --hidden 896 --chunk 128 --losses skl,srkl
"""

import argparse
import json
import os
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
    """Real ShareGPT prompts when the package is installed (else fixed text), cut to exactly prompt_len tokens
    so both engines see the same work."""
    try:
        recs, _ = data_lib.read_records(data_lib.resolve_data_path("sharegpt"), skip_bad=True, limit=4 * num_prompts)
        texts = [r["messages"][-1]["content"] for r in recs]
    except Exception:
        texts = [f"Question {i}: explain the history of distillation in machine learning, in detail. " * 40
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


def bench_sample(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} n={args.n} prompts={args.prompts} "
          f"prompt_len={args.prompt_len} max_new_tokens={args.max_new_tokens} repeats={args.repeats}")
    print(f"{'model':<14} {'ours tok/s':>11} {'ours+logp tok/s':>16} {'HF tok/s':>10} {'ratio':>7} {'ratio+logp':>11}")
    for name in args.models.split(","):
        model, tok = models.load(name, dtype=dtype, device=device)
        model.eval()
        prompts = bench_prompts(tok, args.prompts, args.prompt_len)
        pad = tok.pad_token_id
        ids, mask = sample.left_pad(prompts, pad, device)
        # No end-of-turn stop on either side: both produce exactly max_new_tokens per sample (the same work).
        common = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=1.0, eos_ids=[],
                      pad_id=pad, seed=0)

        def ours():
            sample.generate(model, prompts, return_logprobs=False, **common)

        def ours_logp():
            sample.generate(model, prompts, return_logprobs=True, **common)

        @torch.no_grad()
        def hf():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=1.0,
                           max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                           num_return_sequences=args.n, pad_token_id=pad)

        for fn in (ours, hf):  # warm-up: allocator, kernels, lazy imports
            fn()
        times = {"ours": [], "ours_logp": [], "hf": []}
        for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits all three alike
            times["ours"].append(time_call(ours, device))
            times["ours_logp"].append(time_call(ours_logp, device))
            times["hf"].append(time_call(hf, device))
        tokens = len(prompts) * args.n * args.max_new_tokens
        tps = {k: tokens / statistics.median(v) for k, v in times.items()}
        print(f"{name:<14} {tps['ours']:>11.0f} {tps['ours_logp']:>16.0f} {tps['hf']:>10.0f} "
              f"{tps['ours'] / tps['hf']:>6.2f}x {tps['ours_logp'] / tps['hf']:>10.2f}x", flush=True)


KD_LOSSES = {   # name -> (loss_fn, kwargs): DistiLLM's alpha 0.1 (arXiv 2402.03898), GKD's beta 0.5 (arXiv 2306.13649)
    "skl": (losses.skl, {"alpha": 0.1}), "srkl": (losses.srkl, {"alpha": 0.1}), "jsd": (losses.jsd, {"beta": 0.5}),
    "forward_kl": (losses.forward_kl, {}), "reverse_kl": (losses.reverse_kl, {}),
}


def peak_memory_mb(device):
    """Peak since the process started: the resident set on CPU (ru_maxrss is in KiB on Linux), allocated on GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def losses_worker(args):
    """One variant of one loss in this (fresh) process: a process's peak memory cannot be reset, so each variant
    gets its own. Writes its figures and outputs to args.worker_out for the parent to compare."""
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)   # the same inputs in every variant's process
    V, H, Ht = args.vocab, args.hidden, args.teacher_hidden or args.hidden
    # Scaled so logits have std ~ 2, like a trained LM head's (unit-variance weights would give std ~ 30).
    student_weight = (torch.randn(V, H, generator=g, device=device) * 2 / H**0.5).requires_grad_(True)
    teacher_weight = torch.randn(V, Ht, generator=g, device=device) * 2 / Ht**0.5
    student_hidden = torch.randn(args.batch, args.seq, H, generator=g, device=device).requires_grad_(True)
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
            weights = torch.full(values_shape, 1.0 / values_shape.numel(), device=device)  # the same mean
            loss, values = losses.kd_loss_chunked(loss_fn, student_hidden, student_weight, teacher_hidden,
                                                  teacher_weight, weights, chunk_size=args.chunk, **kwargs)
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
    # A fixed subset of the weight gradient's rows: the whole [V, H] is too big to pass between processes.
    rows = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:4096].to(device)
    torch.save({"values": values.cpu(), "grad_hidden": student_hidden.grad.cpu(),
                "grad_weight_rows": student_weight.grad[rows].cpu()}, args.worker_out + ".pt")
    with open(args.worker_out, "w") as f:
        json.dump({"peak_mb": peak_memory_mb(device), "inputs_mb": inputs_mb, "seconds": statistics.median(times)}, f)


def bench_losses(args):
    """Peak memory and time of forward + backward of each loss, naive (full [B, T, V] logits) vs chunked,
    each variant in a fresh subprocess (see losses_worker)."""
    if args.worker:
        return losses_worker(args)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    unit = "allocated" if args.device == "cuda" else "RSS"
    print(f"device={args.device} threads={torch.get_num_threads()} vocab={args.vocab} seq={args.seq} "
          f"batch={args.batch} hidden={args.hidden} teacher_hidden={args.teacher_hidden or args.hidden} "
          f"chunk={args.chunk} fp32 repeats={args.repeats}; one fp32 [B, T, V] tensor = "
          f"{args.batch * args.seq * args.vocab * 4 / 2**20:.0f} MB; memory is peak {unit}, "
          f"'above inputs' excludes the interpreter, the heads and the hidden states")
    print(f"{'loss':<11} {'variant':<8} {'peak MB':>8} {'above inputs MB':>16} {'seconds':>8} {'peak ratio':>10} "
          f"{'above ratio':>11} {'time ratio':>11} {'max|d values|':>14} {'max|d grad h|':>14} {'max|d grad W|':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.losses.split(","):
            res = {}
            for variant in ("naive", "chunked"):
                out = os.path.join(tmp, f"{name}_{variant}")
                cmd = [sys.executable, os.path.abspath(__file__), "losses", "--worker", variant, "--worker-out", out,
                       "--loss", name, "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch),
                       "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden),
                       "--chunk", str(args.chunk), "--repeats", str(args.repeats), "--device", args.device]
                # Blocks above 1 MB straight from mmap, so a freed block leaves the resident set at once. By default
                # glibc raises that threshold after the first big free (up to 32 MB) and serves chunk-sized blocks
                # from its heap, whose freed pages stay resident: ru_maxrss would then count memory already freed.
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
                line = f"{name:<11} {variant:<8} {r['peak_mb']:>8.0f} {above:>16.0f} {r['seconds']:>8.2f}"
                if variant == "chunked":
                    above_ratio = (n["peak_mb"] - n["inputs_mb"]) / max(above, 1.0)
                    line += (f" {n['peak_mb'] / r['peak_mb']:>9.1f}x {above_ratio:>10.1f}x "
                             f"{n['seconds'] / r['seconds']:>10.2f}x "
                             f"{diffs[0]:>14.2e} {diffs[1]:>14.2e} {diffs[2]:>14.2e}")
                print(line, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="tokens/s of sample.generate vs HF generate(num_return_sequences=n)")
    s.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated model names")
    s.add_argument("--n", type=int, default=8, help="samples per prompt")
    s.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    s.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (ShareGPT prompts cut to this)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per sample")
    s.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median reported)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    k = sub.add_parser("losses", help="peak memory and time of the full-vocab KD losses, naive vs chunked")
    k.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen2.5 student: 151936)")
    k.add_argument("--seq", type=int, default=1024, help="positions per sequence (DistiLLM-2 max length 1024)")
    k.add_argument("--batch", type=int, default=1, help="sequences")
    k.add_argument("--hidden", type=int, default=896, help="student hidden size (Qwen2.5-0.5B: 896)")
    k.add_argument("--teacher-hidden", type=int, default=0, help="teacher hidden size (0: same as --hidden)")
    k.add_argument("--chunk", type=int, default=128, help="positions per chunk of the chunked path")
    k.add_argument("--losses", default="skl,srkl", help=f"comma-separated, from {','.join(KD_LOSSES)}")
    k.add_argument("--repeats", type=int, default=1, help="timed forward+backward per variant (median reported)")
    k.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    k.add_argument("--worker", choices=["naive", "chunked"], default=None, help=argparse.SUPPRESS)
    k.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    k.add_argument("--loss", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    {"sample": bench_sample, "losses": bench_losses}[args.cmd](args)


if __name__ == "__main__":
    main()
