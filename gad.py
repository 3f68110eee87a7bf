"""GAD: Generative Adversarial Distillation (black-box; arXiv 2511.10643, reference recipe microsoft/LMOps `gad/`).

The student G is a generator trained by PPO against a Bradley-Terry discriminator D that learns to tell the
teacher's responses from G's. Only the teacher's text is used. One command runs the pipeline:

    python gad.py                                     # embedded default: SmolLM2-135M-Instruct student,
                                                      # ShareGPT's ChatGPT answers as the teacher, CPU
    python gad.py --student tiny --out runs/tiny      # tiny random models, < 1 minute
    torchrun --nproc_per_node=8 gad.py --student qwen2.5-1.5b --data teacher.jsonl

Stages (--stage): seqkd (SFT on teacher responses: the baseline), warmup (D learns, G does SFT), gad (PPO
against D), all = warmup -> gad -> eval, each stage starting from the previous one's weights in memory.

Each GAD step: (1) roll out n responses per prompt from G; (2) rewards r_i = D(x, y_i) BEFORE this step's D
update; (3) GRPO advantages per group; (4) one D step on L_D; (5) one PPO update of G with a k3 KL penalty to
G-at-the-start-of-the-stage. See README "GAD: implementation details" for each detail and its source.

Departures from the reference, each a flag:
  - the reference keeps PPO at one epoch / one mini-batch (ratio 1, REINFORCE with a group baseline): the same
    defaults here, with --ppo-epochs / --mini-batches for real PPO;
  - the reference's D head initialisation is not specified; ours starts at zero (D indifferent at step 0);
  - the pipeline's reference teacher is GPT-5-Chat; the CPU default uses ShareGPT's ChatGPT answers instead;
  - prompts over --max-prompt-len are dropped; the reference's verl loader, where it does not filter them out,
    cuts them to their first max_prompt_length tokens (data.truncation=right), losing the conversation's end.
"""

import argparse
import json
import math
import os
import time

import torch

import common
from common import print0
import data as data_lib
import discriminator
import eval as eval_lib
import models
import ppo
import sample

