"""AMM: adversarial moment-matching distillation (Jia et al., arXiv 2406.02959, NeurIPS 2024).

    python amm.py  # CPU default: SmolLM2-135M teacher, 24-layer student
    python amm.py --teacher tiny-teacher --student tiny --out runs/amm-tiny
    torchrun --nproc_per_node=8 amm.py --teacher qwen2.5-7b --student qwen2.5-1.5b \
        --data prompts.jsonl

No public implementation exists. The paper fixes the shape (moment matching of the teacher's and the
student's next-token distributions, on- and off-policy, against a learned adversary, optimised with
a policy gradient); the parameterisation below is OUR RECONSTRUCTION from the paper. Every choice is
a flag, listed at the end.

The method. Distillation as imitation in a token-level MDP: state s_t = (x, y_<t), action y_t,
teacher policy p, student policy q. For a bounded class F of functions f(s, .) over the vocabulary,
a moment-matching distance compares the policies' moments <p(.|s) - q(.|s), f(s, .)> on a
distribution of states:
    d_off = sup_f E_{x, y ~ p} [ (1/T) sum_t <p_t - q_t, f(s_t)> ]     on the teacher's states
    d_on  = sup_f E_{x, y ~ q} [ (1/T) sum_t <p_t - q_t, f(s_t)> ]     on the student's own states
The student minimises beta d_off + (1 - beta) d_on; adversaries f_off, f_on ascend the same
objective. With |f| <= 1 the sup is f = sign(p - q), where <p - q, f> = ||p - q||_1: an optimal
adversary turns each distance into the expected L1 distance of the next-token distributions (logged
as l1_off / l1_on, the yardstick for how close the learned adversary is to the sup).

Each step, for the step's prompts: y_s ~ q (--samples-per-prompt of them, temperature 1) and y_t ~ p
(one, temperature 1); --adv-steps adversary updates; one student update. With
g_t = <p_t - q_t, f(s_t)> per token:
  - off-policy (teacher responses): the states do not depend on the student, so the gradient of
    (1/T) sum_t g_t is the plain one;
  - on-policy (student samples): the states do depend on it. The student minimises the surrogate
        (1/T) sum_t g_t + sum_t log q(y_t | s_t) * sg(A_t),
        A_t = (R_t - b_t) / T,   R_t = sum_{t' > t} g_t'
    (reward-to-go with a baseline b_t) whose expected gradient is the exact gradient of d_on for the
    current adversary: g_t differentiates the moment at a fixed state, the score term the change of
    the state distribution (y_t affects only later states, hence t' > t). With T a sequence's own
    length (choice 3, our default), A_t = (1/T) sum_t' g_t' - b, the whole sequence's distance.
    tests/test_amm.py checks both by enumerating every sequence of a small problem.

Reconstruction choices and assumptions (the paper leaves these open; each is a flag):
  1. Adversary input (--adv-input teacher): f(s_t) = tanh(W h_t + b), a vector over the student's
     vocabulary, h_t the detached final hidden state of the TEACHER at s_t (its features of the
     state). "student" uses the student's detached hidden state instead. W, b start at zero
     (--adv-init-std 0): f = 0, so both distance estimates start at 0 and rise as the adversaries
     learn.
  2. Adversary optimisation: AdamW, --adv-lr, --adv-steps (1) updates per student step on the step's
     batch, before the student's update, which then sees the updated adversaries.
  3. The 1/T of "mean_t" (--token-mean sequence, our default): each sequence's own length, so a
     response's distance is the mean moment over its tokens. Every action then changes the return
     through the length (an EOS shortens it), so the score term weighs each action by the whole
     sequence's distance, not a reward-to-go (unbiased; more variance). --token-mean horizon is the
     per-step-cost form: 1 / --max-new-tokens for every sequence, a sum of per-step costs, and the
     reward-to-go R_t = sum_{t' > t} g_t' above. After its EOS a sequence then sits in an absorbing
     state where p = q and adds 0, which pays the student to stop early: measured with
     `python amm.py --token-mean horizon`, SmolLM2's cut student went from 20-token responses to
     1-token ones in 8 steps (`--student tiny --token-mean horizon`: 16 to 2 in 14 steps). Both are
     checked exactly in tests/test_amm.py.
  4. Baseline (--baseline loo): b_t of a sample = the mean R_t of the other samples of its prompt.
     It does not depend on the sample's own actions, so the gradient stays unbiased; needs
     --samples-per-prompt >= 2.
     "none": b = 0.
  5. --beta 0.5 (weight of d_off), fixed over training.
  6. Teacher responses are sampled fresh every step at temperature 1 (no fixed data set of teacher
     responses); full-vocabulary p and q at temperature 1 (no top-p) in every moment.
  7. A teacher vocabulary larger than the student's: the teacher samples only the student's ids, and
     p is renormalised over them before the moments (losses.align_vocab), as in distillm2.py.
  8. Adversary rank (--adv-rank r; paper preset 256, CPU presets 0): W = U A, A [r, H] and U [V, r],
     so f(s_t) = tanh(U (A h_t) + b). U starts at zero (--adv-init-std), so f = 0 still, and A
     random: U's gradient goes through A h_t, nonzero from the first step (with both factors at zero
     each one's gradient goes through the other: zero forever, a saddle). A ~ N(0, H / r^2): AdamW's
     first step moves every element by about --adv-lr, which changes U A h_t by about lr ||A h_t||_1
     and a full W h_t by lr ||h_t||_1; for a spread-out h_t these are r std(A) ||h_t||_2 and
     sqrt(H) ||h_t||_2 (times the same constant), equal at std(A) = sqrt(H) / r, so one --adv-lr
     suits both forms. With std(A) = 1/sqrt(H) the rank-16 adversaries of the CPU default raised
     d_on and d_off by 0.02 at the first step, the full ones by 0.4 (H / r = 36 times slower).
     0, or r >= H, is the full [V, H] matrix.
Memory: every full-vocabulary quantity (p, q, f, their moments) is computed from final hidden states
--chunk-size positions at a time (losses.kd_loss_chunked for the student, adversary_backward for the
adversaries): the step holds [N, T, H] hidden states, never [N, T, V]; a low-rank f is (h A^T) U^T a
chunk at a time, never the [V, H] product. Adversaries at Qwen2.5-7B -> 1.5B shape (H = 3584, the
teacher's, read by default; the student's V = 151936), with fp32 weights + gradients + AdamW (16
bytes a parameter): full, 545M parameters each, 17.4 GB for the two; rank 256, 40.0M each, 1.28 GB
for the two.
"""

