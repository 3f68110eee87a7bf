"""sample.generate against independent computations on a tiny random model."""

import pytest
import torch

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
    """log q(y_t | s_t) from one unpadded, uncached forward pass per sequence: no padding, no KV cache."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature  # [T, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_positions_after_end_of_turn_are_masked(tiny):
    model, _, prompts = tiny
    eos = list(range(0, 128))  # half the vocabulary ends a turn, so rows stop at different steps
    ro = sample.generate(model, prompts, n=4, max_new_tokens=12, temperature=1.0, eos_ids=eos, pad_id=PAD, seed=0)
    lengths = set()
    for ids, mask in zip(ro.response_ids.tolist(), ro.response_mask.tolist()):
        stops = [i for i, t in enumerate(ids) if t in eos and mask[i]]
        L = stops[0] + 1 if stops else len(ids)  # the end-of-turn token itself is part of the response
        assert mask == [1] * L + [0] * (len(ids) - L)
        assert all(t == PAD for t in ids[L:])
        assert not any(t in eos for t in ids[:L - 1])
        lengths.add(L)
    assert len(lengths) > 1, "all rows stopped together: the test would not see per-row masking"
    assert (ro.logprobs[ro.response_mask == 0] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_fresh_forward_pass(tiny, temperature):
    model, _, prompts = tiny
    n = 3
    ro = sample.generate(model, prompts, n=n, max_new_tokens=10, temperature=temperature, eos_ids=range(0, 40),
                         pad_id=PAD, seed=1)
    for row in range(len(prompts) * n):
        mask = ro.response_mask[row].bool()
        response = ro.response_ids[row][mask].tolist()
        want = fresh_logprobs(model, prompts[row // n], response, temperature)
        torch.testing.assert_close(ro.logprobs[row][mask], want, atol=1e-5, rtol=1e-5)


def test_greedy_equals_unbatched_hf_generate(tiny):
    """The shared-prefill KV cache, left padding and position ids give what an unpadded HF generate gives."""
    model, _, prompts = tiny
    ro = sample.generate(model, prompts, n=2, max_new_tokens=12, temperature=0, eos_ids=[], pad_id=PAD)
    for b, p in enumerate(prompts):
        hf = model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            pad_token_id=PAD)
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
    ro = sample.generate(model, prompts, n=2, max_new_tokens=16, temperature=1.0, eos_ids=[258] + list(range(60)),
                         pad_id=PAD, seed=3)
    for text, ids, mask in zip(ro.texts(tok), ro.response_ids, ro.response_mask):
        kept = [t for t in ids[mask.bool()].tolist() if t < 256]
        assert text == tok.decode(kept)
        assert "<|im_end|>" not in text and "<|pad|>" not in text


def test_samples_do_not_depend_on_the_batch(tiny):
    """Per-sample generators keyed by prompt: a prompt sampled alone or inside a batch gets the same tokens."""
    model, _, prompts = tiny
    kw = dict(n=2, max_new_tokens=10, temperature=1.0, eos_ids=[], pad_id=PAD, seed=5)
    batch = sample.generate(model, prompts, prompt_keys=["a", "b", "c"], **kw)
    alone = sample.generate(model, prompts[1:2], prompt_keys=["b"], **kw)
    assert torch.equal(batch.response_ids[2:4], alone.response_ids)
