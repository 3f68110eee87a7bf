"""Losses as pure functions of tensors, the definitions to check against the papers. Per-token
losses return [B, T]: the reduction is the caller's. The chunked fast path is fast_losses.py."""

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------
# masked reductions (masks are 0/1, bool or numeric)

def masked_sum(x, mask, dim=None):
    # where, not x * mask: a masked position may hold NaN, and NaN * 0 = NaN
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x, mask, dim=None):
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)  # 0, not NaN, where the mask is empty


# --------------------------------------------------------------------------------------------------
# discriminator (GAD, arXiv 2511.10643): Bradley-Terry on (teacher, student) score pairs

def bt_loss(teacher_scores, student_scores):
    """-mean log sigmoid(D(x, y_t) - D(x, y_s)) over elementwise pairs (same shape)."""
    margin = teacher_scores.float() - student_scores.float()
    # -softplus(-z), finite everywhere; log(sigmoid(z)) is -inf for z below about -100 in fp32
    return -F.logsigmoid(margin).mean()


def bt_accuracy(teacher_scores, student_scores):
    return (teacher_scores > student_scores).float().mean()


# --------------------------------------------------------------------------------------------------
# DPO (Rafailov et al. 2023, arXiv 2305.18290): SODA's loss (arXiv 2604.03873), the teacher's
# response chosen over the student's

def dpo(chosen, rejected, ref_chosen, ref_rejected, beta):
    """-log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))) per pair, from the
    responses' summed logprobs [B] under the policy and the frozen reference."""
    margin = (chosen.float() - ref_chosen.float()) - (rejected.float() - ref_rejected.float())
    return -F.logsigmoid(beta * margin)


# --------------------------------------------------------------------------------------------------
# PPO

def ppo_policy_loss(logprobs, old_logprobs, advantages, clip_eps=0.2, dual_clip=3.0):
    """PPO's clipped surrogate per token [B, T] (Schulman et al. 2017), dual-clipped unless None,
    and where a clip was active (zero gradient there). advantages: [B, T] or [B] (GRPO)."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)                              # [B] -> [B, 1]
    # clamped as verl does: exp(20) is far outside any clip range, and a ratio of inf would give
    # inf * 0 = NaN in the backward of the inactive branch
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))       # [B, T]
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(pg_losses1, pg_losses2)                           # [B, T]
    clipped = pg_losses2 > pg_losses1
    if dual_clip is not None:
        # Ye et al. 2020 (as verl): for A < 0 the max grows without bound in r, so cap it at -c A
        pg_losses3 = -advantages * dual_clip
        capped = (advantages < 0) & (loss > pg_losses3)
        loss = torch.where(capped, pg_losses3, loss)
        clipped = clipped | capped
    return loss, clipped


# --------------------------------------------------------------------------------------------------
# KL(pi || ref) estimators from samples y ~ pi (Schulman, "Approximating KL Divergence", 2020),
# with the log-ratio d = ref_logprobs - logprobs = log(ref(y) / pi(y))

def kl_k2(logprobs, ref_logprobs):
    """d^2 / 2: biased, low variance, >= 0; also PPO's approx_kl diagnostic (cleanrl, TRL)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs, ref_logprobs):
    """exp(d) - d - 1: unbiased, >= 0, low variance; GAD's KL term (verl's low_var_kl)."""
    # not clamped as in verl: it overflows only for d > 88, a sampled token of probability below
    # e^-88; ppo_update skips a non-finite step rather than hide it
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


# --------------------------------------------------------------------------------------------------
# entropy

def entropy_from_logits(logits):
    """H = logsumexp(z) - sum_v p_v z_v per position, [..., V] -> [...], in float32 at least."""
    # this form takes no log of a probability (log p is -inf for a tiny p)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)      # [..., 1]
    p = torch.exp(logits - lse)                               # [..., V]
    p_z = torch.where(p > 0, p * logits, torch.zeros_like(p))  # p = 0: 0, not 0 * -inf
    return lse.squeeze(-1) - p_z.sum(-1)


# --------------------------------------------------------------------------------------------------
# white-box distillation: divergences between the teacher's p and the student's q over the whole
# vocabulary (DistiLLM-2, arXiv 2503.07067; DistiLLM, arXiv 2402.03898; GKD, arXiv 2306.13649).
# Logits [B, T, V] in, per-token values [B, T] out. Mixtures are formed in log space (logaddexp):
# a p + (1 - a) q underflows to 0 for a tiny p, while log a + log p stays finite.

def align_vocab(student_logits, teacher_logits):
    """(student_logits, teacher_logits), the teacher's vocabulary cut or padded to the student's."""
    v_s, v_t = student_logits.size(-1), teacher_logits.size(-1)
    if v_t > v_s:
        # ids past the student's are embedding padding the shared tokenizer never produces
        # (Qwen2.5-7B 152064 vs 1.5B 151936); the softmax after the cut renormalises p over the rest
        teacher_logits = teacher_logits[..., :v_s]
    elif v_t < v_s:
        # p = 0 on the student's extra ids: reverse_kl is then +inf where q > 0, its true value
        teacher_logits = F.pad(teacher_logits, (0, v_s - v_t), value=float("-inf"))
    return student_logits, teacher_logits


