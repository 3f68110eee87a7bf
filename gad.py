"""GAD: Generative Adversarial Distillation (black-box; arXiv 2511.10643, reference recipe
microsoft/LMOps `gad/`).

The student G is a generator trained by PPO against a Bradley-Terry discriminator D that learns to
tell the teacher's responses from G's. Only the teacher's text is used. One command runs the
pipeline:

    python gad.py                                 # embedded CPU default: SmolLM2-135M-Instruct
                                                  # teaching its 24-layer cut on ShareGPT prompts
    python gad.py --student tiny --out runs/tiny  # tiny random models, < 1 minute
    torchrun --nproc_per_node=8 gad.py --student qwen2.5-1.5b --data teacher.jsonl

Stages (--stage): seqkd (SFT on teacher responses: the baseline), warmup (D learns, G does SFT), gad
(PPO against D), all = warmup -> gad -> eval, each stage starting from the previous one's weights in
memory.

Each GAD step: (1) roll out n responses per prompt from G; (2) rewards r_i = D(x, y_i) BEFORE this
step's D update; (3) GRPO advantages per group; (4) one D step on L_D; (5) one PPO update of G with
a k3 KL penalty to G-at-the-start-of-the-stage. See README "GAD: implementation details" for each
detail and its source.

Departures from the reference, each a flag:
  - the reference keeps PPO at one epoch / one mini-batch (ratio 1, REINFORCE with a group
    baseline): the same defaults here, with --ppo-epochs / --mini-batches for real PPO;
  - the reference's D head initialisation is not specified; ours starts at zero (D indifferent at
    step 0);
  - the pipeline's reference teacher is GPT-5-Chat; the CPU default's is SmolLM2-135M-Instruct,
    sampled once for every prompt (--teacher-responses teacher), so that its NLL of the student's
    samples can score the run (the training still reads only its text);
  - prompts over --max-prompt-len are dropped; the reference's verl loader, where it does not filter
    them out, cuts them to their first max_prompt_length tokens (data.truncation=right), losing the
    conversation's end.
"""

import argparse
import functools
import math
import os
import time

import torch

import common
from common import print0
import data as data_lib
import discriminator
import eval as eval_lib
import judge
import models
import ppo
import sample

# Presets: --student picks one; every flag left unset is filled from it (and printed).
PAPER = dict(  # GAD reference recipe (LMOps gad/scripts/train): 7B-14B students on 8 GPUs
    data="sharegpt", samples_per_prompt=8, prompts_per_step=256, temperature=0.8, top_p=1.0,
    lr=1e-6, d_lr=1e-6, weight_decay=0.01, grad_clip=0.2, clip_eps=0.2, dual_clip=3.0,
    kl_coef=0.001, freeze_g_steps=10,
    warmup_epochs=1.0, gad_epochs=2.0, seqkd_epochs=3.0, seqkd_lr=5e-6,
    # LMOps gad/scripts/train/*.sh: data.max_prompt_length=2048, data.max_response_length=1536
    # (rollouts and validation alike; teacher responses cut to it)
    max_prompt_len=2048, max_response_len=1536, max_new_tokens=1536, eval_max_new_tokens=1536,
    micro_batch_size=8, dtype="bfloat16", eval_prompts=256, val_fraction=0.1,
    teacher_responses="data",
    # LMOps gad/scripts/train: gradient checkpointing on, micro-batches of at most 12288 tokens per
    # GPU (ppo_max_token_len_per_gpu, the critic's too)
    gradient_checkpointing=True, micro_batch_tokens=12288,
    # ours: at most 1M KV-cache tokens per generate() call (26.7 GiB at 1.5B), the largest round
    # budget under which every GPU command's rollout fits an 80 GB card with 8 GiB to spare
    # (`python bench.py gpu --predict-only`, BENCHMARKS.md); the reference's vLLM sizes its cache
    # by gpu_memory_utilization instead
    gen_batch_tokens=1_000_000,
)
PRESETS = {
    # lr / d_lr: with a D much faster than G (d_lr 3e-3) the tiny student's reward never climbs;
    # with these, 80 GAD steps of 8 x 8 samples raise a held-out D's score (tests/test_gad.py, the
    # learning test).
    "tiny": dict(PAPER, data="tiny", teacher="tiny-teacher", samples_per_prompt=4,
                 prompts_per_step=8, lr=1e-2, d_lr=1e-3, grad_clip=1.0, kl_coef=0.001,
                 freeze_g_steps=2, warmup_steps=6, gad_steps=20, seqkd_epochs=2.0, seqkd_lr=3e-3,
                 max_prompt_len=64, max_response_len=16, max_new_tokens=16, micro_batch_size=32,
                 dtype="float32", eval_prompts=16, eval_max_new_tokens=16, limit=160,
                 gradient_checkpointing=False, micro_batch_tokens=None),
    # The embedded CPU default, the pair and settings of `bench.py quality --budget cpu`:
    # SmolLM2-135M-Instruct teaching itself without its 6 middle layers (distillm2.py, amm.py too),
    # its responses sampled once; 8 warmup steps (G frozen for the first 2) + 18 GAD steps = 24
    # student updates of 4 prompts x 4 samples.
    "smollm2-135m": dict(PAPER, teacher="smollm2-135m", student_layers="0-11,18-29",
                         teacher_responses="teacher", samples_per_prompt=4, prompts_per_step=4,
                         lr=2e-5, d_lr=1e-4, grad_clip=1.0, freeze_g_steps=2, warmup_steps=8,
                         gad_steps=18, seqkd_epochs=1.0, seqkd_lr=2e-5, max_prompt_len=64,
                         max_response_len=32, max_new_tokens=32, micro_batch_size=8,
                         dtype="float32", eval_prompts=32, eval_max_new_tokens=32, limit=300,
                         val_fraction=0.2, gradient_checkpointing=False, micro_batch_tokens=None),
}
DEFAULT_STUDENT = "smollm2-135m"


