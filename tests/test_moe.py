"MoE layer against the per-token reference, for every router; config errors; dense FFN; upcycling; HF parity."
import pytest
import torch

from flanmoe_nb.moe import MoEConfig, MoELayer, DenseFFN, moe_reference, MOE_PRESETS

D, F_, E = 12, 20, 4

ROUTERS = {
    "switch": dict(top_k=1),
    "switch_bpr": dict(top_k=1, batch_prioritized=True),
    "gshard_all": dict(top_k=2, second_policy="all"),
    "gshard_random": dict(top_k=2, second_policy="random"),
    "gshard_threshold": dict(top_k=2, second_policy="threshold", second_threshold=0.3, renormalize=False),
    "top3_bpr": dict(top_k=3, batch_prioritized=True),
    "expert_choice": dict(router="expert_choice"),
    "st_moe": dict(top_k=2, activation="gated-gelu_tanh", jitter_eps=0.1, router_dtype="float32"),
    "swiglu_bias": dict(top_k=2, activation="swiglu", router_bias=True),
}
CAPACITY = {"dropless": dict(capacity_factor=None, eval_capacity_factor=None),
            "drops": dict(capacity_factor=0.75, eval_capacity_factor=0.75),
            "per_seq": dict(capacity_scope="sequence", expert_capacity=2)}


def make(router, capacity, seed=0, use_kernels=True, **kw):
    cfg = dict(ROUTERS[router]); cfg.update(CAPACITY[capacity]); cfg.update(kw)
    if cfg.get("router") == "expert_choice" and cfg.get("capacity_factor", 1) is None:
        cfg.update(capacity_factor=1.0, eval_capacity_factor=2.0)
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(D, F_, E, use_kernels=use_kernels, **cfg))
    with torch.no_grad():
        layer.router.weight.mul_(8)              # confident router: policies and capacity matter
        if layer.router.bias is not None: layer.router.bias.normal_()
    return layer


def inputs(masked, flat, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, D, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]).bool() if masked else None
    if flat: return x.view(18, D), None if mask is None else mask.view(18)
    return x, mask


