"""The compiled dense-layer ops of the T5 model (fused attention, RMS norm, token cross-entropy, dense_mm) vs
their pure-PyTorch twins: random shapes on every CPU kernel copy, gradcheck, opcheck, torch.compile, bad input,
and the model with and without them."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck

import flanmoe_nb.kernels as K
import flanmoe_nb.gemm as G
import flanmoe_nb.layer_ops as L

pytestmark = pytest.mark.skipif(not K.extension_available(), reason="flanmoe_nb._C not built")
ops = torch.ops.flanmoe
HYP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODES = ["blas"] + (K.cpu_gemm_info()["supported"] if K.extension_available() else [])   # baseline, avx2, avx512
MIN32 = torch.finfo(torch.float32).min


def _qkv(B, Lq, Lk, H, D, dtype, seed, packed):
    "q, k, v as [B, L, H, D]; with `packed` (Lq == Lk) strided views of one [B, L, 3, H, D] tensor, like a fused projection."
    g = torch.Generator().manual_seed(seed)
    if packed and Lq == Lk:
        return torch.randn(B, Lq, 3, H, D, generator=g, dtype=dtype).unbind(2)
    return (torch.randn(B, Lq, H, D, generator=g, dtype=dtype), torch.randn(B, Lk, H, D, generator=g, dtype=dtype),
            torch.randn(B, Lk, H, D, generator=g, dtype=dtype))


def _bias(kind, B, H, Lq, Lk, dtype, seed):
    g = torch.Generator().manual_seed(seed + 7)
    if kind == "none": return None
    if kind == "shared": return torch.randn(1, H, Lq, Lk, generator=g, dtype=dtype)      # T5 position bias
    if kind == "keymask":                                                                 # cross-attention padding
        return torch.where(torch.rand(B, 1, 1, Lk, generator=g) < 0.3, torch.finfo(dtype).min / 2, 0.0).to(dtype)
    b = torch.randn(B, H, Lq, Lk, generator=g, dtype=dtype)                              # bias + causal mask
    return b + torch.triu(torch.full((Lq, Lk), torch.finfo(dtype).min / 2, dtype=dtype), 1)   # (half min, as the model's)


def _grads(fn, q, k, v, bias, go, key_mask=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = fn(*leaves, b) if key_mask is None else fn(*leaves, b, key_mask)
    gr = torch.autograd.grad(y, leaves + ([b] if b is not None else []), go)
    return y.detach(), gr


# ---------------------------------------------------------------- attention
@HYP
@given(B=st.integers(0, 3), H=st.integers(1, 4), Lq=st.integers(0, 70), Lk=st.integers(0, 70), D=st.integers(1, 40),
       bias=st.sampled_from(["none", "shared", "keymask", "full"]), key_mask=st.booleans(), packed=st.booleans(),
       mode=st.sampled_from(MODES), seed=st.integers(0, 2**16))
def test_attention_equals_reference(B, H, Lq, Lk, D, bias, key_mask, packed, mode, seed):
    q, k, v = _qkv(B, Lq, Lk, H, D, torch.float32, seed, packed)
    bb = _bias(bias, B, H, Lq, Lk, torch.float32, seed)
    g = torch.Generator().manual_seed(seed + 3)
    go = torch.randn(B, Lq, H, D, generator=g)
    km = torch.where(torch.rand(B, Lk, generator=g) < 0.3, MIN32 / 2, 0.0) if key_mask else None   # padded keys (half min, as the model's)
    with K.use_cpu_gemm(mode):
        y, g = _grads(K.attention, q, k, v, bb, go, km)
    y64, g64 = _grads(K.attention_reference, *(t.double() for t in (q, k, v)), None if bb is None else bb.double(),
                      go.double(), None if km is None else km.double())
    assert y.shape == (B, Lq, H, D) and y.dtype == torch.float32
    torch.testing.assert_close(y, y64.float(), atol=2e-5, rtol=1e-4)
    for a, b in zip(g, g64):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b.float(), atol=5e-5, rtol=1e-4)


@HYP
@given(B=st.integers(0, 3), H=st.integers(1, 4), L=st.integers(0, 40), D=st.integers(1, 24),
       bias=st.sampled_from(["none", "shared", "full"]), key_mask=st.booleans(), dropout=st.sampled_from([0.0, 0.3]),
       mode=st.sampled_from(MODES), seed=st.integers(0, 2**16))
def test_attention_qkv_equals_attention_on_the_unbound_views(B, H, L, D, bias, key_mask, dropout, mode, seed):
    "Packed self attention: the same output and gradients (dqkv as one tensor, the bias's) as attention on qkv.unbind(2)."
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3, H, D, generator=g)
    bb = _bias(bias, B, H, L, L, torch.float32, seed)
    km = torch.where(torch.rand(B, L, generator=g) < 0.3, MIN32 / 2, 0.0) if key_mask else None
    go = torch.randn(B, L, H, D, generator=g)
    out = []
    for packed in (True, False):
        x = qkv.clone().requires_grad_()
        b = None if bb is None else bb.clone().requires_grad_()
        torch.manual_seed(seed)                                    # the same dropout draw for both
        with K.use_cpu_gemm(mode):
            y = K.attention_qkv(x, b, km, dropout) if packed else K.attention(*x.unbind(2), b, km, dropout)
            out.append((y.detach(), *torch.autograd.grad(y, [x] + ([b] if b is not None else []), go)))
    for a, r in zip(*out):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-6)


def test_attention_qkv_gradcheck_opcheck_and_bad_input():
    qkv = torch.randn(2, 5, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, b: ops.attention_qkv(t, b)[0], (qkv, bias))
    torch.library.opcheck(ops.attention_qkv.default, (torch.randn(2, 5, 3, 2, 4, requires_grad=True),
                                                      torch.randn(1, 2, 5, 5, requires_grad=True), torch.randn(2, 5)))
    x = torch.randn(2, 5, 3, 2, 4)
    _, p = ops.attention_qkv(x, None)
    torch.library.opcheck(ops.attention_qkv_backward.default, (torch.randn(2, 5, 2, 4), x, p, False))
    dqkv, _ = ops.attention_qkv_backward(torch.randn(2, 5, 2, 4), x, p, False)
    assert dqkv.shape == x.shape and dqkv.is_contiguous()
    with pytest.raises(ValueError, match="qkv must be a 5-D tensor \\[B, L, 3, H, D\\]"):
        K.attention_qkv(torch.randn(2, 5, 2, 4))
    with pytest.raises(ValueError, match="qkv must be \\[B, L, 3, H, D\\]"):
        ops.attention_qkv(torch.randn(2, 5, 2, 2, 4))
    with pytest.raises(ValueError, match="attention_qkv: key_mask must be an additive \\[B, Lk\\] = \\[2, 5\\]"):
        K.attention_qkv(x, None, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="dout must be \\[B, Lq, H, D\\] = \\[2, 5, 2, 4\\]"):
        ops.attention_qkv_backward(torch.randn(2, 4, 2, 4), x, p, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):                 # not the op: attention's fallback (SDPA)
        assert K.attention_qkv(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", MODES)
def test_attention_float64_gradcheck(mode):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, L, 3, 5, dtype=torch.float64, requires_grad=True) for L in (4, 6, 6))
    bias = torch.randn(1, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    with K.use_cpu_gemm(mode):
        assert torch.autograd.gradcheck(K.attention, (q, k, v, bias))
        assert torch.autograd.gradcheck(lambda q, k, v: K.attention(q, k, v), (q, k, v))


def test_attention_fully_masked_rows_and_nonfinite_values_like_the_composite():
    q, k, v = _qkv(2, 5, 9, 2, 16, torch.float32, 0, False)
    bias = torch.zeros(2, 2, 5, 9)
    bias[0, :, 1] = MIN32                  # a row with every key masked: uniform, as softmax of equal scores
    bias[1, 0, :, 3] = MIN32               # one key masked everywhere: weight exactly 0
    qn = q.clone(); qn[1, 2, 1, 0] = float("nan")
    for qq in (q, qn):
        y = K.attention(qq, k, v, bias)
        ref = K.attention_reference(qq, k, v, bias)
        assert torch.equal(y.isnan(), ref.isnan())
        torch.testing.assert_close(y.nan_to_num(), ref.nan_to_num(), atol=1e-5, rtol=1e-5)
    _, probs = ops.attention(q, k, v, bias)
    assert torch.equal(probs[1, 0, :, 3], torch.zeros(5))
    torch.testing.assert_close(probs[0, :, 1], torch.full((2, 9), 1 / 9))


def test_attention_key_mask_apart_from_a_shared_bias():
    "Position bias [1, H, Lq, Lk] + padding mask [B, Lk]: as the summed bias, gradient summed over the batch, any threads."
    q, k, v = _qkv(4, 9, 9, 3, 16, torch.float32, 6, True)
    pos = torch.randn(1, 3, 9, 9) + torch.triu(torch.full((9, 9), MIN32 / 2), 1)   # causal, in the shared part
    km = torch.zeros(4, 9); km[1, 5:] = MIN32 / 2; km[2, 0] = MIN32 / 2        # row 0 of sequence 2: its key masked twice
    go = torch.randn(4, 9, 3, 16)
    y, g = _grads(K.attention, q, k, v, pos, go, km)
    full = pos + km[:, None, None, :]                                           # the model's AttnBias.full()
    y_ref, g_ref = _grads(K.attention_reference, q, k, v, full, go)
    assert y.isfinite().all()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g[:3], g_ref[:3]): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert g[3].shape == (1, 3, 9, 9)
    torch.testing.assert_close(g[3], g_ref[3].sum(0, keepdim=True), atol=1e-5, rtol=1e-5)
    _, p = ops.attention(q, k, v, pos, km)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(ops.attention_backward(go, q, k, v, p, True, False)[3])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="key_mask must be an additive"):
        K.attention(q, k, v, pos, km[:, :5])
    with pytest.raises(ValueError, match="key_mask must not require a gradient"):
        K.attention(q, k, v, pos, km.clone().requires_grad_())
    with pytest.raises(ValueError, match="key_mask must be"):
        ops.attention(q, k, v, pos, km[:, :5])


@pytest.mark.parametrize("mode", MODES)
def test_attention_dropout_is_dropout_on_the_probabilities(mode):
    "Same seed, same mask as `kernels.dropout` of the probabilities in the composite; gradients through them; gradcheck."
    q, k, v = _qkv(3, 7, 11, 2, 24, torch.float32, 8, False)
    bias = torch.randn(1, 2, 7, 11)
    go = torch.randn(3, 7, 2, 24)
    def composite(q, k, v, b):
        s = torch.einsum("bihd,bjhd->bhij", q, k) + b
        return torch.einsum("bhij,bjhd->bihd", K.dropout(s.softmax(-1), 0.3, True), v)
    with K.use_cpu_gemm(mode):
        torch.manual_seed(5); y, g = _grads(lambda *t: K.attention(*t, dropout=0.3), q, k, v, bias, go)
    torch.manual_seed(5); y_ref, g_ref = _grads(composite, q, k, v, bias, go)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, g_ref): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    mult = (torch.rand(2, 3, 4, 5, dtype=torch.float64) > 0.25).double() / 0.75
    qd, kd, vd = (torch.randn(2, L, 3, 6, dtype=torch.float64, requires_grad=True) for L in (4, 5, 5))
    bd = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.attention(*t, None, mult)[0], (qd, kd, vd, bd))
    torch.testing.assert_close(ops.attention(qd, kd, vd, bd, None, mult)[0], K.attention_reference(qd, kd, vd, bd, None, mult))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        K.attention(q, k, v, bias, dropout=1.0)
    with pytest.raises(ValueError, match="dropout_mult must be a contiguous"):
        ops.attention(q, k, v, bias, None, torch.ones(3, 2, 7, 10))


def test_model_with_attention_dropout_equals_the_composite(monkeypatch):
    import flanmoe_nb.model as M
    torch.manual_seed(0)
    cfg = M.ModelConfig.preset("tiny", moe=dict(num_experts=4, top_k=1), dropout=0.1)
    model = M.EncoderDecoder(cfg).train()
    x = torch.randint(2, cfg.vocab_size, (2, 9)); y = torch.randint(2, cfg.vocab_size, (2, 5))
    def run():
        model.zero_grad(set_to_none=True); torch.manual_seed(11)
        out = model(input_ids=x, labels=y); out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    fused = run()
    def twin(q, k, v, bias=None, key_mask=None, dropout=0.0):   # the composite, the mask drawn where the op draws it
        mult = K.dropout(torch.ones(q.shape[0], q.shape[2], q.shape[1], k.shape[1]), dropout) if dropout else None
        return K.attention_reference(q, k, v, bias, key_mask, mult)
    monkeypatch.setattr(K, "attention", twin)
    plain = run()
    torch.testing.assert_close(fused[0], plain[0], atol=1e-6, rtol=1e-6)
    for a, b in zip(fused[1], plain[1]): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_attention_probs_are_not_differentiable_and_backward_is_exact_op():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 3, 4, 2, 8, torch.float32, 1, False))
    out, probs = ops.attention(q, k, v, None)
    assert out.requires_grad and not probs.requires_grad
    dq, dk, dv, db = ops.attention_backward(torch.ones_like(out), q.detach(), k.detach(), v.detach(), probs, False)
    assert db.numel() == 0
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(gq, dq) and torch.equal(gk, dk) and torch.equal(gv, dv)


def test_attention_falls_back_to_sdpa_for_bf16_and_autocast():
    q, k, v = _qkv(2, 6, 6, 2, 8, torch.float32, 2, True)
    bias = _bias("shared", 2, 2, 6, 6, torch.float32, 2)
    ref = K.attention_reference(q, k, v, bias)
    y = K.attention(*(t.bfloat16() for t in (q, k, v)), bias)
    assert y.dtype == torch.bfloat16 and not K.attention_kernel_pays(q.bfloat16())
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not K.attention_kernel_pays(q)


def test_attention_bad_input_names_the_argument():
    q, k, v = _qkv(2, 4, 5, 2, 8, torch.float32, 0, False)
    bad = [
        (lambda: ops.attention(q[0], k, v, None), "q must be a 4-D"),
        (lambda: ops.attention(q.bfloat16(), k, v, None), "q must be float32 or float64"),
        (lambda: ops.attention(q, k.double(), v, None), "k must have the dtype of q"),
        (lambda: ops.attention(q, k[:, :, :1], v, None), "k must be [B, Lk, H, D]"),
        (lambda: ops.attention(q, k, v[:, :3], None), "v must have the shape of k"),
        (lambda: ops.attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, None), "q must have a contiguous last dimension"),
        (lambda: ops.attention(q, k, v, torch.zeros(2, 3, 4, 5)), "bias must broadcast"),
        (lambda: ops.attention(q, k, v, torch.zeros(2, 2, 4, 1)), "bias must have Lk = 5"),
        (lambda: ops.attention(q, k, v, torch.zeros(2, 2, 4, 5, dtype=torch.float64)), "bias must have the dtype of q"),
        (lambda: ops.attention_backward(torch.zeros(2, 4, 2, 8), q, k, v, torch.zeros(2, 2, 4, 4), True), "probs must be"),
        (lambda: ops.attention_backward(torch.zeros(2, 4, 2, 7), q, k, v, torch.zeros(2, 2, 4, 5), True), "dout must be [B, Lq, H, D]"),
        (lambda: K.attention(q, k, v, torch.zeros(1, 1, 2, 4, 5)), "bias must broadcast"),
        (lambda: K.attention(q, k[..., None], v), "k must be a 4-D tensor"),
    ]
    for fn, msg in bad:
        with pytest.raises((ValueError, RuntimeError), match=msg.replace("[", r"\[").replace("]", r"\]")):
            fn()


def test_attention_wrapper_broadcasts_bias_of_any_rank_and_layout():
    q, k, v = _qkv(2, 4, 5, 3, 8, torch.float32, 4, False)
    b2 = torch.randn(4, 5)
    ref = K.attention_reference(q, k, v, b2)
    torch.testing.assert_close(K.attention(q, k, v, b2), ref)
    torch.testing.assert_close(K.attention(q, k, v, b2.T.contiguous().T), ref)          # column-major bias
    torch.testing.assert_close(K.attention(q, k, v, torch.zeros(2, 1, 1, 1)), K.attention_reference(q, k, v))


def test_attention_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = (t.detach().requires_grad_() for t in _qkv(2, 6, 6, 2, 8, torch.float32, 5, True))
    bias = torch.randn(1, 2, 6, 6, requires_grad=True)
    fn = lambda q, k, v, b: K.attention(q, k, v, b).square().sum()
    cfn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    g1 = torch.autograd.grad(cfn(q, k, v, bias), (q, k, v, bias))
    g2 = torch.autograd.grad(fn(q, k, v, bias), (q, k, v, bias))
    for a, b in zip(g1, g2): torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- dropout
@HYP
@given(shape=st.sampled_from([(0,), (1,), (7,), (2, 33, 64), (1000, 3)]), p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), seed=st.integers(-2**63, 2**63 - 1))
def test_dropout_equals_its_twin(shape, p, dtype, seed):
    x = torch.randn(shape).to(dtype)
    y = ops.dropout(x, p, seed)
    assert torch.equal(y, K.dropout_reference(x, p, seed)) and torch.equal(y, ops.dropout(x, p, seed))


def test_dropout_rate_gradient_seed_and_errors():
    x = torch.randn(200, 500, requires_grad=True)
    torch.manual_seed(3); y = K.dropout(x, 0.2)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.8) < 0.005                                   # 100k draws: 5 sigma is ~0.006
    (g,) = torch.autograd.grad((y * 2).sum(), x)
    torch.testing.assert_close(g, (y != 0).float() * 2 / 0.8)       # the same mask, scaled
    torch.manual_seed(3); assert torch.equal(K.dropout(x, 0.2), y)     # torch's seed reproduces it
    assert not torch.equal(K.dropout(x, 0.2), y)
    assert K.dropout(x, 0.2, training=False) is x and K.dropout(x, 0.0) is x
    assert torch.autograd.gradcheck(lambda t: ops.dropout(t, 0.3, 9), (torch.randn(4, 5, dtype=torch.float64, requires_grad=True),))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"): ops.dropout(x.detach(), 1.0, 0)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"): K.dropout(x, -0.1)
    with pytest.raises(ValueError, match="x must be float32"): ops.dropout(torch.ones(3, dtype=torch.int32), 0.1, 0)


# ---------------------------------------------------------------- rms_norm
@HYP
@given(shape=st.sampled_from([(0, 8), (1, 1), (3, 7, 64), (257, 33), (600, 130), (5, 0, 16), (2, 300, 48)]),
       dtype=st.sampled_from([torch.float32, torch.float64]), need=st.sampled_from(["both", "x", "w"]),
       seed=st.integers(0, 2**16))
def test_rms_norm_equals_reference(shape, dtype, need, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_(need != "w")
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g, dtype=dtype)).requires_grad_(need != "x")
    go = torch.randn(shape, generator=g, dtype=dtype)
    y, y_ref = K.rms_norm(x, w, 1e-6), K.rms_norm_reference(x, w, 1e-6)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, y_ref, **tol)
    leaves = [t for t in (x, w) if t.requires_grad]
    for a, b in zip(torch.autograd.grad(y, leaves, go), torch.autograd.grad(y_ref, leaves, go)):
        torch.testing.assert_close(a, b, atol=tol["atol"] * max(1, shape[0]), rtol=tol["rtol"] * 10)


def test_rms_norm_gradcheck_and_weight_gradient_bits_independent_of_threads():
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: K.rms_norm(x, w, 1e-3), (x, w))
    x32, w32, g32 = torch.randn(1000, 64), torch.randn(64), torch.randn(1000, 64)
    y, r = ops.rms_norm(x32, w32, 1e-6)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(ops.rms_norm_backward(g32, x32, w32, r, True, True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_rms_norm_bad_input_names_the_argument():
    x, w = torch.randn(4, 8), torch.ones(8)
    bad = [
        (lambda: ops.rms_norm(x.long(), w, 1e-6), "x must be float32 or float64"),
        (lambda: ops.rms_norm(x, torch.ones(7), 1e-6), "weight must have one entry per feature"),
        (lambda: ops.rms_norm(x, w.double(), 1e-6), "weight must have the dtype of x"),
        (lambda: ops.rms_norm(x.T, torch.ones(4), 1e-6), "x must be contiguous"),
        (lambda: ops.rms_norm(x, w, -1.0), "eps must be finite and >= 0"),
        (lambda: ops.rms_norm_backward(x, x, w, torch.ones(3), True, True), "rstd must be"),
        (lambda: ops.rms_norm_backward(x[:2], x, w, torch.ones(4), True, True), "dy must have"),
    ]
    for fn, msg in bad:
        with pytest.raises((ValueError, RuntimeError), match=msg):
            fn()


# ---------------------------------------------------------------- cross_entropy
@HYP
@given(N=st.integers(0, 300), V=st.integers(1, 600), dtype=st.sampled_from([torch.float32, torch.float64]),
       ignored=st.sampled_from([0.0, 0.3, 1.0]), mode=st.sampled_from(MODES), seed=st.integers(0, 2**16))
def test_cross_entropy_equals_torch(N, V, dtype, ignored, mode, seed):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(N, V, generator=g, dtype=dtype)).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignored] = -100
    with K.use_cpu_gemm(mode):
        loss = K.cross_entropy(x, t)
        grad = torch.autograd.grad(loss, x)[0] if N else None
    ref = F.cross_entropy(x, t, ignore_index=-100)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(loss, ref, equal_nan=True, **tol)      # every row ignored: NaN, like torch
    if N and (t != -100).any(): torch.testing.assert_close(grad, torch.autograd.grad(ref, x)[0], **tol)


def test_cross_entropy_gradcheck_nonfinite_and_bad_input():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 6, 0, 3])
    assert torch.autograd.gradcheck(lambda z: K.cross_entropy(z, t), (x,))
    xn = torch.randn(3, 20); xn[1, 4] = float("nan")
    assert K.cross_entropy(xn, torch.tensor([0, 1, 2])).isnan() and K.cross_entropy(xn, torch.tensor([0, -100, 2])).isfinite()
    bad = [
        (lambda: ops.cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1]), -100), r"target must be in \[0, 5\)"),
        (lambda: ops.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1]), -100), "one entry per row"),
        (lambda: ops.cross_entropy(torch.randn(3, 5).bfloat16(), torch.tensor([0, 1, 2]), -100), "logits must be float32"),
        (lambda: ops.cross_entropy(torch.randn(3, 5), torch.tensor([0., 1, 2]), -100), "target must be int64"),
        (lambda: ops.cross_entropy(torch.randn(5, 3).T, torch.tensor([0, 1, 2]), -100), "logits must be contiguous"),
    ]
    for fn, msg in bad:
        with pytest.raises((ValueError, RuntimeError), match=msg):
            fn()


# ---------------------------------------------------------------- opcheck
def _opcheck_cases():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, L, 3, 4) for L in (5, 6, 6))
    cases = [("attention", (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), torch.randn(1, 3, 5, 6, requires_grad=True))),
             ("attention", (q, k, v, torch.randn(1, 3, 5, 6, requires_grad=True), torch.randn(2, 6))),
             ("attention", (q.double(), k.double(), v.double(), None)),
             ("rms_norm", (torch.randn(3, 5, 8, requires_grad=True), torch.randn(8, requires_grad=True), 1e-6)),
             ("rms_norm", (torch.randn(4, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), 1e-5))]
    _, p = ops.attention(q.detach(), k.detach(), v.detach(), None)
    cases.append(("attention_backward", (torch.randn(2, 5, 3, 4), q.detach(), k.detach(), v.detach(), p, True)))
    cases.append(("attention_backward", (torch.randn(2, 5, 3, 4), q.detach(), k.detach(), v.detach(), p, True, False)))
    x, w = torch.randn(4, 8), torch.randn(8)
    cases.append(("rms_norm_backward", (torch.randn(4, 8), x, w, ops.rms_norm(x, w, 1e-6)[1], True, True)))
    cases.append(("dropout", (torch.randn(5, 7, requires_grad=True), 0.25, 42)))
    logits, tgt = torch.randn(6, 9), torch.tensor([0, 3, -100, 8, 1, 1])
    cases.append(("cross_entropy", (logits.requires_grad_(), tgt, -100)))
    cases.append(("cross_entropy_backward", (torch.tensor(1.5), logits.detach(), tgt, logits.detach().logsumexp(-1), -100)))
    return cases


@pytest.mark.parametrize("case", range(11))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(ops, name).default, args)


# ---------------------------------------------------------------- dense_mm (grouped_mm's C++ autograd)
def test_dense_mm_matches_linear_with_double_backward():
    if not G._dense_kernels_pay(torch.ones(1), torch.ones(1, 1)):
        pytest.skip("dense_mm is torch.matmul on this CPU (no AVX-512 kernels)")
    x = torch.randn(5, 7, 12, requires_grad=True, dtype=torch.float32)
    w = torch.randn(9, 12, requires_grad=True)
    y = K.dense_mm(x, w, trans_w=True)

    gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
    rx, rw = torch.autograd.grad(F.linear(x, w).square().sum(), (x, w), create_graph=True)
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-5); torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-5)
    hx = torch.autograd.grad(gx.sum() + gw.sum(), x)[0]
    torch.testing.assert_close(hx, torch.autograd.grad(rx.sum() + rw.sum(), x)[0], atol=1e-4, rtol=1e-5)
    with torch.no_grad(): assert K.dense_mm(x, w, True).grad_fn is None


# ---------------------------------------------------------------- the model with and without the fused ops
def test_model_loss_and_gradients_equal_with_and_without_fused_ops(monkeypatch):
    import flanmoe_nb.model as M
    torch.manual_seed(0)
    cfg = M.ModelConfig.preset("tiny", moe=dict(num_experts=4, top_k=2), dropout=0.0)
    model = M.EncoderDecoder(cfg)
    x = torch.randint(2, cfg.vocab_size, (3, 11)); y = torch.randint(2, cfg.vocab_size, (3, 6))
    am = torch.ones_like(x); am[1, 8:] = 0                   # padding: key masks in self and cross attention

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=x, attention_mask=am, labels=y)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(L, "attention_kernel_faster", lambda d: True)   # the op on any ISA (the choice: below)
    assert K.attention_op_faster(torch.ones(1, 1, 1, 1))
    fused = loss_and_grads()
    monkeypatch.setattr(K, "attention_op_faster", lambda q, k=None: False)
    real_op = L._op
    monkeypatch.setattr(L, "_op", lambda name: None if name in ("rms_norm", "cross_entropy") else real_op(name))
    plain = loss_and_grads()
    torch.testing.assert_close(fused[0], plain[0], atol=1e-6, rtol=1e-6)
    assert fused[1].keys() == plain[1].keys()
    for n in fused[1]: torch.testing.assert_close(fused[1][n], plain[1][n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.fixture
def attention_choice(tmp_path, monkeypatch):
    "A fresh, measured attention choice: its own cache file, no forced or deterministic mode, nothing chosen yet."
    monkeypatch.setenv("FLANMOE_KERNEL_CACHE", str(tmp_path / "choice.json"))
    for v in ("FLANMOE_DETERMINISTIC", "FLANMOE_PATH_ATTENTION"): monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(L, "_ATTN_CHOSEN", {})
    return tmp_path / "choice.json"


@pytest.mark.skipif(L._op("attention") is None, reason="needs the compiled extension")
def test_attention_choice_is_measured_and_never_takes_a_slow_path(attention_choice, monkeypatch):
    import time
    slow, fast = (lambda: time.sleep(0.003)), (lambda: None)
    q, k = torch.ones(2, 64, 4, 16), torch.ones(2, 100, 4, 16)
    for op_fn, sdpa_fn, want in ((slow, fast, False), (fast, slow, True)):
        monkeypatch.setattr(L, "_ATTN_CHOSEN", {}); attention_choice.unlink(missing_ok=True)
        monkeypatch.setattr(L, "_attention_candidates", lambda *a, o=op_fn, s=sdpa_fn: dict(op=o, sdpa=s))
        assert K.attention_op_faster(q, k) is want
        [(name, rec)] = [(n, r) for n, r in K.kernel_choices().items() if n.startswith("attention/") and "-d16-h4-q64-k128-b2" in n]
        assert rec["source"] == "measured" and rec["choice"] == ("op" if want else "sdpa"), rec
    assert K.attention_op_faster(q, k) is True and K.attention_op_faster(q[:, :40], k) is True   # same class: no new timing
    monkeypatch.setenv("FLANMOE_PATH_ATTENTION", "sdpa")
    assert K.attention_op_faster(q, k) is False                                # forced
    monkeypatch.setenv("FLANMOE_PATH_ATTENTION", "flash")
    with pytest.raises(ValueError, match="FLANMOE_PATH_ATTENTION='flash'"): K.attention_op_faster(q, k)


@pytest.mark.skipif(L._op("attention") is None, reason="needs the compiled extension")
def test_attention_candidates_time_the_real_paths(attention_choice):
    "The candidates run the op and SDPA forward and backward (the timing itself is not asserted: it is the machine's)."
    cands = L._attention_candidates(2, 8, 32, 16, 16)
    for fn in cands.values(): fn()
    with torch.no_grad(): assert not K.attention_op_faster(torch.ones(1, 32, 8, 16))    # no gradients: not measured
    got = K.attention_op_faster(torch.ones(1, 32, 8, 16), torch.ones(1, 16, 8, 16))
    [rec] = [r for n, r in K.kernel_choices().items() if n.endswith("-d16-h8-q32-k16-b1") and n.startswith("attention/")]
    assert got is (rec["choice"] == "op") and set(rec["ms"]) == {"op", "sdpa"}, rec


def test_model_takes_the_attention_op_only_where_its_isa_copy_is_faster():
    "AVX-512: every head size; AVX2: up to 32 (it ties at 64); the SSE2 baseline (mode 'blas'): never."
    q16, q64 = torch.ones(1, 1, 1, 16), torch.ones(1, 1, 1, 64)
    want = {"avx512": (True, True), "avx2": (True, False), "blas": (False, False)}
    for mode in [m for m in want if m == "blas" or m in K.cpu_gemm_info()["supported"]]:
        with K.use_cpu_gemm(mode):
            assert (K.attention_op_faster(q16), K.attention_op_faster(q64)) == want[mode], mode
            assert not K.attention_op_faster(q16.double())     # float64: SDPA
            with torch.no_grad(): assert not K.attention_op_faster(q16)   # no gradients: SDPA
