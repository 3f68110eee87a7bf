"""White-box distillation losses (losses.py: skl, srkl, jsd, forward_kl, reverse_kl, align_vocab;
fast_losses.kd_loss_chunked) against their definitions computed another way: float64 probabilities
(not log space), and Python loops."""

import math

import pytest
import torch

import fast_losses
import losses

B, T, V = 3, 5, 11


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread hand-offs cost more than the math on a shared CPU. Restored
    afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_logits(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# --------------------------------------------------------------------------------------------------
# brute force, float64, in probability space, straight from the definitions

def kl64(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def per_seq(w, like):
    """A float, or [B] -> [B, 1, 1], float64."""
    return torch.as_tensor(w, dtype=torch.float64).reshape(-1, *(1,) * (like.dim() - 1))


def skl_ref(s, t, alpha, detach_q=False):
    q, p = s.double().softmax(-1), t.double().softmax(-1)
    a = per_seq(alpha, q)
    m1 = a * p + (1 - a) * (q.detach() if detach_q else q)
    return kl64(p, m1)


def srkl_ref(s, t, alpha, detach_q=False):
    q, p = s.double().softmax(-1), t.double().softmax(-1)
    a = per_seq(alpha, q)
    m2 = (1 - a) * p + a * (q.detach() if detach_q else q)
    return kl64(q, m2)


def jsd_ref(s, t, beta):
    q, p = s.double().softmax(-1), t.double().softmax(-1)
    b = per_seq(beta, q)
    m = b * p + (1 - b) * q
    return b[..., 0] * kl64(p, m) + (1 - b[..., 0]) * kl64(q, m)


def fkl_ref(s, t, _=None):
    return kl64(t.double().softmax(-1), s.double().softmax(-1))


def rkl_ref(s, t, _=None):
    return kl64(s.double().softmax(-1), t.double().softmax(-1))


# 0.1: DistiLLM's default; [B]: the per-sample curriculum
ALPHAS = [0.1, torch.tensor([0.01, 0.1, 0.7])]
CASES = [   # (name, ours, brute force, weight)
    ("skl", losses.skl, skl_ref, ALPHAS[0]), ("skl_per_seq", losses.skl, skl_ref, ALPHAS[1]),
    ("srkl", losses.srkl, srkl_ref, ALPHAS[0]), ("srkl_per_seq", losses.srkl, srkl_ref, ALPHAS[1]),
    ("jsd", losses.jsd, jsd_ref, 0.5),
    ("jsd_per_seq", losses.jsd, jsd_ref, torch.tensor([0.1, 0.5, 0.9])),
    ("forward_kl", losses.forward_kl, fkl_ref, None),
    ("reverse_kl", losses.reverse_kl, rkl_ref, None),
]


def call(fn, s, t, w):
    return fn(s, t) if w is None else fn(s, t, w)


# --------------------------------------------------------------------------------------------------
# values

@pytest.mark.parametrize("name,fn,ref,w", CASES, ids=[c[0] for c in CASES])
def test_values_match_float64_brute_force(name, fn, ref, w):
    s, t = make_logits(B, T, V, seed=1), make_logits(B, T, V, seed=2)
    got = call(fn, s, t, w)
    assert got.shape == (B, T) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref(s, t, w), rtol=1e-5, atol=1e-6)
    assert (got > 0).all()


def test_values_match_python_loop_over_the_vocabulary():
    """One position of each loss from the textbook sums, in plain Python floats."""
    s, t = make_logits(1, 1, V, seed=3), make_logits(1, 1, V, seed=4)
    zs, zt = s[0, 0].tolist(), t[0, 0].tolist()
    q = [math.exp(z) / sum(math.exp(y) for y in zs) for z in zs]
    p = [math.exp(z) / sum(math.exp(y) for y in zt) for z in zt]
    a, b = 0.1, 0.3
    want = {
        "skl": sum(pv * math.log(pv / (a * pv + (1 - a) * qv)) for pv, qv in zip(p, q)),
        "srkl": sum(qv * math.log(qv / ((1 - a) * pv + a * qv)) for pv, qv in zip(p, q)),
        "jsd": sum(b * pv * math.log(pv / (b * pv + (1 - b) * qv))
                   + (1 - b) * qv * math.log(qv / (b * pv + (1 - b) * qv)) for pv, qv in zip(p, q)),
        "forward_kl": sum(pv * math.log(pv / qv) for pv, qv in zip(p, q)),
        "reverse_kl": sum(qv * math.log(qv / pv) for pv, qv in zip(p, q)),
    }
    got = {"skl": losses.skl(s, t, a), "srkl": losses.srkl(s, t, a), "jsd": losses.jsd(s, t, b),
           "forward_kl": losses.forward_kl(s, t), "reverse_kl": losses.reverse_kl(s, t)}
    for k in want:
        assert got[k].item() == pytest.approx(want[k], rel=1e-5), k


def test_per_sequence_weight_equals_each_row_with_its_float():
    s, t = make_logits(B, T, V, seed=5), make_logits(B, T, V, seed=6)
    alpha = torch.tensor([0.05, 0.3, 0.9])
    for fn in (losses.skl, losses.srkl, losses.jsd):
        rows = fn(s, t, alpha)
        for i in range(B):
            torch.testing.assert_close(rows[i], fn(s[i:i + 1], t[i:i + 1], alpha[i].item())[0])


def test_all_nonnegative_and_zero_when_p_equals_q():
    s, t = make_logits(B, T, V, seed=7, scale=5.0), make_logits(B, T, V, seed=8, scale=5.0)
    for _, fn, _, w in CASES:
        assert (call(fn, s, t, w) >= 0).all()
        torch.testing.assert_close(call(fn, s, s.clone(), w), torch.zeros(B, T), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# gradients: the detach conventions of the DistiLLM-2 reference

def grad_wrt_student(fn, s, t, w, weights):
    s = s.clone().requires_grad_(True)
    (call(fn, s, t, w) * weights).sum().backward()
    return s.grad


@pytest.mark.parametrize("alpha", ALPHAS, ids=["float", "per_seq"])
def test_srkl_gradient_distillm2_holds_q_in_the_mixture_fixed_distillm_does_not(alpha):
    s, t = make_logits(B, T, V, seed=9), make_logits(B, T, V, seed=10)
    # per-token weights, so each token's gradient is checked
    weights = make_logits(B, T, seed=11).abs()
    distillm2 = grad_wrt_student(lambda s_, t_, a_: losses.srkl(s_, t_, a_, stop_grad=True),
                                 s, t, alpha, weights)
    distillm = grad_wrt_student(losses.srkl, s, t, alpha, weights)
    detached = grad_wrt_student(lambda s_, t_, a_: srkl_ref(s_, t_, a_, detach_q=True),
                                s.double(), t, alpha, weights)
    attached = grad_wrt_student(lambda s_, t_, a_: srkl_ref(s_, t_, a_, detach_q=False),
                                s.double(), t, alpha, weights)
    torch.testing.assert_close(distillm2.double(), detached, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(distillm.double(), attached, rtol=1e-4, atol=1e-6)
    # the detach changes the gradient: the test can tell
    assert (detached - attached).abs().max() > 1e-3


@pytest.mark.parametrize("alpha", ALPHAS, ids=["float", "per_seq"])
def test_skl_gradient_flows_through_q_in_the_mixture(alpha):
    s, t = make_logits(B, T, V, seed=12), make_logits(B, T, V, seed=13)
    weights = make_logits(B, T, seed=14).abs()
    got = grad_wrt_student(losses.skl, s, t, alpha, weights)
    attached = grad_wrt_student(lambda s_, t_, a_: skl_ref(s_, t_, a_, detach_q=False),
                                s.double(), t, alpha, weights)
    torch.testing.assert_close(got.double(), attached, rtol=1e-4, atol=1e-6)
    # SKL sees q only through the mixture: with q detached there its gradient would be exactly 0
    assert got.abs().max() > 1e-3


@pytest.mark.parametrize("name,fn,ref,w",
                         [c for c in CASES if c[0].startswith(("jsd", "forward", "reverse"))],
                         ids=["jsd", "jsd_per_seq", "forward_kl", "reverse_kl"])
def test_other_gradients_match_brute_force(name, fn, ref, w):
    s, t = make_logits(B, T, V, seed=15), make_logits(B, T, V, seed=16)
    weights = make_logits(B, T, seed=17).abs()
    got = grad_wrt_student(fn, s, t, w, weights)
    want = grad_wrt_student(lambda s_, t_, w_=None: ref(s_, t_, w_), s.double(), t, w, weights)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient():
    s, t = (make_logits(B, T, V, seed=18).requires_grad_(True),
            make_logits(B, T, V, seed=19).requires_grad_(True))
    for _, fn, _, w in CASES:
        call(fn, s, t, w).sum().backward()
    assert t.grad is None and s.grad is not None


# --------------------------------------------------------------------------------------------------
# jsd endpoints

def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    s, t = make_logits(B, T, V, seed=20), make_logits(B, T, V, seed=21)
    assert torch.equal(losses.jsd(s, t, 0.0), losses.forward_kl(s, t))
    assert torch.equal(losses.jsd(s, t, 1.0), losses.reverse_kl(s, t))
    s = s.requires_grad_(True)
    # per sequence, the endpoints mixed with the interior
    got = losses.jsd(s, t, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(got[0], losses.forward_kl(s, t)[0])
    torch.testing.assert_close(got[1].double(), jsd_ref(s[1:2], t[1:2], 0.5)[0],
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], losses.reverse_kl(s, t)[2])
    got.sum().backward()
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------------------------------
# vocabulary alignment

def test_larger_teacher_vocab_is_cut_to_the_student_one():
    s, t = make_logits(2, 3, 1000, seed=22), make_logits(2, 3, 1024, seed=23)
    # the padding ids carry mass in p before the cut: the cut must really drop them
    t[..., 1000:] += 5.0
    for _, fn, _, w in CASES:
        w = w[:2] if torch.is_tensor(w) else w
        assert torch.equal(call(fn, s, t, w), call(fn, s, t[..., :1000], w))


def test_larger_student_vocab_pads_the_teacher_with_zero_probability():
    s, t = make_logits(2, 3, 1024, seed=24), make_logits(2, 3, 1000, seed=25)
    s_al, t_al = losses.align_vocab(s, t)
    assert t_al.shape == s.shape and torch.isinf(t_al[..., 1000:]).all() and torch.equal(s_al, s)
    p = torch.cat([t.double().softmax(-1), torch.zeros(2, 3, 24, dtype=torch.float64)], -1)
    q = s.double().softmax(-1)
    # 0 log 0 = 0 on the extra ids
    want = (p[..., :1000] * (p[..., :1000].log() - q[..., :1000].log())).sum(-1)
    s = s.requires_grad_(True)
    torch.testing.assert_close(losses.forward_kl(s, t).double(), want, rtol=1e-5, atol=1e-6)
    for fn, w in ((losses.skl, 0.1), (losses.srkl, 0.1), (losses.jsd, 0.5), (losses.jsd, 0.0)):
        value = fn(s, t, w)
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(s.grad).all()
    # q > 0 where p = 0: the true value, as documented
    assert torch.isinf(losses.reverse_kl(s, t)).all()


# --------------------------------------------------------------------------------------------------
# numerics: padding positions, extreme logits, bf16

def test_padding_and_extreme_positions_give_finite_values_and_gradients():
    """Positions the caller will mask still enter the backward (a NaN there poisons every
    gradient)."""
    s = make_logits(4, 2, V, seed=26)
    t = make_logits(4, 2, V, seed=27)
    t[0] = 0.0                                # uniform teacher (zero-filled padding)
    s[1], t[1] = 0.0, 0.0                     # both zero
    s[2, :, 0], t[2, :, 1] = 1e4, 1e4         # one-hot student and teacher on different ids:
                                              # p, q underflow to 0
    t[3, :, 3:] = float("-inf")               # a teacher with masked-out ids
    s = s.requires_grad_(True)
    for name, fn, _, w in CASES:
        if name == "reverse_kl":
            continue                          # +inf where q > 0 = p, by definition (row 3)
        w = torch.tensor([0.1, 0.2, 0.3, 0.4]) if torch.is_tensor(w) else w
        value = call(fn, s, t, w)
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(s.grad).all(), name
        s.grad = None


def test_bf16_inputs_upcast_to_fp32():
    s, t = make_logits(B, T, V, seed=28), make_logits(B, T, V, seed=29)
    s16, t16 = s.bfloat16(), t.bfloat16()
    for _, fn, _, w in CASES:
        got = call(fn, s16, t16, w)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        # the math itself is fp32
        assert torch.equal(got, call(fn, s16.float(), t16.float(), w))
        # only the logits were rounded
        torch.testing.assert_close(got, call(fn, s, t, w), rtol=0.05, atol=0.01)
    s16.requires_grad_(True)
    losses.srkl(s16, t16, 0.1).sum().backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad).all()


# --------------------------------------------------------------------------------------------------
# chunked path

# 37 positions in chunks of 8: a ragged last chunk
H_S, H_T, V_S, V_T, T_LONG, CHUNK = 16, 24, 50, 56, 37, 8


def heads_and_hidden(seed=30):
    g = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(H_S, V_S, bias=True)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(V_S, H_S, generator=g))
        student_head.bias.copy_(torch.randn(V_S, generator=g))
    teacher_weight = torch.randn(V_T, H_T, generator=g)  # a bare weight tensor, larger vocab
    student_hidden = torch.randn(B, T_LONG, H_S, generator=g)
    teacher_hidden = torch.randn(B, T_LONG, H_T, generator=g)
    weights = torch.rand(B, T_LONG, generator=g)
    return student_head, teacher_weight, student_hidden, teacher_hidden, weights


def naive_value_and_grads(fn, kw, student_head, student_hidden, teacher_hidden, teacher_weight,
                          weights):
    student_head.zero_grad()
    h = student_hidden.clone().requires_grad_(True)
    value = fn(student_head(h), teacher_hidden @ teacher_weight.T, **kw)  # [B, T, V] logits
    (value * weights).sum().backward()
    return value.detach(), h.grad, student_head.weight.grad.clone(), student_head.bias.grad.clone()


@pytest.mark.parametrize("name,fn,ref,w", CASES, ids=[c[0] for c in CASES])
def test_chunked_equals_naive_values_and_gradients(name, fn, ref, w):
    student_head, teacher_weight, student_hidden, teacher_hidden, weights = heads_and_hidden()
    weights[1, -5:] = 0                                             # padding: weight 0
    kw = {} if w is None else ({"beta": w} if fn is losses.jsd else {"alpha": w})
    want = naive_value_and_grads(fn, kw, student_head, student_hidden, teacher_hidden,
                                 teacher_weight, weights)

    student_head.zero_grad()
    h = student_hidden.clone().requires_grad_(True)
    loss, values = fast_losses.kd_loss_chunked(fn, h, student_head, teacher_hidden, teacher_weight,
                                               weights=weights, chunk_size=CHUNK, **kw)
    loss.backward()
    assert values.shape == (B, T_LONG) and not values.requires_grad
    torch.testing.assert_close(loss, (want[0] * weights).sum(), rtol=1e-5, atol=1e-5)
    got = (values, h.grad, student_head.weight.grad, student_head.bias.grad)
    for g_, w_, what in zip(got, want, ("values", "grad hidden", "grad weight", "grad bias")):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5, msg=what)


