"""ppo.py: GRPO advantages against a Python loop; logprobs and the update on a tiny model."""

import statistics

import pytest
import torch

import common
import losses
import models
import ppo
import sample

PAD = 256
EOS = list(range(0, 40))   # many end-of-turn ids, so responses stop at different lengths


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: thread hand-offs cost more than the math, and on a shared CPU two
    threads per process ran this file 5x slower than one. Restored afterwards, so other test files
    are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------
# advantages

def test_grpo_advantages_match_python_loop():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5 * 4, generator=g)
    got = ppo.grpo_advantages(rewards, group_size=4)
    r = rewards.tolist()
    for p in range(5):
        group = r[4 * p:4 * p + 4]
        mean, std = statistics.mean(group), statistics.stdev(group)   # stdev: unbiased, n - 1
        for i in range(4):
            assert got[4 * p + i].item() == pytest.approx((group[i] - mean) / (std + 1e-6),
                                                          rel=1e-5, abs=1e-6)


def test_grpo_constant_group_and_group_size_one_give_zeros():
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 2.0, 3.0, 4.0])
    adv = ppo.grpo_advantages(rewards, group_size=4)
    assert (adv[:4] == 0).all() and (adv[4:] != 0).all()
    assert (ppo.grpo_advantages(rewards, group_size=1) == 0).all()
    with pytest.raises(ValueError):
        ppo.grpo_advantages(rewards, group_size=3)


# --------------------------------------------------------------------------------------------------
# a tiny model and a rollout

@pytest.fixture(scope="module")
def rollout():
    model = models.tiny_model(seed=0).eval()
    tok = models.tiny_tokenizer()
    prompts = [tok.encode(s, add_special_tokens=False)
               for s in ["hi", "a longer prompt, left padded", "third"]]
    ro = sample.generate(model, prompts, n=4, max_new_tokens=10, temperature=0.7, eos_ids=EOS,
                         pad_id=PAD, seed=0)
    lengths = ro.response_mask.sum(-1)
    assert lengths.min() < lengths.max(), "all rows the same length: masking would go untested"
    return ro


def logprobs_of(model, ro, temperature=0.7):
    with torch.no_grad():
        return sample.sequence_logprobs(model, ro, temperature)


def naive_logprobs(model, ro, temperature):
    """log softmax(logits / temperature)[y_t] from the model's own full logits [N, P+T, V], 0 at
    padding."""
    P = ro.prompt_ids.shape[1]
    logits = model(
        input_ids=ro.input_ids, attention_mask=ro.attention_mask,
        position_ids=sample.position_ids_from_mask(ro.attention_mask)).logits[:, P - 1:-1]
    lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32))
                           / temperature, -1).gather(
        -1, ro.response_ids[..., None].clone())[..., 0]
    return torch.where(ro.response_mask.bool(), lp, 0.0)


def test_sequence_logprobs_equal_the_full_logits_log_softmax(rollout):
    """The chunked LM head at the response positions against log_softmax over the model's full
    logits, on the left-padded rollout at its sampling temperature."""
    model = models.tiny_model(seed=0).eval()
    with torch.no_grad():
        want = naive_logprobs(model, rollout, 0.7)
    torch.testing.assert_close(logprobs_of(model, rollout), want, atol=1e-5, rtol=1e-5)


def test_sequence_entropy_at_the_state_before_each_token(rollout):
    """Entropy of softmax(logits / temperature) at the position predicting y_t, checked against one
    unpadded forward pass per row (no padding, no position-id arithmetic)."""
    model = models.tiny_model(seed=0).eval()
    with torch.no_grad():
        lp, ent = sample.sequence_logprobs(model, rollout, 0.7, return_entropy=True)
        for row in (0, 5, 11):
            ids = rollout.input_ids[row][rollout.attention_mask[row].bool()][None]   # [1, p + t]
            t = int(rollout.response_mask[row].sum())
            p = ids.shape[1] - t
            out = model(input_ids=ids)
            probs = torch.softmax(out.logits[0, p - 1:p - 1 + t].double() / 0.7, -1)      # [t, V]
            torch.testing.assert_close(ent[row, :t].double(), -(probs * probs.log()).sum(-1),
                                       atol=1e-5, rtol=1e-5)
            assert (ent[row, t:] == 0).all() and (lp[row, t:] == 0).all()


# --------------------------------------------------------------------------------------------------
# the update

def seq_advantages(n_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ppo.grpo_advantages(torch.randn(n_rows, generator=g), group_size=4)


def test_first_step_has_ratio_one(rollout):
    """One epoch, one mini-batch, old logprobs from the same weights: PPO is REINFORCE, nothing is
    clipped."""
    model = models.tiny_model(seed=0)
    old = logprobs_of(model, rollout)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = ppo.ppo_update(model, opt, rollout, seq_advantages(12), old, old, kl_coef=0.001,
                           micro_batch_size=5, temperature=0.7,
                           generator=torch.Generator().manual_seed(0))
    assert stats["clipfrac"] == 0.0
    # current == old == ref up to float noise
    assert stats["approx_kl"] < 1e-12 and stats["kl"] < 1e-6
    assert stats["skipped_steps"] == 0 and stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_on_policy_update_uses_its_own_logprobs_as_the_old_ones(rollout):
    """old_logprobs=None (one epoch, one mini-batch): the step equals the one with a separate pass's
    logprobs, with the ratio exactly 1; with more epochs it is refused."""
    adv = seq_advantages(12)
    steps = []
    for old in (logprobs_of(models.tiny_model(seed=0), rollout), None):
        model = models.tiny_model(seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        stats = ppo.ppo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), rollout, adv,
                               old, micro_batch_size=5, max_grad_norm=None, temperature=0.7)
        steps.append(torch.cat([(b - p.detach()).flatten()
                                for b, p in zip(before, model.parameters())]))
    assert stats["approx_kl"] == 0.0 and stats["clipfrac"] == 0.0
    # equal up to rounding (the separate pass batches rows differently): 1e-6 failed 1 run in 4 on
    # 2 busy cores (1.5e-6 off), while wrong old logprobs move a step with lr 1 by far more than
    # 1e-5
    torch.testing.assert_close(steps[1], steps[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="on-policy"):
        ppo.ppo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), rollout, adv, None,
                       ppo_epochs=2)


