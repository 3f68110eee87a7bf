"""DistiLLM-2: contrastive white-box distillation (arXiv 2503.07067; reference
jongwooko/distillm-2), with the DistiLLM (SKL, SRKL; arXiv 2402.03898), GKD (generalized JSD;
arXiv 2306.13649), forward / reverse KL and on-policy distillation baselines on the same trainer.

    python distillm2.py  # CPU default: SmolLM2-135M teacher, 24-layer student
    python distillm2.py --teacher tiny-teacher --student tiny --out runs/d2-tiny
    torchrun --nproc_per_node=8 distillm2.py --teacher qwen2.5-7b --student qwen2.5-1.5b \
        --data prompts.jsonl

Each epoch e: for every prompt, y_t ~ teacher and y_s ~ the CURRENT student (temperature 0.8,
top-p 0.95), then steps over (x, y_t, y_s) with, per token (arXiv 2503.07067, eqs. for SKL / SRKL),
    SKL_a  = sum_v p (log p - log m1),
             log m1 = logsumexp(log a + log p, log(1-a) + log q)       (q not detached)
    SRKL_a = sum_v q (log q - log m2),
             log m2 = logsumexp(log(1-a) + log p, log a + sg(log q))   (sg inside only)
each averaged over its sequence's response tokens, and the loss
mean_i[(1 - beta) SKL(y_t,i) + beta SRKL(y_s,i)]. Full-vocabulary losses are computed from hidden
states a chunk of positions at a time (losses.kd_loss_chunked).

Schedules, and where we depart from the paper or the released code (each a flag):
  - beta (--beta-schedule): the paper's formula is garbled. "linear" (ours, the default): from
    --beta0 (0.5) at the first step toward 1 at the last,
    beta = beta0 + (1 - beta0) step / total_steps, so the SKL term fades out.
    "gradual": the released code's schedule (DistiLLMTrainer.kd_loss, switched off there by
    gradual_beta = False): (2 - b) SKL + b SRKL with b = 1 + 0.5 min(1, 2 step / max_steps), i.e. on
    our (1 - beta, beta) scale beta = beta0 (1 + 0.5 min(1, 2 step / total_steps)): 0.5 -> 0.75 over
    the first half, then flat.
    "constant" keeps beta0.
  - alpha curriculum (per sample, from epoch 2 on): with P = exp(mean_t log p) and
    Q = exp(mean_t log q) over a sequence, gap = P - Q on teacher responses and Q - P on student
    responses, m = the batch mean of the gap (over the global batch, all ranks: the reference's is
    per device; ours makes torchrun equal one process),
    alpha_i = clip(1 - (1 - alpha0) m / (gap_i + 1e-5), 0.01, alpha0). --no-alpha-curriculum keeps
    alpha0.
  - --released reproduces the released code: the alpha curriculum off, beta constant (unless
    --beta-schedule gradual), and the loss (2 - 2 beta) SKL + 2 beta SRKL: SKL + SRKL at beta 0.5,
    twice the paper's. The reference regenerates responses by hand between runs; here every epoch
    does.
  - Lengths: prompts over --max-prompt-len are dropped when read (the reference keeps their end);
    when a prompt and its longer response exceed --max-len, the responses are cut to
    max_len - max_prompt_len tokens (the reference's rule: DistiLLMTrainer.tokenize_row).
  - A teacher vocabulary larger than the student's (Qwen2.5-7B 152064 vs 1.5B 151936): the teacher
    samples only ids the student has, and its extra logits are dropped before the softmax
    (losses.align_vocab).

Baselines (--loss skl|srkl|jsd|fkl|rkl), as their own papers' code defines them:
  - DistiLLM's SKL and SRKL (jongwooko/distillm, losses.py): q is not detached in either mixture
    (DistiLLM-2's SRKL above detaches it), and the reduction is one mean over every response token
    of the batch (--reduction token, the baselines' default; DistiLLM-2 averages per sequence,
    --reduction sequence). TRL's GKD also takes the token mean. SKL's value here is the KL
    (DistiLLM's code drops the constant entropy of p; the gradient is the same).
  - GKD (TRL GKDTrainer.training_step): on a --on-policy-fraction (lambda) of the steps, a coin per
    step, the rows are fresh samples of the CURRENT student, drawn at that step at
    --on-policy-temperature (0.9, TRL's GKDConfig) without top-p; on the other steps, the epoch's
    teacher responses. lambda defaults to 0.5 for jsd (GKD's best), else 0. The loss is taken at
    temperature 1, as TRL's.
  - On-policy distillation: --loss rkl --on-policy-fraction 1 (GKD with lambda 1 and beta 1): every
    step the student samples and descends the full-vocabulary reverse KL to the teacher on its own
    samples. Thinking Machines' "on-policy distillation" recipe optimises the same reverse KL with a
    sampled-token estimate.
  - --both-responses: the loss on the teacher's AND the epoch's student responses every step, their
    per-sequence means summed: the DistiLLM-2 repository's own GKD baseline (the paper's GKD number)
    is --loss jsd --jsd-beta 0.9 --both-responses (distillm_trainer.py, loss_type gkd: mixture
    weight 0.9).
"""

