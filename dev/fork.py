"""Does GAD's adversarial phase help? The fork study: one shared warmup per seed (SFT on the
teacher's text with D trained beside it, GAD's warmup), then K more student updates of three
branches from that checkpoint, on the same prompts: (a) SFT continued (SeqKD), (b) GAD, (c) SODA
(arXiv 2604.03873: DPO, the teacher's response over the raw student's, sampled once). Every final
student is scored on held-out prompts, and each claim gets a paired bootstrap interval over seeds
and prompts.

    python dev/bench.py fork --budget tiny --out runs/fork-tiny   # the tiny random pair: ~2 min
    python dev/bench.py fork --budget cpu --out runs/fork-cpu     # SmolLM2-135M -> its 24-layer cut

Confounds removed against dev/quality.py's budgets: the teacher's text is sampled at the student's
rollout temperature, every SFT is on logits / T (gad.py), the prompts kept are those whose teacher
response ends within the length limit (so "ended" is not a student-only feature), and the RL and
DPO rate is a fifth of the SFT rate (the reference's 1e-6 : 5e-6). A killed study continues where
it stopped. OUT gets fork.json, fork.md and fork.png.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common
import data as data_lib
import discriminator
import eval as eval_lib
import fast_losses
import files
import models
import sample
import teacher as teacher_lib
from dev import quality

BUDGETS = {
    # the tiny random pair: the pipeline check the tests run (its D threshold is a check of the
    # gate, not of D: random models differ in everything)
    "tiny": dict(
        teacher="tiny-teacher", student="tiny", student_layers=None, data="tiny", dtype="float32",
        temperature=0.8, max_new_tokens=16, max_prompt_len=64, drop_cut=False,
        test_prompts=16, dev_prompts=8, train_prompts=32, seeds=2, threads=1, gen_batch=32,
        prompts_per_step=4, samples_per_prompt=4, warmup_steps=6, max_warmup_steps=12,
        freeze_g_steps=2, fork_steps=4, sft_lr=3e-3, rl_lr=6e-4, d_lr=1e-3, soda_beta=0.1,
        d_threshold=0.6, grad_clip=1.0, micro_batch_size=32, save_every=4),
    # SmolLM2-135M-Instruct teaching its 24-layer cut (the CPU defaults' pair), ShareGPT prompts
    # of at most 64 tokens whose teacher response ends within 96 tokens at T = 0.8 (32% do). D's
    # gate: 0.8 was missed (seed 0: 0.750 after 24 warmup steps, 0.781 = 50 of 64 after 48), so
    # 0.75: far above chance (binomial p < 1e-5), short of what the paper's D reaches. One seed:
    # a seed takes ~70 min here (its 48 warmup steps ~25); the intervals are over prompts only
    "cpu": dict(
        teacher="smollm2-135m", student="smollm2-135m", student_layers="0-11,18-29",
        data="sharegpt", dtype="float32", temperature=0.8, max_new_tokens=96, max_prompt_len=64,
        drop_cut=True, test_prompts=128, dev_prompts=64, train_prompts=96, seeds=1,
        threads=None, gen_batch=64, prompts_per_step=4, samples_per_prompt=4, warmup_steps=24,
        max_warmup_steps=48, freeze_g_steps=4, fork_steps=24, sft_lr=2e-5, rl_lr=4e-6,
        d_lr=1e-4, soda_beta=0.1, d_threshold=0.75, grad_clip=1.0, micro_batch_size=8,
        save_every=8),
    # a budget that can answer, for one GPU (needs the models; not run here): Qwen2.5-1.5B
    # teaching 0.5B, 256 prompts x 8 samples of up to 1024 tokens a step, a warmup of one epoch
    # over 8192 prompts, 500 steps a branch (SeqKD's: 15.6 epochs, as GAD's), 500 test prompts
    # (the judge's, with --judge on quality.py's scorer); d_lr to be tuned on D's held-out
    # accuracy. `python dev/bench.py fork --budget gpu --predict-only`: its hours on one H100
    "gpu": dict(
        teacher="qwen2.5-1.5b", student="qwen2.5-0.5b", student_layers=None, data="sharegpt",
        dtype="bfloat16", temperature=0.8, max_new_tokens=1024, max_prompt_len=512,
        drop_cut=True, test_prompts=500, dev_prompts=256, train_prompts=8192, seeds=3,
        threads=None, gen_batch=64, prompts_per_step=256, samples_per_prompt=8, warmup_steps=32,
        max_warmup_steps=64, freeze_g_steps=10, fork_steps=500, sft_lr=5e-6, rl_lr=1e-6,
        d_lr=1e-6, soda_beta=0.1, d_threshold=0.8, grad_clip=0.2, micro_batch_size=8,
        save_every=50, gradient_checkpointing=True, micro_batch_tokens=12288),
}
BRANCHES = {"seqkd": "SeqKD (SFT continued)", "gad": "GAD", "soda": "SODA"}
ROWS = {"student": "student (before)", "warmup": "fork point (warmup)", **BRANCHES,
        "teacher": "teacher (a second sample)"}
# (better, other): the claims, each judged on every metric of METRICS
CLAIMS = [("gad", "seqkd"), ("soda", "gad"), ("soda", "seqkd")]
# metric -> (label, lower is better); each a per-prompt (sum, count) so a bootstrap resamples
# prompts: a token mean (NLL, entropy) or a plain mean (count 1)
METRICS = {"nll_sampled": ("teacher NLL, sampled", True),
           "nll_greedy": ("teacher NLL, greedy", True),
           "c2st": ("fresh-D accuracy", True),
           "entropy": ("student entropy", None),
           "length": ("length, sampled", None),
           "ended": ("ends turn, sampled", None)}


def add_arguments(p):
    p.add_argument("--budget", default="cpu", choices=list(BUDGETS))
    p.add_argument("--out", default=None, help="output folder (default: runs/fork-BUDGET)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default: the budget's)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--lr-sweep", action="store_true",
                   help="first run each branch from the first seed's warmup at --sweep-factors "
                        "times its rate, scored on the dev prompts; the study then uses the best")
    p.add_argument("--sweep-factors", default="0.3,1,3", help="learning-rate factors of the sweep")
    p.add_argument("--predict-only", action="store_true",
                   help="print the budget's predicted hours on one H100 and stop")
    return p


# --------------------------------------------------------------------------------------------------
# the hours a budget should take on one GPU: arithmetic, not a measurement

# decode_step: the launch overhead of a decode step (a generate() call is --gen-batch-tokens, 1M
# KV-cache tokens at most); an assumption until `bench.py gpu` measures it
H100 = dict(name="H100 SXM", flops=989e12, bandwidth=3.35e12, mfu=0.4, bandwidth_share=0.6,
            decode_step=0.01, call_tokens=1_000_000)


def gpu_hours(b, hw=H100):
    """Predicted seconds of each phase of one seed (and of the shared teacher sampling and scoring)
    on one GPU: matmul FLOPs by common.Compute's rule (2 N a token forward, 6 N trained) at hw's
    MFU; a decode step at the larger of its FLOPs and reading the bf16 weights and KV cache at
    hw's share of the bandwidth, plus a fixed overhead a decode step of each generate() call.
    Every response counted at the length limit (an upper bound)."""
    from dev import bench
    s, t = bench.arch(b["student"]), bench.arch(b["teacher"])
    P, n, L, Lp = (b["prompts_per_step"], b["samples_per_prompt"], b["max_new_tokens"],
                   b["max_prompt_len"])
    rate = hw["flops"] * hw["mfu"]
    fwd = lambda a, rows: 2 * a.params * rows * (Lp + L) / rate
    # forward + backward: 3 forwards; 4 with activation checkpointing (the forward again)
    train = lambda a, rows: (4 if b.get("gradient_checkpointing") else 3) * fwd(a, rows)

    def gen(a, rows):   # the prefill, then L decode steps over every row (KV: bf16 keys, values)
        kv = rows * 2 * a.layers * a.kv_dim * 2 * (L * Lp + L * L / 2)
        read = (L * 2 * a.params + kv) / (hw["bandwidth"] * hw["bandwidth_share"])
        calls = math.ceil(rows * (Lp + L) / hw["call_tokens"])
        return (2 * a.params * rows * Lp / rate + max(read, 2 * a.params * rows * L / rate)
                + calls * L * hw["decode_step"])

    test = b["test_prompts"]   # scoring a model: greedy and sampled, the teacher's passes, entropy
    score = 2 * gen(s, test) + 2 * fwd(t, test) + fwd(s, test)
    steps = {   # (seconds a step, steps) of each phase of one seed
        "warmup": (gen(s, P * n) + train(s, P * n + P) + train(s, P), b["warmup_steps"]),
        "seqkd": (train(s, P), b["fork_steps"]),
        "gad": (gen(s, P * n) + 2 * fwd(s, P * n) + train(s, P * n + P) + train(s, P * n),
                b["fork_steps"]),
        "soda rejected": (gen(s, b["train_prompts"]), 1),   # sampled once, at the stage's start
        "soda": (2 * fwd(s, 2 * P) + train(s, 2 * P), b["fork_steps"]),
        "scoring": (score, 4)}
    need = b["train_prompts"] + b["dev_prompts"] + b["test_prompts"]
    teacher_score = 2 * gen(t, test) + 3 * fwd(t, test)
    once = {"teacher sampling": gen(t, need),
            "scoring the student and teacher": score + teacher_score}
    return steps, once


def print_hours(b, hw=H100):
    steps, once = gpu_hours(b, hw)
    seed = sum(sec * k for sec, k in steps.values())
    print(f"predicted on one {hw['name']} ({hw['mfu']:.0%} MFU, {hw['bandwidth_share']:.0%} of "
          f"its bandwidth when decoding, {hw['decode_step'] * 1e3:.0f} ms a decode step), "
          "responses at the length limit:")
    for phase, (sec, k) in steps.items():
        print(f"  {phase:<13} {sec:8.1f} s a step x {k:4d} = {sec * k / 3600:6.2f} h")
    for phase, sec in once.items():
        print(f"  {phase}: {sec / 3600:.2f} h (once)")
    total = seed * b["seeds"] + sum(once.values())
    print(f"  one seed {seed / 3600:.1f} h; {b['seeds']} seeds and the shared work "
          f"{total / 3600:.1f} h")
    return total


# --------------------------------------------------------------------------------------------------
# data: the teacher sampled once at the rollout temperature, prompts kept where its response ends

def prepare_data(b, out, tok, seed, device):
    """(test, dev, train) records with a teacher response each, split by a hash of the id."""
    need = b["test_prompts"] + b["dev_prompts"] + b["train_prompts"]
    pool = quality.candidate_prompts(b, tok, need)
    path, take = os.path.join(out, "teacher.jsonl"), need + need // 4 + 4
    while True:
        cfg = teacher_lib.settings(model=b["teacher"], out=path, max_new_tokens=b["max_new_tokens"],
                                   temperature=b["temperature"], top_p=1.0, seed=seed,
                                   max_prompt_len=b["max_prompt_len"], batch_size=b["gen_batch"],
                                   dtype=b["dtype"], device=device)
        stats = teacher_lib.sample_records(pool[:take], cfg)
        if stats["failed"] or stats["too_long"]:
            raise RuntimeError(f"sampling the teacher into {path}: {dict(stats)}")
        done = {r["id"]: r["teacher_response"] for r in data_lib.read_records(path)[0]}
        ready = [dict(r, teacher_response=done[r["id"]]) for r in pool[:take] if done.get(r["id"])
                 and not (b["drop_cut"] and data_lib.encode_response(
                     tok, done[r["id"]], b["max_new_tokens"])[1])]
        if len(ready) >= need or take >= len(pool):
            break
        take = min(len(pool), take + 2 * (need - len(ready)) + 4)
    if len(ready) < need:
        raise RuntimeError(f"{len(ready)} of {take} prompts have a teacher response that ends; "
                           f"the budget needs {need}")
    t, d = b["test_prompts"], b["dev_prompts"]
    return ready[:t], ready[t:t + d], ready[t + d:need], {"sampled": take, "kept": len(ready)}


# --------------------------------------------------------------------------------------------------
# the runs: gad.py as a process, resumed from its checkpoint when killed

def gad_command(b, stage, run_dir, seed, lr, data_path, rows, device, init_from=None, steps=None):
    P, T = b["prompts_per_step"], b["max_new_tokens"]
    a = ["gad.py", "--stage", stage, "--student", b["student_path"], "--dtype", b["dtype"],
         "--data", data_path, "--limit", str(rows), "--teacher-responses", "data",
         "--val-fraction", "0", "--eval-prompts", "0", "--max-prompt-len", str(b["max_prompt_len"]),
         "--max-response-len", str(T), "--max-new-tokens", str(T), "--prompts-per-step", str(P),
         "--samples-per-prompt", str(b["samples_per_prompt"]), "--temperature",
         repr(b["temperature"]), "--top-p", "1.0", "--lr", repr(lr), "--seqkd-lr", repr(lr),
         "--d-lr", repr(b["d_lr"]), "--grad-clip", repr(b["grad_clip"]), "--soda-beta",
         repr(b["soda_beta"]), "--freeze-g-steps", str(b["freeze_g_steps"]), "--micro-batch-size",
         str(b["micro_batch_size"]), "--seed", str(seed), "--out", run_dir, "--save-every",
         str(b["save_every"]), "--gradient-checkpointing" if b.get("gradient_checkpointing")
         else "--no-gradient-checkpointing"]
    tokens = b.get("micro_batch_tokens")
    a += ["--micro-batch-tokens", str(tokens)] if tokens else []
    # the cut: the warmup's student's, and SODA's raw student whose samples it rejects (a branch's
    # G is --init-from's, already cut)
    a += ["--student-layers", b["student_layers"]] if b["student_layers"] else []
    a += ["--init-from", init_from] if init_from else []
    a += ["--device", device] if device else []
    if stage == "seqkd":   # SeqKD's length is in epochs only: ceil(epochs * N / P) = steps
        a += ["--seqkd-epochs", repr((steps * P - 0.5) / rows)]
    else:
        a += [f"--{stage}-steps", str(steps)]
    return a


def run(cmd, run_dir):
    """gad.py until its student is exported: fresh, or resumed from its ckpt.pt."""
    if os.path.exists(os.path.join(run_dir, "student", "config.json")):
        return
    resume = os.path.exists(os.path.join(run_dir, "ckpt.pt"))
    if not resume:   # killed before its first checkpoint: nothing of it is kept (metrics.jsonl)
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
    progress = quality.read_json(os.path.join(run_dir, "progress.json")) or {"train_s": 0.0}
    quality.run_trainer(cmd + (["--resume"] if resume else []), run_dir, progress)


def disc_accuracy(b, run_dir, tok, dev, device, seed):
    """D's held-out accuracy at the fork: each dev prompt's teacher response against one sample of
    the warmup's student (temperature T), the pairs D was trained on."""
    D = eval_lib.load_discriminator(os.path.join(run_dir, "discriminator"), "float32", device)
    G = models.load_model(os.path.join(run_dir, "student"), dtype=b["dtype"], device=device)
    m = eval_lib.evaluate(G, tok, dev, score_fn=lambda *x: discriminator.score(D, *x),
                          max_new_tokens=b["max_new_tokens"],
                          temperature=b["temperature"], batch_size=b["gen_batch"], seed=seed + 7,
                          max_prompt_len=b["max_prompt_len"], max_response_len=b["max_new_tokens"])
    return m["disc_acc"]


