"""Bad-input fuzz of the compiled ops: random corruptions of valid arguments must raise an error that names
the corrupted argument (never crash, never return garbage), and valid random inputs must keep working."""
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

import flanmoe_nb.kernels as K

pytestmark = pytest.mark.skipif(not K.extension_available(), reason="flanmoe_nb._C not built")
ops = torch.ops.flanmoe
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ERRORS = (ValueError, RuntimeError, TypeError, IndexError)


def _corrupt(t: torch.Tensor, how: str, g: torch.Generator, hi: int | None = None):
    "Return a corrupted copy of `t` (or None when the corruption does not apply)."
    if how == "noncontig":
        if t.dim() == 0 or t.numel() < 2: return None
        big = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        v = big[..., ::2]; v.copy_(t); return v
    if how == "dtype":
        return t.to(torch.int32) if not t.is_floating_point() else t.to(torch.int64)
    if how == "rank":
        return t.unsqueeze(0)
    if how == "shape":
        return t.narrow(0, 0, t.shape[0] - 1) if t.dim() and t.shape[0] > 0 else torch.cat([t, t[:1]]) if t.dim() else None
    if how in ("neg", "big"):
        if t.is_floating_point() or t.numel() == 0: return None
        c = t.clone().view(-1)
        i = int(torch.randint(0, c.numel(), (1,), generator=g))
        c[i] = -1 - int(torch.randint(0, 5, (1,), generator=g)) if how == "neg" else hi + int(torch.randint(0, 5, (1,), generator=g))
        return c.view(t.shape)
    raise AssertionError(how)


HOWS = ["noncontig", "dtype", "rank", "shape", "neg", "big"]


def _check(fn, name):
    try:
        fn()
    except ERRORS as e:
        assert name in str(e), f"error does not name {name!r}: {e}"
        return True
    return False


@FUZZ
@given(seed=st.integers(0, 2**20), how=st.sampled_from(HOWS), T=st.integers(1, 20), k=st.integers(1, 4),
       E=st.integers(1, 16), d=st.integers(1, 8), target=st.sampled_from(["expert_idx", "token_idx", "x", "weights", "y"]))
def test_corrupted_argument_is_named(seed, how, T, k, E, d, target):
    g = torch.Generator().manual_seed(seed)
    eidx = torch.randint(0, E, (T, k), generator=g)
    plan = K.route_plan(eidx, E)
    S = plan.token_idx.numel()
    x, y, w = torch.randn(T, d, generator=g), torch.randn(S, d, generator=g), torch.rand(S, generator=g)
    if target == "expert_idx":
        bad = _corrupt(eidx, how, g, hi=E)
        if bad is None: return
        raised = _check(lambda: K.route_plan(bad, E), "expert_idx")
        assert raised or how == "shape"     # dropping a token is still a valid routing
        return
    args = dict(x=x, token_idx=plan.token_idx, weights=w, y=y)
    if target in ("x",):
        bad = _corrupt(x, how, g)
        if bad is None: return
        raised = _check(lambda: K.permute(bad, plan.token_idx, w), "x")
        if how == "shape":   # fewer rows of x: an index may now be out of range, which names token_idx
            return
        assert raised
        return
    if target == "token_idx":
        bad = _corrupt(plan.token_idx, how, g, hi=T)
        if bad is None: return
        r1 = _check(lambda: K.permute(x, bad, None), "token_idx")
        r2 = _check(lambda: K.unpermute(torch.randn(bad.shape[0] if bad.dim() else 1, d), bad, None, T), "token_idx")
        assert r1 and (r2 or how == "shape") or how == "shape"
        return
    if target == "weights":
        bad = _corrupt(w, how, g)
        if bad is None or how in ("neg", "big"): return
        if how == "dtype":   # the wrappers cast weights to the data dtype; the raw op must refuse
            assert _check(lambda: ops.permute(x, plan.token_idx, bad), "weights"); return
        assert _check(lambda: K.permute(x, plan.token_idx, bad), "weights")
        assert _check(lambda: K.unpermute(y, plan.token_idx, bad, T), "weights")
        return
    if target == "y":
        bad = _corrupt(y, how, g)
        if bad is None: return
        assert _check(lambda: K.unpermute(bad, plan.token_idx, w, T), "y")