def test_later_minibatches_get_clipped(rollout):
    model = models.tiny_model(seed=0)
    old = logprobs_of(model, rollout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = ppo.ppo_update(model, opt, rollout, seq_advantages(12), old, ppo_epochs=2,
                           mini_batches=2, temperature=0.7,
                           generator=torch.Generator().manual_seed(0))
    assert stats["clipfrac"] > 0
    assert stats["approx_kl"] > 0


def test_update_raises_logprobs_of_positive_advantage_samples(rollout):
    model = models.tiny_model(seed=0)
    old = logprobs_of(model, rollout)
    adv = torch.tensor([1.0, -1.0] * 6)                   # each prompt has good and bad samples
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # small: the first-order (monotone) regime
    ppo.ppo_update(model, opt, rollout, adv, old, temperature=0.7)
    delta = (logprobs_of(model, rollout) - old).sum(-1)   # [N] change of log q(y | x)
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()
    assert (delta[adv > 0] > 0).float().mean() >= 0.5
    assert (delta[adv < 0] < 0).float().mean() >= 0.5


def test_nan_advantage_skips_the_step(rollout):
    model = models.tiny_model(seed=0)
    old = logprobs_of(model, rollout)
    before = [p.detach().clone() for p in model.parameters()]
    adv = seq_advantages(12)
    adv[3] = float("nan")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = ppo.ppo_update(model, opt, rollout, adv, old, temperature=0.7)
    assert stats["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state                                     # AdamW's moments never saw the NaN
    assert all(p.grad is None for p in model.parameters())


def test_loss_is_token_mean_over_the_minibatch_across_micro_batches(rollout, monkeypatch):
    """SGD with lr 1 and no clipping: the weight change is minus the gradient. Micro-batches of
    uneven token counts must give the gradient of sum(per-token loss) / (all response tokens),
    computed here in one pass, in float64. The bound is float32's own error on this gradient: that
    of the same one-pass gradient in float32 (about 100-200 eps x the tensor's largest element on
    this wide-init model, 1e-6..3e-5; summation order, so it differs by CPU), times 4. A wrong
    count or reduction is off by the gradient's own size."""
    old = logprobs_of(models.tiny_model(seed=0), rollout)
    ref = logprobs_of(models.tiny_model(seed=1), rollout)       # another model: a nonzero k3 term
    adv = seq_advantages(12)
    mask = rollout.response_mask.bool()

    def one_pass_gradient(dtype):
        model = models.tiny_model(seed=0).to(dtype)
        lp = naive_logprobs(model, rollout, 0.7)   # the full [N, T, V] logits, no chunked head
        pg, _ = losses.ppo_policy_loss(lp, old.to(dtype), adv.to(dtype))
        loss = losses.masked_sum(pg + 0.1 * losses.kl_k3(lp, ref.to(dtype)), mask) / mask.sum()
        return torch.autograd.grad(loss, list(model.parameters()))
    want = one_pass_gradient(torch.float64)
    bound = [4 * (w32.double() - w).abs().max() for w32, w in
             zip(one_pass_gradient(torch.float32), want)]

    def assert_close(got, want, scale=1.0):
        for g, w, b in zip(got, want, bound):
            assert (g.double() - w * scale).abs().max() <= b * scale, (g, w)

    def weight_change(micro_batch_tokens=None, shapes=None):
        m = models.tiny_model(seed=0)
        if shapes is not None:   # the [rows, prompt + response] of every forward pass
            backbone = m.model.forward
            m.model.forward = lambda input_ids, **kw: (shapes.append(tuple(input_ids.shape))
                                                       or backbone(input_ids, **kw))
        before = [p.detach().clone() for p in m.parameters()]
        ppo.ppo_update(m, torch.optim.SGD(m.parameters(), lr=1.0), rollout, adv, old, ref,
                       kl_coef=0.1, micro_batch_size=5, micro_batch_tokens=micro_batch_tokens,
                       max_grad_norm=None, temperature=0.7)
        return [b - p.detach() for b, p in zip(before, m.parameters())]

    assert_close(weight_change(), want)
    # micro-batches bounded by padded tokens (fault 4 of issue 9): every forward pass within the
    # budget, the same step
    shapes = []
    assert_close(weight_change(micro_batch_tokens=40, shapes=shapes), want)
    assert len(shapes) > 12 / 5 + 1 and all(rows * width <= 40 or rows == 1
                                            for rows, width in shapes), shapes
    # under DDP the count summed over ranks (common.all_reduce_sum) is the denominator: twice the
    # count, half the step
    monkeypatch.setattr(common, "all_reduce_sum", lambda n: 2 * n)
    assert_close(weight_change(), want, scale=0.5)
