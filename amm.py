"""AMM: adversarial moment-matching distillation (Jia et al., arXiv 2406.02959, NeurIPS 2024).

    python amm.py  # CPU default: SmolLM2-135M teacher, 24-layer student
    torchrun --nproc_per_node=8 amm.py --teacher qwen2.5-7b --student qwen2.5-1.5b \
        --data prompts.jsonl

The student q minimises beta d_off + (1 - beta) d_on, d = sup_f E[(1/T) sum_t <p_t - q_t, f(s_t)>]
on the teacher's (off) or its own (on) responses, as two adversaries f ascend them. No public code
exists: this is OUR RECONSTRUCTION, derived in docs/implementation-notes.md.

Reconstruction choices (the paper leaves them open; each is a flag):
  1. --adv-input teacher: f(s_t) = tanh(W h_t + b), h_t the teacher's detached final hidden state.
  2. --adv-steps 1 AdamW update (--adv-lr) of each adversary before each student update.
  3. --token-mean sequence: T is each response's own length (horizon: --max-new-tokens).
  4. --baseline loo: the mean over the prompt's other samples (--samples-per-prompt >= 2).
  5. --beta 0.5 (the weight of d_off), fixed over training.
  6. Teacher responses sampled fresh every step at temperature 1; p, q at temperature 1, no top-p.
  7. A larger teacher vocabulary: the teacher samples the student's ids, p renormalised over them.
  8. --adv-rank r: W = U A, U [V, r] from zero, A [r, H] ~ N(0, H / r^2); 0: a full [V, H] W.
"""

import functools
import math
import time

import torch
import torch.nn.functional as F

import common
from common import print0
import data as data_lib
import eval as eval_lib
import fast_losses
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
    adv_rank=256, fsdp=False,
)
PRESETS = {
    "tiny": dict(PAPER, teacher="tiny-teacher", data="tiny", epochs=3, prompts_per_step=8,
                 micro_batch_size=32, lr=1e-2, adv_lr=1e-1, max_prompt_len=64, max_new_tokens=16,
                 dtype="float32", eval_prompts=16, limit=64, gradient_checkpointing=False,
                 micro_batch_tokens=None, adv_rank=0),
    # The CPU default, the pair, data and settings of distillm2.py's (and `dev/bench.py quality
    # --budget cpu`): SmolLM2-135M-Instruct and itself without 6 middle layers, 2 epochs of 12
    # steps.
    "smollm2-135m": dict(PAPER, teacher="smollm2-135m", student_layers="0-11,18-29", epochs=2,
                         prompts_per_step=4, samples_per_prompt=2, micro_batch_size=8, lr=2e-5,
                         adv_lr=1e-3, max_prompt_len=64, max_new_tokens=32, dtype="float32",
                         eval_prompts=16, limit=111, val_fraction=0.25, gen_batch_size=8,
                         gradient_checkpointing=False, micro_batch_tokens=None, adv_rank=0),
}


def parse_args(argv=None):
    p = common.arg_parser("AMM: adversarial moment-matching distillation", out="runs/amm")
    p.set_defaults(weight_decay=0.0, grad_clip=1.0)   # the student's and the adversaries'
    g = p.add_argument_group("AMM (reconstruction choices: see the header)")
    g.add_argument("--beta", type=float, default=0.5, help="weight of d_off; 1 - beta weighs d_on")
    g.add_argument("--adv-steps", type=int, default=1, help="adversary updates per student update")
    g.add_argument("--adv-lr", type=float, help="adversary AdamW learning rate")
    g.add_argument("--adv-input", default="teacher", choices=("teacher", "student"),
                   help="whose detached final hidden state the adversary reads")
    g.add_argument("--adv-init-std", type=float, default=0.0, help="adversary init std (0: f = 0)")
    g.add_argument("--adv-rank", type=int, help="rank r of W = U A (0: a full [V, H] W)")
    g.add_argument("--token-mean", default="sequence", choices=("sequence", "horizon"),
                   help="1/T of the distances: 1/own length, or 1/--max-new-tokens")
    g.add_argument("--baseline", default="loo", choices=("loo", "none"),
                   help="leave-one-out mean over the prompt's other samples, or none")
    g.add_argument("--samples-per-prompt", type=int, help="student samples per prompt")
    g.add_argument("--epochs", type=int, help="passes over the prompts")
    g.add_argument("--gen-batch-size", type=int, default=32, help="prompts per generate() call")
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
    """f(s_t) = tanh(W h_t + b) [.., V], a bounded test function over the vocabulary; W is `proj`
    [V, H], or U (`proj`, [V, r]) times A (`down`, [r, H]) for 0 < rank < H (header choice 8)."""

    def __init__(self, hidden_size, vocab_size, init_std=0.0, rank=0):
        super().__init__()
        low_rank = 0 < rank < hidden_size   # rank >= H would express nothing more
        self.down = (torch.nn.Linear(hidden_size, rank, bias=False) if low_rank
                     else torch.nn.Identity())
        self.proj = torch.nn.Linear(rank if low_rank else hidden_size, vocab_size)
        if low_rank:   # U's gradient nonzero at once; AdamW's first step moves f as a full W's
            torch.nn.init.normal_(self.down.weight, std=hidden_size ** 0.5 / rank)
        torch.nn.init.normal_(self.proj.weight, std=init_std)    # U or W; std 0: f = 0
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
    """||p_t - q_t||_1 per token [B, T]: the moment of the best bounded adversary, sign(p - q)."""
    q, p = _probs(student_logits, teacher_logits)
    return (p - q).abs().sum(-1)


