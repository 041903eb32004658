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