import argparse
import functools
import math
import os
import shutil
import time

import torch

import common
from common import print0
import data as data_lib
import eval as eval_lib
import judge
import losses
import models
import sample

# DistiLLM-2 reference recipe, Qwen2.5-7B -> 1.5B: jongwooko/distillm-2
# training_configs/qwen2.5-1.5b-distillm2.yaml (keys named), generate/generate_vllm.py (sampling),
# README (the launch command)
PAPER = dict(
    teacher="qwen2.5-7b",
    data="sharegpt",            # the reference's prompts are UltraChat's (UCLA-AGI/SPIN_iter*),
                                # not offline here
    epochs=3,                   # the paper's 3 rounds; num_train_epochs: 1 is one round,
                                # regenerated by hand between
    prompts_per_step=32,        # per_device_train_batch_size 1 x
                                # gradient_accumulation_steps 8 x --num_processes=4
    lr=5e-5,                    # learning_rate (with LoRA), lr_scheduler_type: cosine
    warmup_ratio=0.1,           # warmup_ratio
    lora_r=16, lora_alpha=128, lora_dropout=0.05,   # use_peft, lora_r, lora_alpha, lora_dropout
                                                    # (all 7 projections)
    max_prompt_len=512,         # max_prompt_length
    max_len=1024,               # max_length: prompt + response in training
    max_new_tokens=1024,        # generate_vllm.py --max_tokens
    temperature=0.8, top_p=0.95,  # generate_vllm.py --temperature, --top_p
    dtype="bfloat16",           # bf16: true, torch_dtype: null (fp32 weights, bf16 autocast)
    gradient_checkpointing=True,  # gradient_checkpointing
    # ours: the evaluation, sampling batch, and micro-batches (bounded by a token budget; the update
    # is the same)
    eval_prompts=256, limit=None, gen_batch_size=32, val_fraction=0.1, micro_batch_size=8,
    micro_batch_tokens=12288,
)
# The CPU presets train all weights (no LoRA, no warmup, no length cap): tiny runs that show the
# methods move.
CPU = dict(lora_r=0, warmup_ratio=0.0, max_len=None, dtype="float32", gradient_checkpointing=False,
           micro_batch_tokens=None)
PRESETS = {
    "tiny": dict(PAPER, **CPU, teacher="tiny-teacher", data="tiny", epochs=2, prompts_per_step=8,
                 micro_batch_size=16, lr=3e-3, max_prompt_len=64, max_new_tokens=16,
                 eval_prompts=16, limit=64, gen_batch_size=32),
    # The CPU default, the pair and settings of `bench.py quality --budget cpu`: the
    # SmolLM2-135M-Instruct teacher; the student is the same model without its 6 middle layers (24
    # of 30: dropping every other layer leaves a student so broken that a few CPU steps only
    # collapse it). The first 111 ShareGPT rows give 48 train prompts of at most 64 tokens (2 epochs
    # of 12 steps: the benchmark's 24 student updates) and 16 held out.
    "smollm2-135m": dict(PAPER, **CPU, teacher="smollm2-135m", student_layers="0-11,18-29",
                         epochs=2, prompts_per_step=4, micro_batch_size=8, lr=2e-5,
                         max_prompt_len=64, max_new_tokens=32, eval_prompts=16, limit=111,
                         gen_batch_size=8, val_fraction=0.25),
}
LOSSES = ("distillm2", "skl", "srkl", "jsd", "fkl", "rkl")


