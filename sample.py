"""Batched sampling from a causal LM: the Rollout (prompts, responses and their masks), the plain
decode loop, and the responses' logprobs. The fast decode path (static KV cache, compaction,
compile) is fast_decode.py; the chunked logprobs, fast_losses.py.
"""

import contextlib
import hashlib
from dataclasses import dataclass

import torch

import common
import data as data_lib
import fast_losses
import fast_decode
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
        """The Rollout of some rows (a slice or index tensor)."""
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.response_ids[index],
                       self.response_mask[index])

    def trim(self):
        """The same rows without the columns that are padding in every row."""
        # a micro-batch then costs its own longest prompt and response, not the whole batch's
        keep_p = self.prompt_mask.any(0).nonzero()
        start = int(keep_p[0]) if len(keep_p) else self.prompt_ids.shape[1] - 1
        keep_r = self.response_mask.any(0).nonzero()
        end = int(keep_r[-1]) + 1 if len(keep_r) else 1
        return Rollout(self.prompt_ids[:, start:], self.prompt_mask[:, start:],
                       self.response_ids[:, :end], self.response_mask[:, :end])

    def micro_batches(self, max_rows, max_tokens=None, rows=None, equal=False):
        """(index, trimmed sub-Rollout) pairs covering `rows` in groups of at most max_rows rows
        and max_tokens padded tokens (split_by_budget); equal: as many groups on every rank."""
        # more than one group: sorted by length first, so a group pads to lengths close to its own
        # (a gradient accumulated over the groups is the same sum in another order)
        rows = torch.arange(self.prompt_ids.shape[0]) if rows is None else rows.cpu()
        plen, rlen = (self.prompt_mask.sum(1).cpu()[rows].tolist(),
                      self.response_mask.sum(1).cpu()[rows].tolist())
        sizes = [(1, p, r) for p, r in zip(plen, rlen)]
        groups = split_by_budget(sizes, max_rows, max_tokens)
        if len(groups) > 1:
            order = sorted(range(len(sizes)), key=lambda i: sizes[i][1] + sizes[i][2])
            rows, sizes = rows[order], [sizes[i] for i in order]
            groups = split_by_budget(sizes, max_rows, max_tokens)
        for a, b in equalize(groups) if equal else groups:
            index = rows[a:b].to(self.prompt_ids.device)
            yield index, self.rows(index).trim()

    def map(self, fn, max_rows, max_tokens=None, per_position=False):
        """fn(micro-batch) over micro_batches, gathered back by row into [N, ...] (per_position:
        [N, T, ...], 0 past a micro-batch's width). For passes without gradients."""
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
    """Consecutive groups [(start, end)] of items sized (rows, prompt_len, response_len): at most
    max_rows rows and max_tokens = rows x (longest prompt + longest response) tokens a group."""
    # tokens, not rows, bound activation memory (LMOps' GAD sizes micro-batches by tokens per GPU);
    # an item over a bound on its own is a group of its own
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


def split_to(groups, count):
    """Groups (ranges or lists of rows), the largest halved first, until there are `count`: under
    --fsdp every rank must run as many micro-batches, each of their passes being a collective."""
    groups = list(groups)
    while len(groups) < count:
        i = max(range(len(groups)), key=lambda k: len(groups[k]))
        g, half = groups[i], len(groups[i]) // 2
        if half == 0:
            raise RuntimeError(f"{sum(map(len, groups))} rows cannot make {count} micro-batches")
        groups[i:i + 1] = [g[:half], g[half:]]
    return groups