# Presets: --student picks one; every flag left unset is filled from it (and printed).
PAPER = dict(  # GAD reference recipe (LMOps gad/scripts/train): 7B-14B students on 8 GPUs
    data="sharegpt", samples_per_prompt=8, prompts_per_step=256, temperature=0.8, top_p=1.0, lr=1e-6, d_lr=1e-6,
    weight_decay=0.01, grad_clip=0.2, clip_eps=0.2, dual_clip=3.0, kl_coef=0.001, freeze_g_steps=10,
    warmup_epochs=1.0, gad_epochs=2.0, seqkd_epochs=3.0, seqkd_lr=5e-6,
    # LMOps gad/scripts/train/*.sh: data.max_prompt_length=2048, data.max_response_length=1536 (rollouts and
    # validation alike; teacher responses cut to it)
    max_prompt_len=2048, max_response_len=1536, max_new_tokens=1536, eval_max_new_tokens=1536,
    micro_batch_size=8, dtype="bfloat16", eval_prompts=256,
    # LMOps gad/scripts/train: gradient checkpointing on, micro-batches of at most 12288 tokens per GPU
    # (ppo_max_token_len_per_gpu, the critic's too)
    gradient_checkpointing=True, micro_batch_tokens=12288,
)
PRESETS = {
    # lr / d_lr: with a D much faster than G (d_lr 3e-3) the tiny student's reward never climbs; with these, 80
    # GAD steps of 8 x 8 samples raise a held-out D's score (tests/test_gad.py, the learning test).
    "tiny": dict(PAPER, data="tiny", teacher="tiny-teacher", samples_per_prompt=4, prompts_per_step=8, lr=1e-2,
                 d_lr=1e-3, grad_clip=1.0, kl_coef=0.001, freeze_g_steps=2, warmup_steps=6, gad_steps=20,
                 seqkd_epochs=2.0, seqkd_lr=3e-3, max_prompt_len=64, max_response_len=16, max_new_tokens=16,
                 micro_batch_size=32, dtype="float32", eval_prompts=16, eval_max_new_tokens=16, limit=160,
                 gradient_checkpointing=False, micro_batch_tokens=None),
    # The embedded CPU default: real weights and data from packages, sized for ~6 minutes on 2 cores.
    "smollm2-135m": dict(PAPER, samples_per_prompt=4, prompts_per_step=2, lr=2e-5, d_lr=1e-4, grad_clip=1.0,
                         freeze_g_steps=2, warmup_steps=10, gad_steps=20, seqkd_epochs=1.0, seqkd_lr=2e-5,
                         max_prompt_len=64, max_response_len=32, max_new_tokens=32, micro_batch_size=8,
                         dtype="float32", eval_prompts=32, eval_max_new_tokens=32, limit=1200,
                         gradient_checkpointing=False, micro_batch_tokens=None),
}
DEFAULT_STUDENT = "smollm2-135m"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GAD: generative adversarial distillation (black-box)")
    g = p.add_argument_group("models")
    g.add_argument("--student", default=DEFAULT_STUDENT, help="student alias/folder; picks the preset")
    g.add_argument("--student-layers", default=None, help="keep only these student layers, e.g. '0-5' or 'every2'")
    g.add_argument("--teacher", default=None, help="local model or 'api:URL:MODEL' to sample responses for rows "
                                                   "that have none (black-box: only its text is used)")
    g.add_argument("--init-from", default=None, help="folder with student/ (and discriminator/) to start from")
    g.add_argument("--dtype", default=None, help="compute dtype, float32 | bfloat16 (autocast; G and D keep fp32 "
                                                 "weights and AdamW state, the reference is stored in it)")
    g.add_argument("--attn", default="sdpa", help="sdpa | eager | flash_attention_2")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (paper preset: on)")
    g.add_argument("--adam8bit", action="store_true", help="bitsandbytes 8-bit AdamW for G and D")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="jsonl/parquet/ShareGPT file, 'sharegpt' (package), 'tiny'")
    g.add_argument("--limit", type=int, default=None, help="read at most this many rows")
    g.add_argument("--skip-bad", action="store_true", help="skip bad rows instead of stopping")
    g.add_argument("--max-prompt-len", type=int, default=None, help="drop longer prompts (tokens)")
    g.add_argument("--max-response-len", type=int, default=None, help="cut longer teacher responses (tokens)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="held-out prompts for eval")
    g = p.add_argument_group("stages")
    g.add_argument("--stage", default="all", choices=["seqkd", "warmup", "gad", "all"], help="what to run")
    g.add_argument("--out", default="runs/gad", help="checkpoints, metrics.jsonl, final HF folders")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    g.add_argument("--save-every", type=int, default=10, help="checkpoint every k steps (and at stage ends)")
    g.add_argument("--stop-after", type=int, default=None, help="exit after this many steps (tests of resume)")
    g.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-epochs")
    g.add_argument("--warmup-epochs", type=float, default=None, help="warmup length (reference: ~1 epoch)")
    g.add_argument("--gad-steps", type=int, default=None, help="overrides --gad-epochs")
    g.add_argument("--gad-epochs", type=float, default=None, help="GAD length (reference: ~2 epochs)")
    g.add_argument("--seqkd-epochs", type=float, default=None, help="SeqKD baseline epochs (reference: 3)")
    g = p.add_argument_group("GAD")
    g.add_argument("--samples-per-prompt", type=int, default=None, help="rollouts per prompt, the GRPO group "
                                                                         "(reference: 8)")
    g.add_argument("--prompts-per-step", type=int, default=None, help="global prompts per step (ref: 256)")
    g.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward/backward")
    g.add_argument("--micro-batch-tokens", type=int, default=None, help="padded tokens per forward/backward "
                                                                         "(reference: 12288 per GPU)")
    g.add_argument("--chunk-size", type=int, default=128, help="positions per chunk of full-vocabulary logits")
    g.add_argument("--max-new-tokens", type=int, default=None, help="rollout length")
    g.add_argument("--temperature", type=float, default=None, help="rollout temperature (ref: 0.8)")
    g.add_argument("--top-p", type=float, default=None, help="rollout top-p (ref: 1.0)")
    g.add_argument("--lr", type=float, default=None, help="G learning rate (ref: 1e-6, constant)")
    g.add_argument("--d-lr", type=float, default=None, help="D learning rate (ref: 1e-6, constant)")
    g.add_argument("--seqkd-lr", type=float, default=None, help="SeqKD learning rate (ref: 5e-6)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (ref: 0.01)")
    g.add_argument("--grad-clip", type=float, default=None, help="max grad norm (ref: 0.2)")
    g.add_argument("--clip-eps", type=float, default=None, help="PPO clip (ref: 0.2)")
    g.add_argument("--dual-clip", type=float, default=None, help="dual-clip c for A<0 (ref: 3)")
    g.add_argument("--kl-coef", type=float, default=None, help="k3 KL(pi||ref) loss coefficient (ref: 0.001)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout batch (ref: 1)")
    g.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per pass (ref: 1)")
    g.add_argument("--freeze-g-steps", type=int, default=None, help="warmup: D learns alone first (ref: 10)")
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    g = p.add_argument_group("eval")
    g.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts in the before/after table")
    g.add_argument("--eval-max-new-tokens", type=int, default=None, help="greedy eval length")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    args = p.parse_args(argv)

    common.fill_preset(args, PRESETS, PAPER)
    if args.stage == "gad" and not args.init_from and not args.resume:
        print0("note: --stage gad without --init-from starts GAD from the raw student (no warmup)")
    return args


# ----------------------------------------------------------------------------------------------------------
# data

def load_records(args, rank):
    """Prompts with teacher responses. Rows without one are sampled once from --teacher (rank 0, resumable, into
    OUT/teacher.jsonl), then everyone reads that file."""
    if args.data == "tiny":
        records = data_lib.tiny_prompts(args.limit or 160, args.seed)
    else:
        records, bad = data_lib.read_records(data_lib.resolve_data_path(args.data), skip_bad=args.skip_bad
                                             or args.data == "sharegpt", limit=args.limit)
        if bad:
            print0(f"skipped {len(bad)} bad rows (first: {bad[0]})")
    missing = [r for r in records if r["teacher_response"] is None]
    if missing:
        if not args.teacher:
            print0(f"dropping {len(missing)} rows without a teacher response (no --teacher given)")
            return [r for r in records if r["teacher_response"] is not None]
        teacher_file = os.path.join(args.out, "teacher.jsonl")
        if rank == 0:
            prompts_file = os.path.join(args.out, "prompts.jsonl")
            common.atomic_write_text(prompts_file, "".join(json.dumps(r) + "\n" for r in missing))
            cmd = ["--data", prompts_file, "--out", teacher_file, "--max-new-tokens", str(args.max_response_len),
                   "--temperature", "1.0", "--top-p", "1.0", "--seed", str(args.seed)]
            if args.teacher.startswith("api:"):
                _, url_model = args.teacher.split(":", 1)
                url, model = url_model.rsplit(":", 1)
                cmd += ["--api-base", url, "--api-model", model]
            else:
                cmd += ["--model", args.teacher, "--max-prompt-len", str(args.max_prompt_len)]
            if sample.main(cmd) != 0:
                raise RuntimeError(f"sampling the teacher into {teacher_file} failed; rerun to resume it")
        common.barrier()
        sampled = {r["id"]: r["teacher_response"] for r in data_lib.read_records(teacher_file)[0]}
        for r in records:
            r["teacher_response"] = r["teacher_response"] or sampled.get(r["id"])
        records = [r for r in records if r["teacher_response"]]
    return records


def encode_records(records, tok, args):
    """Token ids of each prompt and teacher response; too-long prompts dropped (counted)."""
    out, dropped = [], 0
    for r in records:
        p = data_lib.encode_prompt(tok, r["messages"])
        if len(p) > args.max_prompt_len:
            dropped += 1
            continue
        y, _ = data_lib.encode_response(tok, r["teacher_response"], args.max_response_len)
        out.append({"id": r["id"], "prompt": p, "response": y, "record": r})
    return out, dropped


# ----------------------------------------------------------------------------------------------------------
# steps

def sft_step(model, opt, ro, args, amp):
    """One optimizer step of token-mean NLL on the responses of `ro` (SeqKD, and G's warmup step). Returns the
    global batch's loss (each rank holds its share of it, so the shares are summed, not averaged)."""
    model.train()
    tokens = common.all_reduce_sum(ro.response_mask.sum().item())
    total = 0.0
    for _, r in ro.micro_batches(args.micro_batch_size, args.micro_batch_tokens):
        with amp:
            lp = sample.sequence_logprobs(model, r, chunk_size=args.chunk_size)          # [b, t]
            loss = -(lp * r.response_mask).sum() / max(tokens, 1)
        loss.backward()
        total += loss.item()
    grad_norm, skipped = common.clip_and_step(model.parameters(), opt, args.grad_clip)
    return {"sft_loss": common.all_reduce_sum(total), "g_grad_norm": grad_norm, "g_skipped": int(skipped)}


def num_steps(explicit, epochs, num_examples, per_step):
    return explicit if explicit is not None else max(1, math.ceil(epochs * num_examples / per_step))


# ----------------------------------------------------------------------------------------------------------
# export

def save_hf(G, D, tok, folder, dtype):
    """The final student and discriminator as Hugging Face folders in `dtype` (from_pretrained loads them)."""
    if common.get_rank() != 0:
        return
    for name, m in (("student", G), ("discriminator", D)):
        if m is not None:
            models.save_hf(m, tok, os.path.join(folder, name), dtype)


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world, device = common.compute_init(args.device)
    common.seed_everything(args.seed)  # same init on every rank; sampling randomness is keyed per prompt
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must divide by the world size {world}")

    # -------------------------------------------------------------------- models
    # G and D keep fp32 weights and AdamW state; --dtype is the compute dtype (autocast) and the reference's
    tok = models.load_tokenizer(args.student)
    init = os.path.join(args.init_from, "student") if args.init_from else args.student
    G = models.load_model(init, dtype="float32", attn=args.attn, device=device, seed=args.seed,
                          layers=None if args.init_from else args.student_layers)
    d_init = os.path.join(args.init_from, "discriminator") if args.init_from else None
    if d_init and os.path.isdir(d_init):
        from transformers import AutoModelForSequenceClassification
        D = AutoModelForSequenceClassification.from_pretrained(d_init, dtype=torch.float32).to(device)
    else:
        D = discriminator.from_student(G)
    if args.gradient_checkpointing:
        for m in (G, D):
            models.checkpoint_activations(m)
    amp = models.autocast(device, args.dtype)
    eos, pad = sample.stop_ids(tok, G), tok.pad_token_id
    print0(f"student {args.student}: {models.num_params(G) / 1e6:.2f}M params, world {world}, device {device}, "
           f"compute {args.dtype}")

    # -------------------------------------------------------------------- data
    records = load_records(args, rank)
    train_recs, val_recs = data_lib.train_val_split(records, args.val_fraction, seed=args.seed)
    train, dropped = encode_records(train_recs, tok, args)
    print0(f"data: {len(train)} train prompts ({dropped} over --max-prompt-len dropped), {len(val_recs)} held out")

    # -------------------------------------------------------------------- resume
    opt_g = common.make_optimizer(G.parameters(), args.seqkd_lr if args.stage == "seqkd" else args.lr,
                                  args.weight_decay, args.adam8bit)
    opt_d = common.make_optimizer(D.parameters(), args.d_lr, args.weight_decay, args.adam8bit)
    resume = None   # the checkpoint's stage, step and (in the GAD stage) reference weights
    order = ["seqkd", "warmup", "gad"]
    if args.resume and os.path.exists(ckpt_path):
        resume = common.load_checkpoint(ckpt_path, G=G, D=D, opt_g=opt_g, opt_d=opt_d)
        print0(f"resumed from {ckpt_path}: stage {resume['stage']} step {resume['step']}")
        done = (order.index(resume["stage"]), resume["step"])
        common.drop_metrics_after(metrics_path, lambda r: (order.index(r["stage"]), r["step"]) <= done)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log

    stages = ["warmup", "gad", "eval"] if args.stage == "all" else [args.stage] + (
        ["eval"] if args.stage in ("gad", "seqkd") else [])
    bad_in_a_row, steps_done = 0, 0

    def log(stage, step, total, m, t0, tokens):
        nonlocal bad_in_a_row
        m = common.reduce_metrics(m)
        dt = time.time() - t0
        m.update(stage=stage, step=step, tokens_per_s=common.all_reduce_sum(tokens) / dt, s_per_step=dt)
        common.log_metrics(metrics_path, m)
        fields = " | ".join(f"{k} {m[k]:.4g}" for k in ("d_loss", "d_acc", "reward_mean", "reward_std", "pg_loss",
                                                          "kl", "clipfrac", "sft_loss", "response_len",
                                                          "tokens_per_s", "s_per_step") if k in m)
        print0(f"{stage} {step + 1}/{total} | {fields}")
        skipped = m.get("d_skipped", 0) + m.get("g_skipped", 0)
        bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        if bad_in_a_row >= args.max_bad_steps:
            raise RuntimeError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient; stopping "
                               f"(lower --lr / --d-lr, or check the data)")

    def end_step(stage, step, total, ref=None):
        """Checkpoint every --save-every steps and at the stage's end; then honour --stop-after."""
        nonlocal steps_done
        if (step + 1) % args.save_every == 0 or step + 1 == total:
            common.save_checkpoint(ckpt_path, stage=stage, step=step, G=G, D=D, opt_g=opt_g, opt_d=opt_d, ref=ref)
        steps_done += 1
        if args.stop_after is not None and steps_done >= args.stop_after:
            print0(f"--stop-after {args.stop_after}: exiting")
            common.compute_cleanup()
            raise SystemExit(0)

    def resume_step(stage):
        """Where a stage starts: 0, or after the checkpointed step; None if the checkpoint is past this stage."""
        if resume is None:
            return 0
        if order.index(resume["stage"]) > order.index(stage):
            return None
        return resume["step"] + 1 if resume["stage"] == stage else 0

    def teacher_rollout(batch):
        return sample.pack([ex["prompt"] for ex in batch], [ex["response"] for ex in batch], pad, device)

    @torch.no_grad()
    def response_logprobs(model, ro):
        """[N, T] logprobs of the rollout's responses at the sampling temperature, in micro-batches."""
        with amp:
            return ro.map(lambda r: sample.sequence_logprobs(model, r, args.temperature, chunk_size=args.chunk_size),
                          args.micro_batch_size, args.micro_batch_tokens, per_position=True)

    def rollout(batch, keys, step):
        G.eval()
        with amp:
            ro = sample.generate(G, [ex["prompt"] for ex in batch], n=args.samples_per_prompt,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                 eos_ids=eos, pad_id=pad, seed=args.seed, prompt_keys=[f"{k}|{step}" for k in keys])
        G.train()
        return ro

    d_kw = dict(max_grad_norm=args.grad_clip, micro_batch_size=args.micro_batch_size,
                micro_batch_tokens=args.micro_batch_tokens, amp=amp)

    # -------------------------------------------------------------------- SeqKD baseline
    if "seqkd" in stages and (start := resume_step("seqkd")) is not None:
        total = num_steps(None, args.seqkd_epochs, len(train), args.prompts_per_step)
        for step in range(start, total):
            t0, phases = time.time(), common.Phases(device)
            batch, _ = data_lib.batch_at_step(train, step, args.prompts_per_step, args.seed, "seqkd", rank, world)
            ro = teacher_rollout(batch)
            with phases("g_update"):
                m = sft_step(G, opt_g, ro, args, amp)
            log("seqkd", step, total, m | phases.stats, t0, ro.response_mask.sum().item())
            end_step("seqkd", step, total)

    # -------------------------------------------------------------------- warmup: D learns, G does SFT
    if "warmup" in stages and (start := resume_step("warmup")) is not None:
        for group in opt_g.param_groups:
            group["lr"] = args.lr
        total = num_steps(args.warmup_steps, args.warmup_epochs, len(train), args.prompts_per_step)
        for step in range(start, total):
            t0, phases = time.time(), common.Phases(device)
            batch, keys = data_lib.batch_at_step(train, step, args.prompts_per_step, args.seed, "warmup", rank, world)
            with phases("sampling"):
                ro = rollout(batch, keys, step)
            t_ro = teacher_rollout(batch)
            with phases("d_update"):
                m = discriminator.update(D, opt_d, t_ro, ro, args.samples_per_prompt, **d_kw)
            if step >= args.freeze_g_steps:  # the reference freezes G for the first steps: D learns alone first
                with phases("g_update"):
                    m.update(sft_step(G, opt_g, t_ro, args, amp))  # once per unique prompt, not once per rollout
            m["response_len"] = ro.response_mask.sum(-1).float().mean().item()
            log("warmup", step, total, m | phases.stats, t0, ro.response_mask.sum().item())
            end_step("warmup", step, total)

    # -------------------------------------------------------------------- GAD: PPO against D
    if "gad" in stages and (start := resume_step("gad")) is not None:
        ref = models.frozen_copy(G, args.dtype)  # pi_ref = G at the start of the stage (matmul weights in --dtype)
        if resume is not None and resume["stage"] == "gad":
            ref.load_state_dict(resume.pop("ref"))
        total = num_steps(args.gad_steps, args.gad_epochs, len(train), args.prompts_per_step)
        for step in range(start, total):
            t0, phases = time.time(), common.Phases(device)
            batch, keys = data_lib.batch_at_step(train, step, args.prompts_per_step, args.seed, "gad", rank, world)
            with phases("sampling"):
                ro = rollout(batch, keys, step)
            with phases("scoring"):
                D.eval()
                rewards = discriminator.score_rollout(D, ro, args.micro_batch_size, args.micro_batch_tokens, amp)
                D.train()                                                          # [B*n], BEFORE the D step
                advantages = ppo.grpo_advantages(rewards, args.samples_per_prompt)  # [B*n], per group of n
                # one epoch, one mini-batch (the reference): the update's own logprobs are the old ones (None)
                on_policy = (args.ppo_epochs, args.mini_batches) == (1, 1)
                old_lp = None if on_policy else response_logprobs(G, ro)
                ref_lp = response_logprobs(ref, ro)
            with phases("d_update"):
                m = discriminator.update(D, opt_d, teacher_rollout(batch), ro, args.samples_per_prompt, **d_kw)
            with phases("g_update"):
                g = ppo.ppo_update(G, opt_g, ro, advantages, old_lp, ref_lp, kl_coef=args.kl_coef,
                                   clip_eps=args.clip_eps, dual_clip=args.dual_clip, ppo_epochs=args.ppo_epochs,
                                   mini_batches=args.mini_batches, micro_batch_size=args.micro_batch_size,
                                   micro_batch_tokens=args.micro_batch_tokens, max_grad_norm=args.grad_clip,
                                   temperature=args.temperature,
                                   generator=torch.Generator().manual_seed(args.seed * 1000003 + step),
                                   token_count_fn=common.all_reduce_sum, grad_sync_fn=common.all_reduce_grads,
                                   amp=amp, chunk_size=args.chunk_size)
            m.update(g_skipped=g.pop("skipped_steps", 0), **g)
            m.update(reward_mean=rewards.mean().item(), reward_std=rewards.std().item(),
                     response_len=ro.response_mask.sum(-1).float().mean().item())
            log("gad", step, total, m | phases.stats, t0, ro.response_mask.sum().item())
            end_step("gad", step, total, ref)
        del ref

    # -------------------------------------------------------------------- export, then eval: before / after
    # Training is over: its state goes before anything else is loaded (at 1.5B the two AdamW states are 25 GB).
    opt_g = opt_d = resume = None
    if args.stage == "seqkd":
        D = None   # SeqKD trains no D: nothing to export or score with
    save_hf(G, D, tok, args.out, args.dtype)
    if "eval" in stages and args.eval_prompts > 0 and rank == 0:   # only rank 0 evaluates, or loads for it
        teacher = None
        if args.teacher and not args.teacher.startswith("api:"):
            teacher = models.load_model(args.teacher, dtype=args.dtype, device=device).eval()
        score_fn = None if D is None else (
            lambda *t: discriminator.score_rollout(D.eval(), sample.Rollout(*t, None), args.micro_batch_size))
        before = models.load_model(init, dtype=args.dtype, device=device, seed=args.seed,
                                   layers=None if args.init_from else args.student_layers).eval()
        # the same limits as eval.py, so eval.json and `python eval.py` on OUT/student agree
        kw = dict(teacher=teacher, score_fn=score_fn, max_new_tokens=args.eval_max_new_tokens,
                  max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len)
        val = val_recs[:args.eval_prompts]
        table = {"before": eval_lib.evaluate(before, tok, val, **kw),
                 "after": eval_lib.evaluate(G.eval(), tok, val, **kw)}
        print0(eval_lib.format_table(table))
        common.atomic_write_text(os.path.join(args.out, "eval.json"), json.dumps(
            {k: {m: v for m, v in d.items() if m != "samples"} for k, d in table.items()}, indent=1))
    common.compute_cleanup()


if __name__ == "__main__":
    main()
