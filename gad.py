"""GAD: Generative Adversarial Distillation, black-box (arXiv 2511.10643; reference: microsoft/LMOps
`gad/`). The student G is trained by PPO against a Bradley-Terry discriminator D that tells the
teacher's responses from G's; only the teacher's text is used. Details: docs/gad.md.

    python gad.py                                 # CPU default: SmolLM2-135M, its 24-layer cut
    python gad.py --student tiny --out runs/tiny  # tiny random models, < 1 minute
    torchrun --nproc_per_node=8 gad.py --student qwen2.5-1.5b --data teacher.jsonl

    python gad.py --stage soda --init-from runs/gad-warmup        # SODA (arXiv 2604.03873) after it

Departures from the reference (each a flag): PPO defaults to one epoch and one mini-batch as there,
--ppo-epochs / --mini-batches give real PPO; D's head starts at zero; prompts over --max-prompt-len
are dropped, not cut; the CPU default's teacher is SmolLM2-135M-Instruct, sampled once. The
warmup's SFT runs at --seqkd-lr, the SFT rate (the reference runs it at the actor's). Every
stage trains the policy it samples from, softmax(logits / --temperature), as the reference's SFT
does; SODA's paper (DPO on plain logits, no public code) is followed otherwise: its rejected
responses are the raw --student's, sampled once, its reference the student at the stage's start.
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
import losses
import models
import ppo
import sample
import teacher as teacher_lib

# --student picks a preset; every flag left unset is filled from it (and printed)
PAPER = dict(  # the reference recipe (LMOps gad/scripts/train): 7B-14B students on 8 GPUs
    data="sharegpt", samples_per_prompt=8, prompts_per_step=256, temperature=0.8, top_p=1.0,
    lr=1e-6, d_lr=1e-6, weight_decay=0.01, grad_clip=0.2, clip_eps=0.2, dual_clip=3.0,
    kl_coef=0.001, soda_beta=0.1, freeze_g_steps=10, warmup_epochs=1.0, gad_epochs=2.0,
    seqkd_epochs=3.0, soda_epochs=1.0,
    seqkd_lr=5e-6, max_prompt_len=2048, max_response_len=1536, max_new_tokens=1536,
    eval_max_new_tokens=1536, micro_batch_size=8, dtype="bfloat16", eval_prompts=256,
    val_fraction=0.1, teacher_responses="data",
    gradient_checkpointing=True, micro_batch_tokens=12288,   # ppo_max_token_len_per_gpu
    # ours: a generate() call's KV cache <= 1M tokens (26.7 GiB at 1.5B): every GPU command's
    # rollout fits an 80 GB card with 8 GiB to spare (`python dev/bench.py gpu --predict-only`)
    gen_batch_tokens=1_000_000, fsdp=False, drop_cut=False,
)
PRESETS = {
    # a D much faster than G (d_lr 3e-3) keeps the tiny student's reward flat; with these, 80 GAD
    # steps raise a held-out D's score (tests/test_gad.py, the learning test)
    "tiny": dict(PAPER, data="tiny", teacher="tiny-teacher", samples_per_prompt=4,
                 prompts_per_step=8, lr=1e-2, d_lr=1e-3, grad_clip=1.0, kl_coef=0.001,
                 freeze_g_steps=2, warmup_steps=6, gad_steps=20, seqkd_epochs=2.0, seqkd_lr=3e-3,
                 max_prompt_len=64, max_response_len=16, max_new_tokens=16, micro_batch_size=32,
                 dtype="float32", eval_prompts=16, eval_max_new_tokens=16, limit=160,
                 gradient_checkpointing=False, micro_batch_tokens=None),
    # the CPU default: SmolLM2-135M-Instruct teaching itself without its 6 middle layers, its
    # responses sampled once at the rollout temperature, the prompts whose response ends within
    # 32 tokens kept (12% of the 1431 short prompts in 2600 rows: 178); 8 warmup steps
    # (G frozen for 2) + 18 GAD steps of 4 x 4 samples; SFT at 2e-5, GAD at a fifth of it (the
    # reference's 5e-6 : 1e-6)
    "smollm2-135m": dict(PAPER, teacher="smollm2-135m", student_layers="0-11,18-29",
                         teacher_responses="teacher", samples_per_prompt=4, prompts_per_step=4,
                         lr=4e-6, d_lr=1e-4, grad_clip=1.0, freeze_g_steps=2, warmup_steps=8,
                         gad_steps=18, seqkd_epochs=1.0, seqkd_lr=2e-5, max_prompt_len=64,
                         max_response_len=32, max_new_tokens=32, micro_batch_size=8,
                         dtype="float32", eval_prompts=24, eval_max_new_tokens=32, limit=2600,
                         val_fraction=0.25, gradient_checkpointing=False, micro_batch_tokens=None,
                         drop_cut=True),
    # the paper's bigger students: G's, D's and the reference's decoder layers (and untied
    # embeddings) sharded over the ranks; per-rank peaks (`python dev/bench.py gpu --predict-only`):
    # 3B 53.5 GiB on 8 GPUs; 7B 57.3 on 8 (generate() calls of 250k KV-cache tokens); 14B 69.6 on
    # 32 (4 nodes; 100k-token calls), 77.5 on 16 (over the 71.2 an 80 GB card leaves)
    "qwen2.5-3b": dict(PAPER, fsdp=True),
    "qwen2.5-7b": dict(PAPER, fsdp=True, gen_batch_tokens=250_000),
    "qwen2.5-14b": dict(PAPER, fsdp=True, gen_batch_tokens=100_000),
}
STAGES = ("seqkd", "warmup", "gad", "soda")   # --stage: one, or several in this order
LOG_KEYS = ("d_loss", "d_acc", "reward_mean", "reward_std", "pg_loss", "kl", "clipfrac", "sft_loss",
            "dpo_loss", "dpo_acc", "response_len")


def parse_args(argv=None):
    p = common.arg_parser("GAD: generative adversarial distillation (black-box)", out="runs/gad")
    g = p.add_argument_group("GAD (reference values in brackets)")
    g.add_argument("--stage", default="all",
                   help="seqkd | warmup | gad | soda, a comma list of them in that order, or all: "
                        "warmup,gad")
    g.add_argument("--teacher-responses", choices=["data", "teacher"], help="which --teacher fills")
    g.add_argument("--init-from", default=None, help="folder with student/ (and discriminator/)")
    g.add_argument("--max-response-len", type=int, default=None, help="cut teacher responses")
    g.add_argument("--drop-cut", action=argparse.BooleanOptionalAction, default=None,
                   help="drop the prompts whose teacher response is cut at --max-response-len: "
                        "every teacher response ends, and \"ends\" tells D nothing wrong")
    g.add_argument("--samples-per-prompt", type=int, default=None, help="the GRPO group [8]")
    g.add_argument("--temperature", type=float, default=None, help="rollout temperature [0.8]")
    g.add_argument("--top-p", type=float, default=None, help="rollout top-p [1.0]")
    g.add_argument("--d-lr", type=float, default=None, help="D learning rate [1e-6]")
    g.add_argument("--seqkd-lr", type=float, default=None,
                   help="SFT learning rate: SeqKD, G in the warmup [5e-6]")
    g.add_argument("--clip-eps", type=float, default=None, help="PPO clip [0.2]")
    g.add_argument("--dual-clip", type=float, default=None, help="dual clip c for A < 0 [3]")
    g.add_argument("--kl-coef", type=float, default=None, help="k3 KL(G || ref) coefficient [1e-3]")
    g.add_argument("--soda-beta", type=float, default=None, help="SODA's DPO beta [0.1]")
    g.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout [1]")
    g.add_argument("--mini-batches", type=int, default=1, help="optimizer steps a pass [1]")
    g.add_argument("--freeze-g-steps", type=int, default=None, help="warmup: D alone first [10]")
    g.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-epochs")
    g.add_argument("--warmup-epochs", type=float, default=None, help="warmup length [1]")
    g.add_argument("--gad-steps", type=int, default=None, help="overrides --gad-epochs")
    g.add_argument("--gad-epochs", type=float, default=None, help="GAD length [2]")
    g.add_argument("--seqkd-epochs", type=float, default=None, help="SeqKD length [3]")
    g.add_argument("--soda-steps", type=int, default=None, help="overrides --soda-epochs")
    g.add_argument("--soda-epochs", type=float, default=None, help="SODA length [1]")
    g.add_argument("--eval-max-new-tokens", type=int, default=None, help="greedy eval length")
    g.add_argument("--skip-bad", action="store_true", help="skip bad data rows, not stop")
    g.add_argument("--attn", default="sdpa", help="sdpa | eager | flash_attention_2")
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after k non-finite steps")
    judge.add_flags(p)
    args = p.parse_args(argv)
    common.fill_preset(args, PRESETS, PAPER)
    args.stages = ["warmup", "gad"] if args.stage == "all" else args.stage.split(",")
    if [s for s in STAGES if s in args.stages] != args.stages:
        p.error(f"--stage {args.stage}: one of {', '.join(STAGES)} or several in that order")
    if args.teacher_responses == "teacher" and not args.teacher:
        p.error("--teacher-responses teacher needs --teacher (a local model or api:URL:MODEL)")
    if args.stages in (["gad"], ["soda"]) and not args.init_from and not args.resume:
        print0(f"note: --stage {args.stage} without --init-from starts from the raw student")
    return args


def load_student(args, fp32=True):
    """G in fp32 for training (AdamW at lr 1e-6 rounds away in bf16), or in --dtype for the
    "before" column of the table."""
    path = os.path.join(args.init_from, "student") if args.init_from else args.student
    return models.load_model(path, dtype="float32" if fp32 else args.dtype, attn=args.attn,
                             device=args.device, seed=args.seed,
                             layers=None if args.init_from else args.student_layers)


def load_discriminator(args, G):
    """D: --init-from's discriminator/, else G's backbone copied with a zero score head."""
    path = os.path.join(args.init_from or "", "discriminator")
    if not (args.init_from and os.path.isdir(path)):
        return discriminator.from_student(G)
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(
        args.device)


def teacher_rollout(batch, args):
    """The batch's prompts with their teacher responses, laid out as a Rollout."""
    prompts, responses = zip(*[(ex["prompt"], ex["response"]) for ex in batch])
    return sample.pack(prompts, responses, args.pad_id, args.device)