def add_loss_flags(p):
    """The objective and its schedules."""
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="distillm2", choices=LOSSES, help="objective")
    g.add_argument("--alpha0", type=float, default=0.1,
                   help="skew alpha (DistiLLM: 0.1); curriculum upper bound")
    g.add_argument("--beta0", type=float, default=0.5,
                   help="DistiLLM-2 starting beta (SRKL weight)")
    g.add_argument("--beta-schedule", default=None, choices=["linear", "gradual", "constant"],
                   help="linear to 1 (ours), gradual (the released code's), "
                        "constant (default with --released)")
    g.add_argument("--no-alpha-curriculum", action="store_true", help="keep alpha at alpha0")
    g.add_argument("--released", action="store_true",
                   help="as the released code: no alpha curriculum, "
                        "constant beta, SKL + SRKL")
    g.add_argument("--jsd-beta", type=float, default=0.5,
                   help="GKD's beta (0: KL(p||q), 1: KL(q||p))")
    g.add_argument("--on-policy-fraction", type=float, default=None,
                   help="baselines: share of steps on fresh "
                        "samples of the student (GKD lambda)")
    g.add_argument("--on-policy-temperature", type=float, default=0.9,
                   help="their temperature (TRL GKD: 0.9)")
    g.add_argument("--both-responses", action="store_true",
                   help="baselines: the loss on the teacher's and the "
                        "epoch's student responses every step, summed")
    g.add_argument("--reduction", default=None, choices=["token", "sequence"],
                   help="mean over all response tokens "
                        "(baselines' default) or per sequence, then over sequences "
                        "(distillm2, --both-responses)")
    g.add_argument("--chunk-size", type=int, default=128,
                   help="positions per chunk of full-vocab logits")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DistiLLM-2 and white-box KD baselines")
    g = p.add_argument_group("models")
    g.add_argument("--student", default="smollm2-135m",
                   help="student alias/folder; picks the preset")
    g.add_argument("--student-layers", default=None,
                   help="keep only these student layers, e.g. 'every2'")
    g.add_argument("--teacher", default=None,
                   help="white-box teacher (same tokenizer as the student)")
    g.add_argument("--dtype", default=None,
                   help="compute dtype, float32 | bfloat16 (autocast; the student keeps "
                        "fp32 weights and AdamW state, the teacher is stored in it)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (paper preset: on)")
    g.add_argument("--adam8bit", action="store_true", help="bitsandbytes 8-bit AdamW")
    g.add_argument("--lora-r", type=int, default=None,
                   help="LoRA rank via peft (reference: 16); 0 = full "
                        "fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (reference: 128)")
    g.add_argument("--lora-dropout", type=float, default=None,
                   help="LoRA dropout (reference: 0.05)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="prompts: jsonl/parquet/ShareGPT, 'sharegpt', 'tiny'")
    g.add_argument("--limit", type=int, default=None, help="read at most this many rows")
    g.add_argument("--max-prompt-len", type=int, default=None, help="drop longer prompts (tokens)")
    g.add_argument("--max-len", type=int, default=None,
                   help="prompt + response tokens in training (the "
                        "reference's max_length); none: no cap")
    g.add_argument("--val-fraction", type=float, default=None, help="held-out prompts for eval")
    add_loss_flags(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None,
                   help="epochs; responses are regenerated every epoch")
    g.add_argument("--prompts-per-step", type=int, default=None,
                   help="global batch (reference: 128)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="rows per forward/backward (DistiLLM-2: a "
                        "prompt's y_t and y_s rows count two)")
    g.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="padded tokens per forward/backward")
    g.add_argument("--gen-batch-size", type=int, default=None, help="prompts per generate() call")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (reference: 5e-5 with LoRA), cosine")
    g.add_argument("--warmup-ratio", type=float, default=None,
                   help="linear warmup over this share of the steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm")
    g.add_argument("--max-new-tokens", type=int, default=None, help="response length when sampling")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (reference: 0.8)")
    g.add_argument("--top-p", type=float, default=None, help="sampling top-p (reference: 0.95)")
    sample.add_generate_flags(g)
    common.add_run_flags(g, out="runs/distillm2")
    g.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out prompts in the before/after table")
    judge.add_flags(p)
    args = p.parse_args(argv)
    common.fill_preset(args, PRESETS, PAPER)
    baseline = args.loss != "distillm2"
    # GKD's best lambda for its own loss; the others train off-policy
    if args.on_policy_fraction is None:
        args.on_policy_fraction = 0.5 if args.loss == "jsd" and not args.both_responses else 0.0
    if args.both_responses and (not baseline or args.on_policy_fraction > 0):
        raise ValueError("--both-responses is a baseline's option (--loss skl|srkl|jsd|fkl|rkl), "
                         "without --on-policy-fraction: its student responses are the epoch's")
    if args.reduction is None:
        args.reduction = "token" if baseline and not args.both_responses else "sequence"
    if args.beta_schedule is None:
        args.beta_schedule = "constant" if args.released else "linear"
    if args.max_len is not None and args.max_len <= args.max_prompt_len:
        raise ValueError(f"--max-len {args.max_len} must exceed "
                         f"--max-prompt-len {args.max_prompt_len}")
    return args


# --------------------------------------------------------------------------------------------------
# schedules (pure functions, tested against the formulas)

def beta_at(step, total, beta0, schedule="linear"):
    """The SRKL weight beta at `step` of `total` (0-based, as the reference's global_step of
    max_steps): linear: beta0 + (1 - beta0) step / total (our reading of the paper's garbled
    formula); gradual: the released code's beta0 (1 + 0.5 min(1, 2 step / total)); constant:
    beta0."""
    if schedule == "linear":
        return beta0 + (1.0 - beta0) * step / max(total, 1)
    if schedule == "gradual":
        return beta0 * (1.0 + 0.5 * min(1.0, 2.0 * step / max(total, 1)))
    return beta0


def lr_factor(step, total, warmup):
    """The learning rate's factor at `step`: linear warmup from 0 over `warmup` steps, then cosine
    to 0 at `total` (transformers' get_cosine_schedule_with_warmup, the reference's
    lr_scheduler_type cosine + warmup_ratio)."""
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup)
                                 / max(1, total - warmup)))


