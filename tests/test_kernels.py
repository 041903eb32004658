"""Compiled MoE core vs its pure-PyTorch reference twins: routing plan, permute/unpermute, grouped GEMM,
expert FFN; gradcheck, opcheck, torch.compile, and error messages that name the argument."""
import contextlib
from pathlib import Path
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

import flanmoe_nb.kernels as K
import flanmoe_nb.extension as X
import flanmoe_nb.gemm as G
import flanmoe_nb.moe_ops as MO

pytestmark = pytest.mark.skipif(not K.extension_available(), reason="flanmoe_nb._C not built")
ops = torch.ops.flanmoe
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else (
        dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=5e-2, rtol=5e-2))


def _routing(draw_seed, T, k, E, skew):
    g = torch.Generator().manual_seed(draw_seed)
    if skew == "one":        # every token to expert 0 (and other slots to expert 1..)
        return torch.arange(k).clamp(max=E - 1).repeat(T, 1)
    if skew == "few":        # only the first two experts are used: the rest stay empty
        return torch.randint(0, min(2, E), (T, k), generator=g)
    return torch.randint(0, E, (T, k), generator=g)


# ---------------------------------------------------------------- route_plan
@HYP
@given(T=st.integers(0, 300), k=st.integers(1, 4), E=st.integers(1, 128), seed=st.integers(0, 2**16),
       cap=st.one_of(st.none(), st.integers(0, 3), st.integers(0, 400)),
       skew=st.sampled_from(["uniform", "one", "few"]), use_prio=st.booleans(), use_valid=st.booleans())
def test_route_plan_equals_reference(T, k, E, seed, cap, skew, use_prio, use_valid):
    eidx = _routing(seed, T, k, E, skew)
    g = torch.Generator().manual_seed(seed + 1)
    prio = torch.rand(T, k, generator=g).round(decimals=1) if use_prio else None   # ties on purpose
    valid = torch.rand(T, generator=g) > 0.2 if use_valid else None
    got, ref = K.route_plan(eidx, E, cap, prio, valid), K.route_plan_reference(eidx, E, cap, prio, valid)
    for name, a, b in zip(K.RoutePlan._fields, got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert int(got.group_sizes.sum()) == got.token_idx.numel() == int(got.keep.sum())
    if cap is not None: assert all(n <= cap for n in got.group_sizes.tolist())
    full, full_ref = K.route_plan(eidx, E, cap, prio, valid, trim=False), K.route_plan_reference(eidx, E, cap, prio, valid, trim=False)
    for name, a, b in zip(K.RoutePlan._fields, full, full_ref):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    S = got.token_idx.numel()
    assert full.assign_idx.numel() == T * k and torch.equal(full.assign_idx[:S], got.assign_idx)
    assert sorted(full.assign_idx.tolist()) == list(range(T * k))          # every assignment exactly once


def test_route_plan_raw_op_rows():
    "The op itself returns all T*k rows: kept ones first, then dropped, then invalid."
    eidx = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0]])
    gs, req, tok, asg, keep, slot = ops.route_plan(eidx, 3, 2, None, torch.tensor([True, True, True, False]))
    assert gs.tolist() == [2, 2, 1] and req.tolist() == [3, 2, 1]
    assert asg.tolist() == [0, 4, 2, 1, 5, 3, 6, 7]      # kept (5), dropped (1: asg 3), invalid token 3
    assert slot[3].tolist() == [-1, -1] and not keep[3].any()


def test_route_plan_priority_nan_ranks_last():
    eidx = torch.zeros(3, 1, dtype=torch.long)
    prio = torch.tensor([[float("nan")], [0.1], [0.9]])
    p = K.route_plan(eidx, 1, 2, prio)
    assert p.token_idx.tolist() == [2, 1] and p.keep[:, 0].tolist() == [False, True, True]
    assert torch.equal(p.slot, K.route_plan_reference(eidx, 1, 2, prio).slot)


# ---------------------------------------------------------------- permute / unpermute / gather_dot
@HYP
@given(T=st.integers(0, 64), S=st.integers(0, 200), d=st.integers(1, 33), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), weighted=st.booleans())
def test_permute_unpermute_equal_reference(T, S, d, seed, dtype, weighted):
    g = torch.Generator().manual_seed(seed)
    if T == 0: S = 0
    idx = torch.randint(0, max(T, 1), (S,), generator=g)
    x = torch.randn(T, d, generator=g).to(dtype)
    y = torch.randn(S, d, generator=g).to(dtype)
    w = torch.rand(S, generator=g).to(dtype) if weighted else None
    torch.testing.assert_close(K.permute(x, idx, w), K.permute_reference(x, idx, w), **_tol(dtype))
    torch.testing.assert_close(K.unpermute(y, idx, w, T), K.unpermute_reference(y, idx, w, T), **_tol(dtype))
    ref = (x[idx].double() * y.double()).sum(1).to(dtype)
    torch.testing.assert_close(ops.gather_dot(x, idx, y), ref, **_tol(dtype))


def _dot16(a, c):
    "dot_row's order: 16 fp32 partial sums (lane j takes elements i + j, the tail from lane 0), then pairwise halves."
    a, c = a.float(), c.float()
    n, part, i = a.numel(), torch.zeros(16), 0
    while i + 16 <= n: part = part + a[i:i + 16] * c[i:i + 16]; i += 16
    for j in range(n - i): part[j] = part[j] + a[i + j] * c[i + j]
    w = 8
    while w: part[:w] = part[:w] + part[w:2 * w]; w //= 2
    return part[0]


@HYP
@given(T=st.integers(1, 40), k=st.integers(1, 3), d=st.sampled_from([1, 5, 16, 17, 33, 64, 100]), seed=st.integers(0, 2**16))
def test_bf16_row_ops_are_bitwise_their_fp32_formulas(T, k, d, seed):
    """bf16 permute / unpermute / gather_dot / unpermute_backward (AVX-512 rows where the CPU has them, else c10's scalar
    conversions) give the bits of their fp32 formulas rounded once: a scaled row, a token's rows summed from 0 in row
    order, the 16-lane dot; zeros, NaN and row tails included."""
    g = torch.Generator().manual_seed(seed)
    S = T * k
    idx = torch.randperm(S, generator=g) % T
    y = torch.randn(S, d, generator=g).bfloat16(); x = torch.randn(T, d, generator=g).bfloat16()
    w = torch.rand(S, generator=g).bfloat16(); grad = torch.randn(T, d, generator=g).bfloat16()
    y.view(-1)[::7] = 0.0; y.view(-1)[0] = float("nan")
    same = lambda a, b: torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    ref = torch.zeros(T, d)
    for s in sorted(range(S), key=lambda s: (int(idx[s]), s)): ref[idx[s]] = ref[idx[s]] + w[s].float() * y[s].float()
    assert same(ops.unpermute(y, idx, w, T), ref.bfloat16())
    assert same(ops.permute(x, idx, w), (x[idx].float() * w.float()[:, None]).bfloat16())
    assert same(ops.gather_dot(x, idx, y), torch.stack([_dot16(x[idx[s]], y[s]) for s in range(S)]).bfloat16())
    dy, dw = ops.unpermute_backward(grad, idx, w, y, True, True)
    assert same(dy, (grad[idx].float() * w.float()[:, None]).bfloat16())
    assert same(dw, torch.stack([_dot16(grad[idx[s]], y[s]) for s in range(S)]).bfloat16())


@HYP
@given(T=st.integers(0, 40), S=st.integers(0, 120), d=st.integers(1, 70), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_unpermute_backward_is_permute_and_gather_dot_in_one_pass(T, S, d, seed, dtype):
    "Both gradients of unpermute at once equal the two ops; unpermute's autograd uses it and agrees with the reference."
    g = torch.Generator().manual_seed(seed)
    if T == 0: S = 0
    idx = torch.randint(0, max(T, 1), (S,), generator=g)
    grad = torch.randn(T, d, generator=g).to(dtype)
    y = torch.randn(S, d, generator=g).to(dtype)
    w = torch.rand(S, generator=g).to(dtype)
    dy, dw = ops.unpermute_backward(grad, idx, w, y, True, True)
    torch.testing.assert_close(dy, ops.permute(grad, idx, w), **_tol(dtype))
    torch.testing.assert_close(dw, ops.gather_dot(grad, idx, y), **_tol(dtype))
    dy_only, none = ops.unpermute_backward(grad, idx, None, y, True, False)
    assert torch.equal(dy_only, grad[idx]) and none.numel() == 0
    yl, wl = y.clone().requires_grad_(), w.clone().requires_grad_()
    got = torch.autograd.grad(K.unpermute(yl, idx, wl, T), (yl, wl), grad)
    want = torch.autograd.grad(K.unpermute_reference(yl, idx, wl, T), (yl, wl), grad)
    for a, b in zip(got, want): torch.testing.assert_close(a, b, **_tol(dtype))


def test_unpermute_backward_bad_input_names_the_argument():
    grad, y, idx = torch.randn(4, 3), torch.randn(2, 3), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="y must have shape \\[2, 3\\]"):
        ops.unpermute_backward(grad, idx, None, y[:, :2].contiguous(), True, False)
    with pytest.raises(ValueError, match="token_idx must be in \\[0, rows of grad=4\\)"):
        ops.unpermute_backward(grad, torch.tensor([0, 4]), None, y, True, False)
    with pytest.raises(ValueError, match="need_dweights needs weights"):
        ops.unpermute_backward(grad, idx, None, y, True, True)
    with pytest.raises(ValueError, match="y must have the dtype of grad"):
        ops.unpermute_backward(grad, idx, None, y.double(), True, False)


def test_permute_backward_matches_reference():
    torch.manual_seed(0)
    x, w = torch.randn(10, 6, requires_grad=True), torch.rand(25, requires_grad=True)
    idx = torch.randint(0, 10, (25,))
    gy = torch.randn(25, 6)
    g1 = torch.autograd.grad((K.permute(x, idx, w) * gy).sum(), (x, w))
    g2 = torch.autograd.grad((K.permute_reference(x, idx, w) * gy).sum(), (x, w))
    for a, b in zip(g1, g2): torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- grouped_mm