def student_rollout(G, batch, step, args):
    """n samples a prompt from G, keyed by (prompt, step): the same on any rank or resume."""
    n = args.samples_per_prompt
    with common.gathered(G):   # --fsdp: G's layers gathered once, not at every decode step
        ro = sample.rollout(G, [ex["prompt"] for ex in batch],
                            [f"{ex['key']}|{step}" for ex in batch], n=n,
                            temperature=args.temperature, top_p=args.top_p,
                            **common.rollout_settings(args))
    common.compute.generate(G, ro, n)
    return ro


@torch.no_grad()
def response_logprobs(model, ro, args):
    """[N, T] logprobs of the responses at the rollout temperature (a scoring pass: eval mode)."""
    model.eval()
    with args.amp, common.gathered(model):
        return ro.map(lambda r: sample.sequence_logprobs(model, r, args.temperature,
                                                         chunk_size=args.chunk_size),
                      args.micro_batch_size, args.micro_batch_tokens, per_position=True)


def sft_step(model, opt, ro, args):
    """One optimizer step of token-mean NLL on the responses of `ro` (SeqKD; G in the warmup)."""
    model.train()
    tokens = common.all_reduce_sum(ro.response_mask.sum().item())   # the global batch's
    total = 0.0
    for _, r in ro.micro_batches(args.micro_batch_size, args.micro_batch_tokens, equal=args.fsdp):
        with args.amp:
            lp = sample.sequence_logprobs(model, r, args.temperature,
                                          chunk_size=args.chunk_size)                    # [b, t]
            loss = -(lp * r.response_mask).sum() / max(tokens, 1)
        loss.backward()
        total += loss.item()
    grad_norm, skipped = common.clip_and_step(model.parameters(), opt, args.grad_clip)
    common.compute.train(model, ro)
    return dict(sft_loss=common.all_reduce_sum(total), g_grad_norm=grad_norm,
                g_skipped=int(skipped))