@FUZZ
@given(seed=st.integers(0, 2**20), G=st.integers(1, 10), N=st.integers(0, 30), how=st.sampled_from(["sum", "neg", "len", "dtype", "rank"]))
def test_grouped_mm_bad_group_sizes(seed, G, N, how):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, N + 1, (G - 1,), generator=g)).values
    gs = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([N])]))
    a, b = torch.randn(N, 3, generator=g), torch.randn(G, 3, 2, generator=g)
    assert K.grouped_mm(a, b, gs).shape == (N, 2)
    bad = {"sum": gs + torch.nn.functional.one_hot(torch.tensor(0), G),
           "neg": torch.cat([torch.tensor([-1]), gs[1:] + 0]) if G > 1 else torch.tensor([-1]),
           "len": torch.cat([gs, torch.tensor([0])]), "dtype": gs.int(), "rank": gs[None]}[how]
    assert _check(lambda: K.grouped_mm(a, b, bad), "group_sizes")
    if how != "len":    # wgrad takes G from group_sizes, so an extra empty group is valid there
        assert _check(lambda: ops.grouped_mm_wgrad(a, torch.randn(N, 2), bad), "group_sizes")


@FUZZ
@given(seed=st.integers(0, 2**20), cap=st.integers(-5, -1), E=st.integers(-3, 0))
def test_route_plan_bad_scalars(seed, cap, E):
    eidx = torch.zeros(3, 2, dtype=torch.long)
    assert _check(lambda: K.route_plan(eidx, 2, capacity=cap), "capacity")
    assert _check(lambda: K.route_plan(eidx, E), "num_experts")
    assert _check(lambda: ops.unpermute(torch.randn(2, 2), torch.tensor([0, 1]), None, cap), "num_tokens")


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 2000), k=st.integers(1, 4), E=st.sampled_from([1, 2, 7, 64, 128]),
       cap=st.one_of(st.none(), st.integers(0, 64)), seed=st.integers(0, 2**20))
def test_route_plan_large_random(T, k, E, cap, seed):
    g = torch.Generator().manual_seed(seed)
    eidx = torch.randint(0, E, (T, k), generator=g)
    prio = torch.rand(T, k, generator=g)
    for a, b in zip(K.route_plan(eidx, E, cap, prio), K.route_plan_reference(eidx, E, cap, prio)):
        assert torch.equal(a, b)


# Sizes whose int64 sum wraps: [2**62] * 4 "sums" to 0 and [int64 max, int64 max, 3] to 1, which passed the old
# `total <= rows` check and then offset pointers by 2**62 rows (a segfault in grouped_mm and grouped_mm_wgrad).
WRAPPING_GROUP_SIZES = [[2**62] * 4, [2**62, 2**62], [2**63 - 1, 2**63 - 1, 3], [2**63 - 1, 1], [1, 2**63 - 1, 2**63 - 1]]


@pytest.mark.parametrize("gs", WRAPPING_GROUP_SIZES, ids=str)
def test_group_sizes_that_overflow_int64_are_refused(gs):
    a, G = torch.randn(6, 4), len(gs)
    first_bad = 0 if gs[0] > 6 else 1
    pat = rf"group_sizes\[{first_bad}\] = {gs[first_bad]} exceeds the \d+ rows of a"
    with pytest.raises(ValueError, match=pat):
        K.grouped_mm(a, torch.randn(G, 4, 3), torch.tensor(gs))
    with pytest.raises(ValueError, match=pat):
        K.grouped_mm(a, torch.randn(G, 3, 4), torch.tensor(gs), trans_b=True)
    with pytest.raises(ValueError, match=pat):
        ops.grouped_mm_wgrad(a, torch.randn(6, 3), torch.tensor(gs))
    with pytest.raises(ValueError, match=pat.replace("of a", "of h")):
        ops.relu_grouped_mm(a, torch.randn(G, 4, 3), torch.tensor(gs))
    with pytest.raises(ValueError, match=pat.replace("of a", "of dy")):
        ops.relu_grouped_mm_backward(torch.randn(6, 3), a, torch.randn(G, 4, 3), torch.tensor(gs), True, True)


def test_huge_output_shapes_are_refused_by_name():
    "Zero-element operands with huge dims: the output size is checked before anything is allocated."
    # 4 * (2**62 + 2**20) bytes wraps to 4 MiB: the host cache once handed out a 4 MiB block for it
    with pytest.raises(ValueError, match=r"output \[rows of a, b.shape\[2\]\]"):
        ops.grouped_mm(torch.empty(2**62 + 2**20, 0), torch.empty(1, 0, 1), torch.tensor([0]), False)
    with pytest.raises(ValueError, match=r"num_tokens"):
        ops.unpermute(torch.randn(2, 2), torch.tensor([0, 1]), None, 2**63 - 1)
    with pytest.raises(ValueError, match=r"num_experts=9223372036854775807 is too large"):
        ops.route_plan(torch.zeros(3, 2, dtype=torch.long), 2**63 - 1)
    with pytest.raises(ValueError, match=r"probs \[B, H, Lq, Lk\]"):
        ops.attention(*(torch.empty(2**31, 1, 2**31, 0),) * 3)