def compare(layer, x, mask, seed=3):
    x1 = x.clone().requires_grad_()
    params = [x1, *layer.parameters()]
    torch.manual_seed(seed)
    y, aux = layer(x1, mask)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + aux.balance_loss + 0.1 * aux.z_loss
    g = torch.autograd.grad(loss, params, allow_unused=True)
    torch.manual_seed(seed)
    y_ref, a_ref = moe_reference(layer, x1, mask)
    loss_ref = (y_ref * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + a_ref["balance_loss"] + 0.1 * a_ref["z_loss"]
    g_ref = torch.autograd.grad(loss_ref, params, allow_unused=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(g, g_ref):
        if a is None or b is None: assert a is None and b is None; continue
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert torch.equal(aux.expert_counts, a_ref["expert_counts"])
    assert torch.equal(aux.requested, a_ref["requested"])
    torch.testing.assert_close(aux.balance_loss, a_ref["balance_loss"])
    torch.testing.assert_close(aux.z_loss, a_ref["z_loss"])
    torch.testing.assert_close(aux.dropped_fraction, a_ref["dropped_fraction"])
    return y, aux


@pytest.mark.parametrize("capacity", list(CAPACITY))
@pytest.mark.parametrize("router", list(ROUTERS))
def test_layer_matches_per_token_reference(router, capacity):
    for masked, flat, train in [(False, False, True), (True, False, True), (True, True, False)]:
        if flat and capacity == "per_seq": flat = False
        layer = make(router, capacity).train(train)
        x, mask = inputs(masked, flat)
        y, aux = compare(layer, x, mask)
        if mask is not None:
            assert (y[~mask] == 0).all()                               # padding outputs 0
        if capacity == "dropless" and ROUTERS[router].get("router") != "expert_choice":
            assert aux.dropped_fraction.item() == 0


def test_drops_actually_happen_and_dropped_tokens_output_zero():
    layer = make("switch", "drops").eval()
    x, _ = inputs(False, True)
    y, aux = compare(layer, x, None)
    assert aux.dropped_fraction.item() > 0
    assert (aux.expert_counts <= aux.capacity).all()
    counts = aux.expert_counts.sum().item()
    assert (y.abs().sum(-1) > 0).sum().item() == counts                 # top-1: one row per processed token
    assert aux.dropped_fraction.item() == pytest.approx(1 - counts / 18)


def test_kernels_and_reference_twins_agree():
    for router in ("switch", "gshard_all", "expert_choice", "st_moe"):
        a, b = make(router, "drops", use_kernels=True).eval(), make(router, "drops", use_kernels=False).eval()
        x, mask = inputs(True, False)
        ya, aux_a = a(x, mask)
        yb, aux_b = b(x, mask)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
        assert torch.equal(aux_a.expert_counts, aux_b.expert_counts)


def test_random_policy_reproducible_with_seed_and_eval_policy():
    layer = make("gshard_random", "dropless").train()
    x, _ = inputs(False, True)
    torch.manual_seed(7); y1, a1 = layer(x)
    torch.manual_seed(7); y2, a2 = layer(x)
    assert torch.equal(y1, y2)
    assert a1.expert_counts.sum() < 36                                  # some second choices skipped
    layer.cfg.second_policy_eval = "all"                                # the router reads the layer's config
    _, a3 = layer.eval()(x)
    assert a3.expert_counts.sum() == 36


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_expert_dropout(p):
    """Expert dropout acts on the experts' hidden units, inverted: with w_out = identity each output entry is the
    gated relu hidden unit, so in training every entry is either 0 or exactly its eval value / (1 - p), and about
    a fraction p of the nonzero ones are 0. In eval nothing is dropped (the reference twin)."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(D, D, E, top_k=1, capacity_factor=None, eval_capacity_factor=None, expert_dropout=p))
    with torch.no_grad(): layer.experts.w_out.copy_(torch.eye(D).expand(E, D, D))
    x = torch.randn(400, D)
    y_eval, _ = layer.eval()(x)
    torch.testing.assert_close(y_eval, moe_reference(layer, x)[0], atol=1e-5, rtol=1e-4)
    torch.manual_seed(1)
    y_train, _ = layer.train()(x)
    on = y_eval != 0
    kept = y_train[on] != 0
    torch.testing.assert_close(y_train[on][kept], y_eval[on][kept] / (1 - p), atol=1e-6, rtol=1e-5)
    assert torch.equal(y_train[~on], torch.zeros_like(y_train[~on]))
    n = int(on.sum()); sd = (p * (1 - p) / n) ** 0.5
    assert n > 1000 and abs((1 - kept.float().mean().item()) - p) < 5 * sd


def test_bf16_forward():
    layer = make("st_moe", "drops").to(torch.bfloat16).eval()
    x, mask = inputs(True, False)
    y, aux = layer(x.bfloat16(), mask)
    assert y.dtype == torch.bfloat16 and aux.balance_loss.dtype == torch.float32 and aux.router_probs.dtype == torch.float32
    y32, _ = make("st_moe", "drops").eval()(x.bfloat16().float(), mask)
    assert (y.float() - y32).abs().max() < 0.1


def test_parameter_names_and_shapes():
    layer = MoELayer(MoEConfig(D, F_, E, activation="gated-gelu", router_bias=True))
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"router.weight": (E, D), "router.bias": (E,), "experts.w_in": (E, D, 2 * F_),
                      "experts.w_out": (E, F_, D)}
    assert layer.num_local_experts == E
    ffn = DenseFFN(D, F_, "relu")
    assert {n: tuple(p.shape) for n, p in ffn.named_parameters()} == {"w_in": (D, F_), "w_out": (F_, D)}


def test_causal_safe():
    assert MoELayer(MoEConfig(D, F_, E, top_k=2)).causal_safe
    assert not MoELayer(MoEConfig.preset("expert_choice", D, F_, E)).causal_safe


@pytest.mark.parametrize("kw,msg", [
    (dict(top_k=5), r"top_k must be <= num_experts \(got top_k=5, num_experts=4\)"),
    (dict(num_experts=0), "num_experts=0"), (dict(activation="tanh"), "activation='tanh'"),
    (dict(router="hash"), "router='hash'"), (dict(capacity_factor=0), "capacity_factor=0"),
    (dict(eval_capacity_factor=-2.0), "eval_capacity_factor=-2.0"), (dict(d_ff=0), "d_ff=0"),
    (dict(expert_dropout=-0.1), "expert_dropout=-0.1"), (dict(second_policy="sometimes"), "second_policy='sometimes'"),
])
def test_bad_configs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MoEConfig(**{"d_model": D, "d_ff": F_, "num_experts": E, **kw})


def test_bad_inputs():
    layer = MoELayer(MoEConfig(D, F_, E))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 3, 5\)"): layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"mask.shape=\(2, 4\)"): layer(torch.randn(2, 3, D), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="name='mixtral'"): MoEConfig.preset("mixtral", D, F_, E)


def test_presets():
    "Each preset is the router its paper defines, and reaches the layer's router: GShard's random second expert, ST-MoE's top-2 with every second choice and an fp32 router, Switch's top-1, expert choice's per-expert capacity."
    want = {"switch": dict(router="token_choice", top_k=1, capacity_factor=1.25),
            "gshard": dict(router="token_choice", top_k=2, second_policy="random", capacity_factor=1.25),
            "st_moe": dict(router="token_choice", top_k=2, second_policy="all", router_dtype="float32"),
            "expert_choice": dict(router="expert_choice", capacity_factor=1.0)}
    assert set(want) == set(MOE_PRESETS)
    for name, fields in want.items():
        cfg = MoEConfig.preset(name, D, F_, E)
        assert cfg.causal_safe == (name != "expert_choice")
        layer = MoELayer(cfg)
        for k, v in fields.items():
            assert getattr(cfg, k) == v and getattr(layer.router.cfg, k) == v, (name, k)
    assert MoEConfig.preset("gshard", D, F_, E, top_k=1).top_k == 1          # overrides win
    with pytest.raises(ValueError, match="name='gshard2'"): MoEConfig.preset("gshard2", D, F_, E)
    # GShard's policy is in effect: in training some second choices are skipped; ST-MoE keeps them all
    x = torch.randn(64, D)
    for name, all_kept in (("gshard", False), ("st_moe", True)):
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig.preset(name, D, F_, E, capacity_factor=None)).train()
        assert (layer(x)[1].expert_counts.sum() == 2 * 64) == all_kept, name


def test_from_dense():
    torch.manual_seed(0)
    for act in ("relu", "gated-gelu_tanh"):
        dense = DenseFFN(D, F_, act).eval()
        x = torch.randn(2, 5, D)
        moe = MoELayer.from_dense(dense, MoEConfig(D, F_, E, top_k=2, activation=act, eval_capacity_factor=None)).eval()
        torch.testing.assert_close(moe(x)[0], dense(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(moe.experts.w_in[3], dense.w_in) and torch.equal(moe.experts.w_out[1], dense.w_out)
    with pytest.raises(ValueError, match="cfg.activation='relu'"):
        MoELayer.from_dense(dense, MoEConfig(D, F_, E))


def test_dense_ffn_formula():
    torch.manual_seed(0)
    ffn = DenseFFN(D, F_, "gated-gelu").eval()
    x = torch.randn(4, D)
    h = x @ ffn.w_in
    want = (torch.nn.functional.gelu(h[:, :F_]) * h[:, F_:]) @ ffn.w_out
    torch.testing.assert_close(ffn(x), want)


@pytest.mark.parametrize("capacity", [2, 3, 64])
def test_hf_switch_sparse_mlp_parity(capacity):
    "HF-compatible mode (per-sequence capacity, top-1, raw gate) equals transformers' SwitchTransformersSparseMLP."
    sw = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers")
    from transformers import SwitchTransformersConfig
    hcfg = SwitchTransformersConfig(d_model=D, d_ff=F_, num_experts=E, expert_capacity=capacity, router_jitter_noise=0.0)
    torch.manual_seed(0)
    hf = sw.SwitchTransformersSparseMLP(hcfg).eval()
    for p in hf.parameters(): torch.nn.init.normal_(p, std=0.5)
    ours = MoELayer(MoEConfig(D, F_, E, capacity_scope="sequence", expert_capacity=capacity, activation="relu")).eval()
    with torch.no_grad():
        ours.router.weight.copy_(hf.router.classifier.weight)
        ours.experts.w_in.copy_(torch.stack([hf.experts[f"expert_{i}"].wi.weight.T for i in range(E)]))
        ours.experts.w_out.copy_(torch.stack([hf.experts[f"expert_{i}"].wo.weight.T for i in range(E)]))
    x = torch.randn(3, 10, D)
    with torch.no_grad():
        want = hf(x)
        got, aux = ours(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if capacity == 2: assert aux.dropped_fraction.item() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("router", ["switch", "gshard_all", "expert_choice", "st_moe"])
def test_cuda_matches_cpu(router):
    layer = make(router, "drops").eval()
    x, mask = inputs(True, False)
    y, aux = layer(x, mask)
    y_gpu, aux_gpu = layer.cuda()(x.cuda(), mask.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y, atol=1e-4, rtol=1e-4)
    assert torch.equal(aux_gpu.expert_counts.cpu(), aux.expert_counts)


@pytest.mark.parametrize("router", ["switch", "expert_choice", "gshard_all"])
def test_all_padding_and_empty_inputs(router):
    layer = make(router, "per_seq").train()
    x = torch.randn(2, 3, D, requires_grad=True)
    y, aux = layer(x, torch.zeros(2, 3, dtype=torch.bool))
    (y.sum() + aux.balance_loss + aux.z_loss).backward()
    assert (y == 0).all() and aux.expert_counts.sum() == 0
    assert aux.dropped_fraction.item() == 0 and aux.balance_loss.item() == 0 and aux.z_loss.item() == 0
    for shape in [(0, D), (2, 0, D)]:
        y, aux = layer(torch.randn(*shape))
        assert y.shape == shape and aux.expert_counts.sum() == 0


def test_moe_layer_with_capacity_compiles_fullgraph():
    "Token-choice routing keeps fixed T*k-row buffers (dropped rows as padding): no host read, no graph break."
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, capacity_factor=1.0, activation="relu")
    layer = MoELayer(cfg).train()
    x = torch.randn(2, 8, 16, requires_grad=True)
    y, aux = torch.compile(layer, fullgraph=True)(x)
    y_ref, aux_ref = layer(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.balance_loss, aux_ref.balance_loss)
    assert float(aux.dropped_fraction) > 0                       # capacity 4 of 8 rows per expert: some dropped
    g = torch.autograd.grad((y.square().sum() + aux.balance_loss), (x, layer.experts.w_in, layer.router.weight))
    g_ref = torch.autograd.grad((y_ref.square().sum() + aux_ref.balance_loss), (x, layer.experts.w_in, layer.router.weight))
    for a, b in zip(g, g_ref): torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
