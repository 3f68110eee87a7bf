"""AMM: the on-policy surrogate's expected gradient against the exact gradient (every sequence
enumerated), the adversary and student steps moving the distance estimates their way, learning,
resume and DDP on tiny models."""

import contextlib
import io
import itertools
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import amm
import common
from scripts import (metrics, reference_run, resumed_on_two_ranks, run_here, run_script,
                     student_weights)

# 36 train: 4 steps
TINY = ["--student", "tiny", "--limit", "40", "--epochs", "1", "--eval-prompts", "4"]


def run(args, torchrun=False):
    """A run on two gloo ranks, or in this process (scripts.run_here: no new interpreter)."""
    if torchrun:
        return run_script("amm.py", args, torchrun=True)
    return run_here("amm.py", args)


# --------------------------------------------------------------------------------------------------
# exact: a tabular problem small enough to enumerate every response

V, EOS, HORIZON = 3, 2, 3      # tokens 0, 1 and EOS; responses of at most 3 tokens


def all_responses():
    """Every response: up to HORIZON tokens, stopping at (and including) the first EOS."""
    out = []
    for length in range(1, HORIZON + 1):
        for ys in itertools.product(range(V), repeat=length):
            if EOS not in ys[:-1] and (ys[-1] == EOS or length == HORIZON):
                out.append(ys)
    return out


# EOS-free prefixes
STATES = [()] + [s for n in range(1, HORIZON) for s in itertools.product(range(EOS), repeat=n)]
STATE_ID = {s: i for i, s in enumerate(STATES)}


def tabular_batch(responses, table):
    """ids, mask [N, T] and a per-state table [S, V] gathered at every response position
    [N, T, V]."""
    ids = torch.tensor([list(y) + [0] * (HORIZON - len(y)) for y in responses])
    mask = torch.tensor([[1.0] * len(y) + [0.0] * (HORIZON - len(y)) for y in responses])
    state = torch.tensor([[STATE_ID[y[:t]] if t < len(y) else 0 for t in range(HORIZON)]
                          for y in responses])
    return ids, mask, table[state]


# the adversary's input per state: adversary rank 2 < 5 is the low-rank form, 0 the full one
FEATURES = 5