def test_chunked_gradient_scales_and_accumulates_like_autograd():
    """The gradient is computed in forward, so check what backward must still do: multiply by the
    upstream gradient (here 3 * loss1 - 0.5 * loss2), accumulate over calls (micro-batches), skip a
    frozen head, and keep a bf16 head's gradient in bf16."""
    student_head, teacher_weight, student_hidden, teacher_hidden, weights = heads_and_hidden()
    h1, h2 = (student_hidden[:, :20].clone().requires_grad_(True),
              student_hidden[:, 20:].clone().requires_grad_(True))
    run = lambda h, t, w: fast_losses.kd_loss_chunked(losses.srkl, h, student_head, t,
                                                      teacher_weight, weights=w, chunk_size=CHUNK,
                                                      alpha=torch.tensor([0.1, 0.3, 0.05]))[0]
    (3 * run(h1, teacher_hidden[:, :20], weights[:, :20])
     - 0.5 * run(h2, teacher_hidden[:, 20:], weights[:, 20:])).backward()
    got = (h1.grad, h2.grad, student_head.weight.grad.clone())
    student_head.zero_grad()
    g1, g2 = (student_hidden[:, :20].clone().requires_grad_(True),
              student_hidden[:, 20:].clone().requires_grad_(True))
    t_logits = teacher_hidden @ teacher_weight.T
    alpha = torch.tensor([0.1, 0.3, 0.05])
    naive = lambda h, t, w: (losses.srkl(student_head(h), t, alpha) * w).sum()
    (3 * naive(g1, t_logits[:, :20], weights[:, :20])
     - 0.5 * naive(g2, t_logits[:, 20:], weights[:, 20:])).backward()
    for g_, w_ in zip(got, (g1.grad, g2.grad, student_head.weight.grad)):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)

    frozen = torch.nn.Linear(H_S, V_S, bias=False).requires_grad_(False)
    h = student_hidden.clone().requires_grad_(True)
    fast_losses.kd_loss_chunked(losses.skl, h, frozen, teacher_hidden, teacher_weight,
                                alpha=0.1)[0].backward()
    assert frozen.weight.grad is None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0

    bf16 = torch.nn.Linear(H_S, V_S, bias=False).to(torch.bfloat16)
    hb = student_hidden.to(torch.bfloat16).requires_grad_(True)
    fast_losses.kd_loss_chunked(losses.forward_kl, hb, bf16, teacher_hidden,
                                teacher_weight)[0].backward()
    assert bf16.weight.grad.dtype == torch.bfloat16 and hb.grad.dtype == torch.bfloat16