def d_step(D, opt_d, batch, ro, args):
    """One Bradley-Terry step of D: each of G's samples against its prompt's teacher response."""
    m = discriminator.update(D, opt_d, teacher_rollout(batch, args), ro, args)
    common.compute.train(D, m.pop("d_tokens"))
    return m


def gad_step(G, D, ref, opt_g, opt_d, batch, step, args):
    """One GAD step: the five blocks of the method (README, "One GAD step")."""
    with common.phase("sampling"):   # 1. rollout: n samples per prompt from G
        ro = student_rollout(G, batch, step, args)
    with common.phase("scoring"):    # 2. reward: D scores each sample BEFORE this step's D update
        rewards = discriminator.score_rollout(D, ro, args)                        # [B*n]
        # 3. advantages: each reward against its prompt's group (GRPO)
        advantages = ppo.grpo_advantages(rewards, args.samples_per_prompt)        # [B*n]
        # one epoch, one mini-batch (the reference): the update's own logprobs are the old ones
        on_policy = (args.ppo_epochs, args.mini_batches) == (1, 1)
        old_lp = None if on_policy else response_logprobs(G, ro, args)            # [B*n, T]
        ref_lp = response_logprobs(ref, ro, args)                                 # [B*n, T]
    for model, passes in ((D, 1), (G, 0 if on_policy else 1), (ref, 1)):
        common.compute.forward(model, ro, passes)
    with common.phase("d_update"):   # 4. D step: teacher vs student, Bradley-Terry
        m = d_step(D, opt_d, batch, ro, args)
    with common.phase("g_update"):   # 5. G step: PPO with a k3 KL penalty toward ref
        g = ppo.ppo_update(G, opt_g, ro, advantages, old_lp, ref_lp, args,
                           generator=torch.Generator().manual_seed(args.seed * 1000003 + step))
    common.compute.train(G, ro, passes=args.ppo_epochs)
    m.update(g_skipped=g.pop("skipped_steps", 0), **g)
    m.update(reward_mean=rewards.mean().item(), reward_std=rewards.std().item())
    m["response_len"] = ro.response_mask.sum(-1).float().mean().item()
    return m, ro.response_mask.sum().item()