def alpha_curriculum(gap, alpha0, m=None):
    """Per-sample alpha from the likelihood gap [B] (DistiLLM-2):
    clip(1 - (1 - a0) m / (gap + 1e-5), 0.01, a0) with m the batch mean of the gap (given by the
    caller under DDP: the global batch's). A sample the student already matches gets a small alpha
    (a sharper loss), one far behind the batch gets alpha0."""
    m = gap.mean() if m is None else m
    return (1 - (1 - alpha0) * m / (gap + 1e-5)).clamp(0.01, alpha0)


# --------------------------------------------------------------------------------------------------

def add_lora(model, r, alpha, dropout):
    """LoRA adapters (peft, optional) on every attention and MLP projection, as the reference's
    students (lora_target_modules). The adapters are injected in place, so the rest of this file
    calls the model as before."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RuntimeError("--lora-r needs peft: pip install peft") from None
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"])
    return get_peft_model(model, cfg)


def respond(model, rows, tag, gen, temperature, top_p, vocab_size=None, compute=None,
            teacher=False):
    """One response (token ids) per prompt row from `model`, keyed by (tag, row id): the same
    whatever the batching, the rank or an interruption. gen: sample.rollout's other arguments.
    Counted in `compute` (not the held-out responses: evaluation is not training compute)."""
    ro = sample.rollout(model, [r["prompt"] for r in rows], [f"{tag}|{r['id']}" for r in rows],
                        temperature=temperature, top_p=top_p, vocab_size=vocab_size, **gen)
    if compute is not None:
        compute.generate(model, ro, teacher=teacher,
                         calls=math.ceil(len(rows) / (gen["batch_size"] or len(rows))))
    return ro.responses()


def fit_length(prompt, responses, max_len, max_prompt_len):
    """The responses of one prompt, cut as the reference does (DistiLLMTrainer.tokenize_row): when
    the prompt and the longest of them exceed max_len, every one is cut to max_len - max_prompt_len
    tokens. (Prompts over max_prompt_len were dropped when read, so the reference's cut of the
    prompt itself never applies.)"""
    if max_len is None or len(prompt) + max(map(len, responses)) <= max_len:
        return responses
    return [r[:max_len - max_prompt_len] for r in responses]


def pack_rows(batch, responses, args, pad, device):
    """Rollouts of the batch's prompts, one per response column: responses[i] lists prompt i's
    responses (e.g. [y_t, y_s]), fit to --max-len together, so a prompt's teacher and student
    responses are cut by the same rule."""
    fitted = [fit_length(r["prompt"], rs, args.max_len, args.max_prompt_len)
              for r, rs in zip(batch, responses)]
    return [sample.pack([r["prompt"] for r in batch], list(col), pad, device)
            for col in zip(*fitted)]


@torch.no_grad()
def mean_logprob(model, ro, args):
    """Per-sequence mean log-probability of the response (temperature 1) [N]: log P or log Q of the
    curriculum, `model` in eval mode (a scoring pass)."""
    model.eval()
    return ro.map(lambda r: losses.masked_mean(sample.sequence_logprobs(model, r,
                                                                        chunk_size=args.chunk_size),
                                               r.response_mask.bool(), dim=-1),
                  args.micro_batch_size, args.micro_batch_tokens)


def epoch_rows_path(out, epoch, rank):
    return os.path.join(out, "epoch_rows", f"epoch{epoch}.rank{rank}.pt")


def load_epoch_rows(out, epoch, ids):
    """The responses of `ids` for `epoch`, from every rank's file of that epoch (a resumed run may
    have another world size): each rank writes its own rows once when it regenerates them, never the
    checkpoint."""
    folder = os.path.join(out, "epoch_rows")
    rows = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith(f"epoch{epoch}.rank"):
            rows |= torch.load(os.path.join(folder, name), weights_only=False)
    missing = [i for i in ids if i not in rows]
    if missing:
        raise RuntimeError(f"{folder}: no epoch-{epoch} responses for {len(missing)} prompts "
                           f"(first: {missing[0]}); the run cannot resume mid-epoch without them")
    return {i: rows[i] for i in ids}


def row_groups(rollouts, max_rows, max_tokens):
    """Micro-batches of prompts for rollouts that share their prompts row for row (the teacher's and
    the student's responses): [(start, end)], each at most max_rows and max_tokens over all the
    rollouts' rows."""
    plen = rollouts[0].prompt_mask.sum(1).tolist()
    rlen = [max(r) for r in zip(*(ro.response_mask.sum(1).tolist() for ro in rollouts))]
    return sample.split_by_budget([(len(rollouts), p, r) for p, r in zip(plen, rlen)],
                                  max_rows, max_tokens)


def token_weights(ro, reduction, n_seqs, n_tokens):
    """Per-token weights [N, T] that turn a per-token divergence into the step's loss: "sequence",
    the mean over each sequence's response tokens, averaged over the n_seqs sequences of the global
    batch (DistiLLM-2); "token", one mean over all n_tokens response tokens of the global batch
    (DistiLLM, TRL's GKD)."""
    mask = ro.response_mask.float()
    if reduction == "sequence":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1) / n_seqs
    return mask / n_tokens


