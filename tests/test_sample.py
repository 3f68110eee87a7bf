"""sample.generate against independent computations on a tiny random model.

Samples are compared token for token across paths and batch layouts (plain / static / compiled
decode, one row / a batch, one call / several): the same weights and seeds, so the logits differ
at most in their last bits (other kernels for other shapes) and a token can differ only where
its draw lands within ~1e-7 of a boundary of the cumulative distribution: about 1e-5 over the few
hundred tokens of a test here, on any CPU. Exact equality is what the fast paths promise.
"""

import pytest
import torch

import fast_decode
import fast_losses
import models
import sample

PAD = 256


@pytest.fixture(scope="module")
def tiny():
    model = models.tiny_model(seed=0).eval()
    tok = models.tiny_tokenizer()
    prompts = [tok.encode(s, add_special_tokens=False)
               for s in ["hi", "a longer prompt, so the batch needs left padding", "third one"]]
    return model, tok, prompts


def fresh_logprobs(model, prompt, response, temperature):
    """log q(y_t | s_t) from one unpadded, uncached forward pass per sequence: no padding, no KV
    cache."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature  # [T, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_positions_after_end_of_turn_are_masked(tiny):
    model, _, prompts = tiny
    eos = list(range(0, 128))  # half the vocabulary ends a turn, so rows stop at different steps
    ro = sample.generate(model, prompts, n=4, max_new_tokens=12, temperature=1.0, eos_ids=eos,
                         pad_id=PAD, seed=0)
    lengths = set()
    for ids, mask in zip(ro.response_ids.tolist(), ro.response_mask.tolist()):
        stops = [i for i, t in enumerate(ids) if t in eos and mask[i]]
        L = stops[0] + 1 if stops else len(ids)  # the end-of-turn token is part of the response
        assert mask == [1] * L + [0] * (len(ids) - L)
        assert all(t == PAD for t in ids[L:])
        assert not any(t in eos for t in ids[:L - 1])
        lengths.add(L)
    assert len(lengths) > 1, "all rows stopped together: the test would not see per-row masking"
    with torch.no_grad():
        assert (sample.sequence_logprobs(model, ro, 1.0)[ro.response_mask == 0] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_fresh_forward_pass(tiny, temperature):
    """sequence_logprobs of sampled, left-padded rows at the sampling temperature: those of one
    unpadded forward pass per sequence."""
    model, _, prompts = tiny
    n = 3
    ro = sample.generate(model, prompts, n=n, max_new_tokens=10, temperature=temperature,
                         eos_ids=range(0, 40), pad_id=PAD, seed=1)
    with torch.no_grad():
        logprobs = sample.sequence_logprobs(model, ro, temperature)               # [N, T]
    for row in range(len(prompts) * n):
        mask = ro.response_mask[row].bool()
        response = ro.response_ids[row][mask].tolist()
        want = fresh_logprobs(model, prompts[row // n], response, temperature)
        torch.testing.assert_close(logprobs[row][mask], want, atol=1e-5, rtol=1e-5)


def test_greedy_equals_unbatched_hf_generate(tiny):
    """The shared-prefill KV cache, left padding and position ids give what an unpadded HF
    generate gives."""
    model, _, prompts = tiny
    ro = sample.generate(model, prompts, n=2, max_new_tokens=12, temperature=0, eos_ids=[],
                         pad_id=PAD)
    for b, p in enumerate(prompts):
        hf = model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12,
                            do_sample=False, pad_token_id=PAD)
        # exact: the same weights and seeds (the module's note)
        assert ro.response_ids[2 * b].tolist() == hf[0, len(p):].tolist()
        assert ro.response_ids[2 * b + 1].tolist() == hf[0, len(p):].tolist()


def test_same_seed_same_samples_and_samples_differ(tiny):
    model, _, prompts = tiny
    kw = dict(n=4, max_new_tokens=12, temperature=1.0, eos_ids=[], pad_id=PAD)
    a = sample.generate(model, prompts, seed=7, **kw)
    b = sample.generate(model, prompts, seed=7, **kw)
    c = sample.generate(model, prompts, seed=8, **kw)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)
    for i in range(len(prompts)):  # the n samples of one prompt are different draws, not copies
        group = {tuple(r) for r in a.response_ids[i * 4:(i + 1) * 4].tolist()}
        assert len(group) == 4


def test_sample_token_follows_the_tempered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 2
    draws = sample.sample_token(logits.expand(40000, 6), 0.5, 1.0, torch.rand(40000, 6))
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.5, -1), atol=0.01, rtol=0)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = sample.sample_token(probs.log().expand(20000, 4), 1.0, 0.8, torch.rand(20000, 4))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    # the top token alone reaches 0.4
    draws = sample.sample_token(probs.log().expand(100, 4), 1.0, 0.4, torch.rand(100, 4))
    assert (draws == 0).all()


def test_rollout_texts_drop_end_of_turn_and_padding(tiny):
    model, tok, prompts = tiny
    ro = sample.generate(model, prompts, n=2, max_new_tokens=16, temperature=1.0,
                         eos_ids=[258] + list(range(60)), pad_id=PAD, seed=3)
    for text, ids, mask in zip(ro.texts(tok), ro.response_ids, ro.response_mask):
        kept = [t for t in ids[mask.bool()].tolist() if t < 256]
        assert text == tok.decode(kept)
        assert "<|im_end|>" not in text and "<|pad|>" not in text


def test_samples_do_not_depend_on_the_batch(tiny):
    """Per-sample generators keyed by prompt: a prompt sampled alone or inside a batch gets the same
    tokens."""
    model, _, prompts = tiny
    kw = dict(n=2, max_new_tokens=10, temperature=1.0, eos_ids=[], pad_id=PAD, seed=5)
    batch = sample.generate(model, prompts, prompt_keys=["a", "b", "c"], **kw)
    alone = sample.generate(model, prompts[1:2], prompt_keys=["b"], **kw)
    # exact: the same weights and seeds (the module's note)
    assert torch.equal(batch.response_ids[2:4], alone.response_ids)


def decode_batch_sizes(model):
    """Records the rows of every forward pass through the backbone (prefill included)."""
    sizes = []
    handle = model.model.register_forward_pre_hook(
        lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("attn,temperature,top_p", [("sdpa", 1.0, 1.0), ("sdpa", 0.7, 0.9),
                                                    ("sdpa", 0, 1.0), ("eager", 1.0, 1.0)])
def test_static_decode_gives_the_plain_samples_and_drops_finished_rows(tiny, attn, temperature,
                                                                       top_p):
    """The static path (preallocated cache, ended rows compacted away) against HF's DynamicCache
    loop: the same tokens and masks, for rows that end at many different steps, while the decode
    steps run on fewer and fewer rows."""
    model, _, prompts = tiny
    model.config._attn_implementation = attn
    kw = dict(n=4, max_new_tokens=24, temperature=temperature, top_p=top_p,
              eos_ids=range(0, 30), pad_id=PAD, seed=3)
    try:
        plain_sizes, handle = decode_batch_sizes(model)
        plain = sample.generate(model, prompts, decode="plain", **kw)
        handle.remove()
        sizes, handle = decode_batch_sizes(model)
        static = sample.generate(model, prompts, **kw)
        handle.remove()
    finally:
        model.config._attn_implementation = "sdpa"
    # exact: the same weights and seeds (the module's note)
    assert torch.equal(static.response_ids, plain.response_ids)
    assert torch.equal(static.response_mask, plain.response_mask)
    lengths = plain.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "rows must end at different steps to test compaction"
    steps = sizes[1:]                                                    # after the prefill
    assert plain_sizes[1:] == [12] * len(steps)
    assert steps == sorted(steps, reverse=True) and steps[-1] < 12
    # a step runs the rows still going, or at most a third more (compaction waits for a quarter)
    for t, rows in enumerate(steps):
        live = int((lengths > t + 1).sum())
        assert live <= rows and (rows == 12 or rows <= live / fast_decode.COMPACT_AT)


def test_static_decode_under_bf16_autocast_keeps_a_bf16_cache_and_the_plain_samples(tiny):
    """fp32 weights under bf16 autocast (the trainers' rollouts): the plain loop's cache is fp32
    (rotary output and DynamicCache's promotion), which attention casts to bf16 every step; the
    static cache holds bf16 and samples the same tokens."""
    model, _, prompts = tiny
    kw = dict(n=3, max_new_tokens=16, temperature=1.0, eos_ids=range(0, 40), pad_id=PAD, seed=2)
    dtypes = []
    update = fast_decode.StaticKV.update

    def spy(self, key, value, layer_idx, *args, **kwargs):   # as transformers calls Cache.update
        dtypes.append(self.keys[layer_idx].dtype)
        return update(self, key, value, layer_idx, *args, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = sample.generate(model, prompts, decode="plain", **kw)
        fast_decode.StaticKV.update = spy
        try:
            static = sample.generate(model, prompts, **kw)
        finally:
            fast_decode.StaticKV.update = update
    assert set(dtypes) == {torch.bfloat16}
    # exact: the same weights and seeds (the module's note)
    assert torch.equal(static.response_ids, plain.response_ids)
    assert torch.equal(static.response_mask, plain.response_mask)


def test_static_decode_drives_a_llama_model_too(tiny):
    """SmolLM2 (the CPU defaults' model) is a Llama: its backbone builds its mask another way than
    Qwen2's, and the static path must give the plain path's samples there as well."""
    from transformers import LlamaConfig, LlamaForCausalLM
    _, _, prompts = tiny
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, pad_token_id=PAD)).eval()
    kw = dict(n=3, max_new_tokens=16, temperature=1.0, eos_ids=range(0, 40), pad_id=PAD, seed=2)
    plain = sample.generate(model, prompts, decode="plain", **kw)
    static = sample.generate(model, prompts, **kw)
    # exact: the same weights and seeds (the module's note)
    assert torch.equal(static.response_ids, plain.response_ids)
    assert torch.equal(static.response_mask, plain.response_mask)
    assert len(set(plain.response_mask.sum(1).tolist())) > 1


def test_compiled_decode_gives_the_plain_samples_on_power_of_two_batches(tiny, monkeypatch):
    """The decode step under torch.compile (here dynamo's graph capture with the eager backend: a
    C++ compile of the graph takes a minute on CPU) samples what the plain loop samples; compaction
    keeps batch sizes to powers of two (a CUDA graph each)."""
    model, _, prompts = tiny
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, mode=None, **kw: compile_(fn, backend="eager", **kw))
    kw = dict(n=4, max_new_tokens=24, temperature=1.0, eos_ids=range(0, 30), pad_id=PAD, seed=3)
    plain = sample.generate(model, prompts, decode="plain", **kw)
    sizes, handle = decode_batch_sizes(model)
    compiled = sample.generate(model, prompts, decode="compiled", **kw)
    handle.remove()
    # exact: the same weights and seeds (the module's note)
    assert torch.equal(compiled.response_ids, plain.response_ids)
    assert torch.equal(compiled.response_mask, plain.response_mask)
    assert set(sizes[1:]) <= {12, 8, 4, 2, 1} and len(set(sizes[1:])) > 1


def test_compiled_decode_compiles_once_across_calls_and_compactions(tiny, monkeypatch):
    """Fault 7 (issue 22) measured: --decode compiled makes new static buffers in each generate()
    call, so it might recompile each call or compaction. Dynamo's own counters (eager backend, as
    above) over three calls of other prompts and batch sizes: one graph with a dynamic batch, and
    one for a single live row (dynamo specialises sizes 0 and 1), nothing more."""
    from torch._dynamo.utils import counters
    model, _, prompts = tiny
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, mode=None, **kw: compile_(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    kw = dict(max_new_tokens=24, temperature=1.0, eos_ids=range(0, 30), pad_id=PAD, seed=3)
    for batch, n in ((prompts, 4), (prompts[1:], 8), (prompts[:1] * 3, 2)):
        sample.generate(model, batch, n=n, decode="compiled", **kw)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_rollout_sorts_prompts_by_length_across_calls_and_keeps_their_order(tiny, monkeypatch):
    """Several generate() calls get prompts of similar lengths (less left padding); the result is
    in the caller's order and equal to one call on all prompts."""
    model, _, prompts = tiny
    prompts = prompts + [prompts[0] + prompts[2], prompts[1][:5]]
    keys = ["a", "b", "c", "d", "e"]
    kw = dict(n=2, max_new_tokens=10, temperature=1.0, eos_ids=range(0, 30), pad_id=PAD, seed=4)
    whole = sample.rollout(model, prompts, keys, **kw)
    calls, generate = [], sample.generate
    monkeypatch.setattr(sample, "generate",
                        lambda m, ps, **k: calls.append([len(p) for p in ps]) or generate(m, ps,
                                                                                           **k))
    parts = sample.rollout(model, prompts, keys, batch_size=2, **kw)
    lengths = [length for call in calls for length in call]
    assert lengths == sorted(len(p) for p in prompts) and len(calls) == 3
    # exact: the same weights and seeds (the module's note)
    assert parts.responses() == whole.responses()
    assert torch.equal(parts.input_ids, whole.input_ids)


def test_chunked_token_logprobs_values_and_gradients_against_the_full_log_softmax():
    """fast_losses.token_logprobs (chunks of 3 of 10 positions, temperature 0.7) against log_softmax
    over the whole [M, V] logits, in float64: the values, the entropy, and the gradients to the
    hidden states and the head (backward recomputes each chunk's logits); under bf16 autocast, the
    same within bf16 error, fp32 gradients."""
    g = torch.Generator().manual_seed(0)
    M, H, V = 10, 6, 17
    hidden = torch.randn(M, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (M,), generator=g)
    # any loss downstream: a weighted sum
    upstream = torch.randn(M, generator=g, dtype=torch.float64)

    logq = torch.log_softmax(hidden @ weight.T / 0.7, -1)
    want_lp = logq.gather(-1, tokens[:, None]).squeeze(-1)
    want_ent = -(logq.exp() * logq).sum(-1)
    want_grads = torch.autograd.grad((want_lp * upstream).sum(), (hidden, weight))

    lp, ent = fast_losses.token_logprobs(hidden, weight, tokens, 0.7, chunk_size=3,
                                         with_entropy=True)
    torch.testing.assert_close(lp, want_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, want_ent, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((lp * upstream).sum(), (hidden, weight))
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp16 = fast_losses.token_logprobs(h32, w32, tokens, 0.7, chunk_size=3)
    (lp16.double() * upstream).sum().backward()
    assert (lp16.dtype == torch.float32 and w32.grad.dtype == torch.float32
            and h32.grad.dtype == torch.float32)
    torch.testing.assert_close(lp16.double(), want_lp, rtol=0.05, atol=0.1)
    torch.testing.assert_close(w32.grad.double(), want_grads[1], rtol=0.05, atol=0.1)


def test_packed_rows_give_the_padded_hidden_states_and_gradients(tiny):
    """Rows laid end to end as one padding-free sequence (what flash-attn's varlen path runs; here
    sdpa with HF's block-diagonal mask) against the padded batch: the same hidden states at every
    response position and the same weight gradients."""
    model, _, prompts = tiny
    ro = sample.generate(model, prompts, n=2, max_new_tokens=12, temperature=1.0,
                         eos_ids=range(0, 40), pad_id=PAD, seed=6)
    assert not ro.attention_mask.all(), "the rows must carry padding"
    grads = []
    for pack in (False, True):
        model.zero_grad()
        h, head = sample.response_hidden(model, ro, pack=pack)
        h = h * ro.response_mask[..., None]                # padding positions are not defined
        (head(h).logsumexp(-1) * ro.response_mask).sum().backward()
        grads.append((h.detach(), [p.grad.clone() for p in model.parameters()]))
    model.zero_grad()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    for packed, padded in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(packed, padded, rtol=1e-3, atol=1e-4)   # summation order


def test_micro_batches_respect_the_row_and_token_budgets_and_trim_padding():
    sizes = [(1, 4, 2), (1, 4, 9), (1, 2, 1), (1, 3, 3), (1, 30, 30), (1, 1, 1)]
    groups = sample.split_by_budget(sizes, max_rows=3, max_tokens=30)
    # 2 x 13 fits; 3 x 13 > 30; a 60-token row goes alone
    assert groups == [(0, 2), (2, 4), (4, 5), (5, 6)]
    for a, b in groups:
        rows = sizes[a:b]
        assert len(rows) <= 3 and (b - a == 1 or len(rows) * (max(p for _, p, _ in rows) +
                                                             max(r for _, _, r in rows)) <= 30)
    assert sample.split_by_budget(sizes, max_rows=4) == [(0, 4), (4, 6)]
    ro = sample.pack([[1, 2, 3, 4], [5], [6, 7]], [[8, 9], [10, 11, 12, 13, 14], [15]], PAD)
    (idx,  whole), = ro.micro_batches(max_rows=3)          # one group: the rows in their order
    assert idx.tolist() == [0, 1, 2] and whole.response_ids.shape[1] == 5
    # two groups: length-bucketed, the shortest rows (3 and 6 tokens) together
    (idx_a, a), (idx_b, b) = ro.micro_batches(max_rows=2, max_tokens=18)
    assert idx_a.tolist() == [2, 0] and idx_b.tolist() == [1]
    # each trimmed to its own width: prompts 4, responses 2; then 1 + 5
    assert a.prompt_ids.tolist() == [[PAD, PAD, 6, 7], [1, 2, 3, 4]]
    assert a.response_ids.tolist() == [[15, PAD], [8, 9]]
    assert b.prompt_ids.tolist() == [[5]] and b.response_ids.shape[1] == 5
    # padded tokens over the groups, against consecutive groups of the same budget
    padded = sum(r.input_ids.numel() for _, r in ro.micro_batches(max_rows=2, max_tokens=18))
    assert padded == 2 * 6 + 6 < 2 * (4 + 5) + (2 + 1)


def test_stop_ids_include_the_models_generation_config(tmp_path):
    """Qwen2.5-Instruct's generation_config.json lists eos_token_id [<|im_end|>, <|endoftext|>];
    vLLM (the references' sampler) stops on every one, so generation stops on the second too, read
    from the saved folder."""
    tok = models.tiny_tokenizer()
    model = models.tiny_model(seed=0).eval()
    prompt = tok.encode("third one", add_special_tokens=False)
    greedy = sample.generate(model, [prompt], max_new_tokens=8, temperature=0,
                             eos_ids=sample.stop_ids(tok), pad_id=PAD).response_ids[0].tolist()
    other = greedy[2]                       # the third greedy token, as the model's second eos
    assert other not in sample.stop_ids(tok) and other not in greedy[:2]
    model.generation_config.eos_token_id = [tok.eos_token_id, other]
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = models.load_model(str(tmp_path / "m"))
    stops = sample.stop_ids(tok, loaded)
    assert stops == sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id, other})
    ro = sample.generate(loaded.eval(), [prompt], max_new_tokens=8, temperature=0, eos_ids=stops,
                         pad_id=PAD)
    # stopped at the second eos
    assert ro.response_ids[0][ro.response_mask[0].bool()].tolist() == greedy[:3]


def test_compaction_moves_the_kept_rows_in_place_one_layer_at_a_time():
    """Fault 3 (issue 22): StaticKV.select built every layer's compacted keys and values before
    dropping the old ones, a second cache for a moment (at 1.5B, 256 rows x 3584 tokens: 9 GiB on
    top of 24). In place, layer by layer, the moment costs one layer's keys (or values) of the kept
    rows; and (fault 7) the buffers keep their addresses, which the compiled step's CUDA graphs
    were recorded with."""
    from live_bytes import LiveBytes
    from transformers import DynamicCache
    model = models.tiny_model(seed=0, num_layers=6).eval()
    prompts = torch.randint(0, 256, (4, 20))
    prefill = DynamicCache()
    with torch.no_grad():
        models.with_cache(model.model, prefill, input_ids=prompts)
    kv = fast_decode.StaticKV(prefill, 4, torch.ones_like(prompts), max_new_tokens=40)   # 16 rows
    del prefill
    one = kv.keys[0].nbytes * 12 // 16                     # one compacted layer's keys
    keep = torch.tensor([0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 14, 15])                  # 75% live
    expected = [t[keep].clone() for t in kv.keys + kv.values]
    addresses = [t.data_ptr() for t in kv.keys + kv.values + [kv.valid]]
    with LiveBytes(*kv.keys, *kv.values, kv.valid, kv.pos) as live:
        before = live.now
        kv.select(keep)
    assert live.peak - before <= one + kv.valid.nbytes, (live.peak - before, one)
    assert [t.data_ptr() for t in kv.keys + kv.values + [kv.valid]] == addresses
    for got, want in zip(kv.keys + kv.values, expected):
        assert torch.equal(got, want)


def test_rollout_calls_stay_within_the_token_budget(tiny, monkeypatch):
    """--gen-batch-tokens bounds each generate() call's KV cache: rows x (longest prompt + new
    tokens), with the prompts sorted by length so short ones share calls; the samples are the same
    as one call's (each sample keyed by its prompt)."""
    model, _, prompts = tiny
    prompts = prompts + [prompts[0] + prompts[2], prompts[1][:5], prompts[2][:3]]
    keys = list("abcdef")
    kw = dict(n=2, max_new_tokens=10, temperature=1.0, eos_ids=range(0, 30), pad_id=PAD, seed=4)
    whole = sample.rollout(model, prompts, keys, **kw)
    calls, generate = [], sample.generate
    monkeypatch.setattr(sample, "generate",
                        lambda m, ps, **k: calls.append([len(p) for p in ps]) or generate(m, ps,
                                                                                           **k))
    budget = 2 * 2 * (11 + 10)     # two prompts of up to 11 tokens, 2 samples each
    parts = sample.rollout(model, prompts, keys, max_tokens=budget, **kw)
    assert len(calls) > 2 and all(2 * len(c) * (max(c) + 10) <= budget or len(c) == 1
                                  for c in calls), (calls, budget)
    assert [length for c in calls for length in c] == sorted(map(len, prompts))
    # exact: the same weights and seeds (the module's note)
    assert parts.responses() == whole.responses()
