"The benchmark's methods compute what they are named for (timings are never asserted)."
import pytest
from flanmoe_nb import bench as B


@pytest.mark.parametrize("k", [1, 2])
def test_moe_layer_method_matches_the_ffn(k):
    "`moe_layer` (the whole MoELayer, dropless) gives flanmoe's output on the same weights."
    s = B.Shape(T=96, d=32, f=48, E=6, k=k)
    assert B.check_agreement(s)["moe_layer"] < 1e-5


def test_experts_gemm_is_the_ffn_before_the_combine():
    "`experts_gemm` is the expert FFN alone: combined with the gates it gives flanmoe's output."
    import torch
    from flanmoe_nb import kernels as K
    s = B.Shape(T=64, d=16, f=24, E=4, k=1)
    inp = B.make_inputs(s)
    fn, params = B.build_experts_gemm(s, inp)
    y_rows = fn(*params)
    y, plan = K.moe_ffn(inp["x"], inp["x"].float() @ inp["router"].float().T, inp["w_in"], inp["w_out"], top_k=1)
    gates = torch.softmax(inp["x"].float() @ inp["router"].float().T, -1).max(-1).values
    want = torch.zeros_like(y).index_add_(0, plan.token_idx, y_rows * gates[plan.token_idx, None])
    assert torch.allclose(want, y, atol=1e-5)
    t = B.time_methods(s, ["dense", "moe_layer", "experts_gemm"], reps=1)
    assert set(t) == {"dense", "moe_layer", "experts_gemm"} and all(v > 0 for v in t.values())


def test_router_method_is_the_layers_routing():
    "`router` is the MoELayer's router on the same weights: its gate weights are the ones flanmoe combines with, and both of its losses reach the step."
    import torch
    from flanmoe_nb import kernels as K
    s = B.Shape(T=64, d=16, f=24, E=4, k=2)
    inp = B.make_inputs(s)
    fn, (x, w) = B.build_router(s, inp)
    weights, aux = fn(x, w)
    _, plan = K.moe_ffn(inp["x"], inp["x"].float() @ inp["router"].float().T, inp["w_in"], inp["w_out"], top_k=2)
    probs = torch.softmax(inp["x"].float() @ inp["router"].float().T, -1)
    want = probs.topk(2, -1).values.reshape(-1)[plan.assign_idx]
    assert torch.allclose(weights.sort().values, want.sort().values, atol=1e-6)
    gw, = torch.autograd.grad(aux, [w])
    assert gw.abs().sum() > 0                     # the balance and z losses depend on the router weight
    rows = B.run_moe_bench(T=64, d=16, f=24, experts=(4,), top_ks=(1,), methods=("dense", "moe_layer", "router", "experts_gemm"),
                           reps=1, memory=False, print_fn=lambda *a: None)
    r = rows[0]
    assert 0 < r["router_share"] == r["router_s"] / r["moe_layer_s"]


def test_roofline_floor_is_the_larger_of_compute_and_weight_traffic():
    "E=128 fp32 at the issue's shape: 51.5 GFLOP (0.172 s at 300 GFLOP/s) and 3.2 GB of expert-weight traffic (0.14 s at 23 GB/s)."
    T, d, f = 4096, 512, 2048
    traffic, flops = 3 * 128 * 2 * d * f * 4, 12 * T * d * f
    rates = dict(copy_gbs=23.0, gemm_gflops=300.0)
    r = B.roofline(dict(dtype="fp32", k=1, E=128, flanmoe_s=0.32), rates, T, d, f)
    assert r["bound"] == "compute" and abs(r["floor_s"] - flops / 300e9) < 1e-12
    assert abs(r["over_sum"] - 0.32 / (traffic / 23e9 + flops / 300e9)) < 1e-9 and abs(r["gflops"] - flops / 0.32 / 1e9) < 1e-6
    slow = B.roofline(dict(dtype="fp32", k=1, E=128, flanmoe_s=0.32), dict(copy_gbs=10.0, gemm_gflops=300.0), T, d, f)
    assert slow["bound"] == "memory" and abs(slow["floor_s"] - traffic / 10e9) < 1e-12
    r8 = B.roofline(dict(dtype="bf16", k=1, E=8, flanmoe_s=0.05), rates, T, d, f)
    assert r8["bound"] == "compute" and abs(r8["floor_s"] - flops / 300e9) < 1e-12
    assert B.roofline(dict(dtype="fp32", k=1, E=8), rates, T, d, f) is None
    m = B.machine_rates("fp32", T=64, d=32, f=32, copy_mib=4, reps=1)
    assert m["copy_gbs"] > 0 and m["gemm_gflops"] > 0