def _logprobs(student_logits, teacher_logits):
    # the teacher is a constant: no caller can backprop into it by accident
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits.detach())
    # float32 whatever the input: a bf16 log-softmax over 150k ids keeps ~3 significant digits,
    # and the KL terms are differences of nearly equal log-probabilities
    log_q = F.log_softmax(student_logits.float(), dim=-1)    # [B, T, V]
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)    # [B, T, V]
    return log_q, log_p


def _kl_sum(log_a, log_b):
    a = log_a.exp()
    # 0 log 0 = 0, zeroed before the product: at a = 0 its backward would make 0 * -inf = NaN
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(a))
    return (a * diff).sum(-1)


def _mix_weight(x, like):
    """A mixing weight, a float in [0, 1] or one per sequence [B], as float32 of like's rank."""
    if not torch.is_tensor(x):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"mixing weight must be in [0, 1], got {x}")
        return torch.full((1,) * like.dim(), float(x), device=like.device)
    return (x.detach().to(device=like.device, dtype=torch.float32)
            .reshape(-1, *(1,) * (like.dim() - 1)))


def skl(student_logits, teacher_logits, alpha):
    """DistiLLM's skew KL, KL(p || a p + (1 - a) q) per token [B, T]; alpha: float or [B]."""
    log_q, log_p = _logprobs(student_logits, teacher_logits)
    a = _mix_weight(alpha, log_q)
    # q not detached in the mixture (DistiLLM): the gradient flows through log m1 too
    log_m1 = torch.logaddexp(torch.log(a) + log_p, torch.log1p(-a) + log_q)           # [B, T, V]
    return _kl_sum(log_p, log_m1)


def srkl(student_logits, teacher_logits, alpha, stop_grad=False):
    """Skew reverse KL, KL(q || (1 - a) p + a q) per token [B, T]; alpha: float or [B]."""
    log_q, log_p = _logprobs(student_logits, teacher_logits)
    a = _mix_weight(alpha, log_q)
    # the same values either way; stop_grad=False is DistiLLM's (jongwooko/distillm,
    # losses.skewed_reverse_kl), True DistiLLM-2's mixture held fixed (jongwooko/distillm-2,
    # distillm_trainer.get_batch_logps)
    log_m2 = torch.logaddexp(torch.log1p(-a) + log_p,
                             torch.log(a) + (log_q.detach() if stop_grad else log_q))
    return _kl_sum(log_q, log_m2)


def forward_kl(student_logits, teacher_logits):
    """KL(p || q) per token [B, T]: mass-covering."""
    log_q, log_p = _logprobs(student_logits, teacher_logits)
    return _kl_sum(log_p, log_q)


def reverse_kl(student_logits, teacher_logits):
    """KL(q || p) per token [B, T]: mode-seeking."""
    log_q, log_p = _logprobs(student_logits, teacher_logits)
    return _kl_sum(log_q, log_p)


def jsd(student_logits, teacher_logits, beta):
    """GKD's generalized JSD per token [B, T], M = beta p + (1 - beta) q; beta: float or [B]."""
    log_q, log_p = _logprobs(student_logits, teacher_logits)
    # beta = 0 and 1 are KL(p || q) and KL(q || p) by GKD's (and TRL's) convention, not the limit
    # (the formula tends to 0 at both ends)
    if not torch.is_tensor(beta):
        if beta == 0.0:
            return _kl_sum(log_p, log_q)
        if beta == 1.0:
            return _kl_sum(log_q, log_p)
    b = _mix_weight(beta, log_q)                                                     # [B, 1, 1]
    at_0, at_1 = b[..., 0] == 0, b[..., 0] == 1                                      # [B, 1]
    # an endpoint's mixture is evaluated at 0.5 instead, so that no log 0 reaches the backward
    b = torch.where((b > 0) & (b < 1), b, torch.full_like(b, 0.5))
    log_m = torch.logaddexp(torch.log(b) + log_p, torch.log1p(-b) + log_q)           # [B, T, V]
    # beta KL(p || M) + (1 - beta) KL(q || M)
    loss = b[..., 0] * _kl_sum(log_p, log_m) + (1 - b[..., 0]) * _kl_sum(log_q, log_m)  # [B, T]
    # Only computed when some sequence needs them: an infinite unselected branch would still
    # give NaN gradients.
    if at_0.any():
        loss = torch.where(at_0, _kl_sum(log_p, log_q), loss)
    if at_1.any():
        loss = torch.where(at_1, _kl_sum(log_q, log_p), loss)
    return loss