def add_gad_flags(p):
    """The GAD step: rollouts, PPO, the discriminator."""
    g = p.add_argument_group("GAD")
    g.add_argument("--samples-per-prompt", type=int, default=None,
                   help="rollouts per prompt, the GRPO group (reference: 8)")
    g.add_argument("--prompts-per-step", type=int, default=None,
                   help="global prompts per step (ref: 256)")
    g.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward/backward")
    g.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="padded tokens per forward/backward (reference: 12288 per GPU)")
    g.add_argument("--chunk-size", type=int, default=128,
                   help="positions per chunk of full-vocabulary logits")
    g.add_argument("--max-new-tokens", type=int, default=None, help="rollout length")
    g.add_argument("--temperature", type=float, default=None, help="rollout temperature (ref: 0.8)")
    g.add_argument("--top-p", type=float, default=None, help="rollout top-p (ref: 1.0)")
    sample.add_generate_flags(g)
    g.add_argument("--lr", type=float, default=None, help="G learning rate (ref: 1e-6, constant)")
    g.add_argument("--d-lr", type=float, default=None, help="D learning rate (ref: 1e-6, constant)")
    g.add_argument("--seqkd-lr", type=float, default=None, help="SeqKD learning rate (ref: 5e-6)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay (ref: 0.01)")
    g.add_argument("--grad-clip", type=float, default=None, help="max grad norm (ref: 0.2)")
    g.add_argument("--clip-eps", type=float, default=None, help="PPO clip (ref: 0.2)")
    g.add_argument("--dual-clip", type=float, default=None, help="dual-clip c for A<0 (ref: 3)")
    g.add_argument("--kl-coef", type=float, default=None,
                   help="k3 KL(pi||ref) loss coefficient (ref: 0.001)")
    g.add_argument("--ppo-epochs", type=int, default=1,
                   help="passes over each rollout batch (ref: 1)")
    g.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per pass (ref: 1)")
    g.add_argument("--freeze-g-steps", type=int, default=None,
                   help="warmup: D learns alone first (ref: 10)")
    g.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after this many non-finite steps in a row")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GAD: generative adversarial distillation (black-box)")
    g = p.add_argument_group("models")
    g.add_argument("--student", default=DEFAULT_STUDENT,
                   help="student alias/folder; picks the preset")
    g.add_argument("--student-layers", default=None,
                   help="keep only these student layers, e.g. '0-5' or 'every2'")
    g.add_argument("--teacher", default=None,
                   help="local model or 'api:URL:MODEL' to sample responses for rows that "
                        "have none (black-box: only its text is used; a local one also scores "
                        "the eval's teacher_nll)")
    g.add_argument("--teacher-responses", default=None, choices=["data", "teacher"],
                   help="data: the data's responses, --teacher samples only rows without one; "
                        "teacher: --teacher samples every row's (CPU default)")
    g.add_argument("--init-from", default=None,
                   help="folder with student/ (and discriminator/) to start from")
    g.add_argument("--dtype", default=None,
                   help="compute dtype, float32 | bfloat16 (autocast; G and D keep fp32 weights "
                        "and AdamW state, the reference is stored in it)")
    g.add_argument("--attn", default="sdpa", help="sdpa | eager | flash_attention_2")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (paper preset: on)")
    g.add_argument("--adam8bit", action="store_true", help="bitsandbytes 8-bit AdamW for G and D")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="jsonl/parquet/ShareGPT file, 'sharegpt' (package), 'tiny'")
    g.add_argument("--limit", type=int, default=None, help="read at most this many rows")
    g.add_argument("--skip-bad", action="store_true", help="skip bad rows instead of stopping")
    g.add_argument("--max-prompt-len", type=int, default=None, help="drop longer prompts (tokens)")
    g.add_argument("--max-response-len", type=int, default=None,
                   help="cut longer teacher responses (tokens)")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="held-out prompts for eval (default 0.1)")
    g = p.add_argument_group("stages")
    g.add_argument("--stage", default="all", choices=["seqkd", "warmup", "gad", "all"],
                   help="what to run")
    common.add_run_flags(g, out="runs/gad")
    g.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-epochs")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="warmup length (reference: ~1 epoch)")
    g.add_argument("--gad-steps", type=int, default=None, help="overrides --gad-epochs")
    g.add_argument("--gad-epochs", type=float, default=None,
                   help="GAD length (reference: ~2 epochs)")
    g.add_argument("--seqkd-epochs", type=float, default=None,
                   help="SeqKD baseline epochs (reference: 3)")
    add_gad_flags(p)
    g = p.add_argument_group("eval")
    g.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out prompts in the before/after table")
    g.add_argument("--eval-max-new-tokens", type=int, default=None, help="greedy eval length")
    judge.add_flags(p)
    args = p.parse_args(argv)

    common.fill_preset(args, PRESETS, PAPER)
    if args.teacher_responses == "teacher" and not args.teacher:
        p.error("--teacher-responses teacher needs --teacher (a local model or api:URL:MODEL)")
    if args.stage == "gad" and not args.init_from and not args.resume:
        print0("note: --stage gad without --init-from starts GAD from the raw student (no warmup)")
    return args