def warmup(setup, seed):
    """The shared warmup of one seed, extended by --warmup-steps at a time until D's held-out
    accuracy reaches the budget's threshold (or max_warmup_steps) -> (run dir, steps, accuracy)."""
    b, out = setup["b"], setup["out"]
    run_dir = os.path.join(out, "runs", f"warmup_s{seed}")
    state = quality.read_json(os.path.join(run_dir, "fork.json")) or {}
    steps = state.get("steps", b["warmup_steps"])
    while True:
        cmd = gad_command(b, "warmup", run_dir, seed, b["sft_lr"], setup["data"], setup["rows"],
                          setup["device"], steps=steps)
        run(cmd, run_dir)
        if "accuracy" not in state or state["steps"] != steps:
            state = {"steps": steps, "accuracy": disc_accuracy(b, run_dir, setup["tok"],
                                                               setup["dev"], setup["device"], seed)}
            files.atomic_write_text(os.path.join(run_dir, "fork.json"), json.dumps(state))
        print(f"fork: seed {seed}: warmup {steps} steps, D's held-out accuracy "
              f"{state['accuracy']:.3f} (threshold {b['d_threshold']})", flush=True)
        if state["accuracy"] >= b["d_threshold"] or steps >= b["max_warmup_steps"]:
            return run_dir, steps, state["accuracy"]
        steps = min(b["max_warmup_steps"], steps + b["warmup_steps"])
        os.remove(os.path.join(run_dir, "student", "config.json"))   # train on: --resume


