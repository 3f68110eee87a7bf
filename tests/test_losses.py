"""losses.py against textbook formulas computed another way (float64, Python loops, exact
expectations)."""

import math

import pytest
import torch

import losses


# --------------------------------------------------------------------------------------------------
# masked reductions

def test_masked_mean_ignores_masked_values_and_empty_rows_give_zero():
    x = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), float("nan"), 5.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    row_means = losses.masked_mean(x, mask, dim=-1)
    assert row_means.tolist() == [1.5, 0.0]
    assert losses.masked_mean(x, mask).item() == 1.5
    assert losses.masked_sum(x, mask).item() == 3.0
    assert losses.masked_mean(x, torch.zeros_like(mask)).item() == 0.0


# --------------------------------------------------------------------------------------------------
# Bradley-Terry

def test_bt_loss_matches_softplus_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(64, generator=g) * 4, torch.randn(64, generator=g) * 4
    want = torch.log1p(torch.exp(-(t.double() - s.double()))).mean()
    torch.testing.assert_close(losses.bt_loss(t, s).double(), want, atol=1e-6, rtol=1e-6)
    # huge margins: log(sigmoid) would give log(0) = -inf; logsigmoid stays finite and linear
    big = losses.bt_loss(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert math.isclose(big.item(), 200.0, rel_tol=1e-6)
    assert (losses.bt_loss(torch.tensor([200.0]), torch.tensor([0.0])).item()
            == pytest.approx(0.0, abs=1e-30))


def test_bt_loss_gradient_raises_teacher_and_lowers_student():
    t = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    s = torch.tensor([0.5, -2.0, 4.0], requires_grad=True)
    losses.bt_loss(t, s).backward()
    assert (t.grad < 0).all()    # descending the loss increases D(teacher)
    assert (s.grad > 0).all()    # and decreases D(student)
    torch.testing.assert_close(t.grad, -s.grad)


def test_bt_accuracy_counts_strict_wins():
    t = torch.tensor([1.0, 0.0, 2.0, 5.0])
    s = torch.tensor([0.0, 1.0, 2.0, -5.0])   # win, loss, tie (counts as wrong), win
    assert losses.bt_accuracy(t, s).item() == 0.5


# --------------------------------------------------------------------------------------------------
# DPO

def test_dpo_matches_its_formula_and_the_papers_gradient_in_float64():
    g = torch.Generator().manual_seed(1)
    c, r, rc, rr = (torch.randn(32, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    beta = 0.1
    margin = (c - rc) - (r - rr)
    want = torch.log1p(torch.exp(-beta * margin))                  # log(1 + e^(-beta m))
    torch.testing.assert_close(losses.dpo(c, r, rc, rr, beta).double(), want, atol=1e-6, rtol=1e-6)
    # arXiv 2305.18290 section 4: the gradient weighs each pair by sigma(-beta m), raising the
    # chosen response's logprob and lowering the rejected one's by beta * that weight
    c, r = c.clone().requires_grad_(), r.clone().requires_grad_()
    losses.dpo(c, r, rc, rr, beta).sum().backward()
    weight = beta / (1 + torch.exp(beta * margin))
    torch.testing.assert_close(c.grad, -weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r.grad, weight, atol=1e-6, rtol=1e-6)
    # a policy equal to its reference: log 2 per pair, whatever the logprobs
    assert torch.allclose(losses.dpo(c, r, c, r, beta), torch.full((32,), math.log(2)))


# --------------------------------------------------------------------------------------------------
# PPO clipped surrogate with dual clip

def brute_force_ppo(r, a, eps, c):
    """One token, written from the definitions: returns (loss, clip active)."""
    unclipped = -a * r
    clipped = -a * min(max(r, 1 - eps), 1 + eps)
    loss, active = max(unclipped, clipped), clipped > unclipped
    if c is not None and a < 0 and loss > -c * a:
        loss, active = -c * a, True
    return loss, active


# (ratio, advantage, expected loss with eps 0.2 / c 3, expected clipped)
CASES = [
    (1.1, 1.0, -1.1, False),     # inside the clip range, A > 0
    (0.9, -2.0, 1.8, False),     # inside the clip range, A < 0
    (1.5, 2.0, -2.4, True),      # r > 1 + eps, A > 0: clipped at 1 + eps
    (0.5, -1.0, 0.8, True),      # r < 1 - eps, A < 0: clipped at 1 - eps
    (0.5, 1.0, -0.5, False),     # r < 1 - eps, A > 0: the unclipped branch is the max
    (1.5, -1.0, 1.5, False),     # r > 1 + eps, A < 0: unclipped branch (pessimistic max)
    (2.5, -1.0, 2.5, False),     # below the dual-clip cap 3
    (10.0, -1.0, 3.0, True),     # r huge, A < 0: capped at -c A
    (50.0, -0.5, 1.5, True),     # the cap scales with |A|
    (10.0, 1.0, -1.2, True),     # r huge, A > 0: ordinary clip, no dual clip
    (1.7, 0.0, 0.0, False),      # A = 0: no loss, nothing clipped
]


def test_ppo_policy_loss_crafted_cases_and_brute_force():
    r = torch.tensor([c[0] for c in CASES], dtype=torch.float64)[None]     # [1, K]
    a = torch.tensor([c[1] for c in CASES], dtype=torch.float64)[None]
    old = torch.linspace(-5.0, -0.1, len(CASES), dtype=torch.float64)[None]   # any old logprobs
    loss, clipped = losses.ppo_policy_loss(old + r.log(), old, a, clip_eps=0.2, dual_clip=3.0)
    for k, (ri, ai, want, want_clip) in enumerate(CASES):
        bf_loss, bf_clip = brute_force_ppo(ri, ai, 0.2, 3.0)
        assert loss[0, k].item() == pytest.approx(want, abs=1e-9), (ri, ai)
        assert bf_loss == pytest.approx(want, abs=1e-9)
        assert bool(clipped[0, k]) == want_clip == bf_clip, (ri, ai)


def test_ppo_policy_loss_random_against_brute_force_with_and_without_dual_clip():
    g = torch.Generator().manual_seed(0)
    logprobs = torch.randn(6, 9, generator=g, dtype=torch.float64) * 0.02 - 2
    # ratios from ~0.1 to ~10
    old = logprobs + torch.randn(6, 9, generator=g, dtype=torch.float64) * 1.0
    adv = torch.randn(6, 9, generator=g, dtype=torch.float64)
    for c in (3.0, None):
        loss, clipped = losses.ppo_policy_loss(logprobs, old, adv, clip_eps=0.2, dual_clip=c)
        for i in range(6):
            for j in range(9):
                r = math.exp(logprobs[i, j].item() - old[i, j].item())
                bf_loss, bf_clip = brute_force_ppo(r, adv[i, j].item(), 0.2, c)
                assert loss[i, j].item() == pytest.approx(bf_loss, rel=1e-9, abs=1e-12)
                assert bool(clipped[i, j]) == bf_clip
    # without the dual clip a huge ratio with A < 0 is not capped
    big, _ = losses.ppo_policy_loss(torch.tensor([[math.log(10.0)]]), torch.zeros(1, 1),
                                    torch.tensor([[-1.0]]), dual_clip=None)
    assert big.item() == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(ValueError):
        losses.ppo_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1),
                               dual_clip=1.0)


def test_ppo_policy_loss_gradient_is_zero_exactly_where_clipped():
    r = torch.tensor([c[0] for c in CASES])[None]
    a = torch.tensor([c[1] for c in CASES])[None]
    logprobs = r.log().requires_grad_(True)
    loss, clipped = losses.ppo_policy_loss(logprobs, torch.zeros_like(r), a)
    loss.sum().backward()
    moving = (logprobs.grad != 0)
    assert torch.equal(moving, ~clipped & (a != 0))


def test_ppo_policy_loss_sequence_advantages_broadcast_to_tokens():
    g = torch.Generator().manual_seed(1)
    logprobs, old = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    adv = torch.randn(3, generator=g)
    a, ca = losses.ppo_policy_loss(logprobs, old, adv)
    b, cb = losses.ppo_policy_loss(logprobs, old, adv[:, None].expand(3, 5))
    assert torch.equal(a, b) and torch.equal(ca, cb)


# --------------------------------------------------------------------------------------------------
# KL estimators

def test_kl_k3_zero_for_equal_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(50, 20, generator=g) * 5
    assert (losses.kl_k3(lp, lp) == 0).all()
    ref = lp + torch.randn(50, 20, generator=g)
    k3 = losses.kl_k3(lp, ref)
    assert (k3 > 0).all()
    assert (losses.kl_k2(lp, ref) > 0).all()


def categorical_pair():
    pi = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.25, 0.2, 0.2, 0.1], dtype=torch.float64)
    return pi, ref, (pi * (pi / ref).log()).sum().item()