def warmup_step(G, D, opt_g, opt_d, batch, step, args):
    """D learns to tell G's samples from the teacher's; after --freeze-g-steps G does SFT on the
    teacher's responses (the reference freezes G while D starts)."""
    with common.phase("sampling"):
        ro = student_rollout(G, batch, step, args)
    with common.phase("d_update"):
        m = d_step(D, opt_d, batch, ro, args)
    if step >= args.freeze_g_steps:
        with common.phase("g_update"):
            m.update(sft_step(G, opt_g, teacher_rollout(batch, args), args))
    m["response_len"] = ro.response_mask.sum(-1).float().mean().item()
    return m, ro.response_mask.sum().item()


def raw_student_responses(train, args):
    """SODA's rejected responses {prompt id: ids}: one sample of the raw student (--student, cut by
    --student-layers, before any training) for every training prompt, drawn once in fixed batches
    (the same on any number of ranks and after a resume), shared by the ranks."""
    base = models.load_model(args.student, dtype=args.dtype, attn=args.attn, device=args.device,
                             seed=args.seed, layers=args.student_layers).eval()
    base = common.shard(base, args.dtype) if args.fsdp else base
    size = args.prompts_per_step

    def chunk(i):
        rows = train[i:i + size]
        ro = sample.rollout(base, [ex["prompt"] for ex in rows],
                            [f"{ex['id']}|soda" for ex in rows], n=1,
                            temperature=args.temperature, top_p=args.top_p,
                            **common.rollout_settings(args))
        common.compute.generate(base, ro, 1)
        return ro.responses()
    with common.gathered(base):   # --fsdp: gathered once; the ranks run different batch counts
        parts = common.shard_map(chunk, list(range(0, len(train), size)))
    return dict(zip([ex["id"] for ex in train], [y for part in parts for y in part]))


def soda_step(G, ref, opt_g, batch, rejected, args):
    """SODA: one DPO step, each prompt's teacher response chosen over its rejected response."""
    B, pairs = len(batch), common.all_reduce_sum(len(batch))
    prompts = [ex["prompt"] for ex in batch]
    ro = sample.pack(prompts + prompts, [ex["response"] for ex in batch]
                     + [rejected[ex["id"]] for ex in batch], args.pad_id, args.device)
    with common.phase("scoring"):   # each response's logprob under G and the reference, no grad
        lp, ref_lp = (response_logprobs(m, ro, args).sum(-1) for m in (G, ref))       # [2B] each
        common.compute.forward(G, ro, 1), common.compute.forward(ref, ro, 1)
    lp.requires_grad_()
    loss = losses.dpo(lp[:B], lp[B:], ref_lp[:B], ref_lp[B:], args.soda_beta).sum() / pairs
    # the loss depends on G only through each response's logprob: its gradient is the sum of the
    # responses' logprob gradients weighted by dloss/dlogprob, any micro-batches (pairs may part)
    weight, = torch.autograd.grad(loss, lp)                                         # [2B]
    with common.phase("g_update"):
        G.train()
        for idx, r in ro.micro_batches(args.micro_batch_size, args.micro_batch_tokens,
                                       equal=args.fsdp):
            with args.amp:
                lp_r = sample.sequence_logprobs(G, r, args.temperature, chunk_size=args.chunk_size)
            (weight[idx] * lp_r.sum(-1)).sum().backward()
        grad_norm, skipped = common.clip_and_step(G.parameters(), opt_g, args.grad_clip)
    common.compute.train(G, ro)
    margin = ((lp - ref_lp)[:B] - (lp - ref_lp)[B:]).detach()
    m = dict(dpo_loss=common.all_reduce_sum(loss.item()), g_grad_norm=grad_norm,
             g_skipped=int(skipped), dpo_acc=(margin > 0).float().mean().item(),
             dpo_margin=margin.mean().item())
    return m, ro.response_mask.sum().item()


