"""Pure tensor losses: masked reductions, Bradley-Terry, the PPO clipped surrogate,
KL estimators, entropy.

Every function takes tensors (and a mask where positions can be padding) and returns tensors;
nothing here knows about models, optimizers or ranks. Per-token functions return per-token values
([B, T]); the reduction is the caller's, because the right one (a token-mean over a whole
mini-batch, counted across micro-batches and ranks) cannot be seen from inside one micro-batch.

Masks are 0/1 (bool or numeric). Masked positions may hold anything, NaN included: they are selected
away with `torch.where`, never multiplied by 0 (NaN * 0 = NaN).
"""

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------
# masked reductions

def masked_sum(x, mask, dim=None):
    """Sum of x where mask is set; over everything (dim=None) or along dim."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x, mask, dim=None):
    """Mean of x where mask is set; 0 (not NaN) where the mask is empty."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


# --------------------------------------------------------------------------------------------------
# discriminator (GAD, arXiv 2511.10643): Bradley-Terry on (teacher, student) score pairs

def bt_loss(teacher_scores, student_scores):
    """-mean log sigmoid(D(x, y_t) - D(x, y_s)) over elementwise pairs (same shape).

    F.logsigmoid rather than log(sigmoid(.)): sigmoid underflows to 0 for a margin below about -100
    in fp32 and the log becomes -inf; logsigmoid is computed as -softplus(-z), finite everywhere.
    """
    margin = teacher_scores.float() - student_scores.float()
    return -F.logsigmoid(margin).mean()


def bt_accuracy(teacher_scores, student_scores):
    """Fraction of pairs the discriminator ranks right (teacher strictly above student;
    a tie counts as wrong)."""
    return (teacher_scores > student_scores).float().mean()


# --------------------------------------------------------------------------------------------------
# PPO

def ppo_policy_loss(logprobs, old_logprobs, advantages, clip_eps=0.2, dual_clip=3.0):
    """Per-token clipped surrogate loss [B, T] and a bool [B, T] telling where a clip was
    the active branch.

    loss = max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logprobs - old_logprobs)
           (Schulman et al. 2017)
    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", as in verl):
    for A < 0 the max above grows without bound in r (a token made much more likely although it was
    bad), so it is capped at -c A with c = dual_clip > 1. dual_clip=None disables it.

    advantages: [B, T], or [B] (one per sequence, GRPO) broadcast to every token.
    clipped: the returned loss does not depend on r there (zero gradient), whichever clip caused it.
    The log-ratio is clamped to [-20, 20] before exp, as verl does: a ratio of inf would give
    inf * 0 = NaN in the backward of the (inactive) unclipped branch. exp(20) is far outside any
    clip range, so no value changes.
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


# --------------------------------------------------------------------------------------------------
# KL(pi || ref) estimators from samples of pi (Schulman, "Approximating KL Divergence", 2020)
# With log-ratio d = ref - logprobs = log(ref(y) / pi(y)) and y ~ pi:

def kl_k2(logprobs, ref_logprobs):
    """d^2 / 2: biased (its expectation is an f-divergence that matches KL to second order),
    low variance, >= 0.
    Also PPO's `approx_kl` diagnostic between the current and the old policy (cleanrl, TRL)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs, ref_logprobs):
    """exp(d) - d - 1: unbiased (E_pi[exp(d)] = 1), >= 0 everywhere (exp(d) >= 1 + d), low variance.
    The KL term of GAD (verl's `low_var_kl`). verl also clamps it; we do not: exp overflows in fp32
    only for d > 88, and since ref_logprobs <= 0 that needs logprobs < -88: a token the policy gives
    probability below e^-88, which it does not sample (and during a PPO update the policy is still
    near the sampler). ppo_update skips a non-finite step rather than hide it."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


# --------------------------------------------------------------------------------------------------
# entropy

def entropy_from_logits(logits):
    """H = logsumexp(z) - sum_v p_v z_v per position: [..., V] -> [...], in float32 at least.

    This form needs one softmax and no log of a probability (log p underflows to -inf for tiny p).
    Entries with p = 0 (a logit of -inf, e.g. a masked vocabulary slot) contribute 0 instead of
    0 * -inf = NaN.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)      # [..., 1]
    p = torch.exp(logits - lse)                               # [..., V]
    p_z = torch.where(p > 0, p * logits, torch.zeros_like(p))
    return lse.squeeze(-1) - p_z.sum(-1)