def test_moe_bench_prints_the_paths_it_chose(monkeypatch, tmp_path):
    "After the table, the bench lists every path `choose_path` picked (the machine line can only show the defaults), each expert-GEMM product on its own line."
    from flanmoe_nb import extension as X, gemm as G, kernels as K
    monkeypatch.setenv("FLANMOE_KERNEL_CACHE", str(tmp_path / "choice.json"))
    monkeypatch.delenv("FLANMOE_DETERMINISTIC", raising=False); monkeypatch.delenv("FLANMOE_PATH_FP32_GEMM", raising=False)
    X._CHOICES.clear(); G._FP32_CLASS.clear()
    lines = []
    try:
        B.run_moe_bench(T=64, d=16, f=24, experts=(4,), top_ks=(1,), methods=("dense", "flanmoe"), reps=1, memory=False,
                        print_fn=lines.append)
    finally:
        K.set_cpu_gemm("auto")
    chosen = lines[lines.index(next(l for l in lines if l.startswith("\nPaths chosen"))) + 1:]
    want = [f"{k}: {v['choice']} ({v['source']}" for k, v in sorted(K.kernel_choices().items())]
    assert want and len(chosen) >= len(want) and all(l.strip().startswith(w) for l, w in zip(chosen, want))
    if K.cpu_gemm_info()["supported"]:   # own kernels to choose from: the three products of the class d16-f32-rows16-e4
        assert {l.strip().split(":")[0] for l in chosen} >= {f"fp32_gemm/d16-f32-rows16-e4-{p}" for p in G.GEMM_PRODUCTS}


def test_moe_bench_ratios_against_the_tables_best_dense():
    "The dense FFN is the same at every E: each row also gets its times over the best dense time of its dtype and k."
    lines = []
    rows = B.run_moe_bench(T=64, d=16, f=24, experts=(4, 8), top_ks=(1,), methods=("dense", "flanmoe"), reps=1, memory=False,
                           print_fn=lines.append)
    best = min(r["dense_s"] for r in rows)
    for r in rows:
        assert r["flanmoe_ratio_best"] == r["flanmoe_s"] / best and r["dense_ratio_best"] == r["dense_s"] / best >= 1
    assert any(l.startswith("\nRatios against the best dense time") for l in lines)


def test_layer_gemm_share_splits_one_profiled_run():
    "The MoELayer's time is split, from one profiled run, into its expert-GEMM ops and the rest: both parts are there."
    r = B.layer_gemm_share(B.Shape(T=96, d=32, f=48, E=4, k=2), steps=2)
    assert 0 < r["gemm_s"] < r["wall_s"] and 0 < r["outside"] < 1 and abs(r["outside"] - (1 - r["gemm_s"] / r["wall_s"])) < 1e-12


def test_machine_line_names_the_host_allocator(tmp_path):
    "A preloaded allocator is named on the machine line (the dense baseline's speed depends on it); otherwise the C library's own."
    import os, shutil, subprocess, sys
    code = "from flanmoe_nb import bench as B; print(B.host_allocator()); print(B.machine_line())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert plain[0] not in ("jemalloc", "tcmalloc", "mimalloc") and f"; malloc {plain[0]};" in plain[1]
    if shutil.which("gcc") is None: pytest.skip("no gcc to build a stand-in allocator library")
    (tmp_path / "empty.c").write_text("int flanmoe_stand_in;\n")
    lib = tmp_path / "libjemalloc.so.2"      # a library of that name, mapped into the process: what is detected
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "empty.c")], check=True)
    pre = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "LD_PRELOAD": str(lib)}).stdout.splitlines()
    assert pre[0] == "jemalloc" and "; malloc jemalloc;" in pre[1]


def test_runner_reuses_its_upstream_gradients_unchanged(monkeypatch):
    "The step's upstream gradients are made once; no method's backward may write into them (or the next step would differ)."
    import torch
    s = B.Shape(T=48, d=16, f=24, E=4, k=2)
    inp = B.make_inputs(s)
    grad, seen = torch.autograd.grad, []
    monkeypatch.setattr(torch.autograd, "grad", lambda ys, ps, grads: (seen.append(grads), grad(ys, ps, grads))[1])
    for name in ("flanmoe", "dense", "dense_gmm", "moe_layer", "experts_gemm", "gshard_einsum"):
        seen.clear()
        run = B.runner(B.METHODS[name](s, inp)[:2])
        for _ in range(3): run()
        assert len(seen) == 3 and len(seen[0]) >= 1, name                            # every step went through the spy
        assert all(g is h for g, h in zip(seen[0], seen[2])), name                 # the same tensors every step
        assert all(bool((g == 1).all()) for g in seen[2]), name                      # still ones after three backwards
