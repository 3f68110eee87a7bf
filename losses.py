"""Pure tensor losses: masked reductions, Bradley-Terry, the PPO clipped surrogate, KL estimators, entropy.

Every function takes tensors (and a mask where positions can be padding) and returns tensors; nothing here
knows about models, optimizers or ranks. Per-token functions return per-token values ([B, T]); the reduction
is the caller's, because the right one (a token-mean over a whole mini-batch, counted across micro-batches
and ranks) cannot be seen from inside one micro-batch.

Masks are 0/1 (bool or numeric). Masked positions may hold anything, NaN included: they are selected away with
`torch.where`, never multiplied by 0 (NaN * 0 = NaN).
"""

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# masked reductions

def masked_sum(x, mask, dim=None):
    """Sum of x where mask is set; over everything (dim=None) or along dim."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x, mask, dim=None):
    """Mean of x where mask is set; 0 (not NaN) where the mask is empty."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the masked entries of the whole tensor, 0 on masked positions.

    The variance is the population one (divide by the count), so the result has mean 0 and variance exactly 1
    over the mask (up to eps). TRL's masked_whiten uses the unbiased variance instead; the difference is a factor
    sqrt(n / (n - 1)). shift_mean=False keeps the original mean and only rescales (as TRL does for rewards).
    An empty mask gives zeros.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ----------------------------------------------------------------------------------------------------------
# discriminator (GAD, arXiv 2511.10643): Bradley-Terry on (teacher, student) score pairs

def bt_loss(teacher_scores, student_scores):
    """-mean log sigmoid(D(x, y_t) - D(x, y_s)) over elementwise pairs (same shape).

    F.logsigmoid rather than log(sigmoid(.)): sigmoid underflows to 0 for a margin below about -100 in fp32 and
    the log becomes -inf; logsigmoid is computed as -softplus(-z), finite everywhere.
    """
    margin = teacher_scores.float() - student_scores.float()
    return -F.logsigmoid(margin).mean()


def bt_accuracy(teacher_scores, student_scores):
    """Fraction of pairs the discriminator ranks right (teacher strictly above student; a tie counts as wrong)."""
    return (teacher_scores > student_scores).float().mean()


# ----------------------------------------------------------------------------------------------------------
# PPO

def ppo_policy_loss(logprobs, old_logprobs, advantages, clip_eps=0.2, dual_clip=3.0):
    """Per-token clipped surrogate loss [B, T] and a bool [B, T] telling where a clip was the active branch.

    loss = max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logprobs - old_logprobs)   (Schulman et al. 2017)
    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", as in verl): for A < 0
    the max above grows without bound in r (a token made much more likely although it was bad), so it is
    capped at -c A with c = dual_clip > 1. dual_clip=None disables it.

    advantages: [B, T], or [B] (one per sequence, GRPO) broadcast to every token.
    clipped: the returned loss does not depend on r there (zero gradient), whichever clip caused it.
    The log-ratio is clamped to [-20, 20] before exp, as verl does: a ratio of inf would give inf * 0 = NaN in
    the backward of the (inactive) unclipped branch. exp(20) is far outside any clip range, so no value changes.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)                              # [B] -> [B, 1]
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))       # [B, T]
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(pg_losses1, pg_losses2)                           # [B, T]
    clipped = pg_losses2 > pg_losses1
    if dual_clip is not None:
        pg_losses3 = -advantages * dual_clip
        capped = (advantages < 0) & (loss > pg_losses3)
        loss = torch.where(capped, pg_losses3, loss)
        clipped = clipped | capped
    return loss, clipped


def ppo_value_loss(values, old_values, returns, clip_eps=0.2):
    """Per-token clipped value loss [B, T]: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2),
    as cleanrl ppo.py (the value moves at most eps from its rollout value per update). clip_eps=None: unclipped."""
    v_loss = (values - returns) ** 2
    if clip_eps is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        v_loss = torch.maximum(v_loss, (v_clipped - returns) ** 2)
    return 0.5 * v_loss


# ----------------------------------------------------------------------------------------------------------
# KL(pi || ref) estimators from samples of pi (Schulman, "Approximating KL Divergence", 2020)
# With log-ratio d = ref - logprobs = log(ref(y) / pi(y)) and y ~ pi:

def kl_k1(logprobs, ref_logprobs):
    """-d: unbiased, high variance, negative on some samples."""
    return logprobs - ref_logprobs


def kl_k2(logprobs, ref_logprobs):
    """d^2 / 2: biased (its expectation is an f-divergence that matches KL to second order), low variance, >= 0.
    Also PPO's `approx_kl` diagnostic between the current and the old policy (cleanrl, TRL)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs, ref_logprobs):
    """exp(d) - d - 1: unbiased (E_pi[exp(d)] = 1), >= 0 everywhere (exp(d) >= 1 + d), low variance.
    The KL term of GAD (verl's `low_var_kl`). verl also clamps it; we do not: exp overflows in fp32 only for
    d > 88, and since ref_logprobs <= 0 that needs logprobs < -88: a token the policy gives probability below
    e^-88, which it does not sample (and during a PPO update the policy is still near the sampler). ppo_update
    skips a non-finite step rather than hide it."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


# ----------------------------------------------------------------------------------------------------------
# entropy

def entropy_from_logits(logits):
    """H = logsumexp(z) - sum_v p_v z_v per position: [..., V] -> [...], in float32.

    This form needs one softmax and no log of a probability (log p underflows to -inf for tiny p). Entries with
    p = 0 (a logit of -inf, e.g. a masked vocabulary slot) contribute 0 instead of 0 * -inf = NaN.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)      # [..., 1]
    p = torch.exp(logits - lse)                               # [..., V]
    p_z = torch.where(p > 0, p * logits, torch.zeros_like(p))
    return lse.squeeze(-1) - p_z.sum(-1)