def equalize(groups):
    """Groups [(start, end)] split up to the largest count over the ranks (split_to)."""
    spans = split_to([range(a, b) for a, b in groups], common.all_reduce_max(len(groups)))
    return [(s.start, s.stop) for s in spans]


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
    """Token lists -> a Rollout in generate()'s layout (teacher responses and student samples go
    through the same code)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    T = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(responses), T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), T), dtype=torch.long)
    for i, r in enumerate(responses):
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, :len(r)] = 1
    return Rollout(prompt_ids, prompt_mask, response_ids.to(device), response_mask.to(device))


def position_ids_from_mask(mask):
    """Positions count real tokens only (a left-padded prompt gets an unpadded one's)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def row_generators(seed, keys, n, device):
    """One torch.Generator per sample, seeded by a stable hash of (seed, prompt key, sample index):
    the same draws whatever batch, rank or resumed run the prompt lands in."""
    gens = []
    for key in keys:
        for i in range(n):
            h = hashlib.sha256(f"{seed}|{key}|{i}".encode()).digest()
            gens.append(torch.Generator(device=device).manual_seed(
                int.from_bytes(h[:8], "little") >> 1))
    return gens


def sample_token(logits, temperature, top_p, uniform):
    """logits [N, V] -> tokens [N] given each row's uniform noise [N, V]; temperature 0 is greedy.
    Gumbel-max: argmax(log p + Gumbel noise) is an exact draw from p."""
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
    """Final hidden states [N, T, H] at the positions that predict the response tokens, and the LM
    head: the inputs of the full-vocabulary losses (fast_losses) and of AMM's adversary."""
    # pack (on under flash_attention_2): the rows' real tokens end to end, positions restarting at
    # each row; HF reads that as packed sequences (varlen kernels), no padding computed
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


def sequence_logprobs(model, ro, temperature=1.0, return_entropy=False,
                      chunk_size=fast_losses.LOGIT_CHUNK):
    """Per-token log q(y_t | s_t) [N, T] of a Rollout's responses at `temperature`, 0 at padding,
    differentiable; with return_entropy also each position's entropy [N, T] (no graph)."""
    # the head at the response positions only, chunk_size positions at a time: [N, T, V] logits
    # never exist (at V = 151936 one fp32 [8, 1024, V] tensor is 5 GB)
    h, head = response_hidden(model, ro)                                        # [N, T, H]
    mask = ro.response_mask.bool()                                              # [N, T]
    out = fast_losses.token_logprobs(h[mask], head, ro.response_ids[mask], temperature,
                                     chunk_size, return_entropy)
    lp, ent = out if return_entropy else (out, None)                            # [M] each
    zeros = torch.zeros(mask.shape, dtype=lp.dtype, device=mask.device)
    lp = zeros.masked_scatter(mask, lp)                                         # [N, T]
    return (lp, zeros.masked_scatter(mask, ent)) if return_entropy else lp


DECODE = ("static", "plain", "compiled")


# no_grad, not inference_mode: a rollout is trained on, and inference tensors refuse autograd
@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, eos_ids=(),
             pad_id=0, seed=0, prompt_keys=None, vocab_size=None, decode="static"):
    """n samples of each prompt (token lists) -> a Rollout of B*n rows, prompt-major. Each sample
    draws from its own generator, keyed by (seed, prompt_keys[j], i): the same samples whatever the
    batch, rank or decode ("plain": HF's DynamicCache; "static" / "compiled": fast_decode.py)."""
    from transformers import DynamicCache

    if decode not in DECODE:
        raise ValueError(f"decode must be one of {DECODE}, got {decode!r}")
    device = next(model.parameters()).device
    keys = range(len(prompts)) if prompt_keys is None else prompt_keys
    generators = row_generators(seed, keys, n, device)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)                 # [B, P]
    P, N = prompt_ids.shape[1], len(prompts) * n
    # one prefill a prompt (HF's num_return_sequences would prefill it n times), then the head at
    # the last position, which predicts token 0
    cache = DynamicCache()
    h = models.with_cache(model.model, cache, input_ids=prompt_ids, attention_mask=prompt_mask,
                          position_ids=position_ids_from_mask(prompt_mask)).last_hidden_state
    logits = model.get_output_embeddings()(h[:, -1].repeat_interleave(n, dim=0))[:, :vocab_size]
    fast = None
    if decode != "plain" and fast_decode.supported(model):
        fast = fast_decode.StaticDecoder(model, cache, n, prompt_mask, max_new_tokens,
                                         compiled=decode == "compiled")
    else:
        cache.batch_repeat_interleave(n)    # the prefill, shared by the n samples of a prompt
        ones = torch.ones(N, max_new_tokens, dtype=prompt_mask.dtype, device=device)
        attn = torch.cat([prompt_mask.repeat_interleave(n, dim=0), ones], dim=1)   # [N, P+T]
    next_pos = prompt_mask.sum(-1, keepdim=True).repeat_interleave(n, dim=0)   # [N, 1]
    is_eos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)    # [V] lookup
    is_eos[list(eos_ids)] = True
    rows = torch.arange(N, device=device)   # the batch's rows in the output (compaction drops)
    response_ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((N, max_new_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    # noise for `chunk` steps a generator call: on CPU a generator's stream is the same drawn in
    # one call or many, so the samples do not depend on the chunk
    V, chunk = logits.shape[-1], max(1, (1 << 18) // logits.shape[-1])
    for t in range(max_new_tokens):
        if t % chunk == 0 and temperature > 0:
            k = min(chunk, max_new_tokens - t)
            noise = torch.stack([torch.rand(k, V, generator=g, device=device)
                                 for g in generators], dim=1)                    # [k, N, V]
        uniform = noise[t % chunk] if temperature > 0 else None                   # [N, V]
        tok = sample_token(logits, temperature, top_p, uniform).masked_fill(finished, pad_id)
        response_ids[rows, t] = tok
        response_mask[rows, t] = (~finished).long()
        finished = finished | is_eos[tok]
        live = int((~finished).sum())
        if t == max_new_tokens - 1 or live == 0:
            break
        if fast is None:   # the plain loop: every row to the end
            logits = models.with_cache(model, cache, input_ids=tok[:, None],
                                       attention_mask=attn[:, :P + t + 1],
                                       position_ids=next_pos + t,
                                       logits_to_keep=1).logits[:, -1, :vocab_size]
            continue
        keep = fast.compact(finished, live)   # finished rows dropped once most have ended
        if keep is not None:
            rows, tok, next_pos, finished = rows[keep], tok[keep], next_pos[keep], finished[keep]
            generators = [generators[i] for i in keep.tolist()]
            noise = noise[:, keep] if temperature > 0 else None
        logits = fast.step(tok, next_pos + t, t)[:, :vocab_size]

    T = t + 1
    return Rollout(prompt_ids.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0),
                   response_ids[:, :T], response_mask[:, :T])


def rollout(model, prompts, keys, n=1, batch_size=None, max_tokens=None, amp=None, **sampling):
    """n samples of each prompt in generate() calls (`sampling`: its settings) of at most
    `batch_size` prompts and `max_tokens` KV-cache tokens, rows x (longest prompt + new tokens),
    the prompts sorted by length across calls; sample i of prompt j keyed by (keys[j], i). One
    Rollout, prompt-major, in the order of `prompts`; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
    calls = split_by_budget([(n, len(prompts[j]), sampling["max_new_tokens"]) for j in order],
                            n * (batch_size or len(prompts)), max_tokens)
    if len(calls) == 1:   # one call: the prompts in their own order
        order = list(range(len(prompts)))
    with amp or contextlib.nullcontext():
        parts = [generate(model, [prompts[j] for j in order[a:b]], n=n,
                          prompt_keys=[keys[j] for j in order[a:b]], **sampling)
                 for a, b in calls]
    model.train(was_training)
    if len(parts) == 1:
        return parts[0]
    sampled = [y for part in parts for y in part.responses()]       # in `order`, n per prompt
    responses = [None] * len(sampled)
    for rank, j in enumerate(order):
        responses[j * n:(j + 1) * n] = sampled[rank * n:(rank + 1) * n]
    return pack([p for p in prompts for _ in range(n)], responses, sampling.get("pad_id", 0),
                parts[0].prompt_ids.device)


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