# --------------------------------------------------------------------------------------------------
# white-box distillation: divergences between the teacher's p and the student's q over the full
# vocabulary (DistiLLM-2, arXiv 2503.07067; DistiLLM, Ko et al. 2024, arXiv 2402.03898; GKD,
# Agarwal et al. 2024, arXiv 2306.13649).
#
# Logits [B, T, V] in, per-token values [B, T] out; the mask and the reduction are
# the caller's (masked_mean).
# The math is float32 whatever the input dtype: a bf16 log-softmax over 150k ids keeps only ~3
# significant digits, and the KL terms are differences of nearly equal log-probabilities. The
# teacher is a constant: its logits are detached here, so no caller can backprop into the
# teacher by accident.
# Mixtures are formed in log space with logaddexp: a p + (1 - a) q in probability space underflows
# to 0 for a token with p ~ 1e-45 and the log becomes -inf, while log a + log p stays finite.

def align_vocab(student_logits, teacher_logits):
    """(student_logits, teacher_logits) with the teacher's vocabulary dimension cut or padded
    to the student's.

    Teacher larger (Qwen2.5-7B 152064 vs Qwen2.5-1.5B 151936): models that share a tokenizer differ
    only in how far the embedding matrix was padded (to a multiple that suits the matmul kernels);
    the extra ids are never produced by the shared tokenizer, so the teacher's logits there are
    dropped. The softmax is taken after the cut, which renormalises p over the shared ids: the
    distribution the student can actually match.
    Student larger: the teacher is padded with -inf, so p = 0 on the student's extra ids. Every loss
    here stays finite and pushes the student's mass off those ids, except reverse_kl (and jsd at
    beta = 1), which is then +inf wherever q > 0 on them: its true value, since q puts mass where p
    has none.
    """
    v_s, v_t = student_logits.size(-1), teacher_logits.size(-1)
    if v_t > v_s:
        teacher_logits = teacher_logits[..., :v_s]
    elif v_t < v_s:
        teacher_logits = F.pad(teacher_logits, (0, v_s - v_t), value=float("-inf"))
    return student_logits, teacher_logits


def _logprobs(student_logits, teacher_logits):
    """log q, log p: float32 log-softmaxes over the student's vocabulary, the teacher's detached."""
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits.detach())
    log_q = F.log_softmax(student_logits.float(), dim=-1)    # [B, T, V]
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)    # [B, T, V]
    return log_q, log_p


def _kl_sum(log_a, log_b):
    """sum_v a (log a - log b) over the last dimension, with 0 log 0 = 0.

    The difference is zeroed where a = 0 before the product (not only after it): with a = 0 and
    log a = -inf the product's backward computes 0 * -inf = NaN even where its value
    is selected away.
    """
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(a))
    return (a * diff).sum(-1)


def _mix_weight(x, like):
    """A mixing weight (alpha or beta) as float32 of like's rank: a python float, or one per
    sequence [B]."""
    if not torch.is_tensor(x):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"mixing weight must be in [0, 1], got {x}")
        return torch.full((1,) * like.dim(), float(x), device=like.device)
    return (x.detach().to(device=like.device, dtype=torch.float32)
            .reshape(-1, *(1,) * (like.dim() - 1)))


def skl(student_logits, teacher_logits, alpha):
    """Skew KL, DistiLLM: SKL_a = KL(p || a p + (1 - a) q) per token [B, T].

    q is not detached inside the mixture (DistiLLM's skewed KL): the student's gradient flows
    through log m1 too.
    alpha = 0 gives forward KL; DistiLLM uses alpha = 0.1. alpha: float, or [B] (one per sequence).
    """
    log_q, log_p = _logprobs(student_logits, teacher_logits)
    a = _mix_weight(alpha, log_q)
    log_m1 = torch.logaddexp(torch.log(a) + log_p, torch.log1p(-a) + log_q)           # [B, T, V]
    return _kl_sum(log_p, log_m1)


def srkl(student_logits, teacher_logits, alpha, stop_grad=False):
    """Skew reverse KL, DistiLLM: SRKL_a = KL(q || (1 - a) p + a q) per token [B, T].

    stop_grad=False is DistiLLM's SRKL (jongwooko/distillm, losses.skewed_reverse_kl): the gradient
    flows through q in the mixture too. stop_grad=True is DistiLLM-2's (jongwooko/distillm-2,
    distillm_trainer.get_batch_logps): KL(q || (1 - a) p + a sg(q)), whose gradient is that of
    sum_v q (log q - c) with the mixture c held fixed. The values are the same. alpha = 0 gives
    reverse KL. alpha: float, or [B].
    """
    log_q, log_p = _logprobs(student_logits, teacher_logits)
    a = _mix_weight(alpha, log_q)
    log_m2 = torch.logaddexp(torch.log1p(-a) + log_p,
                             torch.log(a) + (log_q.detach() if stop_grad else log_q))
    return _kl_sum(log_q, log_m2)


def forward_kl(student_logits, teacher_logits):
    """KL(p || q) per token [B, T]: mass-covering (the student is penalised wherever the
    teacher has mass)."""
    log_q, log_p = _logprobs(student_logits, teacher_logits)
    return _kl_sum(log_p, log_q)


