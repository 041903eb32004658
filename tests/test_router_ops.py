"""The router's compiled projection (`router_linear`, its one-pass backward, and the join `_C.router_join` that
`routing.router_project` runs) vs `F.linear`: random shapes on every CPU kernel copy, both shares of x's gradient,
the in-place sum, gradcheck, opcheck, bad input, and an MoE layer's gradients with and without the kernels."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck

import flanmoe_nb.kernels as K
from flanmoe_nb.extension import _C
from flanmoe_nb.moe import MoEConfig, MoELayer
from flanmoe_nb.routing import router_project, _router_join_pays, _router_cast_pays

pytestmark = pytest.mark.skipif(not K.extension_available() or not hasattr(_C, "router_join"),
                                reason="flanmoe_nb._C not built (or built without router_join)")
ops = torch.ops.flanmoe
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODES = ["blas"] + (K.cpu_gemm_info()["supported"] if K.extension_available() else [])   # baseline, avx2, avx512


def _case(T, d, E, bias, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d + 3 * strided, generator=g, dtype=dtype)[:, :d]    # strided: rows d + 3 apart
    w = torch.randn(E, d, generator=g, dtype=dtype)
    b = torch.randn(E, generator=g, dtype=dtype) if bias else None
    gl, gt = torch.randn(T, E, generator=g, dtype=dtype), torch.randn(T, d, generator=g, dtype=dtype)
    return x, w, b, gl, gt


def _grads(fn, x, w, b, gl, gt, perm):
    "Logits and the gradients of <logits, gl> + <tokens[perm], gt> (the tokens read as an expert dispatch reads them)."
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)] + ([b.detach().clone().requires_grad_()] if b is not None else [])
    logits, tokens = fn(*leaves[:2], leaves[2] if b is not None else None)
    loss = (logits * gl).sum() + (tokens[perm] * gt).sum()
    return (logits.detach(), *torch.autograd.grad(loss, leaves))


def _reference(x, w, b): return F.linear(x, w, b), x


@HYP
@given(T=st.integers(0, 70), d=st.integers(1, 80), E=st.integers(1, 40), bias=st.booleans(), strided=st.booleans(),
       mode=st.sampled_from(MODES), seed=st.integers(0, 2**16))
def test_join_matches_linear_on_every_kernel_copy(T, d, E, bias, strided, mode, seed):
    x, w, b, gl, gt = _case(T, d, E, bias, torch.float32, seed, strided)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    with K.use_cpu_gemm(mode):
        got = _grads(_C.router_join, x, w, b, gl, gt, perm)
    want = _grads(_reference, *(t.double() if t is not None else None for t in (x, w, b, gl, gt)), perm)
    for a, r in zip(got, want):
        assert a.shape == r.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, r.float(), atol=1e-4 * max(1, d, T) ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,d,E", [(4096, 512, 8), (300, 512, 32), (257, 130, 128), (1, 1, 1), (5, 17, 3)])
def test_join_at_layer_shapes_and_float64(mode, T, d, E):
    "The model's shapes (a router of 8-128 experts over d=512), odd sizes, one token; float64 bit-near."
    for dtype, tol in ((torch.float32, 2e-4), (torch.float64, 1e-10)):
        x, w, b, gl, gt = _case(T, d, E, True, dtype, 1)
        perm = torch.randperm(T)
        with K.use_cpu_gemm(mode):
            got = _grads(_C.router_join, x, w, b, gl, gt, perm)
        want = _grads(_reference, *(t.double() for t in (x, w, b, gl, gt)), perm)
        for a, r in zip(got, want):
            torch.testing.assert_close(a, r.to(dtype), atol=tol * d ** 0.5, rtol=tol)


def test_tokens_are_a_view_and_each_share_alone_is_right():
    x, w, _, gl, gt = _case(9, 12, 4, False, torch.float32, 3)
    x.requires_grad_()
    logits, tokens = _C.router_join(x, w, None)
    assert tokens._is_view() and tokens.data_ptr() == x.data_ptr() and torch.equal(tokens, x)
    (g_only_logits,) = torch.autograd.grad((logits * gl).sum(), x)
    torch.testing.assert_close(g_only_logits, gl @ w)
    logits, tokens = _C.router_join(x, w, None)
    (g_only_tokens,) = torch.autograd.grad((tokens * gt).sum(), x)
    assert torch.equal(g_only_tokens, gt)
    logits, tokens = _C.router_join(x, w, None)        # the logits alone through the op's own autograd
    assert torch.equal(ops.router_linear(x, w).detach(), logits.detach())


def test_the_experts_gradient_receives_the_routers_share_in_place():
    "x's gradient is the experts' fresh gradient with dlogits @ W added into it by the router's backward: no add pass."
    x, w, _, gl, gt = _case(64, 32, 8, False, torch.float32, 5)
    x.requires_grad_()
    logits, tokens = _C.router_join(x, w, None)
    loss = (logits * gl).sum() + (tokens * 2 * gt).sum()               # d(tokens) = 2 gt, a fresh tensor
    with torch.profiler.profile() as prof:
        loss.backward()
    names = {e.name for e in prof.events()}
    assert "flanmoe::router_linear_backward" in names
    assert not names & {"aten::add", "aten::add_"}, names
    torch.testing.assert_close(x.grad, 2 * gt + gl @ w)


def test_a_shared_gradient_is_not_written_into():
    "When the view's gradient is held elsewhere (here: the caller's own upstream tensor), the sum goes to a new tensor."
    x, w, _, gl, gt = _case(10, 6, 3, False, torch.float32, 6)
    x.requires_grad_()
    logits, tokens = _C.router_join(x, w, None)
    keep = gt.clone()
    torch.autograd.backward([logits, tokens], [gl, gt])
    assert torch.equal(gt, keep)                                        # the upstream gradient is unchanged
    torch.testing.assert_close(x.grad, gt + gl @ w)


def test_gradcheck_and_double_backward():
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((6, 7), (3, 7), (3,)))
    assert torch.autograd.gradcheck(lambda x, w, b: _C.router_join(x, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: ops.router_linear(x, w, b), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w: _C.router_join(x, w, None), (x, w))


def test_weight_gradient_bits_do_not_depend_on_the_thread_count():
    x, w, _, gl, gt = _case(3000, 64, 16, False, torch.float32, 7)
    n = torch.get_num_threads()
    out = []
    for threads in (1, n):
        torch.set_num_threads(threads)
        try: out.append(ops.router_linear_backward(gl, x, w, None, True, True, False))
        finally: torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 8), torch.randn(3, 8), torch.randn(3)
    cases = [("router_linear", (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_())),
             ("router_linear", (x.double(), w.double(), None)),
             ("router_linear_backward", (torch.randn(6, 3), x, w, None, True, True, True)),
             ("router_linear_backward", (torch.randn(6, 3), x, w, torch.randn(6, 8), True, True, False))]
    name, args = cases[case]
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("args,msg", [
    (lambda: (torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)), "x must be float32 or float64"),
    (lambda: (torch.randn(4, 8), torch.randn(3, 7)), "weight must be \\[num_experts, 8\\]"),
    (lambda: (torch.randn(4, 8), torch.randn(3, 8).double()), "weight must have the dtype of x"),
    (lambda: (torch.randn(8, 4).t(), torch.randn(3, 8)), "x must have a contiguous last dimension"),
    (lambda: (torch.randn(4, 8), torch.randn(3, 8), torch.randn(4)), "bias must be \\[num_experts\\] = \\[3\\]"),
    (lambda: (torch.randn(2, 4, 8), torch.randn(3, 8)), "x must be a 2-D tensor"),
])
def test_bad_input_names_the_argument(args, msg):
    with pytest.raises(ValueError, match=msg):
        ops.router_linear(*args())


def test_backward_bad_input_names_the_argument():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="grad must be \\[rows of x, rows of weight\\] = \\[4, 3\\]"):
        ops.router_linear_backward(torch.randn(4, 2), x, w, None, True, True, False)
    with pytest.raises(ValueError, match="dx_acc must be a contiguous tensor of the shape of x"):
        ops.router_linear_backward(torch.randn(4, 3), x, w, torch.randn(4, 7), True, True, False)


def test_router_project_runs_the_join_only_where_it_applies():
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    assert _router_join_pays(x, w, None, torch.float32, False)
    assert not _router_join_pays(x, w, None, torch.float32, True)                      # jitter: the composite
    assert not _router_join_pays(x.bfloat16(), w, None, torch.float32, False)          # x not in the router's dtype
    assert not _router_join_pays(x, w, None, torch.bfloat16, False)
    logits, tokens = router_project(x, w, jitter_eps=0.1, training=True)
    assert tokens is x and logits.shape == (5, 3)
    l1, t1 = router_project(x, w)
    l2, t2 = router_project(x, w, use_kernels=False)
    assert t1 is not x and t1.data_ptr() == x.data_ptr() and t2 is x
    torch.testing.assert_close(l1, l2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_low_precision_tokens_take_the_projection_on_an_fp32_copy(dtype, bias):
    "bf16 / fp16 x with an fp32 router: the compiled projection of x cast to fp32 equals the composite (F.linear in fp32), gradients included; x's gradient comes back in x's dtype."
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 70, generator=g).to(dtype).requires_grad_()
    w = torch.randn(9, 70, generator=g).requires_grad_()
    b = torch.randn(9, generator=g).requires_grad_() if bias else None
    assert _router_cast_pays(x, w, b, torch.float32, False)
    assert not _router_cast_pays(x, w, b, torch.float32, True)                   # jitter: the composite
    assert not _router_cast_pays(x.float(), w, b, torch.float32, False)          # fp32 x: the join instead
    assert not _router_cast_pays(x, w, b, torch.bfloat16, False)                 # a low-precision router: the composite
    dl = torch.randn(300, 9, generator=g)
    outs = []
    for kernels in (True, False):
        logits, tokens = router_project(x, w, b, use_kernels=kernels)
        assert tokens is x and logits.dtype == torch.float32
        outs.append((logits, *torch.autograd.grad(logits, [t for t in (x, w, b) if t is not None], dl)))
    for a, r in zip(*outs):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4) if a.dtype == torch.float32 else torch.testing.assert_close(a, r)


@pytest.mark.parametrize("preset,kw", [("switch", {}), ("switch", dict(router_bias=True, jitter_eps=0.0)),
                                       ("gshard", dict(second_policy="all")), ("expert_choice", {}), ("st_moe", {})])
def test_layer_gradients_with_and_without_the_kernels(preset, kw):
    "A training step's gradients (input, router, experts) agree between the compiled path and the reference ops."
    grads = []
    for use_kernels in (True, False):
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig.preset(preset, 16, 32, 4, use_kernels=use_kernels, **kw)).train()
        x = torch.randn(2, 12, 16, requires_grad=True)
        y, aux = layer(x)
        (y.square().sum() + aux.balance_loss + aux.z_loss).backward()
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