def test_chunked_never_makes_a_whole_batch_of_logits():
    """The memory claim of kd_loss_chunked, counted exactly: the largest tensor any op produces
    (forward and backward). The naive path makes [B, T, V] tensors; the chunked path nothing bigger
    than [chunk, V] or the weight gradient [V, H]."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t):
                    self.largest = max(self.largest, t.numel())
            return out

    student_head, teacher_weight, student_hidden, teacher_hidden, weights = heads_and_hidden()
    h = student_hidden.clone().requires_grad_(True)
    with LargestOutput() as naive:
        (losses.skl(student_head(h), teacher_hidden @ teacher_weight.T, 0.1)
         * weights).sum().backward()
    with LargestOutput() as chunked:
        fast_losses.kd_loss_chunked(losses.skl, h, student_head, teacher_hidden, teacher_weight,
                                    weights=weights, chunk_size=CHUNK, alpha=0.1)[0].backward()
    assert naive.largest >= B * T_LONG * V_S

    class Shapes(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen |= {tuple(t.shape)
                          for t in (out if isinstance(out, (tuple, list)) else (out,))
                          if torch.is_tensor(t)}
            return out

    # no gradient work at all under no_grad (held-out metrics)
    with torch.no_grad(), Shapes() as evaluation:
        fast_losses.kd_loss_chunked(losses.skl, h, student_head, teacher_hidden, teacher_weight,
                                    weights=weights, chunk_size=CHUNK, alpha=0.1)
    assert (V_S, H_S) not in evaluation.seen and (B, T_LONG, H_S) not in evaluation.seen
    # chunk logits, dW, hidden
    assert chunked.largest <= max(CHUNK * V_T, V_S * H_S, B * T_LONG * H_T)