def test_k3_exactly_unbiased_k2_biased():
    """E_pi[k] = sum_y pi(y) k(y), computed exactly over the 5 outcomes."""
    pi, ref, kl = categorical_pair()
    expect = {name: (pi * fn(pi.log(), ref.log())).sum().item()
              for name, fn in [("k2", losses.kl_k2), ("k3", losses.kl_k3)]}
    assert expect["k3"] == pytest.approx(kl, rel=1e-12)
    assert expect["k2"] != pytest.approx(kl, rel=1e-3)      # biased ...
    assert expect["k2"] == pytest.approx(kl, rel=0.3)       # ... but close for nearby distributions


def test_kl_estimators_monte_carlo():
    pi, ref, kl = categorical_pair()
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    lp, ref_lp = pi.log()[y], ref.log()[y]
    k2, k3 = losses.kl_k2(lp, ref_lp), losses.kl_k3(lp, ref_lp)
    k1 = lp - ref_lp     # the plain log-ratio estimator, to compare variances with
    # unbiased: within 4 standard errors
    assert abs(k3.mean().item() - kl) < 4 * k3.std().item() / math.sqrt(len(y))
    assert k2.mean().item() == pytest.approx(kl, rel=0.3)
    assert k3.std() < k1.std()          # why k3: lower variance than k1, and never negative
    assert (k3 >= 0).all()


# --------------------------------------------------------------------------------------------------
# entropy

def test_entropy_matches_definition_and_is_stable():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 50, generator=g) * 3
    p = torch.softmax(logits.double(), -1)
    want = -(p * p.log()).sum(-1)
    got = losses.entropy_from_logits(logits)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # uniform: log V; huge logits (bf16 input, large scale) and -inf slots stay finite
    assert losses.entropy_from_logits(torch.zeros(7)).item() == pytest.approx(math.log(7), rel=1e-6)
    big = (logits * 1e4).bfloat16()
    assert torch.isfinite(losses.entropy_from_logits(big)).all()
    masked = torch.tensor([0.0, 0.0, float("-inf"), float("-inf")])
    assert losses.entropy_from_logits(masked).item() == pytest.approx(math.log(2), rel=1e-6)