# --------------------------------------------------------------------------------------------------
# data

def load_records(args, tok, compute):
    """Prompts with teacher responses. Rows without one (every row with --teacher-responses
    teacher) are sampled once from --teacher (each rank its share, resumable, into
    OUT/teacher.jsonl), then everyone reads that file; the sampling is counted in `compute`
    (count_teacher)."""
    if args.data == "tiny":
        records = data_lib.tiny_prompts(args.limit or 160, args.seed)
    else:
        records, bad = data_lib.read_records(data_lib.resolve_data_path(args.data),
                                             skip_bad=args.skip_bad or args.data == "sharegpt",
                                             limit=args.limit)
        if bad:
            print0(f"skipped {len(bad)} bad rows (first: {bad[0]})")
    if args.teacher_responses == "teacher":
        records = [dict(r, teacher_response=None) for r in records]
    missing = [r for r in records if r["teacher_response"] is None]
    too_long = {id(r) for r in missing
                if len(data_lib.encode_prompt(tok, r["messages"])) > args.max_prompt_len}
    if too_long:   # encode_records would drop them: not worth sampling
        print0(f"not sampling {len(too_long)} rows whose prompts are over --max-prompt-len "
               f"{args.max_prompt_len}")
        records = [r for r in records if id(r) not in too_long]
        missing = [r for r in missing if id(r) not in too_long]
    if missing:
        if not args.teacher:
            print0(f"dropping {len(missing)} rows without a teacher response (no --teacher given)")
            return [r for r in records if r["teacher_response"] is not None]
        teacher_file = os.path.join(args.out, "teacher.jsonl")
        if args.teacher.startswith("api:"):
            url, model = judge.parse_spec(args.teacher, "--teacher")
            source = dict(api_base=url, api_model=model)
        else:
            source = dict(model=args.teacher, max_prompt_len=args.max_prompt_len,
                          gen_batch_tokens=args.gen_batch_tokens)
        cfg = sample.settings(out=teacher_file, max_new_tokens=args.max_response_len,
                              temperature=1.0, top_p=1.0, seed=args.seed, **source)
        stats = sample.sample_records(missing, cfg)   # every rank its share
        if common.all_reduce_sum(stats["failed"]):
            raise RuntimeError(f"sampling the teacher into {teacher_file} failed; "
                               "rerun to resume it")
        rows = data_lib.read_records(teacher_file)[0]
        sampled = {r["id"]: r["teacher_response"] for r in rows}
        count_teacher(compute, tok, [sampled[i] for i in stats["written_ids"]], stats, cfg)
        for r in records:
            r["teacher_response"] = r["teacher_response"] or sampled.get(r["id"])
        records = [r for r in records if r["teacher_response"]]
    return records