def reverse_kl(student_logits, teacher_logits):
    """KL(q || p) per token [B, T]: mode-seeking (the student is penalised only where
    it puts mass)."""
    log_q, log_p = _logprobs(student_logits, teacher_logits)
    return _kl_sum(log_q, log_p)


def jsd(student_logits, teacher_logits, beta):
    """Generalized JSD of GKD per token [B, T]: beta KL(p || M) + (1 - beta) KL(q || M),
    M = beta p + (1 - beta) q.

    The endpoints are a convention, not a limit: the formula itself tends to 0 at both ends (M
    becomes q or p while the other term's weight vanishes). GKD (and TRL's GKDTrainer) define
    beta = 0 as KL(p || q) and beta = 1 as KL(q || p), following the small/large-beta behaviour;
    those are returned exactly here.
    beta: float, or [B] (one per sequence; a per-sequence endpoint is selected with torch.where, and
    the mixture is evaluated there at beta = 0.5 instead so that no log 0 reaches the backward).
    """
    log_q, log_p = _logprobs(student_logits, teacher_logits)
    if not torch.is_tensor(beta):
        if beta == 0.0:
            return _kl_sum(log_p, log_q)
        if beta == 1.0:
            return _kl_sum(log_q, log_p)
    b = _mix_weight(beta, log_q)                                                     # [B, 1, 1]
    at_0, at_1 = b[..., 0] == 0, b[..., 0] == 1                                      # [B, 1]
    b = torch.where((b > 0) & (b < 1), b, torch.full_like(b, 0.5))
    log_m = torch.logaddexp(torch.log(b) + log_p, torch.log1p(-b) + log_q)           # [B, T, V]
    loss = b[..., 0] * _kl_sum(log_p, log_m) + (1 - b[..., 0]) * _kl_sum(log_q, log_m)  # [B, T]
    # Only computed when some sequence needs them: an infinite unselected branch would still
    # give NaN gradients.
    if at_0.any():
        loss = torch.where(at_0, _kl_sum(log_p, log_q), loss)
    if at_1.any():
        loss = torch.where(at_1, _kl_sum(log_q, log_p), loss)
    return loss


def compute_dtype(weight):
    """The dtype a matmul with `weight` runs in: autocast's when it is on for the weight's device,
    else the weight's own (the chunked LM-head paths cast the head once to it, and
    keep it for backward)."""
    device = weight.device.type
    return (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
            else weight.dtype)


def _head_params(head):
    """(weight [V, H], bias or None) of an LM head given as a module (nn.Linear, a tied
    nn.Embedding) or a weight."""
    if torch.is_tensor(head):
        return head, None
    return head.weight, getattr(head, "bias", None)


def kd_loss_chunked(loss_fn, student_hidden, student_head, teacher_hidden, teacher_head,
                    weights=None, chunk_size=128, **kwargs):
    """A full-vocabulary per-token loss from final hidden states, without ever holding
    [B, T, V] logits.

    values = loss_fn(student_head(student_hidden), teacher_head(teacher_hidden),
                     **kwargs)                            per token [B, T]
    loss   = sum_{b,t} weights[b, t] * values[b, t]       (weights: [B, T])
    Returns (loss, values): loss is differentiable in student_hidden and the student head's weight
    and bias; values are detached (for logging). weights carries the mask and the normalisation
    (0 at padding; e.g. mask / tokens per sequence / sequences in the global batch); None means all
    ones. Heads: an nn.Linear, a tied nn.Embedding or a weight [V, H]. The teacher is a constant.
    kwargs (alpha, beta) may be per sequence [B] or per position [B, T, ...] (loss_fn gets each
    chunk's entries), or anything else (passed as it is).

    Memory. The naive path materialises both models' logits [B, T, V], and the loss's graph keeps
    several fp32 [B, T, V] tensors (log q, log p, log m, products) alive until backward, which then
    makes gradients of the same size: at T = 1024, V = 151936 each is 594 MiB. Chunking positions
    alone does not help (every chunk's graph lives until backward). Because the loss is a weighted
    sum of per-token values, its gradient is known in forward up to the scalar that backward will
    multiply it by: so each chunk's logits, loss and gradient are computed, folded into
    d loss / d hidden [B, T, H] and d loss / d W [V, H] (accumulated in place), and freed before the
    next chunk ("fused linear loss", as Liger-Kernel's cross-entropy). Peak extra memory is one
    weight gradient plus a few fp32 [chunk_size, V] tensors, independent of B and T; no logits are
    recomputed, so it costs the naive path's 4 head matmuls. `python bench.py losses` measures both.
    """
    s_weight, s_bias = _head_params(student_head)
    t_weight, t_bias = _head_params(teacher_head)
    if weights is None:
        weights = torch.ones(student_hidden.shape[:2], device=student_hidden.device)
    # torch.is_grad_enabled() is read here: inside forward it is always off, and
    # needs_input_grad ignores no_grad
    return _FusedKDLoss.apply(student_hidden, s_weight, s_bias, teacher_hidden.detach(),
                              t_weight.detach(), None if t_bias is None else t_bias.detach(),
                              weights.detach(), loss_fn, chunk_size, kwargs,
                              torch.is_grad_enabled())