def distance(g, mask, norm):
    """Per-sequence distance (1/T) sum_t g_t [B], T = norm [B] (--token-mean, header choice 3)."""
    return losses.masked_sum(g, mask, dim=-1) / norm


def reward_to_go(g, mask):
    """R_t = sum_{t' > t} g_t' [B, T]: what action y_t changes (every later state, not its own)."""
    g = torch.where(mask.bool(), g, torch.zeros_like(g))
    return g.flip(-1).cumsum(-1).flip(-1) - g


def loo_baseline(x, n):
    """Per row, the mean of x [B, ...] over the other n - 1 rows of its prompt (n a prompt)."""
    groups = x.reshape(-1, n, *x.shape[1:])
    return ((groups.sum(1, keepdim=True) - groups) / (n - 1)).reshape(x.shape)


def on_policy_advantages(g, mask, norm, token_mean, samples_per_prompt, baseline):
    """The score-function weights [B, T] of the on-policy surrogate, from the moments g [B, T]
    (detached), less the same quantity's mean over the prompt's other samples with baseline loo."""
    g = g.detach()
    if token_mean == "horizon":   # a sum of per-step costs: y_t changes only later states
        value = reward_to_go(g, mask) / norm[:, None]             # [B, T]
    else:   # (1/|y|) sum_t g_t: every action changes |y| (an EOS shortens it)
        value = distance(g, mask, norm)[:, None].expand_as(g)     # [B, T], constant in t
    return value - (loo_baseline(value, samples_per_prompt) if baseline == "loo" else 0.0)


def on_policy_surrogate(g, logprobs, advantages, mask, norm):
    """Per sequence [B]: distance(g) + sum_t log q(y_t|s_t) sg(advantage_t), whose expected
    gradient over y ~ q is that of d_on = E[distance(g)] (checked in tests/test_amm.py)."""
    return distance(g, mask, norm) + losses.masked_sum(logprobs * advantages.detach(), mask, dim=-1)


# --------------------------------------------------------------------------------------------------
# per-token values from final hidden states, never more than [chunk, V] at once
# (fast_losses.kd_loss_chunked's form: logits [c, 1, V] and per-position arguments in, [c, 1] out)

def moment_values(s_logits, t_logits, adversary, adv_in):
    """g = <p - q, f(s)> per position, the adversary a constant (its step: adversary_backward)."""
    with torch.no_grad():
        f = adversary(adv_in)[:, None]                                                  # [c, 1, V]
    return token_moments(s_logits, t_logits, f)


def student_values(s_logits, t_logits, adversary, adv_in, tokens, score_weight):
    """The student's per-position objective g + score_weight * log q(y_t | s_t): with weights
    side weight / (sequences * T) and score_weight = advantage_t * T (0 off-policy), its weighted
    sum is the side's share of the surrogate (on_policy_surrogate) over the global batch."""
    # [c, 1]
    logq = torch.log_softmax(s_logits.float(), -1).gather(-1, tokens[:, None, None]).squeeze(-1)
    return moment_values(s_logits, t_logits, adversary, adv_in) + score_weight[:, None] * logq


def l1_values(s_logits, t_logits):
    return l1_distance(s_logits, t_logits)


