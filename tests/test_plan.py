"The capacity planner against the real models: parameter counts, optimizer state, ZeRO's formulas, activation bytes, FLOPs, gloo all-to-all bytes."
import os, subprocess, sys, json
from pathlib import Path
import pytest, torch

from flanmoe_nb import plan as P
from flanmoe_nb.checks import ConfigError
from flanmoe_nb.model import ModelConfig, EncoderDecoder, count_params, count_flops
from flanmoe_nb.optim import Adafactor

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("preset,experts", [("tiny", 0), ("tiny", 8), ("small", 0), ("small", 4)])
def test_param_counts_match_the_real_model(preset, experts):
    cfg = P.PlanConfig(preset=preset, experts=experts).model_config()
    real = count_params(EncoderDecoder(cfg))
    c = P.param_counts(cfg)
    assert (c["dense"] + c["expert"], c["expert"]) == (real["total"], real["experts"])


def test_meta_counts_equal_real_counts_for_base():
    cfg = P.PlanConfig(preset="base", experts=32).model_config()
    with torch.device("meta"): m = EncoderDecoder(cfg)
    real = count_params(m)
    c = P.param_counts(cfg)
    assert c["expert"] == real["experts"] > 0 and c["dense"] + c["expert"] == real["total"]


def _state_elems(opt):
    return sum(t.numel() for st in opt.state.values() for k, t in st.items() if k != "step")


def test_optimizer_state_matches_real_optimizers():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", moe=dict(num_experts=4, top_k=1))
    m = EncoderDecoder(cfg)
    x = torch.randint(2, 512, (2, 8))
    m(x, labels=x).loss.backward()
    c = P.param_counts(cfg)
    from flanmoe_nb.optim import param_groups
    ada = Adafactor(param_groups(m)); ada.step()
    assert _state_elems(ada) == c["adafactor_dense"] + c["adafactor_expert"]
    n = c["dense"] + c["expert"]
    adam = torch.optim.AdamW(m.parameters()); adam.step()
    assert _state_elems(adam) * 4 == P.zero_memory(n, 1, 0, "fp32", "adamw")["optimizer"] == 8 * n
    # without ZeRO the planner counts the factored state, fp32 weights and grads
    mem = P.zero_memory(n, 1, 0, "fp32", "adafactor", c["adafactor_dense"] + c["adafactor_expert"])
    assert mem == dict(weights=4 * n, grads=4 * n, optimizer=4 * _state_elems(ada))