@HYP
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12), Kd=st.integers(1, 17), M=st.integers(1, 19),
       trans_b=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_grouped_mm_equals_reference(sizes, Kd, M, trans_b, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gs = torch.tensor(sizes, dtype=torch.long)
    N, G = sum(sizes), len(sizes)
    a = torch.randn(N, Kd, generator=g).to(dtype).requires_grad_()
    b = torch.randn(G, *((M, Kd) if trans_b else (Kd, M)), generator=g).to(dtype).requires_grad_()
    out, ref = K.grouped_mm(a, b, gs, trans_b), K.grouped_mm_reference(a, b, gs, trans_b)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    dy = torch.randn(N, M, generator=g).to(dtype)
    g1 = torch.autograd.grad((out * dy).sum(), (a, b))
    g2 = torch.autograd.grad((ref * dy).sum(), (a, b))
    for x1, x2 in zip(g1, g2): torch.testing.assert_close(x1, x2, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_padding_rows_are_zero_and_ignored(dtype):
    "Rows past sum(group_sizes) are padding: zero output, no weight gradient, zero input gradient."
    g = torch.Generator().manual_seed(3)
    gs = torch.tensor([3, 0, 2])
    a = torch.randn(9, 6, generator=g).to(dtype).requires_grad_()
    b = torch.randn(3, 6, 5, generator=g).to(dtype).requires_grad_()
    out, ref = K.grouped_mm(a, b, gs), K.grouped_mm_reference(a, b, gs)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    assert out[5:].abs().max() == 0
    dy = torch.randn(9, 5, generator=g).to(dtype)
    da, db = torch.autograd.grad((out * dy).sum(), (a, b))
    da_ref, db_ref = torch.autograd.grad((ref * dy).sum(), (a, b))
    torch.testing.assert_close(da, da_ref, **_tol(dtype)); torch.testing.assert_close(db, db_ref, **_tol(dtype))
    assert da[5:].abs().max() == 0
    torch.testing.assert_close(db, K.grouped_mm_wgrad_reference(a[:5].detach(), dy[:5], gs), **_tol(dtype))


def test_expert_ffn_padded_rows_equal_trimmed():
    "The MoE FFN over all T*k rows (dropped ones as padding) equals it over the kept rows only, with gradients."
    torch.manual_seed(0)
    T, d, f, E, k = 40, 8, 12, 4, 2
    x = torch.randn(T, d, requires_grad=True)
    w_in, w_out = torch.randn(E, d, 2 * f, requires_grad=True), torch.randn(E, f, d, requires_grad=True)   # gated
    gates, eidx = torch.softmax(torch.randn(T, E), -1).topk(k, -1)
    gates.requires_grad_()
    valid = torch.rand(T) > 0.2
    outs = []
    for trim in (True, False):
        p = K.route_plan(eidx, E, 7, None, valid, trim=trim)
        y = K.expert_ffn(x, p.token_idx, p.group_sizes, gates.reshape(-1)[p.assign_idx], w_in, w_out, "gated-gelu")
        outs.append((y, torch.autograd.grad(y.square().sum(), (x, w_in, w_out, gates))))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for g1, g2 in zip(outs[0][1], outs[1][1]): torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-5)


def test_grouped_mm_big_groups_split_over_threads():
    "One huge group plus small ones exercises the row/column splitting of the scheduler."
    torch.manual_seed(0)
    gs = torch.tensor([900, 0, 7, 93])
    a, b, dy = torch.randn(1000, 64), torch.randn(4, 64, 96), torch.randn(1000, 96)
    torch.testing.assert_close(K.grouped_mm(a, b, gs), K.grouped_mm_reference(a, b, gs), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ops.grouped_mm_wgrad(a, dy, gs), K.grouped_mm_wgrad_reference(a, dy, gs),
                               atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------- CPU expert GEMMs (AVX-512 / AVX2) vs BLAS
_SUPPORTED = K.cpu_gemm_info()["supported"] if K.extension_available() else []
GEMM_MODES = [pytest.param(m, marks=pytest.mark.skipif(m != "blas" and m not in _SUPPORTED, reason=f"CPU has no {m}"))
              for m in ("avx512", "avx2", "blas")]


@pytest.mark.parametrize("mode", GEMM_MODES)
@HYP
@given(sizes=st.lists(st.sampled_from([0, 1, 2, 5, 6, 7, 11, 12, 13, 16, 31, 32, 33, 64, 65, 96, 97, 257, 1100]),
                      min_size=1, max_size=5),
       Kd=st.integers(1, 70), M=st.integers(1, 70), trans_b=st.booleans(), pad=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_grouped_mm_cpu_gemms_equal_reference(mode, sizes, Kd, M, trans_b, pad, seed):
    """fp32 row blocks on both sides of the kernels' blocks (NT's 4W-row chunks, TN's 64-row depth chunks),
    row panels of every height (1..12), odd K and M (masked columns, partial tiles), empty groups and
    padding rows: each path equals the float64 reference in the product, the input gradient and the weight
    gradient."""
    g = torch.Generator().manual_seed(seed)
    gs = torch.tensor(sizes, dtype=torch.long)
    N, G = sum(sizes) + pad, len(sizes)
    a = torch.randn(N, Kd, generator=g).requires_grad_()
    b = torch.randn(G, *((M, Kd) if trans_b else (Kd, M)), generator=g).requires_grad_()
    dy = torch.randn(N, M, generator=g)
    with K.use_cpu_gemm(mode):
        assert K.cpu_gemm_info()["active"] == mode
        out = K.grouped_mm(a, b, gs, trans_b)
        da, db = torch.autograd.grad((out * dy).sum(), (a, b))
    ref = K.grouped_mm_reference(a.double(), b.double(), gs, trans_b)
    da_ref, db_ref = torch.autograd.grad((ref * dy.double()).sum(), (a, b))
    tol = dict(atol=5e-4, rtol=1e-4)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(da, da_ref, **tol); torch.testing.assert_close(db, db_ref, **tol)


@pytest.mark.parametrize("mode", GEMM_MODES)
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_mm_cpu_gemms_wide_and_deep_blocks(mode, trans_b):
    """Shapes past the kernels' fixed blocks: M = 2100 columns (NN splits B at 2048 columns, NT's output
    block ends mid-tile), K = 130 (NN's 64-row depth blocks: 64 + 64 + 2, the last accumulating), a
    group of 70 rows (TN's 64-row depth chunks: 64 + 6) and one of 1 row."""
    g = torch.Generator().manual_seed(7)
    gs = torch.tensor([0, 33, 70, 1])
    Kd, M = 130, 2100
    a = torch.randn(int(gs.sum()) + 2, Kd, generator=g).requires_grad_()
    b = torch.randn(4, *((M, Kd) if trans_b else (Kd, M)), generator=g).requires_grad_()
    dy = torch.randn(a.shape[0], M, generator=g)
    with K.use_cpu_gemm(mode):
        out = K.grouped_mm(a, b, gs, trans_b)
        da, db = torch.autograd.grad((out * dy).sum(), (a, b))
    ref = K.grouped_mm_reference(a.double(), b.double(), gs, trans_b)
    da_ref, db_ref = torch.autograd.grad((ref * dy.double()).sum(), (a, b))
    for x, y in ((out, ref), (da, da_ref), (db, db_ref)):
        torch.testing.assert_close(x.double(), y.double(), atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("mode", GEMM_MODES)
@HYP
@given(sizes=st.lists(st.sampled_from([0, 1, 5, 12, 13, 33, 64, 65, 97]), min_size=1, max_size=4),
       f=st.integers(1, 70), d=st.integers(1, 40), pad=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_relu_grouped_mm_equals_relu_then_grouped_mm(mode, sizes, f, d, pad, seed):
    """The fused `relu(h) @ w` (relu as h is read; its backward zeroes dh where h <= 0 inside the product and
    reads relu(h) for the weight gradient) equals the composite relu -> grouped_mm, forward and both
    gradients, on every CPU GEMM path, with empty groups and padding rows."""
    g = torch.Generator().manual_seed(seed)
    gs = torch.tensor(sizes, dtype=torch.long)
    h = torch.randn(sum(sizes) + pad, f, generator=g).requires_grad_()
    w = torch.randn(len(sizes), f, d, generator=g).requires_grad_()
    dy = torch.randn(h.shape[0], d, generator=g)
    with K.use_cpu_gemm(mode):
        y = ops.relu_grouped_mm(h, w, gs)
        dh, dw = torch.autograd.grad(y, (h, w), dy)
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y2 = K.grouped_mm_reference(h2.relu(), w2, gs)
    dh2, dw2 = torch.autograd.grad(y2, (h2, w2), dy.double())
    for a, b in ((y, y2), (dh, dh2), (dw, dw2)):
        torch.testing.assert_close(a.double(), b, atol=5e-4, rtol=1e-4)


def test_relu_grouped_mm_double_backward():
    "gradgradcheck in float64: under create_graph the backward is the composite, differentiable again."
    gs = torch.tensor([3, 0, 2])
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda h, w: ops.relu_grouped_mm(h, w, gs)
    assert torch.autograd.gradcheck(fn, (h, w)) and torch.autograd.gradgradcheck(fn, (h, w))


@pytest.mark.parametrize("mode", GEMM_MODES)
def test_relu_grouped_mm_nonfinite_like_torch_relu(mode):
    "NaN in h stays NaN through the relu and lets the gradient through (torch's threshold_backward); -inf gives 0."
    h = torch.randn(20, 9); h[3, 2], h[11, 5] = float("nan"), float("-inf")
    h.requires_grad_()
    w, gs = torch.randn(2, 9, 6), torch.tensor([8, 12])
    dy = torch.randn(20, 6)
    with K.use_cpu_gemm(mode):
        y = ops.relu_grouped_mm(h, w, gs); (dh,) = torch.autograd.grad(y, h, dy)
    y2 = K.grouped_mm_reference(h.relu(), w, gs); (dh2,) = torch.autograd.grad(y2, h, dy)
    assert torch.equal(y.isnan(), y2.isnan()) and torch.equal(dh.isnan(), dh2.isnan())
    torch.testing.assert_close(dh.nan_to_num(), dh2.nan_to_num(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y[~y.isnan()], y2[~y2.isnan()], atol=1e-4, rtol=1e-4)


def test_expert_ffn_takes_the_fused_relu_only_where_it_applies(monkeypatch):
    "relu without dropout on CPU float32: the fused op, with the composite's values and gradients; gelu, dropout: not."
    torch.manual_seed(0)
    p = _small_plan(T=16, E=4, cap=None)
    x = torch.randn(16, 8, requires_grad=True)
    w_in, w_out = torch.randn(4, 8, 12, requires_grad=True), torch.randn(4, 12, 8, requires_grad=True)
    w = torch.rand(p.token_idx.numel())
    calls = []
    real = ops.relu_grouped_mm
    monkeypatch.setattr(ops, "relu_grouped_mm", lambda *a: calls.append(1) or real(*a))
    run = lambda: K.expert_ffn(x, p.token_idx, p.group_sizes, w, w_in, w_out, "relu")
    y = run(); g = torch.autograd.grad(y.sum(), (x, w_in, w_out))
    assert calls == [1]
    monkeypatch.setattr(MO, "_relu_gmm_pays", lambda *a: False)
    y2 = run(); g2 = torch.autograd.grad(y2.sum(), (x, w_in, w_out))
    torch.testing.assert_close(y, y2)
    for a, b in zip(g, g2): torch.testing.assert_close(a, b)
    monkeypatch.undo(); monkeypatch.setattr(ops, "relu_grouped_mm", lambda *a: calls.append(1) or real(*a))
    K.expert_ffn(x, p.token_idx, p.group_sizes, w, w_in, w_out, "gelu")
    K.expert_ffn(x, p.token_idx, p.group_sizes, w, w_in, w_out, "relu", dropout_p=0.1, training=True)
    assert calls == [1]


@pytest.mark.parametrize("mode", GEMM_MODES[:2])
def test_cpu_gemm_nonfinite_values_like_blas(mode):
    "NaN and inf propagate to exactly the entries BLAS gives them; finite entries agree."
    g = torch.Generator().manual_seed(0)
    a, b, dy = torch.randn(40, 24, generator=g), torch.randn(2, 24, 33, generator=g), torch.randn(40, 33, generator=g)
    a[3, 5], b[1, 2, 7], dy[30, 4] = float("nan"), float("inf"), float("-inf")
    gs = torch.tensor([16, 24])
    res = {}
    for m in (mode, "blas"):
        with K.use_cpu_gemm(m):
            res[m] = (ops.grouped_mm(a, b, gs, False), ops.grouped_mm(dy, b, gs, True), ops.grouped_mm_wgrad(a, dy, gs))
    for x, y in zip(res[mode], res["blas"]):
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.isinf(), y.isinf())
        fin = x.isfinite()
        torch.testing.assert_close(x[fin], y[fin], atol=1e-4, rtol=1e-4)


def test_cpu_gemm_switch_is_restored_and_bad_modes_are_named():
    before = K.cpu_gemm_info()["active"]
    with K.use_cpu_gemm("blas"):
        assert K.cpu_gemm_info()["active"] == "blas"
        assert K.extension_info()["cpu_gemm"] == "blas"
    assert K.cpu_gemm_info()["active"] == before
    with pytest.raises(ValueError, match="mode must be one of"):
        K.set_cpu_gemm("sse")
    for m in ("avx2", "avx512"):
        if m not in _SUPPORTED:
            with pytest.raises(ValueError, match=f"mode='{m}' needs a CPU with"):
                K.set_cpu_gemm(m)
    assert K.cpu_gemm_info()["active"] == before


def test_cpu_cache_reuses_blocks_and_never_leaks_their_contents():
    """Large outputs come from the host cache: a second call of the same size is a hit, and a reused
    (dirty) block is fully overwritten: empty groups get zero weight gradients, tokens without rows zeros."""
    K.empty_cpu_cache()
    N, Kd, M = 64, 64, 32768                       # 8 MiB outputs, above the cache's 4 MiB threshold
    a, dy = torch.randn(N, Kd), torch.randn(N, M)
    full = ops.grouped_mm_wgrad(a, dy, torch.tensor([N, 0]))
    assert full[0].abs().sum() > 0
    del full                                       # its block goes back to the cache, dirty
    info = K.cpu_cache_info()
    assert info["cached_bytes"] >= 2 * Kd * M * 4
    out = ops.grouped_mm_wgrad(a, dy, torch.tensor([0, N]))    # same size: reuses the dirty block
    assert K.cpu_cache_info()["hits"] == info["hits"] + 1
    torch.testing.assert_close(out, K.grouped_mm_wgrad_reference(a, dy, torch.tensor([0, N])), atol=1e-3, rtol=1e-4)
    assert out[0].abs().max() == 0
    del out
    y = torch.full((4, M), 7.0)
    got = ops.unpermute(y, torch.tensor([0, 0, 3, 3]), None, 64)          # 64 x 32768 fp32 = 8 MiB
    ref = K.unpermute_reference(y, torch.tensor([0, 0, 3, 3]), None, 64)
    torch.testing.assert_close(got, ref)
    assert got[1:3].abs().max() == 0 and got[4:].abs().max() == 0
    K.empty_cpu_cache()
    assert K.cpu_cache_info()["cached_bytes"] == 0


def test_cpu_cache_limit_zero_disables_and_bad_limit_is_named():
    old = K.cpu_cache_info()["limit_bytes"]
    try:
        K.set_cpu_cache_limit(0)
        out = ops.grouped_mm(torch.randn(64, 64), torch.randn(1, 64, 32768), torch.tensor([64]))
        del out
        assert K.cpu_cache_info()["cached_bytes"] == 0
        with pytest.raises(ValueError, match="nbytes"):
            K.set_cpu_cache_limit(-1)
    finally:
        K.set_cpu_cache_limit(old)


# ---------------------------------------------------------------- expert_ffn / moe_ffn
@pytest.mark.parametrize("activation", K.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_ffn_equals_reference(activation, dtype):
    torch.manual_seed(0)
    T, d, f, E, k = 40, 16, 24, 6, 2
    f_in = 2 * f if activation.startswith("gated") or activation == "swiglu" else f
    x = torch.randn(T, d).to(dtype).requires_grad_()
    logits = torch.randn(T, E)
    w_in = (torch.randn(E, d, f_in) / 4).to(dtype).requires_grad_()
    w_out = (torch.randn(E, f, d) / 4).to(dtype).requires_grad_()
    y, plan = K.moe_ffn(x, logits, w_in, w_out, top_k=k, capacity=12, activation=activation)
    y_ref, plan_ref = K.moe_ffn_reference(x, logits, w_in, w_out, top_k=k, capacity=12, activation=activation)
    for a, b in zip(plan, plan_ref): assert torch.equal(a, b)
    tol = _tol(dtype) if dtype == torch.float32 else dict(atol=0.1, rtol=0.1)
    torch.testing.assert_close(y, y_ref, **tol)
    dy = torch.randn_like(y)
    g1 = torch.autograd.grad((y * dy).sum(), (x, w_in, w_out))
    g2 = torch.autograd.grad((y_ref * dy).sum(), (x, w_in, w_out))
    for a, b in zip(g1, g2): torch.testing.assert_close(a, b, **tol)


def test_expert_ffn_expert_choice_and_dropout():
    "Expert choice: token_idx is each expert's chosen tokens (a token may repeat or be absent)."
    torch.manual_seed(0)
    T, d, f, E, c = 12, 8, 10, 3, 5
    x = torch.randn(T, d)
    token_idx = torch.cat([torch.randperm(T)[:c] for _ in range(E)])
    gs, w = torch.full((E,), c), torch.rand(E * c)
    w_in, w_out = torch.randn(E, d, f), torch.randn(E, f, d)
    torch.testing.assert_close(K.expert_ffn(x, token_idx, gs, w, w_in, w_out, "silu"),
                               K.expert_ffn_reference(x, token_idx, gs, w, w_in, w_out, "silu"), atol=1e-4, rtol=1e-4)
    y = K.expert_ffn(x, token_idx, gs, w, w_in, w_out, "relu", dropout_p=0.5, training=True)
    assert y.shape == (T, d) and torch.isfinite(y).all()
    torch.testing.assert_close(K.expert_ffn(x, token_idx, gs, w, w_in, w_out, "relu", dropout_p=0.5, training=False),
                               K.expert_ffn_reference(x, token_idx, gs, w, w_in, w_out, "relu"), atol=1e-4, rtol=1e-4)


def test_moe_ffn_dropless_all_to_one_expert_and_empty():
    torch.manual_seed(0)
    T, d, f, E = 20, 8, 12, 5
    x, w_in, w_out = torch.randn(T, d), torch.randn(E, d, f), torch.randn(E, f, d)
    logits = torch.zeros(T, E); logits[:, 3] = 10.0
    y, plan = K.moe_ffn(x, logits, w_in, w_out, top_k=1)
    assert plan.group_sizes.tolist() == [0, 0, 0, T, 0]
    torch.testing.assert_close(y, K.moe_ffn_reference(x, logits, w_in, w_out, top_k=1)[0], atol=1e-4, rtol=1e-4)
    y0, plan0 = K.moe_ffn(x[:0], logits[:0], w_in, w_out, top_k=2)
    assert y0.shape == (0, d) and plan0.token_idx.numel() == 0


# ---------------------------------------------------------------- gradcheck (fp64, small shapes)
def _small_plan(T=7, k=2, E=3, cap=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return K.route_plan(torch.randint(0, E, (T, k), generator=g), E, cap)


def test_gradcheck_grouped_mm():
    torch.manual_seed(0)
    gs = torch.tensor([3, 0, 2])
    a = torch.randn(5, 4, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, 4, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: K.grouped_mm(a, b, gs), (a, b))
    assert torch.autograd.gradgradcheck(lambda a, b: K.grouped_mm(a, b, gs), (a, b))
    bt = torch.randn(3, 3, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: K.grouped_mm(a, b, gs, True), (a, bt))


def test_gradcheck_permute_unpermute_gather_dot():
    torch.manual_seed(0)
    p = _small_plan()
    S, T = p.token_idx.numel(), 7
    x = torch.randn(T, 3, dtype=torch.double, requires_grad=True)
    y = torch.randn(S, 3, dtype=torch.double, requires_grad=True)
    w = torch.rand(S, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: K.permute(x, p.token_idx, w), (x, w))
    assert torch.autograd.gradcheck(lambda y, w: K.unpermute(y, p.token_idx, w, T), (y, w))
    assert torch.autograd.gradgradcheck(lambda y, w: K.unpermute(y, p.token_idx, w, T), (y, w))
    assert torch.autograd.gradcheck(lambda x, y: ops.gather_dot(x, p.token_idx, y), (x, y))
    assert torch.autograd.gradgradcheck(lambda x, w: K.permute(x, p.token_idx, w), (x, w))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gradcheck_expert_ffn(activation):
    torch.manual_seed(0)
    p = _small_plan()
    T, d, f, E = 7, 3, 4, 3
    f_in = 2 * f if activation == "swiglu" else f
    x = torch.randn(T, d, dtype=torch.double, requires_grad=True)
    w = torch.rand(p.token_idx.numel(), dtype=torch.double, requires_grad=True)
    w_in = torch.randn(E, d, f_in, dtype=torch.double, requires_grad=True)
    w_out = torch.randn(E, f, d, dtype=torch.double, requires_grad=True)
    fn = lambda x, w, wi, wo: K.expert_ffn(x, p.token_idx, p.group_sizes, w, wi, wo, activation)
    assert torch.autograd.gradcheck(fn, (x, w, w_in, w_out))


# ---------------------------------------------------------------- opcheck
def _opcheck_cases():
    torch.manual_seed(0)
    p = _small_plan()
    S, T = p.token_idx.numel(), 7
    x, y, w = torch.randn(T, 5), torch.randn(S, 5), torch.rand(S)
    a, b = torch.randn(S, 5), torch.randn(3, 5, 4)
    eidx = torch.randint(0, 3, (7, 2))
    return [
        ("route_plan", (eidx, 3, 4, None, None)),
        ("route_plan", (eidx, 3, None, torch.rand(7, 2), torch.rand(7) > 0.3)),
        ("permute", (x.requires_grad_(), p.token_idx, w.requires_grad_())),
        ("permute", (x, p.token_idx, None)),
        ("unpermute", (y.requires_grad_(), p.token_idx, w, T)),
        ("gather_dot", (x, p.token_idx, y)),
        ("grouped_mm", (a.requires_grad_(), b.requires_grad_(), p.group_sizes, False)),
        ("grouped_mm_wgrad", (a, torch.randn(S, 4, requires_grad=True), p.group_sizes)),
        # CPU-only (test_cuda_opcheck takes the first 8)
        ("relu_grouped_mm", (torch.randn(S, 5, requires_grad=True), torch.randn(3, 5, 4, requires_grad=True), p.group_sizes)),
        ("relu_grouped_mm_backward", (torch.randn(S, 4), torch.randn(S, 5), b, p.group_sizes, True, True)),
        ("unpermute_backward", (torch.randn(T, 5), p.token_idx, w.detach(), y.detach(), True, True)),
        ("unpermute_backward", (torch.randn(T, 5), p.token_idx, None, y.detach(), True, False)),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(ops, name).default, args)


# ---------------------------------------------------------------- torch.compile (few: slow on 2 cores)
def test_expert_ffn_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    p = _small_plan(T=16, E=4, cap=None)
    x = torch.randn(16, 8, requires_grad=True)
    w_in, w_out = torch.randn(4, 8, 12, requires_grad=True), torch.randn(4, 12, 8, requires_grad=True)
    w = torch.rand(p.token_idx.numel())
    for act in ("gelu", "relu"):                          # relu: the fused relu_grouped_mm op
        fn = lambda x, wi, wo: K.expert_ffn(x, p.token_idx, p.group_sizes, w, wi, wo, act)
        cfn = torch.compile(fn, backend="aot_eager", fullgraph=True)
        y1, y2 = cfn(x, w_in, w_out), fn(x, w_in, w_out)
        torch.testing.assert_close(y1, y2)
        g1 = torch.autograd.grad(y1.sum(), (x, w_in, w_out))
        g2 = torch.autograd.grad(y2.sum(), (x, w_in, w_out))
        for a, b in zip(g1, g2): torch.testing.assert_close(a, b)


def test_route_plan_op_under_inductor():
    torch._dynamo.reset()
    eidx = torch.randint(0, 5, (30, 2))
    fn = lambda e: ops.route_plan(e, 5, 8, None, None)
    for a, b in zip(torch.compile(fn, fullgraph=True)(eidx), fn(eidx)): assert torch.equal(a, b)


# ---------------------------------------------------------------- bad input: errors name the argument
def _bad_cases():
    x, idx, y = torch.randn(4, 3), torch.tensor([0, 3, 1]), torch.randn(3, 3)
    a, b, gs = torch.randn(5, 4), torch.randn(3, 4, 2), torch.tensor([2, 0, 3])
    e = torch.tensor([[0, 1], [1, 2]])
    return [
        (lambda: K.route_plan(torch.tensor([[0, 3]]), 3), "expert_idx"),
        (lambda: K.route_plan(torch.tensor([[0, -1]]), 3), "expert_idx"),
        (lambda: K.route_plan(e, 3, capacity=-1), "capacity"),
        (lambda: K.route_plan(e.float(), 3), "expert_idx"),
        (lambda: K.route_plan(e, 0), "num_experts"),
        (lambda: K.route_plan(e[0], 3), "expert_idx"),
        (lambda: K.route_plan(e, 3, priority=torch.rand(3, 2)), "priority"),
        (lambda: K.route_plan(e, 3, valid=torch.ones(2)), "valid"),
        (lambda: K.route_plan(e.t(), 3), "expert_idx"),
        (lambda: K.permute(x, torch.tensor([0, 4])), "token_idx"),
        (lambda: K.permute(x, torch.tensor([0, -1])), "token_idx"),
        (lambda: K.permute(x, idx.int()), "token_idx"),
        (lambda: K.permute(x.t(), idx), "x"),
        (lambda: K.permute(x, idx, torch.rand(2)), "weights"),
        (lambda: K.permute(x.long(), idx), "x"),
        (lambda: K.unpermute(y, idx, None, 3), "token_idx"),
        (lambda: K.unpermute(y, idx, None, -1), "num_tokens"),
        (lambda: K.unpermute(y[:2], idx, None, 4), "y"),
        (lambda: K.unpermute(y, idx[::2], None, 4), "token_idx"),
        (lambda: ops.gather_dot(x, idx, y[:, :2]), "y"),
        (lambda: K.grouped_mm(a, b, torch.tensor([4, 0, 2])), "group_sizes"),     # sums past the rows
        (lambda: K.grouped_mm(a, b, torch.tensor([6, -1, 0])), "group_sizes"),
        (lambda: K.grouped_mm(a, b.double(), gs), "b"),
        (lambda: K.grouped_mm(a, b[:, :3].contiguous(), gs), "inner dimensions"),
        (lambda: K.moe_ffn(x, torch.randn(4, 2), b, b, activation="tanh"), "activation"),
        (lambda: ops.relu_grouped_mm(a[0], b, gs), "h"),
        (lambda: ops.relu_grouped_mm(a, b.double(), gs), "b"),
        (lambda: ops.relu_grouped_mm_backward(torch.randn(5, 2), a[:, :3].contiguous(), b, gs, True, False), "h must be"),
    ]


@pytest.mark.parametrize("case", range(28))
def test_bad_input_names_argument(case):
    fn, name = _bad_cases()[case]
    with pytest.raises((ValueError, RuntimeError, TypeError, IndexError)) as e:
        fn()
    assert name in str(e.value), str(e.value)


def test_wrong_device_is_named():
    meta_idx = torch.tensor([0, 1], device="meta")
    for fn, name in [(lambda: K.permute(torch.randn(4, 3), meta_idx), "token_idx"),
                     (lambda: K.unpermute(torch.randn(2, 3), meta_idx, None, 4), "token_idx"),
                     (lambda: K.grouped_mm(torch.randn(2, 3), torch.randn(1, 3, 2, device="meta"), torch.tensor([2])), "b"),
                     (lambda: K.route_plan(torch.zeros(2, 1, dtype=torch.long), 2, valid=torch.ones(2, dtype=torch.bool, device="meta")), "valid")]:
        with pytest.raises(ValueError) as e: fn()
        assert name in str(e.value) and "device" in str(e.value)


# ---------------------------------------------------------------- GPU (skipped without CUDA)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_ops_equal_reference(dtype):
    torch.manual_seed(0)
    T, d, f, E, k = 64, 32, 48, 8, 2
    x = torch.randn(T, d, device="cuda", dtype=dtype)
    logits = torch.randn(T, E, device="cuda")
    w_in = (torch.randn(E, d, f, device="cuda") / 4).to(dtype)
    w_out = (torch.randn(E, f, d, device="cuda") / 4).to(dtype)
    for cap in (None, 10):
        y, plan = K.moe_ffn(x, logits, w_in, w_out, top_k=k, capacity=cap)
        y_ref, plan_ref = K.moe_ffn_reference(x, logits, w_in, w_out, top_k=k, capacity=cap)
        for a, b in zip(plan, plan_ref): assert torch.equal(a, b)
        torch.testing.assert_close(y, y_ref, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------- CUDA: every op against the CPU op / reference
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
_TOL_CUDA = {torch.float32: dict(atol=1e-3, rtol=1e-3), torch.bfloat16: dict(atol=6e-2, rtol=3e-2),
             torch.float16: dict(atol=1e-2, rtol=1e-2), torch.float64: dict(atol=1e-9, rtol=1e-9)}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("sizes", [[0], [1], [5, 0, 17, 64], [130, 0, 0, 3, 300], [0] * 7 + [513]])
@pytest.mark.parametrize("trans_b", [False, True])
def test_cuda_grouped_mm_and_wgrad_equal_reference(dtype, sizes, trans_b):
    "Empty groups, one row, odd sizes, one big group, padding rows; product, both gradients, wgrad op."
    g = torch.Generator().manual_seed(len(sizes))
    gs = torch.tensor(sizes)
    N, G, Kd, M = sum(sizes) + 3, len(sizes), 72, 40
    a = torch.randn(N, Kd, generator=g)
    b = torch.randn(G, *((M, Kd) if trans_b else (Kd, M)), generator=g) / Kd ** 0.5
    dy = torch.randn(N, M, generator=g)
    ac, bc = a.cuda().to(dtype).requires_grad_(), b.cuda().to(dtype).requires_grad_()
    out = K.grouped_mm(ac, bc, gs.cuda(), trans_b)
    da, db = torch.autograd.grad(out, (ac, bc), dy.cuda().to(dtype))
    ar, br = a.double().requires_grad_(), b.double().requires_grad_()
    ref = K.grouped_mm_reference(ar, br, gs, trans_b)
    da_r, db_r = torch.autograd.grad(ref, (ar, br), dy.double())
    for got, want in ((out, ref), (da, da_r), (db, db_r)):
        torch.testing.assert_close(got.double().cpu(), want, **_TOL_CUDA[dtype])
    assert out[sum(sizes):].abs().max() == 0                   # padding rows stay zero


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cap", [None, 0, 1, 5])
def test_cuda_route_plan_permute_unpermute_equal_cpu(cap):
    "Integer ops bit-equal to the CPU kernels (incl. priorities and invalid tokens); permute/unpermute/gather_dot close."
    g = torch.Generator().manual_seed(7)
    T, k, E, d = 300, 2, 16, 24
    eidx = torch.randint(0, E, (T, k), generator=g)
    eidx[:50] = 3                                              # one overloaded expert
    prio, valid = torch.rand(T, k, generator=g).round(decimals=1), torch.rand(T, generator=g) > 0.1
    cpu = K.route_plan(eidx, E, cap, prio, valid)
    gpu = K.route_plan(eidx.cuda(), E, cap, prio.cuda(), valid.cuda())
    for name, x, y in zip(K.RoutePlan._fields, cpu, gpu):
        assert torch.equal(x, y.cpu()), name
    x, w = torch.randn(T, d, generator=g), torch.rand(T * k, generator=g)
    y = ops.permute(x, cpu.token_idx, w)
    torch.testing.assert_close(ops.permute(x.cuda(), gpu.token_idx, w.cuda()).cpu(), y)
    torch.testing.assert_close(ops.unpermute(y.cuda(), gpu.token_idx, w.cuda(), T).cpu(),
                               ops.unpermute(y, cpu.token_idx, w, T), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.gather_dot(x.cuda(), gpu.token_idx, y.cuda()).cpu(),
                               ops.gather_dot(x, cpu.token_idx, y), atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@cuda
def test_cuda_moe_ffn_has_no_host_sync_and_compiles():
    "Dropless and capacity-limited MoE FFN fwd+bwd run with CUDA sync debug mode 'error' (no host sync), and under torch.compile."
    torch.manual_seed(0)
    T, d, f, E = 256, 64, 128, 8
    x = torch.randn(T, d, device="cuda", requires_grad=True)
    logits = torch.randn(T, E, device="cuda")
    w_in = (torch.randn(E, d, f, device="cuda") / 8).requires_grad_()
    w_out = (torch.randn(E, f, d, device="cuda") / 8).requires_grad_()
    gates, eidx = torch.softmax(logits, -1).topk(2, -1)
    K.route_plan(eidx, E, 40, trim=False)                      # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for cap in (None, 40):
            p = K.route_plan(eidx, E, cap, trim=False)        # dropped rows kept as padding: no host read
            y = K.expert_ffn(x, p.token_idx, p.group_sizes, gates.reshape(-1)[p.assign_idx], w_in, w_out, "relu")
            torch.autograd.grad(y.square().sum(), (x, w_in, w_out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    fn = torch.compile(lambda x, wi, wo: K.moe_ffn(x, logits, wi, wo, top_k=2)[0], fullgraph=True)
    torch.testing.assert_close(fn(x, w_in, w_out), K.moe_ffn_reference(x, logits, w_in, w_out, top_k=2)[0],
                               atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", range(8))
def test_cuda_opcheck(case):
    name, args = _opcheck_cases()[case]
    args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(ops, name), args)


# ---------------------------------------------------------------- CUDA grouped GEMM: the tensor-core path's shape classes
def _clamped(sizes, N):
    "Group sizes as the CUDA kernels see them: negatives as 0, the running sum clamped to the N rows."
    out, acc = [], 0
    for v in sizes:
        nxt = min(acc + max(v, 0), N)
        out.append(nxt - acc)
        acc = nxt
    return out


def _poisoned(shape, dtype):
    "Free a NaN block of this size first, so an uninitialised output from the caching allocator would show."
    torch.empty(shape, device="cuda", dtype=dtype).fill_(float("nan"))


def _gemm_inputs(sizes, N, Kd, M, trans_b, dtype, seed=0, a_offset=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, Kd, generator=g).to(dtype)
    b = (torch.randn(len(sizes), *((M, Kd) if trans_b else (Kd, M)), generator=g) / max(Kd, 1) ** 0.5).to(dtype)
    dy = (torch.randn(N, M, generator=g) / max(N, 1) ** 0.5).to(dtype)
    ac = a.cuda()
    if a_offset:      # same values at a data pointer `a_offset` elements past a 16-byte boundary
        ac = torch.empty(N * Kd + a_offset, device="cuda", dtype=dtype)[a_offset:].view(N, Kd).copy_(ac)
    return a.double(), b.double(), dy.double(), ac, b.cuda(), dy.cuda()


def _check_gemm_ops(sizes, N, Kd, M, trans_b, dtype, a_offset=0):
    a, b, dy, ac, bc, dyc = _gemm_inputs(sizes, N, Kd, M, trans_b, dtype, a_offset=a_offset)
    eff = torch.tensor(_clamped(sizes, N))
    gs = torch.tensor(sizes, device="cuda")
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    _poisoned((N, M), dtype)
    out = ops.grouped_mm(ac, bc, gs, trans_b)
    torch.testing.assert_close(out.double().cpu(), K.grouped_mm_reference(a, b, eff, trans_b), **tol)
    if int(eff.sum()) < N:
        assert out[int(eff.sum()):].abs().max().item() == 0                            # padding rows are zeros
    _poisoned((len(sizes), Kd, M), dtype)
    w = ops.grouped_mm_wgrad(ac, dyc, gs)
    torch.testing.assert_close(w.double().cpu(), K.grouped_mm_wgrad_reference(a, dy, eff), **tol)


# (group sizes, N, K, M): which tile / fallback each one is for
_TC_SHAPES = [
    ([32] * 8, 256, 256, 256),                 # 32-row groups -> 64-row tiles; M, K multiples of 128
    ([1400, 0, 733], 2200, 512, 1024),         # 128-row tiles (>= 132 of them); 16 k slices round the 4-stage ring;
                                               # 67 padding rows
    ([700, 0, 333], 1100, 1024, 256),          # few 128-row tiles -> 64-row tiles; 32 k slices; 67 padding rows
    ([90, 41], 131, 64, 2048),                 # K = 64: fewer k slices than stages; 16 column tiles
    ([300, 1, 0, 299], 900, 136, 136),         # K, M = 8 (mod 128): partial slices and tiles; 300 padding rows
    ([17, 0, 30], 50, 72, 37),                 # odd M: NT on tensor cores with scalar stores, NN / wgrad on SIMT
    ([5, 64, 3], 80, 70, 48),                  # K = 70: not 16-byte rows -> SIMT for every product
    ([1, 2, 3], 6, 8, 8),                      # tiny: one partial 8-wide slice
    ([-4, 7, 10**15], 40, 64, 64),             # negative / oversized sizes: clamped to [0, 7, 33]
    ([0] * 100 + [3] + [0] * 27, 10, 64, 64),  # many empty groups around one; 7 padding rows
]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(_TC_SHAPES)))
@pytest.mark.parametrize("trans_b", [False, True])
def test_cuda_grouped_gemm_shapes_equal_reference(dtype, case, trans_b):
    "grouped_mm and grouped_mm_wgrad on the shape classes the tensor-core kernels special-case, vs float64."
    _check_gemm_ops(*_TC_SHAPES[case], trans_b, dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("trans_b", [False, True])
def test_cuda_grouped_gemm_unaligned_pointer_equal_reference(trans_b):
    "a at a data pointer 2 bytes past a 16-byte boundary: the SIMT fallback, same results."
    _check_gemm_ops([40, 0, 77], 130, 128, 128, trans_b, torch.bfloat16, a_offset=1)


def _kernel_names(fn):
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA device of compute capability >= 8.0")
def test_cuda_grouped_gemm_path_selection():
    "bf16/fp16 with 16-byte rows run the tensor-core kernel; fp32, K = 70 and a misaligned pointer run SIMT."
    gs = torch.tensor([50, 0, 14], device="cuda")
    def names(dtype, Kd, M, offset=0, trans_b=False):
        a = torch.randn(64 * Kd + offset, device="cuda").to(dtype)[offset:].view(64, Kd)
        b = torch.randn(3, *((M, Kd) if trans_b else (Kd, M)), device="cuda").to(dtype)
        dy = torch.randn(64, M, device="cuda").to(dtype)
        return _kernel_names(lambda: (ops.grouped_mm(a, b, gs, trans_b), ops.grouped_mm_wgrad(a, dy, gs)))
    for dtype in (torch.bfloat16, torch.float16):
        n = names(dtype, 64, 48)
        assert "tc_gemm_kernel" in n and "grouped_mm_kernel" not in n and "grouped_wgrad_kernel" not in n, n
    for n in (names(torch.float32, 64, 48), names(torch.bfloat16, 70, 48), names(torch.bfloat16, 64, 48, offset=1)):
        assert "tc_gemm_kernel" not in n and "grouped_mm_kernel" in n and "grouped_wgrad_kernel" in n, n
    n = names(torch.bfloat16, 64, 37, trans_b=True)                # NT needs only K % 8; wgrad needs M % 8 too
    assert "tc_gemm_kernel" in n and "grouped_wgrad_kernel" in n, n


_ENV_SCRIPT = """
import sys, torch, flanmoe_nb.kernels as K
g = torch.Generator().manual_seed(3)
a, b = torch.randn(300, 128, generator=g).cuda().bfloat16(), (torch.randn(4, 128, 256, generator=g) / 12).cuda().bfloat16()
dy, gs = torch.randn(300, 256, generator=g).cuda().bfloat16(), torch.tensor([100, 0, 150, 40]).cuda()
out, w = torch.ops.flanmoe.grouped_mm(a, b, gs, False), torch.ops.flanmoe.grouped_mm_wgrad(a, dy, gs)
torch.save((out.cpu(), w.cpu()), sys.argv[1])
"""


@pytest.mark.gpu
@cuda
def test_cuda_gemm_env_switch(tmp_path):
    "FLANMOE_CUDA_GEMM=simt (read at the first call) runs the SIMT kernels with the same results; a bad value is named."
    import os, subprocess, sys
    outs = {}
    for mode in ("auto", "simt"):
        f = tmp_path / f"{mode}.pt"
        subprocess.run([sys.executable, "-c", _ENV_SCRIPT, str(f)], check=True, timeout=300,
                       env={**os.environ, "FLANMOE_CUDA_GEMM": mode})
        outs[mode] = torch.load(f)
    for x, y in zip(outs["auto"], outs["simt"]):
        torch.testing.assert_close(x.double(), y.double(), atol=3e-2, rtol=1e-2)
    r = subprocess.run([sys.executable, "-c", _ENV_SCRIPT, str(tmp_path / "bad.pt")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "FLANMOE_CUDA_GEMM": "fast"})
    assert r.returncode != 0 and "FLANMOE_CUDA_GEMM" in r.stderr, r.stderr


# ---------------------------------------------------------------- dense_mm (the model's dense layers)
@pytest.mark.parametrize("mode", GEMM_MODES)
@pytest.mark.parametrize("trans_w", [False, True])
def test_dense_mm_equals_matmul_with_grads(mode, trans_w):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 70, 33, generator=g, requires_grad=True)
    w = (torch.randn(*((47, 33) if trans_w else (33, 47)), generator=g) / 6).requires_grad_()
    with K.use_cpu_gemm(mode):
        y = K.dense_mm(x, w, trans_w)
        got = torch.autograd.grad(y.square().sum(), (x, w))
    y_ref = x @ (w.t() if trans_w else w)
    want = torch.autograd.grad(y_ref.square().sum(), (x, w))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want): torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", GEMM_MODES)
def test_dense_relu_mm_equals_relu_then_matmul_with_grads(mode):
    "The dense FFN's fused second product (`relu_grouped_mm` with one group under AVX-512, else relu + dense_mm)."
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 37, 45, generator=g, requires_grad=True)
    w = (torch.randn(45, 19, generator=g) / 6).requires_grad_()
    with K.use_cpu_gemm(mode):
        y = K.dense_relu_mm(h, w)
        got = torch.autograd.grad(y.square().sum(), (h, w))
    y_ref = h.relu() @ w
    want = torch.autograd.grad(y_ref.square().sum(), (h, w))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want): torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_dense_mm_keeps_autocast_and_compiles():
    x, w = torch.randn(16, 8), torch.randn(12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert K.dense_mm(x, w, True).dtype == torch.bfloat16          # matmul under autocast, as F.linear
    fn = torch.compile(lambda x, w: K.dense_mm(x, w, True), fullgraph=True)
    torch.testing.assert_close(fn(x, w), x @ w.t(), atol=1e-5, rtol=1e-5)


@pytest.fixture
def dense_choice(tmp_path, monkeypatch):
    "A fresh, measured dense_mm choice: its own cache file, no forced or deterministic mode, nothing chosen yet."
    monkeypatch.setenv("FLANMOE_KERNEL_CACHE", str(tmp_path / "choice.json"))
    for v in ("FLANMOE_DETERMINISTIC", "FLANMOE_PATH_DENSE_GEMM"): monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(G, "_DENSE_CHOSEN", {})
    return tmp_path / "choice.json"


@pytest.mark.skipif(not K.extension_available() or G._CPU_GEMM["active"] != "avx512",
                    reason="dense_mm has a choice only where the AVX-512 kernels run")
def test_dense_mm_path_is_measured_and_never_slow(dense_choice, monkeypatch):
    import time
    slow, fast = (lambda: time.sleep(0.003)), (lambda: None)
    x, w = torch.ones(300, 24, requires_grad=True), torch.ones(40, 24, requires_grad=True)
    for op_fn, blas_fn, want in ((slow, fast, False), (fast, slow, True)):
        monkeypatch.setattr(G, "_DENSE_CHOSEN", {}); dense_choice.unlink(missing_ok=True)
        monkeypatch.setattr(G, "_dense_candidates", lambda *a, o=op_fn, b=blas_fn: dict(op=o, blas=b))
        assert G._dense_kernels_pay(x, w, True) is want
        [(name, rec)] = [(n, r) for n, r in K.kernel_choices().items() if n == "dense_gemm/avx512-m512-k24-n40-nt-train"]
        assert rec["source"] == "measured" and rec["choice"] == ("op" if want else "blas"), rec
    monkeypatch.setattr(G, "_dense_candidates", lambda *a: pytest.fail("timed again"))
    assert G._dense_kernels_pay(x[:270], w, True) is True                    # same class (rows 257-512): no new timing
    monkeypatch.setattr(G, "_dense_candidates", lambda *a: dict(op=slow, blas=slow))
    monkeypatch.setenv("FLANMOE_PATH_DENSE_GEMM", "blas")
    assert G._dense_kernels_pay(x, w, True) is False                          # forced
    y = K.dense_mm(x, w, True)
    assert y.grad_fn is not None and "GroupedMm" not in type(y.grad_fn).__name__   # torch.matmul's graph
    monkeypatch.setenv("FLANMOE_PATH_DENSE_GEMM", "mkl")
    with pytest.raises(ValueError, match="FLANMOE_PATH_DENSE_GEMM='mkl'"): G._dense_kernels_pay(x, w, True)
    monkeypatch.delenv("FLANMOE_PATH_DENSE_GEMM")
    with torch.autocast("cpu", dtype=torch.bfloat16):                          # not a candidate: never timed
        assert G._dense_kernels_pay(x, w, True) is False
    assert G._dense_kernels_pay(x.double(), w.double(), True) is False


@pytest.mark.skipif(not K.extension_available() or G._CPU_GEMM["active"] != "avx512",
                    reason="dense_mm has a choice only where the AVX-512 kernels run")
def test_dense_mm_candidates_time_the_real_paths(dense_choice):
    "The candidates run the op and torch.matmul, with and without relu and gradients (the timing is the machine's)."
    for trans_w, relu, grad in ((True, False, True), (False, False, False), (False, True, True)):
        for fn in G._dense_candidates(33, 16, 24, trans_w, relu, grad).values(): fn()
    x, w = torch.randn(70, 16), torch.randn(16, 24)
    with torch.no_grad(): G._dense_kernels_pay(x, w)
    assert "dense_gemm/avx512-m128-k16-n24-nn-infer" in K.kernel_choices()
    h = torch.randn(70, 16, requires_grad=True)
    y = K.dense_relu_mm(h, w.requires_grad_())
    torch.testing.assert_close(y, h.relu() @ w)
    assert "dense_gemm/avx512-m128-k16-n24-nn-relu-train" in K.kernel_choices()


# ---------------------------------------------------------------- bf16 grouped GEMMs: oneDNN's brgemm ukernel, own AVX512-BF16 kernels
_BRGEMM = K.extension_available() and X._C.bf16_brgemm_available()
_DP = K.extension_available() and X._C.bf16_dp_available()
_NEED = {"brgemm": (_BRGEMM, "oneDNN's brgemm ukernel does not run bf16 on this CPU"),
         "avx512bf16": (_DP, "this CPU has no AVX512-BF16")}
FAST_BF16 = [pytest.param(m, marks=pytest.mark.skipif(not ok, reason=why)) for m, (ok, why) in _NEED.items()]


@contextlib.contextmanager
def bf16_gemm(mode):
    "The bf16 grouped-GEMM path `mode` inside the block (asserting it could be set), the previous one after it."
    before = X._C.bf16_gemm_active()
    assert X._C.set_bf16_gemm(mode), mode
    try: yield
    finally: X._C.set_bf16_gemm(before)


def test_bf16_gemm_modes_are_named():
    before = {p: X._C.bf16_gemm_active(p) for p in G.GEMM_PRODUCTS}
    try:
        assert not X._C.set_bf16_gemm("nonsense") and X._C.bf16_gemm_active() == X._C.bf16_gemm_active("nn_wide")
        assert X._C.set_bf16_gemm("blas") and X._C.bf16_gemm_active() == "blas"
        assert X._C.set_bf16_gemm("auto") and X._C.bf16_gemm_active() == "blas"
        assert X._C.set_bf16_gemm("brgemm") == _BRGEMM
        assert X._C.set_bf16_gemm("avx512bf16") == _DP
        assert G.bf16_gemm_paths() == ["blas"] + ["brgemm"] * _BRGEMM + ["avx512bf16"] * _DP
        # per product: a pair name sets both orientations, 'all' then lists them when they differ
        assert X._C.set_bf16_gemm("blas") and X._C.set_bf16_gemm("blas", "tn")
        assert not X._C.set_bf16_gemm("blas", "nn_sideways")
        if _DP:
            assert X._C.set_bf16_gemm("avx512bf16", "nt")
            assert X._C.bf16_gemm_active("nt_tall") == X._C.bf16_gemm_active("nt_wide") == "avx512bf16"
            assert X._C.bf16_gemm_active() == ("nn_wide=blas,nn_tall=blas,nt_wide=avx512bf16,nt_tall=avx512bf16,"
                                               "tn_wide=blas,tn_tall=blas")
        with pytest.raises(ValueError, match="product must be one of.*got 'sideways'"): X._C.bf16_gemm_active("sideways")
    finally:
        for p, m in before.items(): X._C.set_bf16_gemm(m, p)


def test_choose_path_replays_a_recorded_run(choice_cache, monkeypatch, tmp_path):
    "FLANMOE_KERNEL_CHOICES=<run folder>: its train.json and eval.json choices are taken, before the deterministic default."
    import json
    calls = []
    cands = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    run = tmp_path / "run"; run.mkdir()
    (run / "train.json").write_text(json.dumps({"status": "trained", "kernel_choices": {"demo/r1": {"choice": "b", "source": "measured", "ms": {"a": 2.0, "b": 1.0}}}}))
    (run / "eval.json").write_text(json.dumps({"score": 0.5, "kernel_choices": {"demo/r1": {"choice": "b"}, "demo/r2": {"choice": "a"}}}))
    monkeypatch.setenv("FLANMOE_KERNEL_CHOICES", str(run))
    monkeypatch.setenv("FLANMOE_DETERMINISTIC", "1")
    assert K.choose_path("demo", "r1", cands, default="a") == "b" and not calls
    assert K.kernel_choices()["demo/r1"]["source"] == "replayed"
    assert K.choose_path("demo", "r2", cands, default="b") == "a"           # recorded by evaluation only
    assert K.pinned_choices() == {"demo/r1": "b", "demo/r2": "a"}
    with pytest.warns(UserWarning, match="demo/r3.*records no choice"):    # not in the record: chosen as usual, and said
        assert K.choose_path("demo", "r3", cands, default="a") == "a"
    assert K.kernel_choices()["demo/r3"]["source"] == "deterministic"
    with pytest.raises(ValueError, match=r"demo/r1='b'.*cannot run"):      # recorded on a machine with a path this one lacks
        K.choose_path("demo", "r1", {"a": cands["a"]}, default="a")
    monkeypatch.setenv("FLANMOE_PATH_DEMO", "a")                            # an explicit path still wins
    assert K.choose_path("demo", "r1", cands, default="a") == "a" and K.kernel_choices()["demo/r1"]["source"] == "environment"
    assert not calls


@pytest.mark.parametrize("files, msg", [
    ({}, "no such file"), ({"train.json": "{"}, "not JSON"), ({"train.json": "[1]"}, "no kernel_choices map"),
    ({"train.json": '{"kernel_choices": {"k": {"ms": 1}}}'}, "gives 'k' no choice"),
    ({"train.json": '{"kernel_choices": {"k": "a"}}', "eval.json": '{"kernel_choices": {"k": {"choice": "b"}}}'}, "'k' is 'a' in one file"),
    ({"train.json": '{"status": "trained"}', "eval.json": '{"score": 1.0}'}, "records kernel_choices")])
def test_kernel_choice_replay_refuses_a_bad_record(tmp_path, files, msg):
    for n, t in files.items(): (tmp_path / n).write_text(t)
    path = str(tmp_path if files else tmp_path / "nope")
    with pytest.raises(ValueError, match=f"FLANMOE_KERNEL_CHOICES={path!r}.*{msg}"): X._load_pins(path)
    (tmp_path / "map.json").write_text('{"k": "a", "j": {"choice": "b"}}')   # a plain map is a record too
    assert X._load_pins(str(tmp_path / "map.json")) == {"k": "a", "j": "b"}


@pytest.mark.parametrize("mode", FAST_BF16)
@HYP
@given(sizes=st.lists(st.sampled_from([0, 1, 2, 7, 31, 32, 33, 64, 65, 97, 129, 300]), min_size=1, max_size=5),
       Kd=st.sampled_from([1, 2, 6, 33, 64, 130, 512]), M=st.sampled_from([1, 5, 31, 63, 64, 65, 130, 256, 300]),
       trans_b=st.booleans(), pad=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_grouped_mm_bf16_fast_paths_equal_fp32_reference(mode, sizes, Kd, M, trans_b, pad, seed):
    """The ukernel path and the own AVX512-BF16 kernels (even depths; odd ones take BLAS) against the fp32 product of
    the same bf16 values: empty groups, one row, row blocks around 32 and 64 (the units), column blocks around 32 and 64
    and panels around 256, padding rows; the product, the input gradient (the transposed product) and the weight
    gradient (depth = a group's rows, padded to 32 / to pairs)."""
    g = torch.Generator().manual_seed(seed)
    gs = torch.tensor(sizes, dtype=torch.long)
    N, G = sum(sizes) + pad, len(sizes)
    a = torch.randn(N, Kd, generator=g).bfloat16().requires_grad_()
    b = torch.randn(G, *((M, Kd) if trans_b else (Kd, M)), generator=g).bfloat16().requires_grad_()
    dy = torch.randn(N, M, generator=g).bfloat16()
    with bf16_gemm(mode):
        out = K.grouped_mm(a, b, gs, trans_b)
        da, db = torch.autograd.grad((out * dy).float().sum(), (a, b))
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    ref = K.grouped_mm_reference(a32, b32, gs, trans_b)
    da_ref, db_ref = torch.autograd.grad((ref * dy.float()).sum(), (a32, b32))
    for x, r in ((out, ref), (da, da_ref), (db, db_ref)):
        assert x.dtype == torch.bfloat16 and x.shape == r.shape
        if not r.numel(): continue
        scale = r.abs().max().item() + 1e-6      # bf16 keeps 8 bits: one rounding of the fp32-accumulated result
        assert (x.float() - r).abs().max().item() <= 2 ** -8 * scale + 1e-6, (x.float() - r).abs().max()
    if N > sum(sizes): assert out[sum(sizes):].eq(0).all()


@pytest.mark.skipif(not _BRGEMM, reason="oneDNN's brgemm ukernel does not run bf16 on this CPU")
def test_grouped_mm_bf16_brgemm_repacks_a_weight_changed_in_place():
    "A thread keeps its packed weight across the chunks of one group within a call, never into the next call: an optimizer updates weights in place, at the same address."
    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 512, generator=g).bfloat16(); b = torch.randn(2, 512, 300, generator=g).bfloat16()
    gs = torch.tensor([550, 50])                 # a group of three 256-row chunks and one of one
    with bf16_gemm("brgemm"):
        o1 = K.grouped_mm(a, b, gs)
        b.mul_(2)
        o2 = K.grouped_mm(a, b, gs)
    assert torch.equal(o2, o1 * 2)              # (doubling is exact in bf16 and fp32)


@pytest.mark.skipif(not _DP, reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("stream", ["on", "off"])
def test_grouped_mm_bf16_dp_large_blocks_equal_fp32_reference(stream):
    """The AVX512-BF16 kernels where the hypothesis shapes do not reach: several units per group (256 rows in NN, 64 in
    NT; the next group's weight prefetched during a unit), several 256-column passes (NN), depth 2048 (several depth
    passes), odd column counts, and the weight gradient with and without non-temporal stores (full aligned tiles only)."""
    g = torch.Generator().manual_seed(1)
    gs = torch.tensor([300, 0, 64, 3])
    N, (d, f) = int(gs.sum()), (130, 1100)
    x = torch.randn(N, d, generator=g).bfloat16(); h = torch.randn(N, 2048, generator=g).bfloat16()
    w1 = torch.randn(4, d, f, generator=g).bfloat16(); w2 = torch.randn(4, 2048, 96, generator=g).bfloat16()
    dy1 = torch.randn(N, f, generator=g).bfloat16(); dy2 = torch.randn(N, 96, generator=g).bfloat16()
    before = X._C.gemm_stream_mode()
    try:
        X._C.set_gemm_stream(stream)
        with bf16_gemm("avx512bf16"):
            got = [K.grouped_mm(x, w1, gs), K.grouped_mm(h, w2, gs), K.grouped_mm(dy1, w1, gs, True),
                   torch.ops.flanmoe.grouped_mm_wgrad(x, dy1, gs), torch.ops.flanmoe.grouped_mm_wgrad(h, dy2, gs)]
    finally: X._C.set_gemm_stream(before)
    f32 = lambda *t: [v.float() for v in t]
    ref = [K.grouped_mm_reference(*f32(x, w1), gs), K.grouped_mm_reference(*f32(h, w2), gs),
           K.grouped_mm_reference(*f32(dy1, w1), gs, True)]
    off = [0, *torch.cumsum(gs, 0).tolist()]
    for a, dy in ((x, dy1), (h, dy2)):
        ref.append(torch.stack([a[off[i]:off[i + 1]].float().t() @ dy[off[i]:off[i + 1]].float() for i in range(4)]))
    for o, r in zip(got, ref):
        assert o.dtype == torch.bfloat16 and o.shape == r.shape
        scale = r.abs().max().item() + 1e-6
        assert (o.float() - r).abs().max().item() <= 2 ** -8 * scale, (o.float() - r).abs().max()
    assert got[3][1].eq(0).all() and got[4][1].eq(0).all()        # the empty group's gradient


BF16_MODES = ["blas", *FAST_BF16]


@pytest.mark.parametrize("mode", BF16_MODES)
@HYP
@given(sizes=st.lists(st.sampled_from([0, 1, 7, 32, 33, 97, 300]), min_size=1, max_size=4),
       f=st.sampled_from([2, 6, 64, 130, 300]), d=st.sampled_from([1, 5, 64, 65, 300]), pad=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_relu_grouped_mm_bf16_equals_relu_then_grouped_mm(mode, sizes, f, d, pad, seed):
    """bf16 `relu(h) @ w` with the relu folded into the product (relu'd rows of h on the ukernel path, the mask on
    its fp32 block before rounding) is bitwise the composite `grouped_mm(h.relu(), w)` on the same path: forward,
    dh (zero where h <= 0, NaN in h lets the gradient through) and dw; padding rows stay 0."""
    g = torch.Generator().manual_seed(seed)
    gs = torch.tensor(sizes, dtype=torch.long)
    h = torch.randn(sum(sizes) + pad, f, generator=g)
    if h.numel() > 3: h.view(-1)[::7] = 0.0; h.view(-1)[1] = float("nan"); h.view(-1)[2] = float("-inf")
    h = h.bfloat16().requires_grad_()
    w = torch.randn(len(sizes), f, d, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(h.shape[0], d, generator=g).bfloat16()
    with bf16_gemm(mode):
        y = ops.relu_grouped_mm(h, w, gs)
        dh, dw = torch.autograd.grad(y, (h, w), dy)
        h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y2 = K.grouped_mm(h2.relu(), w2, gs)
        dh2, dw2 = torch.autograd.grad(y2, (h2, w2), dy)
    for a, b in ((y, y2), (dh, dh2), (dw, dw2)):
        assert a.dtype == torch.bfloat16 and torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), (a.float() - b.float()).abs().max()
    if pad: assert y[sum(sizes):].eq(0).all()


def test_expert_ffn_runs_bf16_under_cpu_autocast():
    """Autocast does not cast custom ops: expert_ffn casts its operands as autocast casts a matmul's, so bf16
    training runs the experts' GEMMs in bf16 (where the matrix engines are), with fp32 gradients for fp32
    weights, and agrees with the fp32 layer to bf16 precision."""
    from flanmoe_nb import moe
    torch.manual_seed(0)
    layer = moe.MoELayer(moe.MoEConfig(64, 128, 4))
    x = torch.randn(2, 16, 64)
    seen = []
    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, f, types, args=(), kwargs=None):
            if "grouped_mm" in str(f): seen.append(args[0].dtype)
            return f(*args, **(kwargs or {}))
    with torch.autocast("cpu", dtype=torch.bfloat16), Spy():
        y, _ = layer(x)
    assert seen and all(d == torch.bfloat16 for d in seen), seen
    y32, _ = layer(x)
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    assert layer.experts.w_in.grad.dtype == torch.float32 and layer.experts.w_in.grad.abs().sum() > 0


# ---------------------------------------------------------------- kernel paths chosen by measurement
@pytest.fixture
def choice_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLANMOE_KERNEL_CACHE", str(tmp_path / "choice.json"))
    for v in ("FLANMOE_DETERMINISTIC", "FLANMOE_PATH_DEMO", "FLANMOE_KERNEL_CHOICES"): monkeypatch.delenv(v, raising=False)
    return tmp_path / "choice.json"


def test_choose_path_never_picks_a_slow_path_and_caches_per_machine(choice_cache, monkeypatch):
    import json, time
    slow, fast = (lambda: time.sleep(0.003)), (lambda: None)
    for order in ({"slow": slow, "fast": fast}, {"fast": fast, "slow": slow}):
        X._CHOICES.clear(); choice_cache.unlink(missing_ok=True)
        assert K.choose_path("demo", "c", order, default="slow") == "fast"
        assert K.kernel_choices()["demo/c"]["source"] == "measured"
    assert K.choose_path("demo", "c", {"slow": slow, "fast": fast}, default="slow") == "fast"
    assert K.kernel_choices()["demo/c"]["source"] == "cache"
    assert json.loads(choice_cache.read_text())["choices"]["demo/c"]["choice"] == "fast"
    # another CPU: the cached choice is not trusted, the paths are measured again (now "slow" is the fast one)
    fp = K.machine_fingerprint()
    monkeypatch.setattr(X, "machine_fingerprint", lambda: dict(fp, cpu="Some Other CPU"))
    assert K.choose_path("demo", "c", {"slow": fast, "fast": slow}, default="slow") == "slow"
    assert K.kernel_choices()["demo/c"]["source"] == "measured"


def test_choose_path_keeps_the_default_on_a_tie(choice_cache, monkeypatch):
    "Paths round differently: one within `margin` of the default does not replace it (no choice flips with timing noise)."
    import types
    clock = [0.0]
    monkeypatch.setattr(X, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    tick = lambda dt: (lambda: clock.__setitem__(0, clock[0] + dt))
    for b_time, want in ((0.97, "a"), (1.03, "a"), (0.90, "b")):
        X._CHOICES.clear(); choice_cache.unlink(missing_ok=True)
        assert K.choose_path("demo", "t", {"a": tick(1.0), "b": tick(b_time)}, default="a") == want, b_time
        assert K.kernel_choices()["demo/t"]["ms"] == {"a": 1000.0, "b": b_time * 1e3}
    X._CHOICES.clear(); choice_cache.unlink(missing_ok=True)
    assert K.choose_path("demo", "t", {"a": tick(1.0), "b": tick(0.97)}, default="a", margin=0.0) == "b"


def test_choose_path_candidates_are_hidden_from_the_callers_saved_tensor_hooks(choice_cache):
    "A measurement inside a forward (the attention choice) must not reach activation checkpointing or memory probes."
    packed = []
    def cand():
        x = torch.randn(4, 4, requires_grad=True)
        (x * x).sum().backward()                        # saves x for backward
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        K.choose_path("demo", "hooks", {"a": cand, "b": cand}, default="a")
        assert not packed
        y = torch.randn(3, requires_grad=True) * torch.randn(3)   # the caller's own ops still reach its hooks
    assert len(packed) >= 1


def test_choose_path_environment_and_deterministic_mode(choice_cache, monkeypatch):
    calls = []
    cands = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    monkeypatch.setenv("FLANMOE_PATH_DEMO", "b")
    assert K.choose_path("demo", "x", cands, default="a") == "b" and not calls
    assert K.kernel_choices()["demo/x"]["source"] == "environment"
    monkeypatch.setenv("FLANMOE_PATH_DEMO", "c")
    with pytest.raises(ValueError, match="FLANMOE_PATH_DEMO='c'"): K.choose_path("demo", "x", cands, default="a")
    monkeypatch.delenv("FLANMOE_PATH_DEMO")
    monkeypatch.setenv("FLANMOE_DETERMINISTIC", "1")
    assert K.choose_path("demo", "x", cands, default="a") == "a" and not calls
    with pytest.raises(ValueError, match="default='z'"): K.choose_path("demo", "x", cands, default="z")


@pytest.mark.skipif(not (_BRGEMM or _DP), reason="bf16 has one path on this CPU (BLAS): nothing to choose")
def test_bf16_expert_ffn_chooses_its_gemm_path_by_measurement(choice_cache, monkeypatch):
    "Each of the six products is timed on every path this CPU runs, and set to the one measured (a tie keeps BLAS)."
    monkeypatch.delenv("FLANMOE_BF16_GEMM", raising=False)
    G._BF16_CLASS.clear(); X._CHOICES.clear()
    before = {p: X._C.bf16_gemm_active(p) for p in G.GEMM_PRODUCTS}
    try:
        x = torch.randn(64, 32).bfloat16(); w_in = torch.randn(4, 32, 64).bfloat16(); w_out = torch.randn(4, 64, 32).bfloat16()
        gs = torch.tensor([16, 16, 16, 16]); idx = torch.arange(64)
        K.expert_ffn(x, idx, gs, None, w_in, w_out)
        recs = {k.rsplit("-", 1)[1]: v for k, v in K.kernel_choices().items() if k.startswith("bf16_gemm/")}
        assert set(recs) == set(G.GEMM_PRODUCTS)
        for p, rec in recs.items():
            assert rec["source"] == "measured" and set(rec["ms"]) == set(G.bf16_gemm_paths())
            fastest = min(rec["ms"], key=rec["ms"].get)
            assert rec["choice"] in (fastest, "blas") and rec["choice"] == X._C.bf16_gemm_active(p)
    finally:
        for p, m in before.items(): X._C.set_bf16_gemm(m, p)


def _fp32_expert_block():
    "(x, token_idx, group_sizes, w_in, w_out): 96 tokens over 4 experts of d=32, f=64."
    return torch.randn(96, 32), torch.arange(96), torch.tensor([24, 24, 24, 24]), torch.randn(4, 32, 64), torch.randn(4, 64, 32)


def _fp32_choices() -> dict:
    "product -> (key, record) of the fp32 expert-GEMM choices made in this process."
    return {k.rsplit("-", 1)[1]: (k, v) for k, v in K.kernel_choices().items() if k.startswith("fp32_gemm/")}


@pytest.fixture
def fp32_choice(choice_cache, monkeypatch):
    "A process with no fp32 expert-GEMM choice made yet, none forced by the environment; the paths are reset after."
    monkeypatch.delenv("FLANMOE_PATH_FP32_GEMM", raising=False)
    G._FP32_CLASS.clear(); X._CHOICES.clear()
    yield
    K.set_cpu_gemm("auto")


@pytest.mark.skipif(not K.extension_available() or not K.cpu_gemm_info()["supported"], reason="no own fp32 CPU kernels to choose from")
def test_fp32_expert_ffn_chooses_its_gemm_path_by_measurement_unless_pinned(fp32_choice, monkeypatch):
    "The fp32 expert GEMMs are measured per shape class and product (own ISAs and BLAS), the fastest of each is set (a tie keeps the widest ISA); a pinned mode is not overridden."
    x, idx, gs, w_in, w_out = _fp32_expert_block()
    supported = K.cpu_gemm_info()["supported"]
    ref = K.expert_ffn_reference(x, idx, gs, None, w_in, w_out)
    torch.testing.assert_close(K.expert_ffn(x, idx, gs, None, w_in, w_out), ref, atol=1e-4, rtol=1e-4)
    recs = _fp32_choices()
    assert set(recs) == set(G.GEMM_PRODUCTS)
    for p, (key, rec) in recs.items():
        assert rec["source"] == "measured" and set(rec["ms"]) == {*supported, "blas"}
        fastest, ms = min(rec["ms"], key=rec["ms"].get), rec["ms"]
        assert rec["choice"] == (fastest if ms[fastest] <= 0.95 * ms[supported[-1]] else supported[-1])
        assert X._C.expert_gemm_active(p) == rec["choice"]
    assert K.kernel_paths()["fp32_expert_gemm"] == X._C.expert_gemm_active()
    # the cached choices are read back without drawing the measuring operands (a cache hit costs no random draw)
    G._FP32_CLASS.clear(); X._CHOICES.clear(); X._C.set_expert_gemm("follow")
    with monkeypatch.context() as m:
        m.setattr(torch, "randn", lambda *a, **k: pytest.fail("a cache hit drew measuring operands"))
        K.expert_ffn(x, idx, gs, None, w_in, w_out)
    for p, (key, rec) in recs.items():
        assert K.kernel_choices()[key]["source"] == "cache" and X._C.expert_gemm_active(p) == rec["choice"]
    # a forced slow path (the environment) is what runs, for every product; pinned by the user, nothing is measured
    G._FP32_CLASS.clear(); monkeypatch.setenv("FLANMOE_PATH_FP32_GEMM", "blas")
    K.expert_ffn(x, idx, gs, None, w_in, w_out)
    assert X._C.expert_gemm_active() == "blas" and all(K.kernel_choices()[k]["source"] == "environment" for k, _ in recs.values())
    monkeypatch.delenv("FLANMOE_PATH_FP32_GEMM"); X._CHOICES.clear()
    with K.use_cpu_gemm("avx2"):
        torch.testing.assert_close(K.expert_ffn(x, idx, gs, None, w_in, w_out), ref, atol=1e-4, rtol=1e-4)
        assert X._C.expert_gemm_active() == "avx2" and not K.kernel_choices()
    assert not G._CPU_GEMM["pinned"]


@pytest.mark.skipif(not K.extension_available() or not K.cpu_gemm_info()["supported"], reason="no own fp32 CPU kernels to choose from")
def test_fp32_gemm_choices_come_back_after_a_pin_without_the_cache_file(fp32_choice, monkeypatch):
    "A pin in and out (`use_cpu_gemm`, as the bench's blas method does) runs the pinned path inside, then the choices this process made, not re-read from the file on every call."
    x, idx, gs, w_in, w_out = _fp32_expert_block()
    K.expert_ffn(x, idx, gs, None, w_in, w_out)
    chosen = {p: rec["choice"] for p, (_, rec) in _fp32_choices().items()}
    with K.use_cpu_gemm("blas"):
        K.expert_ffn(x, idx, gs, None, w_in, w_out)
        assert X._C.expert_gemm_active() == "blas"
    monkeypatch.setattr(X, "_read_cache", lambda machine: pytest.fail("the cache file was read again after a pin"))
    K.expert_ffn(x, idx, gs, None, w_in, w_out)
    assert {p: X._C.expert_gemm_active(p) for p in chosen} == chosen


@pytest.mark.skipif(not K.extension_available() or not K.cpu_gemm_info()["supported"], reason="no own fp32 CPU kernels to choose from")
def test_fp32_gemm_choice_is_per_product_and_never_a_forced_slow_path(fp32_choice, monkeypatch):
    "Made slow for one product only (own kernels for w_in's input gradient, BLAS for w_out's forward), a path is not chosen for that product."
    import time
    slow = {"nn_tall": "blas", "nt_wide": K.cpu_gemm_info()["supported"][-1]}     # one product's BLAS, another's widest ISA
    real = G._product
    def product(p, *operands):
        if slow.get(p) == X._C.expert_gemm_active(p): time.sleep(0.02)
        return real(p, *operands)
    monkeypatch.setattr(G, "_product", product)
    x, idx, gs, w_in, w_out = _fp32_expert_block()
    K.expert_ffn(x, idx, gs, None, w_in, w_out)
    recs = _fp32_choices()
    for p, bad in slow.items():
        assert recs[p][1]["choice"] != bad and X._C.expert_gemm_active(p) != bad, (p, recs[p])


@pytest.mark.skipif(not K.extension_available() or not K.cpu_gemm_info()["supported"], reason="no own fp32 CPU kernels to choose from")
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_fp32_gemm_choice_measures_plain_and_gated_experts(fp32_choice, activation):
    "Measured (not the deterministic default), the choice runs every product on the block's own weights: gated experts have w_in [E, d, 2f] and w_out [E, f, d]."
    torch.manual_seed(0)
    gated = activation == "swiglu"
    x, idx, gs = torch.randn(96, 32), torch.arange(96), torch.tensor([24, 24, 24, 24])
    w_in, w_out = torch.randn(4, 32, 128 if gated else 64) * 0.2, torch.randn(4, 64, 32) * 0.2
    ref = K.expert_ffn_reference(x, idx, gs, None, w_in, w_out, activation)
    torch.testing.assert_close(K.expert_ffn(x, idx, gs, None, w_in, w_out, activation), ref, atol=1e-4, rtol=1e-4)
    assert {rec["source"] for _, rec in _fp32_choices().values()} == {"measured"} and set(_fp32_choices()) == set(G.GEMM_PRODUCTS)


@pytest.mark.skipif(not K.extension_available() or not K.cpu_gemm_info()["supported"], reason="no own fp32 CPU kernels")
def test_fp32_gemm_paths_apply_per_product():
    "With one path per product (forward, input gradient, weight gradient; wide and tall weight), each product runs on its own path: bitwise the result of that path set for all."
    isa = K.cpu_gemm_info()["supported"][-1]
    torch.manual_seed(0)
    def operands(N, D, F):
        return (torch.randn(N, D), torch.randn(3, D, F), torch.randn(3, F, D), torch.randn(N, F), torch.randn(N, F), torch.randn(N, D),
                torch.tensor([N // 2, 0, N - N // 2]))
    candidates = [operands(*shape) for shape in [(10, 1000, 1100), (2000, 40, 72), (5, 700, 64), (2000, 700, 48), (10, 1100, 1000)]]
    try:
        def run(p, mode, ops):
            X._C.set_expert_gemm(mode); return G._product(p, *ops)
        # per product, operands on which the two paths round differently (BLAS blocks the depth its own way), so the
        # test can tell which path ran; where this machine's BLAS agrees bitwise everywhere, that product is left out
        seen = {}
        for p in G.GEMM_PRODUCTS:
            for ops in candidates:
                if not torch.equal(a := run(p, isa, ops), b := run(p, "blas", ops)): seen[p] = (ops, {isa: a, "blas": b}); break
        if len(seen) < 2: pytest.skip(f"BLAS and {isa} agree bitwise on the products {set(G.GEMM_PRODUCTS) - set(seen)} here")
        names = list(G.GEMM_PRODUCTS)
        for mixed in ({p: (isa, "blas")[i % 2] for i, p in enumerate(names)}, {p: ("blas", isa)[i % 2] for i, p in enumerate(names)},
                      {p: (isa, "blas")[i // 2 % 2] for i, p in enumerate(names)}):
            for p, m in mixed.items(): assert X._C.set_expert_gemm(m, p)
            assert X._C.expert_gemm_active() == ",".join(f"{p}={m}" for p, m in mixed.items())
            for p, (ops, out) in seen.items(): assert torch.equal(G._product(p, *ops), out[mixed[p]]), (p, mixed)
        assert X._C.set_expert_gemm("blas", "nt") and X._C.expert_gemm_active("nt_wide") == X._C.expert_gemm_active("nt_tall") == "blas"
        assert not X._C.set_expert_gemm("blas", "nx") and not X._C.set_expert_gemm("nope", "nn_wide")
        with pytest.raises(ValueError, match="product must be"): X._C.expert_gemm_active("nn")
    finally:
        X._C.set_expert_gemm("follow")


@pytest.mark.skipif(not K.extension_available() or not K.cpu_gemm_info()["supported"], reason="no own fp32 CPU kernels")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_nn_kernels_agree_bitwise(isa):
    """The NN kernel's paths give the same bits, relu or not: with the weight prefetch switch off, few rows (<= 64) against
    a weight of >= 1 MiB take the streamed kernel (weight read in place), other shapes the block copy; with it on, always
    the block copy prefetching its next block (next depth block, next column block, none at the end)."""
    if isa not in K.cpu_gemm_info()["supported"]: pytest.skip(f"no {isa}")
    torch.manual_seed(0)
    before = X._C.gemm_prefetch_active()
    try:
        X._C.set_expert_gemm(isa)
        for M, D, N in [(32, 512, 2048), (64, 700, 1500), (5, 2048, 512), (1, 300, 900), (50, 257, 1031), (7, 100, 3000),
                        (1, 64, 4101), (200, 130, 70), (97, 65, 2049)]:
            a, w = torch.randn(M, D), torch.randn(2, D, N) * D ** -0.5
            gs = torch.tensor([M - M // 3, M // 3])
            runs = []
            for blocked in (False, True):
                X._C.set_gemm_prefetch(blocked)
                runs.append((torch.ops.flanmoe.grouped_mm(a, w, gs, False), torch.ops.flanmoe.relu_grouped_mm(a, w, gs)))
            for relu, out in zip((False, True), runs[0]):
                aa = a.relu() if relu else a
                torch.testing.assert_close(out, torch.cat([aa[:M - M // 3] @ w[0], aa[M - M // 3:] @ w[1]]), atol=1e-4, rtol=1e-4)
            assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), (M, D, N)
    finally:
        X._C.set_gemm_prefetch(before); X._C.set_expert_gemm("follow")


@pytest.mark.skipif(not K.extension_available() or not K.cpu_gemm_info()["supported"], reason="no own fp32 CPU kernels")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_tn_streamed_stores_agree_bitwise(isa):
    """The weight gradients written with non-temporal stores (FLANMOE_GEMM_STREAM=on) are the same bits as with ordinary
    ones, relu or not: depths of one pass (streamed) and more (not), column counts that leave a masked tail, a group
    split over column ranges that start off the 64-byte grid, empty groups; 'auto' streams only past the last-level cache."""
    if isa not in K.cpu_gemm_info()["supported"]: pytest.skip(f"no {isa}")
    torch.manual_seed(0)
    before = X._C.gemm_stream_mode()
    try:
        X._C.set_expert_gemm(isa)
        for sizes, P, N in [([32, 5, 0, 17], 512, 2048), ([64, 1], 96, 1000), ([65, 3], 40, 48), ([7], 33, 31),
                            ([200, 0], 130, 70), ([1, 2, 3], 2048, 512)]:
            gs = torch.tensor(sizes); M = sum(sizes)
            a, dy = torch.randn(M, P), torch.randn(M, N)
            runs = []
            for mode in ("off", "on"):
                assert X._C.set_gemm_stream(mode) and X._C.gemm_stream_mode() == mode
                runs.append((torch.ops.flanmoe.grouped_mm_wgrad(a, dy, gs),
                             torch.ops.flanmoe.relu_grouped_mm_backward(dy, a, torch.randn(len(sizes), P, N), gs, False, True)[1]))
            torch.testing.assert_close(runs[0][0], K.grouped_mm_wgrad_reference(a, dy, gs), atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(runs[0][1], K.grouped_mm_wgrad_reference(a.relu(), dy, gs), atol=1e-3, rtol=1e-4)
            assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), (sizes, P, N)
        # one group's columns cut in pieces (a single expert with all the rows: 2 threads split its 2048 columns at 1024,
        # and a 1023-column gradient at 511, off the 64-byte grid)
        for N in (2048, 1023):
            a, dy, gs = torch.randn(48, 256), torch.randn(48, N), torch.tensor([48])
            X._C.set_gemm_stream("off"); ref = torch.ops.flanmoe.grouped_mm_wgrad(a, dy, gs)
            X._C.set_gemm_stream("on"); assert torch.equal(torch.ops.flanmoe.grouped_mm_wgrad(a, dy, gs), ref)
        assert not X._C.set_gemm_stream("sometimes") and X._C.gemm_stream_mode() == "on"
        assert X._C.last_level_cache_bytes() > 0
        paths = K.kernel_paths()                       # what a run's train.json and every bench's machine line record
        assert paths["fp32_weight_grad_stores"] == "on" and paths["last_level_cache_bytes"] == X._C.last_level_cache_bytes()
        assert paths["fp32_nt_prefetch"] == X._C.nt_prefetch_active()
    finally:
        X._C.set_gemm_stream(before); X._C.set_expert_gemm("follow")


@pytest.mark.skipif(not K.extension_available() or not K.cpu_gemm_info()["supported"], reason="no own fp32 CPU kernels")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_nt_prefetch_agrees_bitwise(isa):
    """The NT kernel's prefetch of its weight's next rows (rows of <= 4 KiB) changes no bit: with and without it, with the
    relu mask, for tile counts that leave single-column tails, and a weight with fewer rows than one tile."""
    if isa not in K.cpu_gemm_info()["supported"]: pytest.skip(f"no {isa}")
    torch.manual_seed(0)
    before = X._C.nt_prefetch_active()
    try:
        X._C.set_expert_gemm(isa)
        for M, Kd, N in [(32, 512, 2048), (64, 1024, 100), (5, 2048, 512), (70, 1025, 37), (1, 64, 7), (33, 300, 6001)]:
            dy, w, h = torch.randn(M, Kd), torch.randn(2, N, Kd) * Kd ** -0.5, torch.randn(M, N)
            gs = torch.tensor([M - M // 3, M // 3])
            runs = []
            for on in (True, False):
                X._C.set_nt_prefetch(on); assert X._C.nt_prefetch_active() == on
                runs.append((torch.ops.flanmoe.grouped_mm(dy, w, gs, True),
                             torch.ops.flanmoe.relu_grouped_mm_backward(dy, h, w, gs, True, False)[0]))
            ref = torch.cat([dy[:M - M // 3] @ w[0].T, dy[M - M // 3:] @ w[1].T])
            torch.testing.assert_close(runs[0][0], ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(runs[0][1], torch.where(h > 0, ref, 0.0), atol=1e-4, rtol=1e-4)
            assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), (M, Kd, N)
    finally:
        X._C.set_nt_prefetch(before); X._C.set_expert_gemm("follow")


def test_gemm_stream_env_names_a_bad_value(monkeypatch):
    "FLANMOE_GEMM_STREAM set to a mode that does not exist is named in a warning (the kernels then use 'auto')."
    if X._C is None: pytest.skip("no extension")
    monkeypatch.setenv("FLANMOE_GEMM_STREAM", "sometimes")
    with pytest.warns(UserWarning, match="FLANMOE_GEMM_STREAM='sometimes'"): G._check_gemm_env()
    monkeypatch.setenv("FLANMOE_GEMM_STREAM", "off")
    with warnings.catch_warnings(): warnings.simplefilter("error"); G._check_gemm_env()


def test_extension_stamp_follows_the_sources_not_the_build_time():
    """Cached kernel choices are keyed by the hash of the sources the build recorded (a rebuild of the same code keeps
    them, new code is measured again); a build that recorded none falls back to the library's size and build time."""
    if X._C is None: pytest.skip("no extension")
    assert X._extension_stamp({"sources": "abc123"}) == "src-abc123"
    size_time = X._extension_stamp({})
    assert size_time.startswith(f"{Path(X._C.__file__).stat().st_size}-")
    recorded = X._build_info().get("sources")
    assert X.machine_fingerprint()["extension"] == (f"src-{recorded}" if recorded else size_time)


@pytest.mark.skipif(not K.extension_available() or not K.cpu_gemm_info()["supported"], reason="no own fp32 CPU kernels to choose from")
def test_measuring_a_kernel_path_leaves_the_global_rng_alone(choice_cache, monkeypatch):
    "The first expert block of a shape class measures the paths; dropout drawn after it must not depend on whether it did."
    monkeypatch.delenv("FLANMOE_PATH_FP32_GEMM", raising=False)
    x, idx, gs, w_in, w_out = _fp32_expert_block()
    draws = []
    for _ in range(2):                                  # first: measured; second: from the cache
        G._FP32_CLASS.clear(); X._CHOICES.clear()
        torch.manual_seed(5); K.expert_ffn(x, idx, gs, None, w_in, w_out); draws.append(torch.rand(4))
    assert K.kernel_choices() and torch.equal(*draws)
    K.set_cpu_gemm("auto")