@torch.no_grad()
def hidden_states(model, ro, args):
    """Final hidden states that predict the response tokens [N, T, H], a scoring pass (eval)."""
    model.eval()
    hidden = lambda r: sample.response_hidden(model, r)[0]
    with common.gathered(model):
        return ro.map(hidden, args.micro_batch_size, args.micro_batch_tokens, per_position=True)


@torch.no_grad()
def side_values(fn, side, s_h, heads, chunk_size, **kw):
    """fn's per-token values [N, T] on a side's rows from student states s_h; heads: (s, t)."""
    s_head, t_head = heads
    return fast_losses.kd_loss_chunked(fn, s_h, s_head, side["t_h"], t_head, side["mask"],
                                       chunk_size=chunk_size, **kw)[1]


def moments(side, s_h, heads, chunk_size):
    """g_t [N, T] of one side under its current adversary."""
    kw = dict(adversary=side["adversary"], adv_in=side["adv_in"])
    return side_values(moment_values, side, s_h, heads, chunk_size, **kw)


def mean_distance(side, g):
    """The side's distance estimate: (1/T) sum_t g_t, averaged over the global batch's sequences."""
    total = distance(g, side["mask"], side["norm"]).sum().item()
    return common.all_reduce_sum(total) / side["count"]


def adversary_backward(side, heads, weights, chunk_size, amp):
    """Backward of sum_t weights_t <p_t - q_t, f(s_t)> into the side's adversary (p, q constants),
    at the response positions, chunk_size at a time: each chunk's [c, V] graph freed by its own."""
    s_head, t_head = heads
    keep = side["mask"].bool()
    s_h, t_h, a_h = side["s_h"][keep], side["t_h"][keep], side["adv_in"][keep]   # [M, H]
    w = weights[keep]                                                             # [M]
    for i in range(0, w.shape[0], chunk_size):
        c = slice(i, i + chunk_size)
        with amp:
            with torch.no_grad():
                q, p = _probs(s_head(s_h[c]), t_head(t_h[c]))                              # [c, V]
            objective = (w[c, None] * (p - q) * side["adversary"](a_h[c])).sum()
        objective.backward()


def load_models(args):
    """The tokenizer, the student, the frozen teacher, and the off- and on-policy adversaries."""
    tok, student, teacher = models.load_white_box(args, args.device)
    if args.gradient_checkpointing:
        models.checkpoint_activations(student)
    hidden = (teacher if args.adv_input == "teacher" else student).config.hidden_size
    vocab = student.get_output_embeddings().weight.shape[0]
    torch.manual_seed(args.seed)
    adversary = lambda: Adversary(hidden, vocab, args.adv_init_std, args.adv_rank).to(args.device)
    return tok, student, teacher, adversary(), adversary()   # off-policy, then on-policy


def make_sides(student, teacher, batch, step, adversaries, args):
    """Each side's fixed quantities for the step: its rollout (on: k samples a prompt of the
    student; off: the teacher's), both models' states on it, its adversary, weight and row count."""
    k, prompts = args.samples_per_prompt, [r["prompt"] for r in batch]
    vocab = student.get_output_embeddings().weight.shape[0]   # the teacher samples only these ids
    gen = common.rollout_settings(args)
    with common.phase("sampling"):
        keys = [f"s{step}|{r['id']}" for r in batch]
        with common.gathered(student):
            on_ro = sample.rollout(student, prompts, keys, n=k, **gen)             # y_s ~ q
        keys = [f"t{step}|{r['id']}" for r in batch]
        off_ro = sample.rollout(teacher, prompts, keys, vocab_size=vocab, **gen)   # y_t ~ p
    common.compute.generate(student, on_ro, k)
    calls = math.ceil(len(batch) / (args.gen_batch_size or len(batch)))
    common.compute.generate(teacher, off_ro, teacher=True, calls=calls)
    sides = {}
    for name, ro, weight, rows in (("on", on_ro, 1.0 - args.beta, len(batch) * k),
                                   ("off", off_ro, args.beta, len(batch))):
        mask = ro.response_mask.float()                                                  # [N, T]
        norm = (torch.full_like(mask[:, 0], args.max_new_tokens) if args.token_mean == "horizon"
                else mask.sum(-1).clamp(min=1))                                          # [N]
        with common.phase("scoring"), args.amp:
            t_h, s_h = hidden_states(teacher, ro, args), hidden_states(student, ro, args)
        calls = common.micro_batch_count(ro, args.micro_batch_size, args.micro_batch_tokens)
        common.compute.forward(teacher, ro, teacher=True, calls=calls)
        common.compute.forward(student, ro)
        adv_in = t_h if args.adv_input == "teacher" else s_h
        sides[name] = dict(ro=ro, mask=mask, norm=norm, count=common.all_reduce_sum(rows),
                           weight=weight, adversary=adversaries[name], t_h=t_h, s_h=s_h,
                           adv_in=adv_in)
    return sides