def test_zero_formulas_are_the_papers():
    "ZeRO (Rajbhandari et al. 2020), Fig. 1: 7.5B parameters, N_d = 64, K = 12: 120 / 31.4 / 16.6 / 1.9 GB."
    psi, nd = 7.5e9, 64
    got = [sum(P.zero_memory(psi, nd, z, "bf16", "adamw").values()) for z in range(4)]
    want = [(2 + 2 + 12) * psi, (2 + 2) * psi + 12 * psi / nd, 2 * psi + (2 + 12) * psi / nd, (2 + 2 + 12) * psi / nd]
    assert got == pytest.approx(want, rel=1e-12)
    assert [round(g / 1e9, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]


@pytest.mark.parametrize("moe,activation,dropout", [
    (None, "gated-gelu", 0.0), (None, "gated-gelu", 0.1), (None, "relu", 0.0),
    (dict(num_experts=4, top_k=1, capacity_factor=None), "gated-gelu", 0.0),
    (dict(num_experts=4, top_k=2, capacity_factor=None), "gated-gelu", 0.1)])
def test_activation_bytes_against_measurement(moe, activation, dropout):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", moe=moe, activation=activation, dropout=dropout)
    x, y = torch.randint(2, 512, (8, 64)), torch.randint(2, 512, (8, 32))
    measured = P.measure_activation_bytes(EncoderDecoder(cfg).train(), x, y)
    planned = P.activation_bytes(cfg, 8, 64, 32, "fp32", "eager", mask_bytes=0)   # the CPU dropout keeps no mask
    assert abs(planned / measured - 1) < 0.06, (planned, measured)


def test_checkpointing_keeps_less_and_flops_are_the_models():
    p = P.plan(P.PlanConfig(preset="base", experts=32, ep_size=8, micro_batch=8, grad_accum=2))
    assert p.memory["activations_ckpt"] < p.memory["activations"] / 3
    fwd = count_flops(p.cfg.model_config(), 512, 128)["total"] * 8 * 2
    assert p.flops["forward"] == fwd and p.flops["step"] == 3 * fwd and p.flops["step_ckpt"] == 4 * fwd


def test_experts_shard_over_ep_and_dense_over_world():
    one = P.plan(P.PlanConfig(preset="base", experts=32, ep_size=1, zero=0))
    eight = P.plan(P.PlanConfig(preset="base", experts=32, ep_size=8, zero=0))
    assert eight.params["expert_local"] * 8 == one.params["expert_local"] == one.params["expert"]
    assert one.a2a["step"] == 0 and eight.a2a["off_device_step"] == pytest.approx(eight.a2a["step"] * 7 / 8)


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
@pytest.mark.parametrize("experts", [0, 8])
def test_every_preset_gets_an_answer(preset, experts, capsys):
    assert P.plan_main(["--preset", preset, "--experts", str(experts), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["dense"] > 0 and out["time"]["step"] > 0 and out["memory"]["activations"] > 0


def test_does_not_fit_names_a_change_that_fits():
    p = P.plan(P.PlanConfig(preset="base", experts=128, top_k=2, ep_size=1, zero=0, micro_batch=64, optimizer="adamw"))
    assert not p.fits(False)
    what, q, ck = P.smallest_fitting_change(p)
    assert q.fits(ck) and what in P.format_plan(p)


@pytest.mark.parametrize("kw,msg", [(dict(zero=5), "zero must be"), (dict(experts=32, ep_size=3), "ep_size must divide"),
                                    (dict(preset="huge"), "preset must be one of"), (dict(ep_size=2), "ep_size must be 1 for a dense"),
                                    (dict(micro_batch=0), "micro_batch must be an int >= 1")])
def test_bad_input_names_the_field(kw, msg):
    with pytest.raises(ConfigError, match=msg): P.PlanConfig(**kw)


def test_cli_reports_bad_flags(capsys):
    assert P.plan_main(["--experts", "6", "--ep-size", "4"]) == 2
    assert "ep_size must divide" in capsys.readouterr().err
    assert P.plan_main(["--device", "tpu"]) == 2


def free_port() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return str(s.getsockname()[1])


@pytest.mark.slow
def test_all_to_all_bytes_against_gloo(tmp_path):
    "Two gloo processes, ep_size 2, dropless top-2: the rows the all-to-alls carry are exactly the planned ones."
    sys.path.insert(0, str(Path(__file__).parent))
    import _a2a_worker as A
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", free_port(), str(ROOT / "tests/_a2a_worker.py"),
                        str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"a2a_rank{i}.json").read_text()) for i in range(2)]
    cfg = A.config()
    planned = P.all_to_all_bytes(cfg, A.B, A.S, A.T, ep_size=2, precision="fp32")
    n_layers = len(planned["per_layer"])
    for s in ranks:
        assert s["calls"] == 4 * n_layers
        assert s["total"] == planned["total"]                    # dropless: every token's top_k rows, both ways
    off = sum(s["off_device"] for s in ranks) / 2
    assert abs(off / planned["off_device"] - 1) < 0.5           # routing of an untrained model is only roughly uniform


def test_expert_choice_and_dropless(capsys):
    p = P.plan(P.PlanConfig(preset="small", experts=8, router="expert_choice", capacity_factor=2.0, ep_size=8))
    enc = [v for k, v in p.a2a["per_layer_step"].items() if k.startswith("encoder")][0]
    dec = [v for k, v in p.a2a["per_layer_step"].items() if k.startswith("decoder")][0]
    assert enc / 512 == pytest.approx(dec / 128)      # encoder: capacity factor 2 rows per token, decoder: token-choice top-2
    assert P.plan_main(["--preset", "tiny", "--experts", "4", "--capacity-factor", "none"]) == 0
    assert P.plan_main(["--preset", "tiny", "--experts", "4", "--capacity-factor", "-1"]) == 2
    assert "capacity_factor" in capsys.readouterr().err
