"Routers, capacity, routing plans and auxiliary losses against naive loops (flanmoe_nb.routing)."
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from flanmoe_nb.routing import (RouterConfig, Router, compute_capacity, top_k_gates, token_choice_plan,
                                expert_choice_plan, balance_loss, z_loss, router_logits)

FAST = settings(max_examples=40, deadline=None, derandomize=True)


# ---------------------------------------------------------------- capacity
@pytest.mark.parametrize("T,E,k,cf,minc,want", [(512, 64, 1, 1.25, 0, 10), (512, 64, 2, 2.0, 0, 32), (7, 4, 1, 1.0, 0, 2),
                                                 (10, 64, 1, 1.0, 4, 4), (3, 2, 2, 1.0, 0, 3)])
def test_capacity_formula(T, E, k, cf, minc, want):
    assert compute_capacity(T, E, k, cf, minc) == want


def test_capacity_dropless_and_override():
    assert compute_capacity(100, 4, 1, None) is None
    assert compute_capacity(100, 4, 1, None, expert_capacity=3) == 3
    c = RouterConfig(num_experts=4, capacity_factor=1.0, eval_capacity_factor=None)
    assert c.capacity(8, training=True) == 2 and c.capacity(8, training=False) is None


# ---------------------------------------------------------------- config errors
@pytest.mark.parametrize("kw,msg", [
    (dict(num_experts=0), "num_experts=0"), (dict(num_experts=2, top_k=3), "top_k=3, num_experts=2"),
    (dict(num_experts=2, top_k=0), "top_k=0"), (dict(num_experts=2, router="hash"), "router='hash'"),
    (dict(num_experts=2, capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(num_experts=2, eval_capacity_factor="2"), "eval_capacity_factor='2'"),
    (dict(num_experts=2, min_capacity=-1), "min_capacity=-1"), (dict(num_experts=2, expert_capacity=0), "expert_capacity=0"),
    (dict(num_experts=2, capacity_scope="token"), "capacity_scope='token'"),
    (dict(num_experts=2, second_policy="none"), "second_policy='none'"),
    (dict(num_experts=2, second_policy_eval="x"), "second_policy_eval='x'"),
    (dict(num_experts=2, jitter_eps=1.5), "jitter_eps=1.5"), (dict(num_experts=2, router_dtype="int8"), "router_dtype='int8'"),
    (dict(num_experts=2, router="expert_choice", eval_capacity_factor=None), "eval_capacity_factor=None"),
])
def test_bad_router_config(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        RouterConfig(**kw)


# ---------------------------------------------------------------- gates and policies
def test_top_k_gates_policies():
    torch.manual_seed(0)
    probs = torch.randn(50, 6).mul(2).softmax(-1)
    g, idx, act = top_k_gates(probs, 2, policy="all")
    assert act.all()
    torch.testing.assert_close(g.sum(-1), torch.ones(50))                      # renormalised for k > 1
    torch.testing.assert_close(top_k_gates(probs, 2, renormalize=False)[0], probs.topk(2).values)
    torch.testing.assert_close(top_k_gates(probs, 1)[0], probs.max(-1, keepdim=True).values)  # Switch: raw p
    torch.manual_seed(5)
    _, _, act = top_k_gates(probs, 2, policy="random")
    torch.manual_seed(5)
    u = torch.rand(50, 1)
    g2 = probs.topk(2).values
    g2 = g2[:, 1:] / g2.sum(-1, keepdim=True)
    assert torch.equal(act[:, 1:], 2 * g2 > u) and act[:, 0].all()
    assert 0 < act[:, 1].sum() < 50
    _, _, act = top_k_gates(probs, 2, policy="threshold", threshold=0.3)
    assert torch.equal(act[:, 1:], g2 > 0.3)


# ---------------------------------------------------------------- token-choice plan vs a loop
def naive_token_choice(expert_idx, gates, E, cap, active, valid, Lg, bpr):
    T, k = expert_idx.shape
    asg = [(t, j) for t in range(T) for j in range(k) if valid[t] and active[t, j]]
    key = (lambda a: (a[1], -gates[a[0], 0].item(), a[0])) if bpr else (lambda a: (a[1], a[0]))
    used, keep, req = {}, torch.zeros(T, k, dtype=torch.bool), [0] * E
    for t, j in sorted(asg, key=key):
        e = int(expert_idx[t, j]); req[e] += 1
        n = used.get((e, t // Lg), 0)
        if cap is None or n < cap:
            used[(e, t // Lg)] = n + 1; keep[t, j] = True
    return keep, torch.tensor(req)


@FAST
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.one_of(st.none(), st.integers(0, 6)),
       st.booleans(), st.booleans(), st.booleans(), st.integers(0, 10_000))
def test_token_choice_plan_matches_loop(B, L, E, k, cap, use_mask, per_seq, bpr, seed):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    T = B * L
    probs = torch.rand(T, E, generator=g).softmax(-1)
    gates, expert_idx = probs.topk(k, -1)
    active = torch.rand(T, k, generator=g) < 0.8
    active[:, 0] = True
    valid = torch.rand(T, generator=g) < 0.7 if use_mask else torch.ones(T, dtype=torch.bool)
    Lg = L if per_seq else T
    for use_kernels in (False, True):
        token_idx, w, sizes, req, keep = token_choice_plan(expert_idx, gates, E, cap, active, valid if use_mask else None,
                                                           L if per_seq else None, bpr, use_kernels)
        keep_ref, req_ref = naive_token_choice(expert_idx, gates, E, cap, active, valid, Lg, bpr)
        assert torch.equal(keep, keep_ref) and torch.equal(req, req_ref)
        assert torch.equal(sizes, torch.bincount(expert_idx[keep_ref], minlength=E))
        assert token_idx.numel() == T * k                 # all assignments; the kept ones first
        token_idx, w = token_idx[:int(sizes.sum())], w[:int(sizes.sum())]
        # rows grouped by expert, each kept assignment exactly once, with its gate
        rows = sorted(zip(token_idx.tolist(), w.tolist()))
        want = sorted((t, gates[t, j].item()) for t in range(T) for j in range(k) if keep_ref[t, j])
        assert rows == want
        row_expert = torch.repeat_interleave(torch.arange(E), sizes)
        for s, t in enumerate(token_idx.tolist()):
            assert row_expert[s] in expert_idx[t][keep_ref[t]]


# ---------------------------------------------------------------- expert-choice plan vs a loop
@FAST
@given(st.integers(1, 3), st.integers(1, 7), st.integers(1, 5), st.integers(1, 8), st.booleans(), st.booleans(),
       st.integers(0, 10_000))
def test_expert_choice_plan_matches_loop(B, L, E, cap, use_mask, per_seq, seed):
    g = torch.Generator().manual_seed(seed)
    T = B * L
    probs = torch.rand(T, E, generator=g).softmax(-1)
    valid = torch.rand(T, generator=g) < 0.7 if use_mask else torch.ones(T, dtype=torch.bool)
    Lg = L if per_seq else T
    token_idx, w, sizes, chosen = expert_choice_plan(probs, cap, valid if use_mask else None, L if per_seq else None)
    want, start = [], 0
    for e in range(E):
        rows = []
        for grp in range(T // Lg):
            cand = sorted((t for t in range(grp * Lg, (grp + 1) * Lg) if valid[t]), key=lambda t: -probs[t, e].item())
            rows += cand[:min(cap, Lg)]
        assert sizes[e] == len(rows)
        got = token_idx[start:start + len(rows)].tolist()
        assert sorted(got) == sorted(rows)
        torch.testing.assert_close(w[start:start + len(rows)], probs[got, e])
        start += len(rows)
        want += rows
    assert start == len(token_idx)
    assert torch.equal(chosen, torch.isin(torch.arange(T), torch.tensor(want, dtype=torch.long)))


# ---------------------------------------------------------------- losses
def test_losses_hand_example():
    lg = torch.tensor([[math.log(3), 0.], [0., 0.], [5., 5.]])
    valid = torch.tensor([True, True, False])
    p = lg.softmax(-1)
    torch.testing.assert_close(balance_loss(p, p.argmax(-1), valid), torch.tensor(1.25))
    torch.testing.assert_close(z_loss(lg, valid), torch.tensor(2.5 * math.log(2) ** 2))
    # padding rows do not matter
    lg2 = lg.clone(); lg2[2] = torch.tensor([-7., 30.])
    p2 = lg2.softmax(-1)
    torch.testing.assert_close(balance_loss(p2, p2.argmax(-1), valid), torch.tensor(1.25))
    torch.testing.assert_close(z_loss(lg2, valid), torch.tensor(2.5 * math.log(2) ** 2))


@FAST
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.booleans(), st.integers(0, 10_000))
def test_losses_match_loops(B, L, E, per_seq, seed):
    g = torch.Generator().manual_seed(seed)
    T = B * L
    logits = torch.randn(T, E, generator=g) * 3
    valid = torch.rand(T, generator=g) < 0.7
    p = logits.softmax(-1)
    Lg = L if per_seq else T
    per_group = []
    for grp in range(T // Lg):
        ts = [t for t in range(grp * Lg, (grp + 1) * Lg) if valid[t]]
        if not ts: continue
        f = [sum(int(p[t].argmax() == e) for t in ts) / len(ts) for e in range(E)]
        P = [sum(p[t, e].item() for t in ts) / len(ts) for e in range(E)]
        per_group.append(E * sum(a * b for a, b in zip(f, P)))
    want = sum(per_group) / len(per_group) if per_group else 0.0
    got = balance_loss(p, p.argmax(-1), valid, L if per_seq else None)
    assert got.dtype == torch.float32
    assert abs(got.item() - want) < 1e-5
    vt = [t for t in range(T) if valid[t]]
    zw = sum(torch.logsumexp(logits[t], -1).item() ** 2 for t in vt) / max(len(vt), 1)
    assert abs(z_loss(logits, valid).item() - zw) < 1e-4 * max(1, zw)


def test_losses_match_transformers_switch():
    "Per-sequence groups, top-1, no padding: same values as transformers' Switch loss functions."
    sw = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers")
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4) * 2
    p = logits.softmax(-1)
    hf_bal = sw.load_balancing_loss_func(p, p.argmax(-1))
    ours = balance_loss(p.view(15, 4), p.view(15, 4).argmax(-1), None, group_size=5)
    torch.testing.assert_close(ours, hf_bal)
    torch.testing.assert_close(z_loss(logits.view(15, 4)), sw.router_z_loss_func(logits))


def test_uniform_router_balance_is_one():
    p = torch.full((8, 4), 0.25)
    assert balance_loss(p, torch.arange(8) % 4).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- router module
def test_router_fp32_under_bf16_and_autocast():
    torch.manual_seed(0)
    r = Router(16, RouterConfig(num_experts=4)).to(torch.bfloat16)
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = r(x)
    assert plan.router_logits.dtype == torch.float32 and plan.router_probs.dtype == torch.float32
    assert plan.balance_loss.dtype == torch.float32 and plan.z_loss.dtype == torch.float32
    torch.testing.assert_close(plan.router_logits, x.float() @ r.weight.float().T)


def test_jitter_only_in_training():
    torch.manual_seed(0)
    x, w = torch.randn(6, 8), torch.randn(3, 8)
    assert torch.equal(router_logits(x, w, jitter_eps=0.2, training=False), x @ w.T)
    torch.manual_seed(1)
    lj = router_logits(x, w, jitter_eps=0.2, training=True)
    torch.manual_seed(1)
    noise = torch.empty_like(x).uniform_(0.8, 1.2)
    torch.testing.assert_close(lj, (x * noise) @ w.T)
    assert not torch.allclose(lj, x @ w.T)


def test_router_counts_dropped_and_padding():
    torch.manual_seed(0)
    r = Router(8, RouterConfig(num_experts=2, capacity_factor=1.0))
    with torch.no_grad(): r.weight.copy_(torch.tensor([[10.] + [0.] * 7, [-10.] + [0.] * 7]))
    x = torch.zeros(6, 8); x[:, 0] = torch.tensor([1., 1., 1., 1., -1., 1.])   # 5 tokens want expert 0
    valid = torch.tensor([True, True, True, True, True, False])
    plan = r.train()(x, valid)                                                   # capacity ceil(6/2) = 3
    assert plan.capacity == 3
    assert plan.requested.tolist() == [4, 1] and plan.expert_counts.tolist() == [3, 1]
    assert plan.keep.flatten().tolist() == [True, True, True, False, True, False]
    torch.testing.assert_close(plan.dropped_fraction, torch.tensor(1 / 5))
    assert plan.token_idx.tolist()[:4] == [0, 1, 2, 4] and sorted(plan.token_idx.tolist()[4:]) == [3, 5]


def test_router_group_size_must_divide():
    r = Router(4, RouterConfig(num_experts=2))
    with pytest.raises(ValueError, match="group_size=4, T=6"):
        r(torch.randn(6, 4), group_size=4)


def test_router_expert_choice_balanced_and_gradients():
    torch.manual_seed(0)
    r = Router(8, RouterConfig(num_experts=4, router="expert_choice", capacity_factor=1.0)).train()
    plan = r(torch.randn(12, 8))
    assert plan.expert_counts.tolist() == [3, 3, 3, 3]
    (plan.weights.sum() + plan.balance_loss + plan.z_loss).backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