# --------------------------------------------------------------------------------------------------
# scoring: per prompt, so that a bootstrap can resample prompts

class Scorer:
    """Each model's samples on the test prompts, greedy and at T, measured prompt by prompt; the
    teacher's hidden states of the samples feed a fresh two-sample test against its own text."""

    def __init__(self, b, tok, teacher, records, device):
        self.b, self.tok, self.teacher, self.device = b, tok, teacher, device
        self.prompts = [data_lib.encode_prompt(tok, r["messages"]) for r in records]
        self.refs = [data_lib.encode_response(tok, r["teacher_response"], b["max_new_tokens"])[0]
                     for r in records]
        self.eos = sample.stop_ids(tok, teacher)
        self.ref_features = self.teacher_view(self.refs)[1]

    @torch.no_grad()
    def teacher_view(self, responses):
        """(per-row (NLL sum, tokens), [N, H] mean of the teacher's final hidden states over each
        response: the features of the two-sample test)."""
        sums, feats, n = [], [], self.b["gen_batch"]
        for i in range(0, len(responses), n):
            ro = sample.pack(self.prompts[i:i + n], responses[i:i + n], 0, self.device)
            h, head = sample.response_hidden(self.teacher, ro)                     # [B, T, H]
            mask = ro.response_mask.bool()
            lp = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
            lp[mask] = fast_losses.token_logprobs(h[mask], head, ro.response_ids[mask]).double()
            sums += [(-s, c) for s, c in zip(lp.sum(-1).tolist(), mask.sum(-1).tolist())]
            w = mask.unsqueeze(-1).float()
            feats.append(((h.float() * w).sum(1) / w.sum(1).clamp(min=1)).double().cpu())
        return sums, torch.cat(feats)

    @torch.no_grad()
    def entropy(self, model, responses):
        """Per-row (summed entropy of the model's next-token distribution at T = 1, tokens)."""
        out, n = [], self.b["gen_batch"]
        for i in range(0, len(responses), n):
            ro = sample.pack(self.prompts[i:i + n], responses[i:i + n], 0, self.device)
            _, ent = sample.sequence_logprobs(model, ro, 1.0, return_entropy=True)
            out += list(zip(ent.double().sum(-1).tolist(), ro.response_mask.sum(-1).tolist()))
        return out

    def generate(self, model, temperature, seed):
        out, n = [], self.b["gen_batch"]
        for i in range(0, len(self.prompts), n):
            batch = self.prompts[i:i + n]
            ro = sample.generate(model, batch, prompt_keys=range(i, i + len(batch)),
                                 max_new_tokens=self.b["max_new_tokens"], temperature=temperature,
                                 eos_ids=self.eos, pad_id=0, seed=seed)
            out += ro.responses()
        return out

    def __call__(self, model, sample_seed):
        """{metric: [(sum, count)] a prompt} and the sampled texts of one model."""
        t0 = time.time()
        model.eval()
        greedy = self.generate(model, 0.0, 0)
        # another seed than the teacher.jsonl's: the teacher's row is a second sample
        drawn = self.generate(model, self.b["temperature"], 1000 + sample_seed)
        nll_drawn, feats = self.teacher_view(drawn)
        ended = [float(r[-1] in self.eos) for r in drawn]
        return {"nll_greedy": self.teacher_view(greedy)[0], "nll_sampled": nll_drawn,
                "c2st": [(x, 1) for x in two_sample_test(self.ref_features, feats)],
                "entropy": self.entropy(model, drawn), "length": [(len(r), 1) for r in drawn],
                "ended": [(e, 1) for e in ended], "texts": [self.tok.decode(r) for r in drawn],
                "score_s": time.time() - t0}