def seqkd_step(G, opt_g, batch, args):
    """SeqKD, the baseline: SFT of G on the teacher's responses."""
    ro = teacher_rollout(batch, args)
    with common.phase("g_update"):
        return sft_step(G, opt_g, ro, args), ro.response_mask.sum().item()


def stage_starts(state):
    """Each stage's first step: 0 fresh; resumed, the step after the checkpoint's in its stage, 0
    after it, None (done) before it."""
    if state is None:
        return {s: 0 for s in STAGES}
    done = STAGES.index(state["stage"])
    return {s: None if i < done else state["step"] + 1 if i == done else 0
            for i, s in enumerate(STAGES)}


def stage_steps(stage, args, num_prompts):
    """--<stage>-steps, else --<stage>-epochs over the prompts (SeqKD: epochs only)."""
    steps = getattr(args, f"{stage}_steps", None)
    epochs = getattr(args, f"{stage}_epochs")
    if steps is None:
        steps = max(1, math.ceil(epochs * num_prompts / args.prompts_per_step))
    return steps


def count_bad(m, in_a_row, limit):
    """Steps in a row whose D or G step was skipped (non-finite); an error at `limit`."""
    in_a_row = in_a_row + 1 if m.get("d_skipped", 0) + m.get("g_skipped", 0) else 0
    if in_a_row >= limit:
        raise RuntimeError(f"{in_a_row} steps in a row had a non-finite loss or gradient; stopping "
                           f"(lower --lr / --d-lr, or check the data)")
    return in_a_row


def evaluate(G, D, tok, val_recs, args):
    """The before / after table on held-out prompts into OUT/eval.json (each rank its share), with
    eval.py's limits, so that `python eval.py` on OUT/student agrees."""
    teacher = None
    if args.teacher and not args.teacher.startswith("api:"):
        teacher = models.load_model(args.teacher, dtype=args.dtype, device=args.device).eval()
    score_fn = None if D is None else functools.partial(discriminator.score, D.eval())
    kw = dict(teacher=teacher, score_fn=score_fn, max_new_tokens=args.eval_max_new_tokens,
              max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len)
    val = val_recs[:args.eval_prompts]
    # --fsdp: no collective in a shared evaluation; G gathered once the initial student is freed
    with common.gathered(D):
        table = {"before": eval_lib.evaluate(load_student(args, fp32=False).eval(), tok, val,
                                             **kw)}
        with common.gathered(G):
            table["after"] = eval_lib.evaluate(G.eval(), tok, val, **kw)
    eval_lib.write_table(table, val, args, os.path.join(args.out, "eval.json"))


