"""The fast path of losses.py: never hold [B, T, V] in fp32; the loss a chunk of positions at a
time, gradients fused into forward. tests/test_kd_losses.py ties each function here to the plain
definition on logits in losses.py (values and gradients)."""

import torch
import torch.nn.functional as F

import losses


# --------------------------------------------------------------------------------------------------
# LM heads, shared by the chunked paths

def compute_dtype(weight):
    """The dtype a matmul with `weight` runs in: autocast's when it is on, else the weight's own."""
    device = weight.device.type
    return (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
            else weight.dtype)


def _head_params(head):
    """(weight [V, H], bias or None) of an nn.Linear, a tied nn.Embedding, or a weight."""
    if torch.is_tensor(head):
        return head, None
    return head.weight, getattr(head, "bias", None)


# --------------------------------------------------------------------------------------------------
# full-vocabulary distillation losses from final hidden states

def kd_loss_chunked(loss_fn, student_hidden, student_head, teacher_hidden, teacher_head,
                    weights=None, chunk_size=128, **kwargs):
    """sum(weights * loss_fn(student logits, teacher logits, **kwargs)) -> (loss, values [B, T]),
    chunk_size positions at a time; values detached. weights [B, T] (None: ones) hold mask and
    normalisation; kwargs may be per sequence [B] or per position [B, T, ...]."""
    s_weight, s_bias = _head_params(student_head)
    t_weight, t_bias = _head_params(teacher_head)
    if weights is None:
        weights = torch.ones(student_hidden.shape[:2], device=student_hidden.device)
    teacher = (teacher_hidden.detach(), t_weight.detach(),
               None if t_bias is None else t_bias.detach())   # a constant
    # torch.is_grad_enabled() is read here: inside forward it is always off, and
    # needs_input_grad ignores no_grad
    return _FusedKDLoss.apply(student_hidden, s_weight, s_bias, teacher, weights.detach(),
                              (loss_fn, chunk_size, kwargs, torch.is_grad_enabled()))


def _per_position(v, B, T):
    """A kwarg per sequence [B] or per position [B, T, ...] as one entry a position [B*T, ...]."""
    if not torch.is_tensor(v):
        return v
    if v.shape == (B,):
        return v.repeat_interleave(T)
    if v.shape[:2] == (B, T):
        return v.reshape(B * T, *v.shape[2:])
    return v


# The loss is a weighted sum of per-token values, so its gradient is known in forward up to the
# scalar backward multiplies it by: each chunk's logits and gradients are folded into d hidden and
# d W and freed before the next chunk (a "fused linear loss", as Liger-Kernel's cross-entropy).
class _FusedKDLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, teacher, weights, settings):
        t_hidden, t_weight, t_bias = teacher
        loss_fn, chunk_size, kwargs, grad_enabled = settings
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
        return (*scaled, None, None, None)


# positions whose full-vocabulary logits exist at once ([128, 151936] fp32: 78 MB)
LOGIT_CHUNK = 128


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T / temperature)[y] (and the entropy of that softmax) for M positions,
    `chunk` positions at a time: no [M, V] logits ever exist, only [chunk, V]. Forward keeps nothing
    of a chunk but the logsumexp; backward recomputes the chunk's logits (one more head matmul) and
    folds d/dlogits = g (onehot(y) - p) / temperature into d/dh and d/dW at once (a recompute, as
    gradient checkpointing of the head; Liger's fused linear cross-entropy does the same with the
    gradient known in forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk, with_entropy):
        dtype = compute_dtype(weight)    # bf16 under autocast, else the weight's
        w = weight.to(dtype)                    # [V, H] (one cast, not one per chunk)
        # softmax math in fp32 at least
        M, out = hidden.shape[0], torch.promote_types(dtype, torch.float32)
        logprobs = torch.zeros(M, dtype=out, device=hidden.device)
        lse = torch.zeros(M, dtype=out, device=hidden.device)
        entropy = torch.zeros(M, dtype=out, device=hidden.device) if with_entropy else None
        for i in range(0, M, chunk):
            logits = F.linear(hidden[i:i + chunk].to(dtype), w).to(out) / temperature  # [c, V]
            lse[i:i + chunk] = torch.logsumexp(logits, -1)
            logprobs[i:i + chunk] = (logits.gather(-1, tokens[i:i + chunk, None]).squeeze(-1)
                                     - lse[i:i + chunk])
            if with_entropy:
                entropy[i:i + chunk] = losses.entropy_from_logits(logits)
            del logits
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, tokens, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        t, dtype = ctx.temperature, ctx.dtype
        w = weight.to(dtype)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = (torch.zeros_like(weight, dtype=lse.dtype)     # [V, H] sums, fp32 at least
                  if need_w else None)
        for i in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[i:i + ctx.chunk].to(dtype)                               # [c, H]
            g = grad_logprobs[i:i + ctx.chunk].to(lse.dtype)                    # [c]
            p = torch.exp(F.linear(h, w).to(lse.dtype) / t - lse[i:i + ctx.chunk, None])  # [c, V]
            g_logits = p.mul_(-g[:, None] / t)                                  # -g p / T
            g_logits.scatter_add_(-1, tokens[i:i + ctx.chunk, None],
                                  (g / t)[:, None])                             # + g onehot(y) / T
            g_logits = g_logits.to(dtype)
            if need_h:
                grad_h[i:i + ctx.chunk] = g_logits @ w
            if need_w:
                grad_w += g_logits.t() @ h
            del p, g_logits
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def token_logprobs(hidden, head, tokens, temperature=1.0, chunk_size=LOGIT_CHUNK,
                   with_entropy=False):
    """log q(y | s) at `temperature` of the tokens [M] from the final hidden states [M, H] that
    predict them and the LM head, differentiable in both (see _ChunkedTokenLogprobs), and,
    with_entropy, the entropy of each position's distribution [M] (a diagnostic: no gradient).
    Never more than [chunk_size, V] logits at once."""
    if getattr(head, "bias", None) is not None:
        raise ValueError("token_logprobs: LM heads with a bias are not supported")
    weight = head.weight if isinstance(head, torch.nn.Module) else head
    logprobs, entropy = _ChunkedTokenLogprobs.apply(hidden, weight, tokens, max(temperature, 1e-6),
                                                    chunk_size, with_entropy)
    return (logprobs, entropy) if with_entropy else logprobs