def two_sample_test(ref, other, l2=1.0):
    """A fresh discriminator as a two-sample test (a classifier two-sample test, Lopez-Paz & Oquab
    2017): a linear Bradley-Terry scorer on standardized features, trained on half the prompts'
    (teacher, other) pairs and scored on the other half, both ways -> per prompt 1.0 if it ranks
    the teacher's response above the other, else 0.0. Near 0.5: indistinguishable."""
    n = ref.shape[0]
    correct = torch.zeros(n, dtype=torch.float64)
    for fold in (0, 1):
        train, test = torch.arange(n) % 2 != fold, torch.arange(n) % 2 == fold
        both = torch.cat([ref[train], other[train]])
        mu, sd = both.mean(0), both.std(0).clamp(min=1e-6)
        diff = (ref[train] - other[train]) / sd                                   # [n/2, H]
        w = torch.zeros(ref.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.softplus(-diff @ w).mean() + l2 * w.square().sum() / n
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            margin = ((ref[test] - mu) / sd - (other[test] - mu) / sd) @ w
        correct[test] = (margin > 0).double() + 0.5 * (margin == 0).double()   # a tie: chance
    return correct.tolist()


# --------------------------------------------------------------------------------------------------
# claims: paired bootstrap over seeds and prompts (quality.verdict)

def verdicts(cells, boot):
    """Each claim on each metric with a direction: the difference in the claim's favour, its 95%
    interval and the verdict."""
    out = []
    for better, other in CLAIMS:
        for key, (label, lower) in METRICS.items():
            if lower is None or better not in cells or other not in cells:
                continue
            d, interval, v = quality.verdict(cells[better][key], cells[other][key], boot)
            out.append({"claim": f"{BRANCHES[better]} better than {BRANCHES[other]}",
                        "metric": label, "difference": d, "interval": interval, "verdict": v})
    return out


# --------------------------------------------------------------------------------------------------
# report

def markdown(report):
    b, rows = report["budget"], report["rows"]
    lines = [f"# The fork study, budget `{report['budget_name']}`", "",
             quality.pair_text(b) + f"; {report['data']['train']} training prompts, "
             f"{report['data']['test']} test, "
             f"{report['data']['dev']} dev; responses of at most {b['max_new_tokens']} tokens at "
             f"T = {b['temperature']}; seeds {report['seeds']}. Warmup: "
             + ", ".join(f"seed {s}: {w['steps']} steps, D's held-out accuracy {w['accuracy']:.3f}"
                         for s, w in report["warmups"].items())
             + f" (threshold {b['d_threshold']}, on {report['data']['dev']} dev pairs). Then "
             f"{b['fork_steps']} student updates of each branch. Mean over seeds and prompts:", ""]
    head = ["row", "seeds"] + [METRICS[k][0] for k in METRICS] + [
        "student updates", "student tokens", "FLOPs", "train s"]
    body = []
    for key, r in rows.items():
        c = r["cost"]
        body.append([ROWS[key], str(len(r["seeds"]))] + [f"{r['mean'][k]:.4f}" for k in METRICS]
                    + ([f"{c['student_updates']:.0f}", f"{c['student_tokens']:.0f}",
                        f"{c['flops_total']:.3g}", f"{c['wall_s']:.0f}"] if c else ["-"] * 4))
    lines += quality.table(head, body)
    lines += ["", f"Claims: paired bootstrap over seeds and prompts ({report['boot']} resamples), "
              "95% interval of the difference in the claim's favour (positive: it holds):", ""]
    lines += quality.table(["claim", "metric", "difference", "95% interval", "verdict"],
                           [[v["claim"], v["metric"], f"{v['difference']:+.4f}",
                             f"[{v['interval'][0]:+.4f}, {v['interval'][1]:+.4f}]", v["verdict"]]
                            for v in report["verdicts"]], text_cols=(0, 1, 4))
    lines += ["", "Learning rates: " + ", ".join(f"{BRANCHES[k]} {v:g}" for k, v in
                                                report["lr"].items())
              + ". Branch costs are the branch's own (the shared warmup is its own row). Wall "
              f"time of this invocation: {report['wall_s']:.0f} s."]
    if report["sweep"]:
        lines += ["", "Learning-rate sweep (sampled teacher NLL on the dev prompts, from the first "
                  "seed's fork point; * = kept):", ""]
        lines += quality.table(["branch", "lr", "teacher NLL, sampled"], [
            [BRANCHES[k], f"{float(lr):g}" + (" *" if float(lr) == r["best"] else ""),
             f"{v:.4f}"] for k, r in report["sweep"].items() for lr, v in r["values"].items()])
    return "\n".join(lines) + "\n"


def plot(report, path):
    """fork.png: the sampled teacher NLL and the fresh-D accuracy of every row, each seed a dot."""
    plt = quality.pyplot("fork")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("nll_sampled", "c2st")):
        for x, (row, r) in enumerate(report["rows"].items()):
            ax.scatter([x] * len(r["seeds"]), r["per_seed"][key], color="C0")
            ax.hlines(r["mean"][key], x - 0.3, x + 0.3, color="k")
        ax.set_xticks(range(len(report["rows"])), [ROWS[k] for k in report["rows"]],
                      rotation=30, ha="right", fontsize=7)
        ax.set_title(METRICS[key][0])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# main

