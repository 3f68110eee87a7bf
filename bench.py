"""Performance benchmarks. Compare as ratios measured in one run (shared machines are noisy); absolute times
only mean something on a GPU.

    python bench.py sample                      # sample.generate vs HF generate(num_return_sequences=n)
    python bench.py sample --models tiny --n 8 --prompt-len 256 --max-new-tokens 64
"""

import argparse
import statistics
import time

import torch

import data as data_lib
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
        del model


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
    args = p.parse_args()
    {"sample": bench_sample}[args.cmd](args)


if __name__ == "__main__":
    main()