def count_teacher(compute, tok, responses, stats, cfg):
    """The teacher's cost to this run (each rank its share): the tokens of the responses this rank
    sampled, in the student's tokenizer as the trainer reads them (an endpoint's own count is not
    known), and its generate() batches or requests (retries included). Not its FLOPs: a black-box
    teacher's size is not known."""
    retries = sum(stats[k] for k in ("http_429", "http_5xx", "timeout", "connection"))
    calls = stats["calls"] if cfg.model else stats["written"] + retries
    compute.add(teacher_tokens=sum(len(data_lib.encode_response(tok, y)[0]) for y in responses),
                teacher_calls=calls)


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


# --------------------------------------------------------------------------------------------------
# models

def load_models(args, device):
    """The tokenizer, G and D, both with fp32 weights (and so fp32 AdamW state): --dtype is the
    compute dtype (autocast). D is a copy of G's backbone with a zero score head, or --init-from's
    discriminator/."""
    models.prefetch(args.student, args.teacher)
    tok = models.load_tokenizer(args.student)
    init = os.path.join(args.init_from, "student") if args.init_from else args.student
    G = models.load_model(init, dtype="float32", attn=args.attn, device=device, seed=args.seed,
                          layers=None if args.init_from else args.student_layers)
    d_init = os.path.join(args.init_from, "discriminator") if args.init_from else None
    if d_init and os.path.isdir(d_init):
        from transformers import AutoModelForSequenceClassification
        D = AutoModelForSequenceClassification.from_pretrained(d_init,
                                                               dtype=torch.float32).to(device)
    else:
        D = discriminator.from_student(G)
    if args.gradient_checkpointing:
        for m in (G, D):
            models.checkpoint_activations(m)
    return tok, G, D


def initial_student(args, device):
    """G as the run started it (the "before" column of the table), in --dtype."""
    init = os.path.join(args.init_from, "student") if args.init_from else args.student
    return models.load_model(init, dtype=args.dtype, device=device, seed=args.seed,
                             layers=None if args.init_from else args.student_layers).eval()


# --------------------------------------------------------------------------------------------------
# steps: each returns the step's metrics (this rank's, reduced by the caller) and its response-token
# count

def teacher_rollout(batch, pad, device):
    """The batch's prompts with their teacher responses, in a Rollout's layout."""
    return sample.pack([ex["prompt"] for ex in batch], [ex["response"] for ex in batch], pad,
                       device)


def student_rollout(G, batch, keys, step, args, amp, eos, pad, compute):
    """n samples per prompt from G at the rollout temperature, keyed by (prompt, step)."""
    ro = sample.rollout(G, [ex["prompt"] for ex in batch], [f"{k}|{step}" for k in keys],
                        n=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, eos_ids=eos, pad_id=pad,
                        seed=args.seed, amp=amp, max_tokens=args.gen_batch_tokens,
                        decode=args.decode)
    compute.generate(G, ro, args.samples_per_prompt)
    return ro