def divergence(loss_fn, student, teacher, ro, weights, chunk_size, **kw):
    """sum_{i,t} weights[i, t] * loss_fn(q, p)[i, t] over the rollout's response tokens,
    differentiable in the student, and each sequence's mean divergence [N] (detached, for
    logging)."""
    s_h, s_head = sample.response_hidden(student, ro)
    with torch.no_grad():
        t_h, t_head = sample.response_hidden(teacher, ro)
    loss, values = losses.kd_loss_chunked(loss_fn, s_h, s_head, t_h, t_head, weights,
                                          chunk_size=chunk_size, **kw)
    return loss, losses.masked_mean(values, ro.response_mask, dim=-1)


def baseline_loss(args):
    """(per-token loss function, its keyword arguments) of a baseline --loss."""
    return {"skl": (losses.skl, {"alpha": args.alpha0}),
            "srkl": (losses.srkl, {"alpha": args.alpha0}),
            "jsd": (losses.jsd, {"beta": args.jsd_beta}), "fkl": (losses.forward_kl, {}),
            "rkl": (losses.reverse_kl, {})}[args.loss]


def load_models(args, device):
    """The tokenizer, the student (fp32 weights and AdamW state; with LoRA the frozen base in
    --dtype and peft's adapters in fp32) and the frozen teacher in --dtype. Returns them and the
    peft wrapper (None without LoRA)."""
    tok, student, teacher = models.load_white_box(args, device,
                                                  args.dtype if args.lora_r else "float32")
    lora = None
    if args.lora_r:
        torch.manual_seed(args.seed)   # the adapters' init
        lora = add_lora(student, args.lora_r, args.lora_alpha, args.lora_dropout)
        # the causal LM, its projections now LoRA layers: called as before
        student = lora.get_base_model()
    if args.gradient_checkpointing:
        models.checkpoint_activations(student)
    return tok, student, teacher, lora