def scored(setup, run_dir, load, sample_seed, name="scores.json"):
    """A model's per-prompt metrics by setup's scorer, cached in run_dir/name."""
    path = os.path.join(run_dir, name)
    result = quality.read_json(path)
    if result is None:
        result = setup["scorer"](load(), sample_seed)
        os.makedirs(run_dir, exist_ok=True)
        files.atomic_write_text(path, json.dumps(result))
    return result


def cost(run_dirs):
    """The runs' counters (common.Compute, summed over the stages of gad.py), means over seeds."""
    rows = []
    for d in run_dirs:
        c = quality.compute_counts("gad", d)   # updates: its rows with an SFT, PPO or DPO loss
        c["wall_s"] = (quality.read_json(os.path.join(d, "progress.json")) or {}).get("train_s", 0)
        rows.append(c)
    return {k: float(np.mean([r[k] for r in rows]))
            for k in ("student_updates", "student_tokens", "flops_total", "wall_s")}


def branch_lr(b, branch):
    return b["sft_lr"] if branch == "seqkd" else b["rl_lr"]


def lr_sweep(setup, warm, seed, factors, dev_scorer):
    """{branch: {"values": {lr: sampled teacher NLL on the dev prompts}, "best"}}: each branch
    from the first seed's warmup at each factor times its rate."""
    b, sweep = setup["b"], {}
    for branch in BRANCHES:
        values = {}
        for f in factors:
            lr = float(f"{branch_lr(b, branch) * f:.6g}")
            run_dir = quality.run_folder(os.path.join(setup["out"], "runs"), branch, lr, seed)
            run(gad_command(b, branch, run_dir, seed, lr, setup["data"], setup["rows"],
                            setup["device"], init_from=warm, steps=b["fork_steps"]), run_dir)
            m = scored(dict(setup, scorer=dev_scorer), run_dir, lambda: models.load_model(
                os.path.join(run_dir, "student"), dtype=b["dtype"], device=setup["device"]), seed,
                name="dev_scores.json")
            values[repr(lr)] = float(quality.ratio(np.array(m["nll_sampled"], dtype=float)))
        best = min(values, key=values.get)
        sweep[branch] = {"values": values, "best": float(best),
                         "at_edge": best in (min(values, key=float), max(values, key=float))}
        print(f"fork: sweep {branch}: " + ", ".join(f"{float(k):g}: {v:.4f}"
                                                    for k, v in values.items()), flush=True)
    return sweep