@torch.no_grad()
def response_logprobs(model, ro, args, amp):
    """[N, T] logprobs of the rollout's responses at the sampling temperature, in micro-batches,
    with `model` in eval mode (a scoring pass; the updates put G back in training mode)."""
    model.eval()
    with amp:
        return ro.map(lambda r: sample.sequence_logprobs(model, r, args.temperature,
                                                         chunk_size=args.chunk_size),
                      args.micro_batch_size, args.micro_batch_tokens, per_position=True)


def d_step(D, opt_d, batch, ro, args, amp, pad, device, compute):
    """One Bradley-Terry step of D: each of G's samples against its prompt's teacher response."""
    t_ro = teacher_rollout(batch, pad, device)
    compute.train(D, d_step_tokens(t_ro, ro, args))
    return discriminator.update(D, opt_d, t_ro, ro, args.samples_per_prompt,
                                max_grad_norm=args.grad_clip,
                                micro_batch_size=args.micro_batch_size,
                                micro_batch_tokens=args.micro_batch_tokens, amp=amp)


def d_step_tokens(t_ro, ro, args):
    """The tokens D's step runs forward and backward: every sample once, and a teacher row once in
    each micro-batch holding one of its prompt's samples (discriminator.update's pair_batches)."""
    n = args.samples_per_prompt
    t_prompt, t_resp = t_ro.prompt_mask.sum(1).tolist(), t_ro.response_mask.sum(1).tolist()
    batches = discriminator.pair_batches(t_prompt, t_resp, ro.response_mask.sum(1).tolist(), n,
                                         args.micro_batch_size or len(t_prompt) * (n + 1),
                                         args.micro_batch_tokens)
    return common.Compute.tokens(ro) + sum(t_prompt[b] + t_resp[b] for rows in batches
                                           for b in {j // n for j in rows})


def sft_step(model, opt, ro, args, amp, compute):
    """One optimizer step of token-mean NLL on the responses of `ro` (SeqKD, and G's warmup step).
    Returns the global batch's loss (each rank holds its share of it, so the shares are summed, not
    averaged)."""
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
    compute.train(model, ro)
    return {"sft_loss": common.all_reduce_sum(total), "g_grad_norm": grad_norm,
            "g_skipped": int(skipped)}


def seqkd_step(G, opt_g, batch, args, amp, pad, device, phases, compute):
    """SeqKD, the baseline: SFT of G on the teacher's responses."""
    ro = teacher_rollout(batch, pad, device)
    with phases("g_update"):
        m = sft_step(G, opt_g, ro, args, amp, compute)
    return m, ro.response_mask.sum().item()


def warmup_step(G, D, opt_g, opt_d, batch, keys, step, args, amp, eos, pad, device, phases,
                compute):
    """The warmup: D learns to tell G's samples from the teacher's; G does SFT on the teacher's
    responses, once per prompt, after the first --freeze-g-steps steps (the reference freezes G
    while D starts)."""
    with phases("sampling"):
        ro = student_rollout(G, batch, keys, step, args, amp, eos, pad, compute)
    with phases("d_update"):
        m = d_step(D, opt_d, batch, ro, args, amp, pad, device, compute)
    if step >= args.freeze_g_steps:
        with phases("g_update"):
            m.update(sft_step(G, opt_g, teacher_rollout(batch, pad, device), args, amp, compute))
    m["response_len"] = ro.response_mask.sum(-1).float().mean().item()
    return m, ro.response_mask.sum().item()


def gad_step(G, D, ref, opt_g, opt_d, batch, keys, step, args, amp, eos, pad, device, phases,
             compute):
    """One GAD step: roll out G; reward each sample with D BEFORE D's step; GRPO advantages per
    prompt; one D step; one PPO update of G with a k3 penalty toward the reference (G at the start
    of the stage)."""
    with phases("sampling"):
        ro = student_rollout(G, batch, keys, step, args, amp, eos, pad, compute)
    with phases("scoring"):
        rewards = discriminator.score_rollout(D, ro, args.micro_batch_size,
                                              args.micro_batch_tokens, amp)  # [B*n]
        advantages = ppo.grpo_advantages(rewards, args.samples_per_prompt)  # [B*n], per group of n
        # one epoch, one mini-batch (the reference): the update's own logprobs are the old ones
        # (None)
        on_policy = (args.ppo_epochs, args.mini_batches) == (1, 1)
        old_lp = None if on_policy else response_logprobs(G, ro, args, amp)
        ref_lp = response_logprobs(ref, ro, args, amp)
    # scoring's passes over the rollout: D's rewards, G's old logprobs unless on policy, pi_ref's
    compute.forward(D, ro)
    compute.forward(G, ro, passes=0 if on_policy else 1)
    compute.forward(ref, ro)
    with phases("d_update"):
        m = d_step(D, opt_d, batch, ro, args, amp, pad, device, compute)
    with phases("g_update"):
        g = ppo.ppo_update(G, opt_g, ro, advantages, old_lp, ref_lp, kl_coef=args.kl_coef,
                           clip_eps=args.clip_eps, dual_clip=args.dual_clip,
                           ppo_epochs=args.ppo_epochs, mini_batches=args.mini_batches,
                           micro_batch_size=args.micro_batch_size,
                           micro_batch_tokens=args.micro_batch_tokens, max_grad_norm=args.grad_clip,
                           temperature=args.temperature,
                           generator=torch.Generator().manual_seed(args.seed * 1000003 + step),
                           amp=amp, chunk_size=args.chunk_size)
    compute.train(G, ro, passes=args.ppo_epochs)   # each epoch: every row forward and backward
    m.update(g_skipped=g.pop("skipped_steps", 0), **g)
    m.update(reward_mean=rewards.mean().item(), reward_std=rewards.std().item(),
             response_len=ro.response_mask.sum(-1).float().mean().item())
    return m, ro.response_mask.sum().item()


# --------------------------------------------------------------------------------------------------
# stages

STAGES = ("seqkd", "warmup", "gad")
LOG_KEYS = ("d_loss", "d_acc", "reward_mean", "reward_std", "pg_loss", "kl", "clipfrac", "sft_loss",
            "response_len")


def stage_starts(state):
    """The first step of each stage: 0 in a fresh run; resumed, the step after the checkpoint's in
    its stage, 0 in the stages after it, None (done) in those before it."""
    if state is None:
        return {s: 0 for s in STAGES}
    done = STAGES.index(state["stage"])
    return {s: None if i < done else state["step"] + 1 if i == done else 0
            for i, s in enumerate(STAGES)}


def stage_steps(stage, args, num_prompts):
    explicit, epochs = {"seqkd": (None, args.seqkd_epochs),
                        "warmup": (args.warmup_steps, args.warmup_epochs),
                        "gad": (args.gad_steps, args.gad_epochs)}[stage]
    return (explicit if explicit is not None
            else max(1, math.ceil(epochs * num_prompts / args.prompts_per_step)))


def count_bad(m, in_a_row, limit):
    """Steps in a row whose D or G step was skipped (a non-finite loss or gradient); an error at
    `limit`."""
    in_a_row = in_a_row + 1 if m.get("d_skipped", 0) + m.get("g_skipped", 0) else 0
    if in_a_row >= limit:
        raise RuntimeError(f"{in_a_row} steps in a row had a non-finite loss or gradient; stopping "
                           f"(lower --lr / --d-lr, or check the data)")
    return in_a_row


# --------------------------------------------------------------------------------------------------
# export and eval

def save_hf(G, D, tok, folder, dtype):
    """The final student and discriminator as Hugging Face folders in `dtype` (from_pretrained loads
    them; every rank casts, rank 0 writes)."""
    for name, m in (("student", G), ("discriminator", D)):
        if m is not None:
            models.save_hf(m, tok, os.path.join(folder, name), dtype)


def evaluate(G, D, tok, val_recs, args, device):
    """The before / after table on held-out prompts, into OUT/eval.json: every rank loads what it
    needs and evaluates its share of the prompts (eval.evaluate), rank 0 writes. The same limits as
    eval.py, so eval.json and `python eval.py` on OUT/student agree."""
    teacher = None
    if args.teacher and not args.teacher.startswith("api:"):
        teacher = models.load_model(args.teacher, dtype=args.dtype, device=device).eval()
    score_fn = None if D is None else functools.partial(discriminator.score, D.eval())
    kw = dict(teacher=teacher, score_fn=score_fn, max_new_tokens=args.eval_max_new_tokens,
              max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len)
    val = val_recs[:args.eval_prompts]
    table = {"before": eval_lib.evaluate(initial_student(args, device), tok, val, **kw),
             "after": eval_lib.evaluate(G.eval(), tok, val, **kw)}
    eval_lib.write_table(table, val, args, os.path.join(args.out, "eval.json"))


# --------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.setup(args)
    tok, G, D = load_models(args, device)
    amp = models.autocast(device, args.dtype)
    eos, pad = sample.stop_ids(tok, G), tok.pad_token_id
    print0(f"student {args.student}: {models.num_params(G) / 1e6:.2f}M params, world {world}, "
           f"device {device}, compute {args.dtype}")

    compute = common.Compute()   # the counters of every metrics row
    records = load_records(args, tok, compute)
    train_recs, val_recs = data_lib.train_val_split(records, args.val_fraction, seed=args.seed)
    train, dropped = encode_records(train_recs, tok, args)
    print0(f"data: {len(train)} train prompts ({dropped} over --max-prompt-len dropped), "
           f"{len(val_recs)} held out")

    opt_g = common.make_optimizer(G.parameters(),
                                  args.seqkd_lr if args.stage == "seqkd" else args.lr,
                                  args.weight_decay, args.adam8bit)
    opt_d = common.make_optimizer(D.parameters(), args.d_lr, args.weight_decay, args.adam8bit)
    # stage, step, and the GAD stage's ref
    state = common.resume(args, G=G, D=D, opt_g=opt_g, opt_d=opt_d)
    compute.resume(state)
    starts = stage_starts(state)
    stages = ["warmup", "gad"] if args.stage == "all" else [args.stage]

    bad, steps_done = 0, 0
    for stage in stages:
        if starts[stage] is None:
            continue
        total = stage_steps(stage, args, len(train))
        ref = None
        if stage == "warmup":
            for group in opt_g.param_groups:
                group["lr"] = args.lr
        if stage == "gad":   # pi_ref = G at the start of the stage (matmul weights in --dtype)
            ref = models.frozen_copy(G, args.dtype)
            if state is not None and state["stage"] == "gad":
                ref.load_state_dict(state.pop("ref"))
        for step in range(starts[stage], total):
            t0, phases = time.time(), common.Phases(device)
            batch, keys = data_lib.batch_at_step(train, step, args.prompts_per_step, args.seed,
                                                 stage, rank, world)
            if stage == "seqkd":
                m, tokens = seqkd_step(G, opt_g, batch, args, amp, pad, device, phases, compute)
            elif stage == "warmup":
                m, tokens = warmup_step(G, D, opt_g, opt_d, batch, keys, step, args, amp, eos, pad,
                                        device, phases, compute)
            else:
                m, tokens = gad_step(G, D, ref, opt_g, opt_d, batch, keys, step, args, amp, eos,
                                     pad, device, phases, compute)
            m = common.reduce_metrics(m | phases.stats)
            m.update(stage=stage, step=step, tokens=common.all_reduce_sum(tokens),
                     s_per_step=time.time() - t0, **compute.log())
            common.log_step(args, stage, step, total, m, LOG_KEYS)
            bad = count_bad(m, bad, args.max_bad_steps)
            steps_done += 1
            if common.end_step(args, step, total, steps_done, stage=stage, G=G, D=D, opt_g=opt_g,
                               opt_d=opt_d, ref=ref, compute=compute):
                common.compute_cleanup()
                return
        ref = None

    # Training is over: its state goes before anything else is loaded (at 1.5B the two AdamW states
    # are 25 GB).
    opt_g = opt_d = state = None
    if args.stage == "seqkd":
        D = None   # SeqKD trains no D: nothing to export or score with
    save_hf(G, D, tok, args.out, args.dtype)
    if args.stage != "warmup" and args.eval_prompts > 0:   # every rank its share
        evaluate(G, D, tok, val_recs, args, device)
    common.compute_cleanup()


if __name__ == "__main__":
    common.run_main(main)   # a locked --out: exit 2