def adversary_steps(sides, heads, adv_opt, args, m):
    """--adv-steps ascent steps of both adversaries on beta d_off + (1 - beta) d_on (p, q fixed);
    logs the distances after them and each one's gain into `m`. Returns the moments g [N, T]."""
    chunk, params = args.chunk_size, [p for group in adv_opt.param_groups for p in group["params"]]
    with common.phase("scoring"), args.amp:
        pre = {n: mean_distance(s, moments(s, s["s_h"], heads, chunk)) for n, s in sides.items()}
    for _ in range(args.adv_steps):
        with common.phase("adversary"):
            for sd in sides.values():
                # minus: maximise
                ascent = -sd["weight"] / sd["count"] * sd["mask"] / sd["norm"][:, None]
                adversary_backward(sd, heads, ascent, chunk, args.amp)
            common.clip_and_step(params, adv_opt, args.grad_clip)
    with common.phase("scoring"), args.amp:
        g = {name: moments(sd, sd["s_h"], heads, chunk) for name, sd in sides.items()}
        l1 = {name: mean_distance(sd, side_values(l1_values, sd, sd["s_h"], heads, chunk))
              for name, sd in sides.items()}
    post = {name: mean_distance(sd, g[name]) for name, sd in sides.items()}
    n_heads = models.num_params(heads[0]) + models.num_params(heads[1])   # alone on stored states
    for sd in sides.values():   # over each side's response tokens: the heads (moments before and
        # after, l1, each ascent step), the adversary (moments before and after; each ascent step)
        tokens = int(sd["mask"].sum())
        common.compute.forward(n_heads, tokens, passes=3 + args.adv_steps)
        common.compute.forward(sd["adversary"], tokens, passes=2)
        common.compute.train(sd["adversary"], tokens, passes=args.adv_steps)
    m.update(d_on=post["on"], d_off=post["off"], d_on_gain=post["on"] - pre["on"],
             d_off_gain=post["off"] - pre["off"], l1_on=l1["on"], l1_off=l1["off"])
    return g


def student_backward(student, sides, advantages, heads, args):
    """Backward of the student's objective, beta d_off + (1 - beta) (the surrogate of d_on),
    micro-batch by micro-batch; returns this rank's share of it."""
    student.train()   # from_pretrained leaves eval mode, where HF layers skip checkpointing
    total, (s_head, t_head) = 0.0, heads
    for name, sd in sides.items():
        weights = sd["weight"] / sd["count"] * sd["mask"] / sd["norm"][:, None]           # [N, T]
        score_weight = (advantages * sd["norm"][:, None] if name == "on"
                        else torch.zeros_like(weights))
        for index, r in sd["ro"].micro_batches(args.micro_batch_size, args.micro_batch_tokens,
                                               equal=args.fsdp):
            t = r.response_ids.shape[1]
            with common.phase("student"), args.amp:
                h, _ = sample.response_hidden(student, r)                                # [b, t, H]
                loss, _ = fast_losses.kd_loss_chunked(
                    student_values, h, s_head, sd["t_h"][index, :t], t_head, weights[index, :t],
                    chunk_size=args.chunk_size, adversary=sd["adversary"],
                    adv_in=sd["adv_in"][index, :t], tokens=r.response_ids,
                    score_weight=score_weight[index, :t])
            with common.phase("student"):
                loss.backward()
            total += loss.item()
        # the student's pass (its head included), the teacher's head and the adversary
        common.compute.train(student, sd["ro"])
        n_params = models.num_params(t_head) + models.num_params(sd["adversary"])
        common.compute.forward(n_params, int(sd["mask"].sum()))
    return total


def student_moves(student, sides, heads, args, m):
    """The distance estimates after the student's step at the same states and adversaries, logged
    as d_*_student into `m`: how far the step moved the moments it was to close."""
    with common.phase("scoring"), args.amp:   # one side's student states at a time
        after = {name: mean_distance(sd, moments(sd, hidden_states(student, sd["ro"], args), heads,
                                                 args.chunk_size))
                 for name, sd in sides.items()}
    n_heads = models.num_params(heads[0]) + models.num_params(heads[1])
    for sd in sides.values():   # a student pass, then the heads and the adversary on its states
        common.compute.forward(student, sd["ro"])
        common.compute.forward(n_heads + models.num_params(sd["adversary"]), int(sd["mask"].sum()))
    m.update(d_on_student=after["on"] - m["d_on"], d_off_student=after["off"] - m["d_off"])