def tabular_problem(seed, adv_rank=0):
    g = torch.Generator().manual_seed(seed)
    # student logits
    theta = torch.randn(len(STATES), V, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(len(STATES), V, generator=g, dtype=torch.float64) * 2
    torch.manual_seed(seed)
    adversary = amm.Adversary(FEATURES, V, init_std=2.0, rank=adv_rank)   # a fixed adversary
    f = adversary(torch.randn(len(STATES), FEATURES, generator=g)).detach().double()
    return theta, teacher, f


def sequence_terms(responses, theta, teacher, f):
    """Per response: log q(y) [N], the per-token moments g [N, T], token log-probs [N, T],
    mask [N, T]."""
    ids, mask, q_logits = tabular_batch(responses, theta)
    _, _, p_logits = tabular_batch(responses, teacher)
    _, _, f_t = tabular_batch(responses, f)
    g = amm.token_moments(q_logits, p_logits, f_t)
    logprobs = torch.log_softmax(q_logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
    return logprobs.sum(-1), g, logprobs, mask


def test_enumeration_covers_every_response_once():
    responses = all_responses()
    theta, teacher, f = tabular_problem(0)
    log_q, *_ = sequence_terms(responses, theta, teacher, f)
    assert len(responses) == 15
    # a distribution
    torch.testing.assert_close(log_q.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("adv_rank", [0, 2])
@pytest.mark.parametrize("token_mean", ["horizon", "sequence"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surrogate_gradient_in_expectation_is_the_exact_gradient_of_d_on(seed, token_mean,
                                                                         adv_rank):
    responses = all_responses()
    theta, teacher, f = tabular_problem(seed, adv_rank)
    norm_of = lambda mask: (torch.full_like(mask[:, 0], HORIZON) if token_mean == "horizon"
                            else mask.sum(-1))

    # exact: d_on(theta) = sum_y Q_theta(y) distance(g(y; theta)), differentiated through Q
    # and g alike
    log_q, g, _, mask = sequence_terms(responses, theta, teacher, f)
    d_on = (log_q.exp() * amm.distance(g, mask, norm_of(mask))).sum()
    (exact,) = torch.autograd.grad(d_on, theta)

    def expected_surrogate_gradient(rows, samples_per_prompt, baseline):
        """sum over groups of responses of P(group) * mean of the group's surrogates,
        differentiated."""
        log_q, g, logprobs, mask = sequence_terms(rows, theta, teacher, f)
        adv = amm.on_policy_advantages(g, mask, norm_of(mask), token_mean, samples_per_prompt,
                                       baseline)
        per_seq = amm.on_policy_surrogate(g, logprobs, adv, mask, norm_of(mask))
        group_prob = (log_q.view(-1, samples_per_prompt).sum(-1).exp().detach()
                      .repeat_interleave(samples_per_prompt))
        return torch.autograd.grad((group_prob * per_seq).sum() / samples_per_prompt, theta)[0]

    # no baseline: each response weighted by its probability
    torch.testing.assert_close(expected_surrogate_gradient(responses, 1, "none"), exact,
                               rtol=1e-10, atol=1e-12)
    # leave-one-out baseline with 2 samples per prompt: every ordered pair (y1, y2), rows
    # prompt-major
    pairs = [y for y1, y2 in itertools.product(responses, repeat=2) for y in (y1, y2)]
    torch.testing.assert_close(expected_surrogate_gradient(pairs, 2, "loo"), exact,
                               rtol=1e-10, atol=1e-12)

    # without the score term (states treated as fixed) the gradient is wrong: the test can tell
    log_q, g, _, mask = sequence_terms(responses, theta, teacher, f)
    (plain,) = torch.autograd.grad(
        (log_q.exp().detach() * amm.distance(g, mask, norm_of(mask))).sum(), theta)
    assert (plain - exact).abs().max() > 1e-3
    # and reward-to-go alone is biased when the length depends on the actions
    if token_mean == "sequence":
        log_q, g, logprobs, mask = sequence_terms(responses, theta, teacher, f)
        rtg = amm.reward_to_go(g.detach(), mask) / norm_of(mask)[:, None]
        per_seq = amm.on_policy_surrogate(g, logprobs, rtg, mask, norm_of(mask))
        (biased,) = torch.autograd.grad((log_q.exp().detach() * per_seq).sum(), theta)
        assert (biased - exact).abs().max() > 1e-3


def test_reward_to_go_and_loo_baseline_against_loops():
    g = torch.randn(4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    want = [[sum(g[i, u].item() for u in range(t + 1, 5) if mask[i, u]) for t in range(5)]
            for i in range(4)]
    torch.testing.assert_close(amm.reward_to_go(g, mask), torch.tensor(want, dtype=torch.float64))
    x = torch.randn(6, 2, dtype=torch.float64)   # 2 prompts x 3 samples
    want = torch.stack([(x[3 * (i // 3):3 * (i // 3) + 3].sum(0) - x[i]) / 2 for i in range(6)])
    torch.testing.assert_close(amm.loo_baseline(x, 3), want)


def test_optimal_bounded_adversary_attains_the_l1_distance():
    """sup_{|f| <= 1} <p - q, f> = ||p - q||_1, at f = sign(p - q): the yardstick logged as
    l1_on / l1_off."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 4, 11, generator=g), torch.randn(2, 4, 11, generator=g)
    best = torch.sign(torch.softmax(t, -1) - torch.softmax(s, -1))
    torch.testing.assert_close(amm.token_moments(s, t, best), amm.l1_distance(s, t))
    other = torch.tanh(torch.randn(2, 4, 11, generator=g) * 3)
    assert (amm.token_moments(s, t, other) <= amm.l1_distance(s, t) + 1e-6).all()


# --------------------------------------------------------------------------------------------------
# the adversary's two forms, and its chunked paths against whole-batch autograd

class Largest(TorchDispatchMode):
    """The largest number of elements any op returns while active."""
    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            self.numel = max(self.numel, t.numel() if torch.is_tensor(t) else 0)
        return out


def test_low_rank_adversary_is_the_factorised_formula_and_never_forms_the_product():
    torch.manual_seed(0)
    hidden, vocab, rank, chunk = 64, 5000, 4, 8
    adversary = amm.Adversary(hidden, vocab, init_std=0.3, rank=rank)
    A, U, b = adversary.down.weight, adversary.proj.weight, adversary.proj.bias
    assert A.shape == (rank, hidden) and U.shape == (vocab, rank)
    assert sum(p.numel() for p in adversary.parameters()) == rank * hidden + vocab * rank + vocab
    h = torch.randn(chunk, hidden)
    with Largest() as largest:
        f = adversary(h)
        f.sum().backward()
    # W = U A formed here, never in forward
    torch.testing.assert_close(f, torch.tanh(h @ (U @ A).T + b))
    assert largest.numel <= chunk * vocab < vocab * hidden   # [chunk, V] at most, never [V, H]
    full = amm.Adversary(hidden, vocab, rank=hidden)         # rank >= H: the full matrix
    assert isinstance(full.down, torch.nn.Identity) and full.proj.weight.shape == (vocab, hidden)


def test_low_rank_adversary_first_adamw_step_moves_f_as_far_as_the_full_one():
    """std(A) = sqrt(H) / r (amm.py header, choice 8): AdamW's first step moves every element by
    about lr, which changes U A h by lr ||A h||_1 and a full W h by lr ||h||_1; equal in expectation
    for a Gaussian h, so one --adv-lr suits both forms (with std(A) = 1/sqrt(H) the low-rank f would
    move r / H = 1/16 as far)."""
    torch.manual_seed(0)
    hidden, vocab, rank = 256, 50, 16
    h, direction = torch.randn(1, hidden), torch.randn(1, vocab)
    moved = {}
    for r in (0, rank):
        adversary = amm.Adversary(hidden, vocab, rank=r)
        opt = torch.optim.AdamW(adversary.parameters(), lr=1e-4)
        (direction * adversary(h)).sum().backward()
        opt.step()
        moved[r] = adversary(h).abs().mean().item()
    assert 0.6 < moved[rank] / moved[0] < 1.6, moved


@pytest.mark.parametrize("rank", [0, 4])
def test_adversary_chunked_moments_and_ascent_equal_autograd_and_an_update_raises_the_estimate(
        rank):
    """At the start f = 0 (estimate 0) and U's gradient (W's at full rank) is nonzero: not the
    saddle of two zero factors. The chunked moments and ascent gradients equal whole-batch autograd
    there and after one update (trainer's path: adversary_backward, clip_and_step), which raises the
    estimate."""
    torch.manual_seed(0)
    n, t, hidden, vocab, chunk = 3, 5, 12, 40, 4
    s_head, t_head = (torch.nn.Linear(hidden, vocab, bias=False),
                      torch.nn.Linear(hidden, vocab, bias=False))
    s_h, t_h = torch.randn(n, t, hidden), torch.randn(n, t, hidden)
    mask = (torch.arange(t) < torch.tensor([[5], [2], [4]])).float()
    adversary = amm.Adversary(hidden, vocab, rank=rank)
    side = dict(mask=mask, norm=mask.sum(-1), count=n, adversary=adversary, s_h=s_h, t_h=t_h,
                adv_in=t_h)
    ascent = -mask / side["norm"][:, None] / n   # minus the mean distance over the batch
    params = list(adversary.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)

    def check():
        """Chunked moments and gradients against one autograd pass over [n, t, V]; returns the
        estimate."""
        with torch.no_grad():
            q, p = torch.softmax(s_head(s_h), -1), torch.softmax(t_head(t_h), -1)
        g = ((p - q) * adversary(t_h)).sum(-1)
        want = torch.autograd.grad((ascent * g).sum(), params)
        keep = mask.bool()   # the chunked values at padding are unused
        heads = (s_head, t_head)
        torch.testing.assert_close(amm.moments(side, s_h, heads, chunk)[keep], g.detach()[keep])
        amm.adversary_backward(side, heads, ascent, chunk, contextlib.nullcontext())
        for param, grad in zip(params, want):
            torch.testing.assert_close(param.grad, grad)
        return amm.mean_distance(side, amm.moments(side, s_h, heads, chunk))

    assert check() == 0.0
    assert adversary.proj.weight.grad.abs().max() > 1e-4           # U (or W) learns from the start
    common.clip_and_step(params, opt, 1.0)
    assert check() > 1e-3                                          # ascent raised d from 0
    assert all(param.grad.abs().max() > 1e-4 for param in params)  # A too, once U has moved


# --------------------------------------------------------------------------------------------------
# the trainer on tiny models

def test_adversary_raises_and_student_lowers_the_distances(tmp_path):
    """Logged every step: the adversary's change of each estimate (same samples) and the student's
    (same adversaries; on-policy through importance weights). Adversary steps must raise both,
    student steps lower. These are the trainer's own before/after estimates on the same samples:
    the one place both directions of the min-max show, step by step. The independent checks are
    the adversary's ascent against autograd (above) and the held-out divergence (below)."""
    run(TINY + ["--out", str(tmp_path / "a")])
    log = metrics(tmp_path / "a")
    assert len(log) == 4
    for m in log:
        for key in ("d_on", "d_off", "l1_on", "l1_off", "loss", "grad_norm"):
            assert torch.isfinite(torch.tensor(m[key])), (key, m)
        assert m["d_on_gain"] > 0 and m["d_off_gain"] > 0, m
        # never above the sup
        assert m["d_on"] <= m["l1_on"] + 1e-6 and m["d_off"] <= m["l1_off"] + 1e-6
    assert sum(m["d_off_student"] for m in log) < 0 and sum(m["d_on_student"] for m in log) < 0, log
    assert sum(m["d_off_student"] < 0 for m in log) >= 3
    assert os.path.exists(tmp_path / "a" / "student" / "model.safetensors")


def test_amm_lowers_the_held_out_divergence(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        amm.main(["--student", "tiny", "--out", str(tmp_path / "l")])
    table = json.loads((tmp_path / "l" / "eval.json").read_text())
    before = table["before"]["heldout_fkl"] + table["before"]["heldout_rkl"]
    after = table["after"]["heldout_fkl"] + table["after"]["heldout_rkl"]
    assert after < before - 0.1, (before, after)


one_process = reference_run("amm.py", TINY)


def test_resume_equals_an_uninterrupted_run(tmp_path, one_process):
    cut = TINY + ["--out", str(tmp_path / "cut"), "--save-every", "1"]
    run_here("amm.py", cut + ["--stop-after", "2"])
    run_here("amm.py", cut + ["--resume"])
    a = student_weights(one_process)
    b = student_weights(tmp_path / "cut")
    for k in a:   # tolerance 0: the adversaries, optimizers and sampling keys are all restored
        assert torch.equal(a[k], b[k]), k
    assert ([m["d_on"] for m in metrics(one_process)]
            == [m["d_on"] for m in metrics(tmp_path / "cut")])


def test_torchrun_two_ranks_match_one_process(tmp_path, one_process):
    """Two gloo ranks take the step one process takes: at the first step (the same weights, the
    same samples) the distances, the loss and the global gradient norm agree up to float
    reordering, where a wrong sum or count over ranks is off by a factor. Later steps are not
    compared across rank counts: every step samples the student, whose weights differ in the last
    bits after one step of two differently batched runs, so a token drawn at a near tie of its
    logits can differ and the runs part ways (issue 22 saw it on an AVX-512 CPU: d_on 1.22243 vs
    1.21908 at step 2). Bit for bit instead: two ranks stopped and resumed equal the uninterrupted
    two-rank run (the --fsdp test below)."""
    run(TINY + ["--out", str(tmp_path / "two")], torchrun=True)
    one, two = metrics(one_process), metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    for key in ("d_on", "d_off", "loss", "grad_norm", "response_len"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-7), key
    # the held-out responses and the initial student's column, shared by the ranks: one process's
    before = [json.loads((out / "eval.json").read_text())["before"]
              for out in (one_process, tmp_path / "two")]
    assert before[1] == pytest.approx(before[0], rel=1e-6)


def test_fsdp_two_ranks_match_one_process_and_resume_exactly(tmp_path, one_process):
    """--fsdp (issue 25): the student's decoder layers sharded over two gloo ranks (the adversaries
    stay whole). The first step is one process's (as above); stopped after step 2 and resumed,
    the run equals the uninterrupted one bit for bit."""
    full, cut, fsdp = tmp_path / "full", tmp_path / "cut", TINY + ["--fsdp", "--save-every", "1"]
    run(fsdp + ["--out", str(full)], torchrun=True)
    one, two = metrics(one_process), metrics(full)
    assert len(one) == len(two) == 4
    for key in ("d_on", "d_off", "loss", "grad_norm", "response_len"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-7), key
    resumed = resumed_on_two_ranks("amm.py", fsdp, full, cut, stop=2)
    assert [m["d_on"] for m in resumed] == [m["d_on"] for m in two]


def test_bad_baseline_settings_are_rejected():
    with pytest.raises(ValueError, match="samples-per-prompt"):
        amm.parse_args(["--student", "tiny", "--samples-per-prompt", "1"])