def epoch_responses(student, teacher, train, epoch, fresh, steps_per_epoch, args, gen, vocab,
                    phases, compute):
    """{row id: {"y_t", "y_s"}} of every row this rank trains on in `epoch`: sampled from the
    teacher and the CURRENT student at the epoch's start (`fresh`; written, once, to OUT/epoch_rows
    for a resumed run), or, resuming mid-epoch, read back: the student has moved since they were
    drawn."""
    rank, world = common.get_rank(), common.get_world_size()
    mine = [row for s in range(steps_per_epoch) for row in data_lib.batch_at_step(
        train, epoch * steps_per_epoch + s, args.prompts_per_step, args.seed, "d2", rank, world)[0]]
    if not fresh:
        return load_epoch_rows(args.out, epoch, [r["id"] for r in mine])
    with phases("sampling"):
        y_t = respond(teacher, mine, f"t{epoch}", gen, args.temperature, args.top_p, vocab,
                      compute, teacher=True)
        y_s = respond(student, mine, f"s{epoch}", gen, args.temperature, args.top_p,
                      compute=compute) if uses_student_responses(args) else [[] for _ in mine]
    rows = {r["id"]: {"y_t": a, "y_s": b} for r, a, b in zip(mine, y_t, y_s)}
    common.atomic_torch_save(rows, epoch_rows_path(args.out, epoch, rank))
    common.barrier()   # every rank's file is on disk before any checkpoint of this epoch
    return rows


def step_rollouts(student, batch, epoch_rows, step, args, gen, device, phases, compute):
    """The step's rollouts of its prompts: [y_t], [y_t, y_s] (DistiLLM-2, --both-responses), or, on
    a GKD on-policy step (a coin per step, the same on every rank),
    [a fresh sample of the current student]."""
    coin = torch.rand(1, generator=torch.Generator().manual_seed(args.seed * 7919 + step)).item()
    on_policy = coin < args.on_policy_fraction
    if on_policy:
        with phases("sampling"):
            rows = [[y] for y in respond(student, batch, f"p{step}", gen,
                                         args.on_policy_temperature, 1.0, compute=compute)]
    else:
        rows = [[epoch_rows[r["id"]]["y_t"]] + ([epoch_rows[r["id"]]["y_s"]]
                                                if uses_student_responses(args) else [])
                for r in batch]
    return pack_rows(batch, rows, args, gen["pad_id"], device), on_policy


def uses_student_responses(args):
    """Whether each epoch also samples the student: DistiLLM-2's SRKL term and --both-responses
    train on them."""
    return args.loss == "distillm2" or args.both_responses


