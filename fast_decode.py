"""The fast decode path of sample.generate: a static KV cache, finished rows dropped from the batch
(compaction), and a decode step under torch.compile (CUDA graphs on a GPU). The plain loop in
sample.py is the reference: tests/test_sample.py checks both give the same samples.
"""

import functools

import torch

import models

COMPACT_AT = 0.75   # drop finished rows once at most this fraction of the batch's rows is live


def supported(model):
    """The static path needs attention that reads the cache through update() and takes a 4D mask
    (Qwen2, Llama: sdpa or eager) and no sliding-window layers; others decode on the plain path."""
    cfg = model.config
    return (cfg._attn_implementation in ("sdpa", "eager")
            and set(getattr(cfg, "layer_types", None) or ["full_attention"]) == {"full_attention"})


class StaticKV:
    """A KV cache allocated once, [rows, kv_heads, P + max_new_tokens, head_dim] a layer; a decode
    step writes its key and value in place at column `pos` (DynamicCache concatenates, copying the
    cache every step, and its shapes change, so its step cannot be compiled or graph-captured)."""

    # The model reads it through update(), the one method its attention layers call; `valid`
    # [rows, S] masks the columns not yet written and the prompts' left padding. With `end` set a
    # step reads only the first `end` columns; a compiled step reads them all (fixed shapes).
    # Under autocast it is stored in the autocast dtype: attention casts keys and values to bf16
    # every step anyway, so a bf16 cache gives the same attention at half the memory.

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
        """Keep `rows`, in place, one tensor at a time; the cache becomes views of them."""
        # the moment costs one layer's kept rows, not a second cache (at 1.5B, 256 rows x 3584
        # tokens: a 24 GiB cache), and the buffers keep the addresses CUDA graphs recorded
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


def static_decode_step(model, kv, tok, position_ids):
    """One decode step on a StaticKV: tok [N] at position_ids [N, 1] -> next-token logits [N, V].
    The attention mask is handed over ready-made (HF's mask builder returns a 4D mask as it is):
    sdpa takes the boolean one, eager an additive one."""
    kv.valid.index_fill_(1, kv.pos, True)
    mask = kv.valid[:, None, None, :kv.end]                                    # [N, 1, 1, S]
    if model.config._attn_implementation != "sdpa":
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -1e30)
    h = models.with_cache(model.model, kv, input_ids=tok[:, None], position_ids=position_ids,
                   attention_mask=mask).last_hidden_state
    kv.pos.add_(1)
    return model.get_output_embeddings()(h[:, -1])                             # [N, V]


class StaticDecoder:
    """sample.generate's decode steps on a StaticKV built from the prefill's DynamicCache, copied to
    the n samples of each prompt; compiled=True runs the step under torch.compile."""

    def __init__(self, model, prefill, n, prompt_mask, max_new_tokens, compiled=False):
        device = prompt_mask.device
        amp = torch.is_autocast_enabled(device.type)
        self.kv = StaticKV(prefill, n, prompt_mask, max_new_tokens,
                           torch.get_autocast_dtype(device.type) if amp else None)
        self.compiled, self.P = compiled, prompt_mask.shape[1]
        self.step_fn = functools.partial(static_decode_step, model, self.kv)
        if compiled:
            self.kv.mark_static()
            # dynamic: one graph for every batch size compaction leaves (CUDA graphs still record
            # one replay per size)
            self.step_fn = torch.compile(self.step_fn, dynamic=True,
                                         mode="reduce-overhead" if device.type == "cuda" else None)

    def compact(self, finished, live):
        """The rows to keep once at most COMPACT_AT of the batch is live (None: keep all). A
        compiled step keeps a power of two (each new batch size compiles once more), padded with
        finished rows."""
        size = 1 << (live - 1).bit_length() if self.compiled else live
        if size > COMPACT_AT * len(finished):
            return None
        keep = (~finished).nonzero()[:, 0]
        keep = torch.cat([keep, finished.nonzero()[:size - live, 0]])   # padded to `size`
        self.kv.select(keep)
        if self.compiled:
            self.kv.mark_static()
        return keep

    def step(self, tok, position_ids, t):
        """Decode step t: tok [N] at position_ids [N, 1] -> next-token logits [N, V]."""
        if not self.compiled:
            self.kv.end = self.P + t + 1
        return self.step_fn(tok, position_ids)