def main(args):
    t_start = time.time()
    b = dict(BUDGETS[args.budget])
    if args.predict_only:
        print_hours(b)
        return 0
    out = os.path.abspath(args.out or os.path.join("runs", f"fork-{args.budget}"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if b["threads"] and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(b["threads"])
        torch.set_num_threads(b["threads"])
    os.makedirs(out, exist_ok=True)
    lock = files.lock_output(out)
    common.seed_everything(args.seed)
    b["student_path"] = quality.initial_student(b, out, args.seed)
    tok = models.load_tokenizer(b["student_path"])
    test, dev, train, kept = prepare_data(b, out, tok, args.seed, device)
    data_path = os.path.join(out, "data", "train.jsonl")
    files.atomic_write_text(data_path, "".join(
        json.dumps({k: r[k] for k in ("id", "messages", "teacher_response")}, ensure_ascii=False)
        + "\n" for r in train))
    seeds = [args.seed + i for i in range(args.seeds or b["seeds"])]
    print(f"fork: budget {args.budget}: {len(train)} train, {len(dev)} dev, {len(test)} test "
          f"prompts ({kept['kept']} of {kept['sampled']} sampled kept); seeds {seeds}", flush=True)
    teacher = models.load_model(b["teacher"], dtype=b["dtype"], device=device).eval()
    setup = dict(b=b, out=out, tok=tok, dev=dev, data=data_path, rows=len(train), device=device,
                 scorer=Scorer(b, tok, teacher, test, device))
    runs = os.path.join(out, "runs")
    load = lambda path: lambda: models.load_model(path, dtype=b["dtype"], device=device)
    fixed = {"student": scored(setup, os.path.join(runs, "student"), lambda: models.load_model(
                 b["student_path"], dtype=b["dtype"], device=device, layers=b["student_layers"],
                 seed=args.seed), args.seed),
             "teacher": scored(setup, os.path.join(runs, "teacher"), lambda: teacher, args.seed)}
    per_seed, run_dirs, warmups, sweep = {k: [] for k in ["warmup", *BRANCHES]}, {}, {}, {}
    lrs = {branch: branch_lr(b, branch) for branch in BRANCHES}
    for seed in seeds:
        warm, steps, acc = warmup(setup, seed)
        warmups[seed] = {"steps": steps, "accuracy": acc}
        if acc < b["d_threshold"]:
            raise SystemExit(f"fork: seed {seed}: D's held-out accuracy {acc:.3f} after "
                             f"{steps} warmup steps is under the threshold {b['d_threshold']}: "
                             "no fork (raise max_warmup_steps or d_lr)")
        sweep_path = os.path.join(out, "sweep.json")
        if args.lr_sweep and not os.path.exists(sweep_path):   # the first seed's fork, dev prompts
            factors = [float(f) for f in args.sweep_factors.split(",")]
            files.atomic_write_text(sweep_path, json.dumps(lr_sweep(
                setup, warm, seed, factors, Scorer(b, tok, teacher, dev, device))))
        if os.path.exists(sweep_path):   # a study resumed without --lr-sweep keeps its rates
            sweep = quality.read_json(sweep_path)
            lrs = {branch: r["best"] for branch, r in sweep.items()}
        per_seed["warmup"].append(scored(setup, warm, load(os.path.join(warm, "student")), seed))
        run_dirs.setdefault("warmup", []).append(warm)
        for branch in BRANCHES:
            run_dir = quality.run_folder(os.path.join(out, "runs"), branch, lrs[branch], seed)
            run(gad_command(b, branch, run_dir, seed, lrs[branch], data_path, len(train), device,
                            init_from=warm, steps=b["fork_steps"]), run_dir)
            per_seed[branch].append(scored(setup, run_dir, load(os.path.join(run_dir, "student")),
                                           seed))
            run_dirs.setdefault(branch, []).append(run_dir)
    cells = {k: np.array([[s[m] for m in METRICS] for s in v]).transpose(0, 2, 1, 3)
             for k, v in {**{r: [fixed[r]] for r in fixed}, **per_seed}.items()}   # [S, N, M, 2]
    cells = {k: {m: c[:, :, i] for i, m in enumerate(METRICS)} for k, c in cells.items()}
    rows = {}
    for key in ROWS:
        rows[key] = {"seeds": seeds if key in per_seed else [args.seed],
                     "mean": {m: float(quality.ratio(cells[key][m])) for m in METRICS},
                     "per_seed": {m: [float(quality.ratio(x)) for x in cells[key][m]]
                                  for m in METRICS},
                     "cost": cost(run_dirs[key]) if key in run_dirs else None}
    report = {"budget_name": args.budget, "budget": BUDGETS[args.budget], "seeds": seeds,
              "boot": args.boot, "data": {"train": len(train), "dev": len(dev), "test": len(test),
                                          **kept},
              "warmups": warmups, "lr": lrs, "sweep": sweep, "rows": rows,
              "verdicts": verdicts(cells, args.boot),
              "wall_s": time.time() - t_start}
    text = markdown(report)
    files.atomic_write_text(os.path.join(out, "fork.json"), json.dumps(report, indent=1))
    files.atomic_write_text(os.path.join(out, "fork.md"), text)
    plot(report, os.path.join(out, "fork.png"))
    print(text, flush=True)
    lock.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the fork study (dev/bench.py fork)")
    sys.exit(main(add_arguments(parser).parse_args()))