def cosine(step, total):
    """The learning rate's factor: cosine from 1 to 0 over `total` steps, no warmup."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


LOG_KEYS = ("d_on", "d_on_gain", "d_on_student", "d_off", "d_off_gain", "d_off_student", "l1_on",
            "l1_off", "loss", "grad_norm", "response_len")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.setup(args)
    args.device, args.amp = device, models.autocast(device, args.dtype)   # fixed for the run
    tok, student, teacher, adv_off, adv_on = load_models(args)
    if args.fsdp:
        student = common.shard(student, args.dtype)
    args.eos_ids, args.pad_id = sample.stop_ids(tok, student, teacher), tok.pad_token_id
    heads = (student.get_output_embeddings(), teacher.get_output_embeddings())
    print0(f"teacher {args.teacher}: {models.num_params(teacher) / 1e6:.2f}M, "
           f"student {args.student}: {models.num_params(student) / 1e6:.2f}M, "
           f"adversaries 2 x {models.num_params(adv_on) / 1e6:.2f}M "
           f"params, world {world}, compute {args.dtype}")
    train, val, val_recs, steps_per_epoch = data_lib.white_box_prompts(tok, args)
    total_steps = steps_per_epoch * args.epochs
    print0(f"data: {len(train)} train prompts, {len(val)} held out; {total_steps} steps")
    # held-out teacher responses, sampled once: the fixed yardstick of the before/after divergence
    held = eval_lib.held_out_responses(teacher, val, common.rollout_settings(args),
                                       vocab_size=heads[0].weight.shape[0])
    for r, y in zip(val, held):
        r["y_t"] = y

    opt = common.make_optimizer(student.parameters(), args.lr, args.weight_decay, args.adam8bit)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(cosine, total=total_steps))
    adv_params = list(adv_off.parameters()) + list(adv_on.parameters())
    adv_opt = torch.optim.AdamW(adv_params, lr=args.adv_lr, weight_decay=args.weight_decay)
    ckpt = dict(student=student, adv_off=adv_off, adv_on=adv_on, opt=opt, adv_opt=adv_opt,
                sched=sched)   # what a checkpoint holds
    state = common.resume(args, **ckpt)
    common.compute.resume(state)
    start = 0 if state is None else state["step"] + 1

    for step in range(start, total_steps):
        t0 = time.time()
        batch, _ = data_lib.batch_at_step(train, step, args.prompts_per_step, args.seed, "amm",
                                          rank, world)
        sides = make_sides(student, teacher, batch, step, {"on": adv_on, "off": adv_off}, args)
        m = {"lr": sched.get_last_lr()[0]}
        g = adversary_steps(sides, heads, adv_opt, args, m)
        # advantages of the student's samples under the updated adversary, before the student moves
        on = sides["on"]
        advantages = on_policy_advantages(g["on"], on["mask"], on["norm"], args.token_mean,
                                          args.samples_per_prompt, args.baseline)
        total = student_backward(student, sides, advantages, heads, args)
        with common.phase("student"):
            grad_norm, skipped = common.clip_and_step(student.parameters(), opt, args.grad_clip)
        sched.step()
        student_moves(student, sides, heads, args, m)
        response_len = on["ro"].response_mask.sum().item() / on["ro"].response_mask.shape[0]
        m.update(response_len=response_len, skipped=int(skipped))
        m = common.reduce_metrics(m | common.step_stats())
        tokens = sum(common.all_reduce_sum(sd["ro"].response_mask.sum().item())
                     for sd in sides.values())
        m.update(step=step, loss=common.all_reduce_sum(total), grad_norm=grad_norm, tokens=tokens,
                 s_per_step=time.time() - t0, **common.compute.log())
        common.log_step(args, "step", step, total_steps, m, LOG_KEYS)
        if common.end_step(args, step, total_steps, step + 1 - start, **ckpt,
                           compute=common.compute):
            common.compute_cleanup()
            return

    # training state goes before the evaluation loads anything
    opt = adv_opt = sched = sides = ckpt = None
    eval_lib.white_box_final(student, teacher, tok, val, val_recs, args.pad_id, args, device)
    common.compute_cleanup()


if __name__ == "__main__":
    common.run_main(main)   # a locked --out: exit 2