def _per_position(v, B, T):
    """A kwarg of kd_loss_chunked, flattened to one entry per position [B*T, ...] when it is a
    tensor per sequence [B] or per position [B, T, ...]; anything else (a float, a module) is passed
    to every chunk as it is."""
    if not torch.is_tensor(v):
        return v
    if v.shape == (B,):
        return v.repeat_interleave(T)
    if v.shape[:2] == (B, T):
        return v.reshape(B * T, *v.shape[2:])
    return v


class _FusedKDLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk (see kd_loss_chunked);
    backward scales them."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, weights, loss_fn,
                chunk_size, kwargs, grad_enabled):
        B, T, H = s_hidden.shape
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        need_any = need_h or need_w or need_b
        # Chunks of chunk_size positions of the flattened batch (memory independent of B and T).
        # Each position is handed to loss_fn as a sequence of length 1, [c, 1, V], so per-sequence
        # kwargs become per-position ones.
        hs, ts, ws = s_hidden.reshape(B * T, H), t_hidden.reshape(B * T, -1), weights.reshape(B * T)
        kwargs = {k: _per_position(v, B, T) for k, v in kwargs.items()}
        values = torch.zeros(B * T, device=s_hidden.device)
        grad_h = torch.zeros_like(hs) if need_h else None
        grad_w = (torch.zeros_like(s_weight, dtype=torch.float32)   # [V, H], fp32 sums
                  if need_w else None)
        grad_b = torch.zeros_like(s_bias, dtype=torch.float32) if need_b else None
        # the heads cast once to the compute dtype (bf16 under autocast), not once a chunk
        s_dtype, t_dtype = compute_dtype(s_weight), compute_dtype(t_weight)
        sw, sb = s_weight.to(s_dtype), None if s_bias is None else s_bias.to(s_dtype)
        tw, tb = t_weight.to(t_dtype), None if t_bias is None else t_bias.to(t_dtype)
        for i in range(0, B * T, chunk_size):
            rows = slice(i, i + chunk_size)
            h = hs[rows].to(s_dtype)                                                     # [c, H]
            t_logits = F.linear(ts[rows].to(t_dtype), tw, tb)                            # [c, V_t]
            s_logits = F.linear(h, sw, sb)                                               # [c, V_s]
            chunk_kwargs = {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == (B * T,) else v
                            for k, v in kwargs.items()}
            with torch.enable_grad():
                s_logits.requires_grad_(need_any)
                v = loss_fn(s_logits.unsqueeze(1), t_logits.unsqueeze(1),
                            **chunk_kwargs).squeeze(1)  # [c]
                if need_any:
                    # where, not a product: a value at a weight-0 (padding) position must
                    # not reach the sum
                    chunk_loss = torch.where(ws[rows] != 0, v * ws[rows], torch.zeros_like(v)).sum()
                    (g_logits,) = torch.autograd.grad(chunk_loss, s_logits)              # [c, V_s]
                    g_logits = g_logits.to(s_dtype)
            values[rows] = v.detach()
            if need_h:
                grad_h[rows] = g_logits @ sw
            if need_w:   # in place in fp32; else a product in the compute dtype, summed in fp32
                (grad_w.addmm_(g_logits.t(), h) if s_dtype == grad_w.dtype
                 else grad_w.add_(g_logits.t() @ h))
            if need_b:
                grad_b += g_logits.sum(0).float()
            del t_logits, s_logits, v
            g_logits = None
        values, grad_h = values.view(B, T), None if grad_h is None else grad_h.view(B, T, H)
        # Kept on ctx, not save_for_backward: they are neither inputs nor outputs, and backward
        # scales them in place and hands them over, so no second [V, H] is ever made.
        ctx.grads = [(grad_h, s_hidden.dtype), (grad_w, s_weight.dtype),
                     (grad_b, None if s_bias is None else s_bias.dtype)]
        ctx.mark_non_differentiable(values)
        loss = torch.where(weights != 0, values * weights, torch.zeros_like(values)).sum()
        return loss, values

    @staticmethod
    def backward(ctx, grad_loss, _grad_values):
        # once only: a second backward through this graph is an error
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("kd_loss_chunked: backward called twice "
                               "(its gradients are handed over once)")
        scaled = [None if g is None else g.mul_(grad_loss).to(dtype) for g, dtype in grads]
        return (*scaled, None, None, None, None, None, None, None, None)
