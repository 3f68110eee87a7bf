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
    stats = ppo.ppo_update(model, opt, rollout, seq_advantages(12), old, old,
                           ppo.PPOConfig(kl_coef=0.001, micro_batch_size=5, temperature=0.7),
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
        cfg = ppo.PPOConfig(micro_batch_size=5, grad_clip=None, temperature=0.7)
        stats = ppo.ppo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), rollout, adv,
                               old, None, cfg)
        steps.append(torch.cat([(b - p.detach()).flatten()
                                for b, p in zip(before, model.parameters())]))
    assert stats["approx_kl"] == 0.0 and stats["clipfrac"] == 0.0
    # equal up to rounding (the separate pass batches rows differently): 1e-6 failed 1 run in 4 on
    # 2 busy cores (1.5e-6 off), while wrong old logprobs move a step with lr 1 by far more than
    # 1e-5
    torch.testing.assert_close(steps[1], steps[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="on-policy"):
        ppo.ppo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), rollout, adv, None, None,
                       ppo.PPOConfig(ppo_epochs=2))


def test_later_minibatches_get_clipped(rollout):
    model = models.tiny_model(seed=0)
    old = logprobs_of(model, rollout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = ppo.ppo_update(model, opt, rollout, seq_advantages(12), old, None,
                           ppo.PPOConfig(ppo_epochs=2, mini_batches=2, temperature=0.7),
                           generator=torch.Generator().manual_seed(0))
    assert stats["clipfrac"] > 0
    assert stats["approx_kl"] > 0


def test_update_raises_logprobs_of_positive_advantage_samples(rollout):
    model = models.tiny_model(seed=0)
    old = logprobs_of(model, rollout)
    adv = torch.tensor([1.0, -1.0] * 6)                   # each prompt has good and bad samples
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # small: the first-order (monotone) regime
    ppo.ppo_update(model, opt, rollout, adv, old, None, ppo.PPOConfig(temperature=0.7))
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
    stats = ppo.ppo_update(model, opt, rollout, adv, old, None, ppo.PPOConfig(temperature=0.7))
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
        cfg = ppo.PPOConfig(kl_coef=0.1, micro_batch_size=5, micro_batch_tokens=micro_batch_tokens,
                            grad_clip=None, temperature=0.7)
        ppo.ppo_update(m, torch.optim.SGD(m.parameters(), lr=1.0), rollout, adv, old, ref, cfg)
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


def plain_ppo_loop(model, ro, adv, old, ref, *, lr, epochs, mini_batches, seed, kl_coef=0.1,
                   clip=0.2, dual=3.0, max_norm=1.0, temperature=0.7):
    """PPO written out from the formulas (Schulman et al. 2017; dual clip, Ye et al. 2020; k3 KL
    to the reference) on the model's full logits, in the model's dtype: each epoch a permutation
    of the rows (torch.randperm on a generator seeded `seed`, as ppo_update draws it) cut into
    equal mini-batches; each mini-batch one SGD step on the token mean of
    max(-A r, -A clip(r)), capped at -c A where A < 0, plus kl_coef * k3, its gradient clipped to
    max_norm in global norm. Returns the weights' change and each step's token-mean stats."""
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    mask, P, dt = ro.response_mask.bool(), ro.prompt_ids.shape[1], params[0].dtype
    gen, steps = torch.Generator().manual_seed(seed), []
    for _ in range(epochs):
        for rows in torch.randperm(len(mask), generator=gen).split(len(mask) // mini_batches):
            r_ = ro.rows(rows)
            logits = model(input_ids=r_.input_ids, attention_mask=r_.attention_mask,
                           position_ids=sample.position_ids_from_mask(r_.attention_mask)
                           ).logits[:, P - 1:-1] / temperature
            log_all = logits.log_softmax(-1)                                        # [n, T, V]
            lp = log_all.gather(-1, r_.response_ids[..., None])[..., 0]
            m = mask[rows]
            lp = torch.where(m, lp, 0.0)
            A = adv[rows].to(dt)[:, None].expand_as(lp)
            ratio = (lp - old[rows].to(dt)).exp()
            unclipped, clipped = -A * ratio, -A * ratio.clamp(1 - clip, 1 + clip)
            surrogate = torch.maximum(unclipped, clipped)
            capped = (A < 0) & (surrogate > -dual * A)
            surrogate = torch.where(capped, -dual * A, surrogate)
            d = ref[rows].to(dt) - lp
            k3 = d.exp() - d - 1
            n = m.sum()
            loss = torch.where(m, surrogate + kl_coef * k3, 0.0).sum() / n
            grads = torch.autograd.grad(loss, params)
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= lr * min(1.0, max_norm / (norm + 1e-6)) * g
            mean = lambda x: torch.where(m, x.detach(), 0.0).sum().item() / n.item()
            steps.append({"pg_loss": mean(surrogate), "kl": mean(k3),
                          "approx_kl": mean(0.5 * (lp - old[rows].to(dt)) ** 2),
                          "clipfrac": mean(((clipped > unclipped) | capped).to(dt)),
                          "entropy": mean(-(log_all.exp() * log_all).sum(-1)), "grad_norm": norm})
    change = [p.detach() - b for p, b in zip(params, before)]
    return change, {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}


def test_ppo_epochs_and_mini_batches_equal_a_plain_loop(rollout):
    """2 epochs x 2 shuffled mini-batches (4 SGD steps; the later ones off-policy, some tokens
    clipped), micro-batches of 5 rows, a KL term and the grad-norm clip: the weights' change and
    every reported stat (averaged over the 4 steps) against plain_ppo_loop in float64. The bound is
    float32's own error on the same loop (plain_ppo_loop in float32) times 4, plus 1e-6 x the
    value (or the tensor's largest element) where float32 happened to be exact."""
    # the rollout's policy another model: ratios far from 1 from the first step on, so the clip
    # and the dual clip's cap are both active
    old = logprobs_of(models.tiny_model(seed=2), rollout)
    ref = logprobs_of(models.tiny_model(seed=1), rollout)
    adv = seq_advantages(12)
    model = models.tiny_model(seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = ppo.PPOConfig(kl_coef=0.1, ppo_epochs=2, mini_batches=2, micro_batch_size=5,
                        grad_clip=1.0, temperature=0.7)
    stats = ppo.ppo_update(model, torch.optim.SGD(model.parameters(), lr=0.5), rollout, adv, old,
                           ref, cfg, generator=torch.Generator().manual_seed(0))
    got = [p.detach() - b for p, b in zip(model.parameters(), before)]
    loop = dict(lr=0.5, epochs=2, mini_batches=2, seed=0)
    want, want_stats = plain_ppo_loop(models.tiny_model(seed=0).double(), rollout, adv, old, ref,
                                      **loop)
    f32, f32_stats = plain_ppo_loop(models.tiny_model(seed=0), rollout, adv, old, ref, **loop)
    for g, w, e in zip(got, want, f32):
        bound = 4 * (e.double() - w).abs().max() + 1e-6 * w.abs().max()
        assert (g.double() - w).abs().max() <= bound
    assert want_stats["clipfrac"] > 0 and want_stats["approx_kl"] > 0
    assert stats["skipped_steps"] == 0
    for key, value in want_stats.items():   # the same bound (k3 is exp of a logprob difference)
        assert abs(stats[key] - value) <= 4 * abs(f32_stats[key] - value) + 1e-6 * abs(value), key