def curriculum_alphas(student, teacher, rollouts, epoch, n_seqs, args, amp, phases, m, compute):
    """Per-sample alphas [B] of the SKL and SRKL terms: alpha0, or, for DistiLLM-2 from its second
    epoch on, the curriculum of the likelihood gaps (alpha_curriculum, global batch means). Gaps are
    logged into `m`."""
    device = rollouts[0].prompt_ids.device
    alpha = torch.full((rollouts[0].prompt_ids.shape[0],), args.alpha0, device=device)
    if args.loss != "distillm2" or epoch == 0 or args.no_alpha_curriculum or args.released:
        return alpha, alpha
    t_ro, s_ro = rollouts
    with phases("curriculum"), amp:
        # P - Q, y_t
        gap_t = mean_logprob(teacher, t_ro, args).exp() - mean_logprob(student, t_ro, args).exp()
        # Q - P, y_s
        gap_s = mean_logprob(student, s_ro, args).exp() - mean_logprob(teacher, s_ro, args).exp()
    for ro in rollouts:   # a teacher and a student pass over each
        compute.forward(teacher, ro, teacher=True, calls=common.micro_batch_count(
            ro, args.micro_batch_size, args.micro_batch_tokens))
        compute.forward(student, ro)
    # global means
    m_t, m_s = (common.all_reduce_sum(g.sum().item()) / n_seqs for g in (gap_t, gap_s))
    m.update(gap_skl=gap_t.tolist(), gap_srkl=gap_s.tolist())
    return alpha_curriculum(gap_t, args.alpha0, m_t), alpha_curriculum(gap_s, args.alpha0, m_s)


def loss_terms(args, beta, alpha_t, alpha_s, num_rollouts):
    """(name, per-token loss, its arguments, its weight) for each rollout of the step."""
    if args.loss == "distillm2":
        scale = 2.0 if args.released else 1.0
        return [("skl", losses.skl, {"alpha": alpha_t}, scale * (1.0 - beta)),
                ("srkl", losses.srkl, {"alpha": alpha_s, "stop_grad": True}, scale * beta)]
    fn, kw = baseline_loss(args)
    return [(args.loss, fn, kw, 1.0)] * num_rollouts


def accumulate(student, teacher, rollouts, terms, n_seqs, n_tokens, args, amp, phases, m,
               compute):
    """Backward of the step's loss, micro-batch by micro-batch (a prompt's rollouts stay in one
    micro-batch); returns this rank's share of it. DistiLLM-2 logs each term's per-sequence mean
    into `m`. The student is put in training mode (from_pretrained leaves it in eval mode, where HF
    layers skip activation checkpointing)."""
    student.train()
    total, n_rows = 0.0, rollouts[0].prompt_ids.shape[0]
    for a, b in row_groups(rollouts, args.micro_batch_size, args.micro_batch_tokens):
        j = slice(a, b)
        for (name, fn, kw, scale), ro, n_tok in zip(terms, rollouts, n_tokens):
            part = ro.rows(j).trim()
            # per-row alphas cut
            part_kw = {k: v[j] if torch.is_tensor(v) else v for k, v in kw.items()}
            weights = scale * token_weights(part, args.reduction, n_seqs, n_tok)
            with phases("losses"), amp:
                loss, per_seq = divergence(fn, student, teacher, part, weights, args.chunk_size,
                                           **part_kw)
            with phases("losses"):   # backward outside autocast
                loss.backward()
            compute.train(student, part)
            compute.forward(teacher, part, teacher=True, calls=1)
            total += loss.item()
            if args.loss == "distillm2":
                m[name] = m.get(name, 0.0) + per_seq.sum().item() / n_rows
    return total