def main(argv=None):
    # arguments, compute, models
    args = parse_args(argv)
    rank, world, device = common.setup(args)
    models.prefetch(args.student, args.teacher)
    tok = models.load_tokenizer(args.student)
    G = load_student(args)
    adversarial = "warmup" in args.stages or "gad" in args.stages   # D is trained
    D = load_discriminator(args, G) if adversarial else None
    if args.gradient_checkpointing:
        for m in (G, D):
            if m is not None:
                models.checkpoint_activations(m)
    # the reference policy: a frozen copy (matmul weights in --dtype), set to G's weights when the
    # GAD or SODA stage starts; made before G is sharded (a sharded module cannot be copied)
    ref = models.frozen_copy(G, args.dtype) if {"gad", "soda"} & set(args.stages) else None
    if args.fsdp:
        G, D, ref = (m if m is None else common.shard(m, args.dtype) for m in (G, D, ref))
    args.eos_ids, args.pad_id = sample.stop_ids(tok, G), tok.pad_token_id
    args.amp = models.autocast(device, args.dtype)   # forward passes only, fixed for the run
    print0(f"student {args.student}: {models.num_params(G) / 1e6:.2f}M params, world {world}, "
           f"device {device}, compute {args.dtype}")

    # data: teacher responses (sampled once if missing), a held-out split
    records = teacher_lib.records_with_responses(args, tok)
    if args.drop_cut:
        ends = [not data_lib.encode_response(tok, r["teacher_response"], args.max_response_len)[1]
                for r in records]
        print0(f"data: {ends.count(True)} of {len(records)} teacher responses end within "
               f"--max-response-len {args.max_response_len}; the others' prompts dropped")
        records = [r for r, end in zip(records, ends) if end]
    train_recs, val_recs = data_lib.train_val_split(records, args.val_fraction, seed=args.seed)
    train, dropped = data_lib.encode_examples(train_recs, tok, args.max_prompt_len,
                                              args.max_response_len)
    print0(f"data: {len(train)} train prompts ({dropped} over --max-prompt-len dropped), "
           f"{len(val_recs)} held out")

    # optimizers (fp32 state), and the checkpoint when resuming
    opt_g = common.make_optimizer(G.parameters(), args.lr, args.weight_decay, args.adam8bit)
    opt_d = None if D is None else common.make_optimizer(D.parameters(), args.d_lr,
                                                         args.weight_decay, args.adam8bit)
    state = common.resume(args, G=G, D=D, opt_g=opt_g, opt_d=opt_d, ref=ref)   # stage, step
    common.compute.resume(state)
    starts, bad, steps_done = stage_starts(state), 0, 0

    # the loop: stage by stage, step by step
    for stage in args.stages:
        if starts[stage] is None:
            continue
        total = stage_steps(stage, args, len(train))
        for group in opt_g.param_groups:   # SFT at the SFT rate; GAD and SODA at --lr
            group["lr"] = args.seqkd_lr if stage in ("seqkd", "warmup") else args.lr
        if stage in ("gad", "soda") and (state is None or state["stage"] != stage):
            models.load_weights(ref, G)   # pi_ref = G at the start of the stage (resumed: loaded)
        if stage == "soda":
            with common.phase("sampling"):
                rejected = raw_student_responses(train, args)
        for step in range(starts[stage], total):
            t0 = time.time()
            # every stage walks one seeded order: branches from one checkpoint see the same prompts
            batch, keys = data_lib.batch_at_step(train, step, args.prompts_per_step, args.seed,
                                                 "train", rank, world)
            batch = [dict(ex, key=k) for ex, k in zip(batch, keys)]
            if stage == "seqkd":
                m, tokens = seqkd_step(G, opt_g, batch, args)
            elif stage == "warmup":
                m, tokens = warmup_step(G, D, opt_g, opt_d, batch, step, args)
            elif stage == "soda":
                m, tokens = soda_step(G, ref, opt_g, batch, rejected, args)
            else:
                m, tokens = gad_step(G, D, ref, opt_g, opt_d, batch, step, args)
            m = common.reduce_metrics(m | common.step_stats())
            m.update(stage=stage, step=step, tokens=common.all_reduce_sum(tokens),
                     s_per_step=time.time() - t0, **common.compute.log())
            common.log_step(args, stage, step, total, m, LOG_KEYS)
            bad, steps_done = count_bad(m, bad, args.max_bad_steps), steps_done + 1
            if common.end_step(args, step, total, steps_done, stage=stage, G=G, D=D, opt_g=opt_g,
                               opt_d=opt_d, ref=ref if stage in ("gad", "soda") else None,
                               compute=common.compute):
                return common.compute_cleanup()

    # save and evaluate: training state freed first (at 1.5B the two AdamW states are 25 GB)
    opt_g = opt_d = state = ref = None
    for name, m in (("student", G), ("discriminator", D)):
        if m is not None:   # every rank casts, rank 0 writes
            models.save_hf(m, tok, os.path.join(args.out, name), args.dtype)
    if args.stages != ["warmup"] and args.eval_prompts > 0:
        evaluate(G, D, tok, val_recs, args)
    common.compute_cleanup()


if __name__ == "__main__":
    common.run_main(main)   # a locked --out: exit 2