import argparse
import functools
import math
import time

import torch
import torch.nn.functional as F

import common
from common import print0
import data as data_lib
import eval as eval_lib
import judge
import losses
import models
import sample

# no released recipe; sizes as distillm2.py's PAPER (the paper's students are GPT-2, OpenLLaMA, T5)
PAPER = dict(
    teacher="qwen2.5-7b", data="sharegpt", epochs=3, prompts_per_step=64, samples_per_prompt=4,
    micro_batch_size=8, lr=5e-6, adv_lr=1e-4, max_prompt_len=1024, max_new_tokens=512,
    dtype="bfloat16", eval_prompts=256, limit=None,
    # as gad.py's (LMOps' GAD recipe)
    val_fraction=0.1, gradient_checkpointing=True, micro_batch_tokens=12288,
    # Adversaries of rank 256 (header choice 8): at Qwen2.5-7B's H = 3584, 2 x 40M parameters
    # instead of 2 x 545M (1.28 GB instead of 17.4 GB with AdamW). r / H = 1/14 is a milder cut than
    # rank 16 of SmolLM2's H = 576 (1/36), which on the CPU default still finds most of the full
    # adversaries' estimates (README, AMM section).
    adv_rank=256,
)
PRESETS = {
    "tiny": dict(PAPER, teacher="tiny-teacher", data="tiny", epochs=3, prompts_per_step=8,
                 micro_batch_size=32, lr=1e-2, adv_lr=1e-1, max_prompt_len=64, max_new_tokens=16,
                 dtype="float32", eval_prompts=16, limit=64, gradient_checkpointing=False,
                 micro_batch_tokens=None, adv_rank=0),
    # The CPU default, the pair, data and settings of distillm2.py's (and `bench.py quality --budget
    # cpu`): SmolLM2-135M-Instruct and itself without 6 middle layers, 2 epochs of 12 steps.
    "smollm2-135m": dict(PAPER, teacher="smollm2-135m", student_layers="0-11,18-29", epochs=2,
                         prompts_per_step=4, samples_per_prompt=2, micro_batch_size=8, lr=2e-5,
                         adv_lr=1e-3, max_prompt_len=64, max_new_tokens=32, dtype="float32",
                         eval_prompts=16, limit=111, val_fraction=0.25, gen_batch_size=8,
                         gradient_checkpointing=False, micro_batch_tokens=None, adv_rank=0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="AMM: adversarial moment-matching distillation")
    g = p.add_argument_group("models")
    g.add_argument("--student", default="smollm2-135m",
                   help="student alias/folder; picks the preset")
    g.add_argument("--student-layers", default=None,
                   help="keep only these student layers, e.g. 'every2'")
    g.add_argument("--teacher", default=None,
                   help="white-box teacher (same tokenizer as the student)")
    g.add_argument("--dtype", default=None,
                   help="compute dtype, float32 | bfloat16 (autocast; the student and the "
                        "adversaries keep fp32 weights and AdamW state, the teacher is stored "
                        "in it)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (paper preset: on)")
    g.add_argument("--adam8bit", action="store_true", help="bitsandbytes 8-bit AdamW (student)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="prompts: jsonl/parquet/ShareGPT, 'sharegpt', 'tiny'")
    g.add_argument("--limit", type=int, default=None, help="read at most this many rows")
    g.add_argument("--max-prompt-len", type=int, default=None, help="drop longer prompts (tokens)")
    g.add_argument("--val-fraction", type=float, default=None, help="held-out prompts for eval")
    g = p.add_argument_group("AMM (reconstruction choices: see the header)")
    g.add_argument("--beta", type=float, default=0.5, help="weight of d_off; 1 - beta weighs d_on")
    g.add_argument("--adv-steps", type=int, default=1, help="adversary updates per student update")
    g.add_argument("--adv-lr", type=float, default=None, help="adversary AdamW learning rate")
    g.add_argument("--adv-input", default="teacher", choices=["teacher", "student"],
                   help="whose detached final hidden state the adversary reads")
    g.add_argument("--adv-init-std", type=float, default=0.0,
                   help="adversary weight init std (0: f = 0 at start)")
    g.add_argument("--adv-rank", type=int, default=None,
                   help="adversary W = U A of rank r (0: a full [V, H] W; "
                        "paper preset 256, CPU presets 0)")
    g.add_argument("--token-mean", default="sequence", choices=["sequence", "horizon"],
                   help="1/T of the distances: 1/max-new-tokens (reward-to-go) "
                        "or 1/own length (whole return)")
    g.add_argument("--baseline", default="loo", choices=["loo", "none"],
                   help="reward-to-go baseline: "
                        "leave-one-out mean over the prompt's other samples, or none")
    g.add_argument("--samples-per-prompt", type=int, default=None,
                   help="student samples per prompt (on-policy)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help="passes over the prompts")
    g.add_argument("--prompts-per-step", type=int, default=None, help="global batch of prompts")
    g.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward/backward")
    g.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="padded tokens per forward/backward")
    g.add_argument("--chunk-size", type=int, default=128,
                   help="positions per chunk of full-vocabulary tensors")
    g.add_argument("--lr", type=float, default=None, help="student learning rate, cosine to 0")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (student and adversaries)")
    g.add_argument("--grad-clip", type=float, default=1.0,
                   help="max grad norm (student and each adversary)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="response length when sampling; the horizon T")
    g.add_argument("--gen-batch-size", type=int, default=32, help="prompts per generate() call")
    sample.add_generate_flags(g)
    common.add_run_flags(g, out="runs/amm")
    g.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out prompts in the before/after table")
    judge.add_flags(p)
    args = p.parse_args(argv)
    common.fill_preset(args, PRESETS, PAPER)
    if args.baseline == "loo" and args.samples_per_prompt < 2:
        raise ValueError("--baseline loo needs --samples-per-prompt >= 2 (or use --baseline none)")
    return args


# --------------------------------------------------------------------------------------------------
# the moments and the student's surrogate (pure functions, tested by enumeration in
# tests/test_amm.py)

class Adversary(torch.nn.Module):
    """f(s_t) = tanh(W h_t + b): a bounded test function over the vocabulary, one vector
    per state [.., V].

    W is `proj`, a full [V, H] matrix; or, with 0 < rank < H, W = U A of `proj` U [V, r] and
    `down` A [r, H], applied as (h A^T) U^T, never formed (rank >= H would express nothing more,
    with more parameters). U or W starts at N(0, init_std^2), zero by default: f = 0. A starts at
    N(0, H / r^2): U's gradient is nonzero at once, and AdamW's first step moves f about as much as
    a full W's (header choice 8)."""

    def __init__(self, hidden_size, vocab_size, init_std=0.0, rank=0):
        super().__init__()
        low_rank = 0 < rank < hidden_size
        self.down = (torch.nn.Linear(hidden_size, rank, bias=False) if low_rank
                     else torch.nn.Identity())
        self.proj = torch.nn.Linear(rank if low_rank else hidden_size, vocab_size)
        if low_rank:
            torch.nn.init.normal_(self.down.weight, std=hidden_size ** 0.5 / rank)
        torch.nn.init.normal_(self.proj.weight, std=init_std)    # std 0: all zeros
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, hidden):
        return torch.tanh(self.proj(self.down(hidden.detach().float())))             # [B, T, V]


def _probs(student_logits, teacher_logits):
    """q, p [B, T, V] over the student's vocabulary (p renormalised there), in float32 at least."""
    student_logits, teacher_logits = losses.align_vocab(student_logits, teacher_logits.detach())
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    return F.softmax(student_logits.to(dtype), dim=-1), F.softmax(teacher_logits.to(dtype), dim=-1)


def token_moments(student_logits, teacher_logits, f):
    """g_t = <p_t - q_t, f(s_t)> per token [B, T]."""
    q, p = _probs(student_logits, teacher_logits)
    return ((p - q) * f).sum(-1)


def l1_distance(student_logits, teacher_logits):
    """||p_t - q_t||_1 per token [B, T]: the moment under the optimal bounded adversary
    f = sign(p - q)."""
    q, p = _probs(student_logits, teacher_logits)
    return (p - q).abs().sum(-1)


def distance(g, mask, norm):
    """Per-sequence distance (1/T) sum_t g_t [B]; T = norm [B]: the horizon, or each sequence's own
    length (--token-mean, header choice 3)."""
    return losses.masked_sum(g, mask, dim=-1) / norm


def reward_to_go(g, mask):
    """R_t = sum_{t' > t} g_t' [B, T]: what action y_t changes (it moves every later state, not its
    own)."""
    g = torch.where(mask.bool(), g, torch.zeros_like(g))
    return g.flip(-1).cumsum(-1).flip(-1) - g


def loo_baseline(x, n):
    """Per row, the mean of x over the other n - 1 rows of its group [B, ...] (rows prompt-major,
    n per prompt)."""
    groups = x.reshape(-1, n, *x.shape[1:])
    return ((groups.sum(1, keepdim=True) - groups) / (n - 1)).reshape(x.shape)


def on_policy_advantages(g, mask, norm, token_mean, samples_per_prompt, baseline):
    """The score-function weights [B, T] of the on-policy surrogate, from the moments g [B, T]
    (detached).

    token_mean "horizon" (norm = T for every sequence): the distance (1/T) sum_t g_t is a sum of
    per-step costs, and action y_t weighs by its reward-to-go R_t / T (it changes only later
    states). "sequence" (norm = the own length |y|): (1/|y|) sum_t g_t depends on every action
    through |y| (an EOS shortens it), so every action weighs by the whole sequence's distance.
    Baseline "loo": the same quantity's mean over the prompt's other samples."""
    g = g.detach()
    if token_mean == "horizon":
        value = reward_to_go(g, mask) / norm[:, None]             # [B, T]
    else:
        value = distance(g, mask, norm)[:, None].expand_as(g)     # [B, T], constant in t
    return value - (loo_baseline(value, samples_per_prompt) if baseline == "loo" else 0.0)


def on_policy_surrogate(g, logprobs, advantages, mask, norm):
    """Per sequence [B]: distance(g) + sum_t log q(y_t|s_t) * sg(advantage_t). Its gradient, in
    expectation over y ~ q, is the gradient of d_on = E[distance(g)], the states moving with the
    student (tests/test_amm.py)."""
    return distance(g, mask, norm) + losses.masked_sum(logprobs * advantages.detach(), mask, dim=-1)


# --------------------------------------------------------------------------------------------------
# per-token values from final hidden states, never more than [chunk, V] at once
# (losses.kd_loss_chunked's form: logits [c, 1, V] and per-position arguments in, [c, 1] out)

def moment_values(s_logits, t_logits, adversary, adv_in):
    """g = <p - q, f(s)> per position; the adversary is a constant here (its own step is
    adversary_backward)."""
    with torch.no_grad():
        f = adversary(adv_in)[:, None]                                                  # [c, 1, V]
    return token_moments(s_logits, t_logits, f)


def student_values(s_logits, t_logits, adversary, adv_in, tokens, score_weight):
    """The student's per-position objective: g + score_weight * log q(y_t | s_t). With
    kd_loss_chunked's weights w_t = side weight / (sequences * T) and score_weight = advantage_t * T
    (on-policy; 0 off-policy), the weighted sum is the side's share of the surrogate
    (on_policy_surrogate) over the global batch."""
    # [c, 1]
    logq = torch.log_softmax(s_logits.float(), -1).gather(-1, tokens[:, None, None]).squeeze(-1)
    return moment_values(s_logits, t_logits, adversary, adv_in) + score_weight[:, None] * logq


def l1_values(s_logits, t_logits):
    return l1_distance(s_logits, t_logits)


@torch.no_grad()
def hidden_states(model, ro, max_rows, max_tokens):
    """Final hidden states at the positions that predict the response tokens [N, T, H], in
    micro-batches, `model` in eval mode (a scoring pass)."""
    model.eval()
    return ro.map(lambda r: sample.response_hidden(model, r)[0], max_rows, max_tokens,
                  per_position=True)


@torch.no_grad()
def side_values(fn, side, s_h, s_head, t_head, chunk_size, **kw):
    """fn's per-token values [N, T] over one side's rows (student hidden states s_h, the side's
    teacher ones)."""
    return losses.kd_loss_chunked(fn, s_h, s_head, side["t_h"], t_head, side["mask"],
                                  chunk_size=chunk_size, **kw)[1]


def moments(side, s_h, s_head, t_head, chunk_size):
    """g_t [N, T] of one side under its current adversary."""
    return side_values(moment_values, side, s_h, s_head, t_head, chunk_size,
                       adversary=side["adversary"], adv_in=side["adv_in"])


def mean_distance(side, g):
    """The side's distance estimate: the mean over the global batch's sequences of
    (1/T) sum_t g_t."""
    return common.all_reduce_sum(
        distance(g, side["mask"], side["norm"]).sum().item()) / side["count"]


def adversary_backward(side, s_head, t_head, weights, chunk_size, amp):
    """Backward of sum_t weights_t <p_t - q_t, f(s_t)> into the side's adversary (p and q are
    constants here), at the response positions only, chunk_size at a time: each chunk's [c, V] graph
    is freed by its backward."""
    keep = side["mask"].bool()
    # [M, ...]
    s_h, t_h, a_h, w = side["s_h"][keep], side["t_h"][keep], side["adv_in"][keep], weights[keep]
    for i in range(0, w.shape[0], chunk_size):
        c = slice(i, i + chunk_size)
        with amp:
            with torch.no_grad():
                q, p = _probs(s_head(s_h[c]), t_head(t_h[c]))                              # [c, V]
            objective = (w[c, None] * (p - q) * side["adversary"](a_h[c])).sum()
        objective.backward()


def load_models(args, device):
    """The tokenizer, the student (fp32 weights and AdamW state), the frozen teacher in --dtype, and
    the two adversaries (off- and on-policy; fp32), reading the teacher's or the student's hidden
    states (--adv-input)."""
    tok, student, teacher = models.load_white_box(args, device)
    if args.gradient_checkpointing:
        models.checkpoint_activations(student)
    hidden = (teacher if args.adv_input == "teacher" else student).config.hidden_size
    vocab = student.get_output_embeddings().weight.shape[0]
    torch.manual_seed(args.seed)
    adv_off, adv_on = (Adversary(hidden, vocab, args.adv_init_std, args.adv_rank).to(device)
                       for _ in range(2))
    return tok, student, teacher, adv_off, adv_on


def make_sides(student, teacher, batch, step, adv_on, adv_off, args, gen, amp, phases, compute):
    """Each side's fixed quantities for the step: its rollout (on: k samples per prompt from the
    student; off: the teacher's response), the teacher's hidden states (p, and the adversary's
    input) and the student's before the update (q for the adversary steps and the advantages), its
    weight and its global row count."""
    k, mb, mb_tokens = args.samples_per_prompt, args.micro_batch_size, args.micro_batch_tokens
    vocab = student.get_output_embeddings().weight.shape[0]
    prompts = [r["prompt"] for r in batch]
    with phases("sampling"):
        on_ro = sample.rollout(student, prompts, [f"s{step}|{r['id']}" for r in batch], n=k,
                               **gen)                                                    # y_s ~ q
        off_ro = sample.rollout(teacher, prompts, [f"t{step}|{r['id']}" for r in batch],
                                vocab_size=vocab, **gen)                                 # y_t ~ p
    compute.generate(student, on_ro, k)
    compute.generate(teacher, off_ro, teacher=True,
                     calls=math.ceil(len(batch) / (args.gen_batch_size or len(batch))))
    sides = {}
    for name, ro, adversary, weight, rows in (
            ("on", on_ro, adv_on, 1.0 - args.beta, len(batch) * k),
            ("off", off_ro, adv_off, args.beta, len(batch))):
        mask = ro.response_mask.float()                                                  # [N, T]
        norm = (torch.full_like(mask[:, 0], args.max_new_tokens) if args.token_mean == "horizon"
                else mask.sum(-1).clamp(min=1))                                          # [N]
        with phases("scoring"), amp:
            t_h, s_h = (hidden_states(teacher, ro, mb, mb_tokens),
                        hidden_states(student, ro, mb, mb_tokens))
        compute.forward(teacher, ro, teacher=True,
                        calls=common.micro_batch_count(ro, mb, mb_tokens))
        compute.forward(student, ro)
        sides[name] = dict(ro=ro, mask=mask, norm=norm, count=common.all_reduce_sum(rows),
                           weight=weight, adversary=adversary, t_h=t_h, s_h=s_h,
                           adv_in=t_h if args.adv_input == "teacher" else s_h)
    return sides


def adversary_steps(sides, s_head, t_head, adv_params, adv_opt, args, amp, phases, m, compute):
    """--adv-steps ascent steps of both adversaries on beta d_off + (1 - beta) d_on (p, q fixed).
    Logs the distances after them and each adversary's gain (same samples) into `m`; returns the
    moments g [N, T] after."""
    chunk = args.chunk_size
    with phases("scoring"), amp:
        pre = {name: mean_distance(sd, moments(sd, sd["s_h"], s_head, t_head, chunk))
               for name, sd in sides.items()}
    for _ in range(args.adv_steps):
        with phases("adversary"):
            for sd in sides.values():
                # minus: maximise
                ascent = -sd["weight"] / sd["count"] * sd["mask"] / sd["norm"][:, None]
                adversary_backward(sd, s_head, t_head, ascent, chunk, amp)
            common.clip_and_step(adv_params, adv_opt, args.grad_clip)
    with phases("scoring"), amp:
        g = {name: moments(sd, sd["s_h"], s_head, t_head, chunk) for name, sd in sides.items()}
        l1 = {name: mean_distance(sd, side_values(l1_values, sd, sd["s_h"], s_head, t_head, chunk))
              for name, sd in sides.items()}
    post = {name: mean_distance(sd, g[name]) for name, sd in sides.items()}
    heads = models.num_params(s_head) + models.num_params(t_head)   # run alone on stored states
    for sd in sides.values():   # over each side's response tokens: the heads (moments before and
        # after, l1, each ascent step), the adversary (moments before and after; each ascent step)
        tokens = int(sd["mask"].sum())
        compute.forward(heads, tokens, passes=3 + args.adv_steps)
        compute.forward(sd["adversary"], tokens, passes=2)
        compute.train(sd["adversary"], tokens, passes=args.adv_steps)
    m.update(d_on=post["on"], d_off=post["off"], d_on_gain=post["on"] - pre["on"],
             d_off_gain=post["off"] - pre["off"], l1_on=l1["on"], l1_off=l1["off"])
    return g


def student_backward(student, sides, advantages, s_head, t_head, args, amp, phases, compute):
    """Backward of the student's objective, beta d_off + (1 - beta) (the surrogate of d_on),
    micro-batch by micro-batch; returns this rank's share of it. The student is put in training
    mode (from_pretrained leaves it in eval mode, where HF layers skip activation checkpointing)."""
    student.train()
    total = 0.0
    for name, sd in sides.items():
        weights = sd["weight"] / sd["count"] * sd["mask"] / sd["norm"][:, None]           # [N, T]
        score_weight = (advantages * sd["norm"][:, None] if name == "on"
                        else torch.zeros_like(weights))
        for index, r in sd["ro"].micro_batches(args.micro_batch_size, args.micro_batch_tokens):
            t = r.response_ids.shape[1]
            with phases("student"), amp:
                h, _ = sample.response_hidden(student, r)                                # [b, t, H]
                loss, _ = losses.kd_loss_chunked(
                    student_values, h, s_head, sd["t_h"][index, :t], t_head, weights[index, :t],
                    chunk_size=args.chunk_size, adversary=sd["adversary"],
                    adv_in=sd["adv_in"][index, :t], tokens=r.response_ids,
                    score_weight=score_weight[index, :t])
            with phases("student"):
                loss.backward()
            total += loss.item()
        # the student's pass (its head included), the teacher's head and the adversary
        compute.train(student, sd["ro"])
        compute.forward(models.num_params(t_head) + models.num_params(sd["adversary"]),
                        int(sd["mask"].sum()))
    return total


def student_moves(student, sides, s_head, t_head, args, amp, phases, m, compute):
    """The distance estimates after the student's step, at the same states with the same
    adversaries: how far the step moved the moments it was asked to close (d_on's state distribution
    moves too; that part is the score term, checked exactly in tests/test_amm.py). Logged as
    d_*_student into `m`."""
    with phases("scoring"), amp:
        after = {name: mean_distance(sd, moments(sd, hidden_states(student, sd["ro"],
                                                                   args.micro_batch_size,
                                                                   args.micro_batch_tokens),
                                                 s_head, t_head, args.chunk_size))
                 for name, sd in sides.items()}
    heads = models.num_params(s_head) + models.num_params(t_head)
    for sd in sides.values():   # a student pass, then the heads and the adversary on its states
        compute.forward(student, sd["ro"])
        compute.forward(heads + models.num_params(sd["adversary"]), int(sd["mask"].sum()))
    m.update(d_on_student=after["on"] - m["d_on"], d_off_student=after["off"] - m["d_off"])


LOG_KEYS = ("d_on", "d_on_gain", "d_on_student", "d_off", "d_off_gain", "d_off_student", "l1_on",
            "l1_off", "loss", "grad_norm", "response_len")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.setup(args)
    tok, student, teacher, adv_off, adv_on = load_models(args, device)
    amp = models.autocast(device, args.dtype)
    pad = tok.pad_token_id
    gen = dict(max_new_tokens=args.max_new_tokens, eos_ids=sample.stop_ids(tok, student, teacher),
               pad_id=pad, seed=args.seed, amp=amp,
               batch_size=args.gen_batch_size, max_tokens=args.gen_batch_tokens,
               decode=args.decode)                                     # sample.rollout's settings
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    print0(f"teacher {args.teacher}: {models.num_params(teacher) / 1e6:.2f}M, "
           f"student {args.student}: {models.num_params(student) / 1e6:.2f}M, "
           f"adversaries 2 x {models.num_params(adv_on) / 1e6:.2f}M "
           f"params, world {world}, compute {args.dtype}")
    train, val, val_recs, steps_per_epoch = data_lib.white_box_prompts(
        tok, args.data, limit=args.limit, val_fraction=args.val_fraction,
        max_prompt_len=args.max_prompt_len, eval_prompts=args.eval_prompts, seed=args.seed,
        per_step=args.prompts_per_step)
    total_steps = steps_per_epoch * args.epochs
    print0(f"data: {len(train)} train prompts, {len(val)} held out; {total_steps} steps")
    # held-out teacher responses, sampled once: the fixed yardstick of the before/after divergence
    held = eval_lib.held_out_responses(teacher, val, gen, vocab_size=s_head.weight.shape[0])
    for r, y in zip(val, held):
        r["y_t"] = y

    opt = common.make_optimizer(list(student.parameters()), args.lr, args.weight_decay,
                                args.adam8bit)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(cosine, total=total_steps))
    adv_params = list(adv_off.parameters()) + list(adv_on.parameters())
    adv_opt = torch.optim.AdamW(adv_params, lr=args.adv_lr, weight_decay=args.weight_decay)
    state = common.resume(args, student=student, adv_off=adv_off, adv_on=adv_on, opt=opt,
                          adv_opt=adv_opt, sched=sched)
    compute = common.Compute()   # the counters of every metrics row
    compute.resume(state)
    start = 0 if state is None else state["step"] + 1

    for step in range(start, total_steps):
        t0, phases = time.time(), common.Phases(device)
        batch, _ = data_lib.batch_at_step(train, step, args.prompts_per_step, args.seed, "amm",
                                          rank, world)
        sides = make_sides(student, teacher, batch, step, adv_on, adv_off, args, gen, amp, phases,
                           compute)
        m = {"lr": sched.get_last_lr()[0]}
        g = adversary_steps(sides, s_head, t_head, adv_params, adv_opt, args, amp, phases, m,
                            compute)
        # advantages of the student's samples under the updated adversary, before the student moves
        on = sides["on"]
        advantages = on_policy_advantages(g["on"], on["mask"], on["norm"], args.token_mean,
                                          args.samples_per_prompt, args.baseline)
        total = student_backward(student, sides, advantages, s_head, t_head, args, amp, phases,
                                 compute)
        with phases("student"):
            grad_norm, skipped = common.clip_and_step(student.parameters(), opt, args.grad_clip)
        sched.step()
        student_moves(student, sides, s_head, t_head, args, amp, phases, m, compute)
        m.update(response_len=on["ro"].response_mask.sum().item() / on["ro"].response_mask.shape[0],
                 skipped=int(skipped))
        m = common.reduce_metrics(m | phases.stats)
        tokens = sum(common.all_reduce_sum(sd["ro"].response_mask.sum().item())
                     for sd in sides.values())
        m.update(step=step, loss=common.all_reduce_sum(total), grad_norm=grad_norm, tokens=tokens,
                 s_per_step=time.time() - t0, **compute.log())
        common.log_step(args, "step", step, total_steps, m, LOG_KEYS)
        if common.end_step(args, step, total_steps, step + 1 - start, student=student,
                           adv_off=adv_off, adv_on=adv_on, opt=opt, adv_opt=adv_opt, sched=sched,
                           compute=compute):
            common.compute_cleanup()
            return

    opt = adv_opt = sched = sides = None  # training state goes before the evaluation loads anything
    eval_lib.white_box_final(student, teacher, tok, val, val_recs, pad, args, device)
    common.compute_cleanup()


def cosine(step, total):
    """The learning rate's factor: cosine from 1 to 0 over `total` steps, no warmup."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


if __name__ == "__main__":
    common.run_main(main)   # a locked --out: exit 2