LOG_KEYS = ("epoch", "loss", "skl", "srkl", "beta", "alpha_skl_mean", "alpha_srkl_mean",
            "grad_norm")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.setup(args)
    tok, student, teacher, lora = load_models(args, device)
    amp = models.autocast(device, args.dtype)
    pad = tok.pad_token_id
    gen = dict(max_new_tokens=args.max_new_tokens, eos_ids=sample.stop_ids(tok, student, teacher),
               pad_id=pad, seed=args.seed, amp=amp,
               batch_size=args.gen_batch_size, max_tokens=args.gen_batch_tokens,
               decode=args.decode)                                     # sample.rollout's settings
    vocab = student.get_output_embeddings().weight.shape[0]
    print0(f"teacher {args.teacher}: {models.num_params(teacher) / 1e6:.2f}M, "
           f"student {args.student}: {models.num_params(student) / 1e6:.2f}M params, "
           f"world {world}, loss {args.loss}, compute {args.dtype}")
    train, val, val_recs, steps_per_epoch = data_lib.white_box_prompts(
        tok, args.data, limit=args.limit, val_fraction=args.val_fraction,
        max_prompt_len=args.max_prompt_len, eval_prompts=args.eval_prompts, seed=args.seed,
        per_step=args.prompts_per_step)
    total_steps = steps_per_epoch * args.epochs
    print0(f"data: {len(train)} train prompts, {len(val)} held out; "
           f"{steps_per_epoch} steps per epoch")
    # held-out teacher responses, sampled once: the fixed yardstick of the before/after divergence
    # (--eval-prompts 0 / --val-fraction 0: nothing held out)
    held = eval_lib.held_out_responses(teacher, val, gen, temperature=args.temperature,
                                       top_p=args.top_p, vocab_size=vocab)
    for r, y in zip(val, held):
        r["y_t"] = y

    # all, or the LoRA adapters only
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = common.make_optimizer(trainable, args.lr, args.weight_decay, args.adam8bit)
    warmup = math.ceil(args.warmup_ratio * total_steps)   # transformers' get_warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, total=total_steps, warmup=warmup))
    state = common.resume(args, student=student, opt=opt, sched=sched)
    compute = common.Compute()   # the counters of every metrics row
    compute.resume(state)
    start = 0 if state is None else state["step"] + 1
    if state is None and rank == 0:   # no epoch responses of an earlier run in this folder
        shutil.rmtree(os.path.join(args.out, "epoch_rows"), ignore_errors=True)
    common.barrier()

    epoch_rows = None
    for step in range(start, total_steps):
        t0, phases = time.time(), common.Phases(device)
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if step_in_epoch == 0 or epoch_rows is None:
            epoch_rows = epoch_responses(student, teacher, train, epoch, step_in_epoch == 0,
                                         steps_per_epoch, args, gen, vocab, phases, compute)
        batch, _ = data_lib.batch_at_step(train, step, args.prompts_per_step, args.seed, "d2",
                                          rank, world)
        rollouts, on_policy = step_rollouts(student, batch, epoch_rows, step, args, gen, device,
                                            phases, compute)
        n_seqs = common.all_reduce_sum(len(batch))
        n_tokens = [common.all_reduce_sum(ro.response_mask.sum().item()) for ro in rollouts]
        m = {"epoch": epoch, "lr": sched.get_last_lr()[0]}
        beta = beta_at(step, total_steps, args.beta0, args.beta_schedule)
        alpha_t, alpha_s = curriculum_alphas(student, teacher, rollouts, epoch, n_seqs, args, amp,
                                             phases, m, compute)
        terms = loss_terms(args, beta, alpha_t, alpha_s, len(rollouts))
        total = accumulate(student, teacher, rollouts, terms, n_seqs, n_tokens, args, amp,
                           phases, m, compute)
        with phases("update"):
            grad_norm, skipped = common.clip_and_step(trainable, opt, args.grad_clip)
        sched.step()
        # this rank's share of the loss, times the world
        m.update(loss=total * world, skipped=int(skipped))
        lists = {k: m.pop(k) for k in [k for k, v in m.items() if isinstance(v, list)]}
        m = common.reduce_metrics(m | phases.stats) | lists
        m.update(step=step, grad_norm=grad_norm, beta=beta, on_policy=int(on_policy),
                 tokens=sum(n_tokens), alpha_skl=alpha_t.tolist(), alpha_srkl=alpha_s.tolist(),
                 alpha_skl_mean=alpha_t.mean().item(), alpha_srkl_mean=alpha_s.mean().item(),
                 s_per_step=time.time() - t0, **compute.log())
        common.log_step(args, "step", step, total_steps, m, LOG_KEYS)
        if common.end_step(args, step, total_steps, step + 1 - start,
                           save=(step + 1) % steps_per_epoch == 0,
                           student=student, opt=opt, sched=sched, compute=compute):
            common.compute_cleanup()
            return

    opt = sched = None   # training state goes before the evaluation loads anything
    if lora is not None:
        # a plain HF model: adapters folded into their base weights
        student = lora.merge_and_unload()
    eval_lib.white_box_final(student, teacher, tok, val, val_recs, pad, args, device)
    common.compute_cleanup()


if __name__ == "__main__":
    common.run_main(main)   # a locked --out: exit 2
