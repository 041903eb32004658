"""The committed grids (papermill_runs/*.yaml) run what they name: every grid loads, every MoE block reaches the
model's MoEConfig exactly (the block's values, the preset's defaults for the rest), later stages change
exactly their routing knobs on every MoE layer, and stage parameters reach the TrainConfig and the model's loss coefficients."""
import dataclasses, functools, re
from pathlib import Path
from types import SimpleNamespace
import pytest
from flanmoe_nb import runs
from flanmoe_nb.moe import MOE_PRESETS, MoEConfig, MoELayer

ROOT = Path(__file__).resolve().parents[1]
GRIDS = sorted((ROOT / "papermill_runs").glob("*.yaml"))
_FROM_MODEL = ("d_model", "d_ff", "activation")      # set by the model preset, not by the MoE block
_MOE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MoEConfig) if f.default is not dataclasses.MISSING}


def test_grids_found():
    names = {g.stem for g in GRIDS}
    assert {"tiny", "smoke", "small", "base", "ablation_routing", "ablation_num_experts", "ablation_capacity_factor",
            "ablation_aux_losses", "ablation_freezing"} <= names, names


@functools.lru_cache(maxsize=None)
def _grid(path: Path):
    return runs.load_grid(path)


def _setup(spec) -> int:
    return int(re.match(r"setup(\d)_", spec.notebook.stem).group(1))


def _s0_params(spec) -> dict:
    return runs.experiment_params(setup=0, **spec.params)


def _moe_points(path):
    "The setup-0 MoE points of a grid: (spec, checked parameters, ModelConfig)."
    _, specs = _grid(path)
    out = []
    for s in specs:
        if _setup(s) == 0 and s.params.get("model") == "moe":
            p = _s0_params(s)
            out.append((s, p, runs.model_config(p, vocab_size=512)))
    return out


def _expected_encoder(block: dict) -> dict:
    "Every MoEConfig routing field: the block's value, else the preset's, else the MoEConfig default (8 experts)."
    name = block.get("preset", "switch")
    exp = {**_MOE_DEFAULTS, "num_experts": 8, **MOE_PRESETS[name], **{k: v for k, v in block.items() if k != "preset"}}
    return {k: v for k, v in exp.items() if k not in _FROM_MODEL}


def _diff(cfg: MoEConfig, expected: dict) -> dict:
    return {k: (getattr(cfg, k), v) for k, v in expected.items() if getattr(cfg, k) != v}


@pytest.mark.parametrize("path", GRIDS, ids=[g.stem for g in GRIDS])
def test_grid_loads(path):
    header, specs = _grid(path)
    assert specs and header["name"] == path.stem
    for s in specs:       # every stage after setup 0 starts from a run of the same grid
        if _setup(s) != 0: assert s.deps and s.params["init_checkpoint"].startswith("${"), s.id


@pytest.mark.parametrize("path", GRIDS, ids=[g.stem for g in GRIDS])
def test_setup0_moe_blocks_reach_moe_config(path):
    for s, p, cfg in _moe_points(path):
        block = dict(s.params.get("moe") or {})
        assert cfg.moe is not None, s.id
        exp = _expected_encoder(block)
        assert not _diff(cfg.moe, exp), f"{path.name} {s.id}: MoEConfig differs from the grid (got, expected): {_diff(cfg.moe, exp)}"
        for k, v in block.items():           # the grid's values, literally
            if k != "preset": assert getattr(cfg.moe, k) == v, (s.id, k)
        assert (cfg.moe.d_model, cfg.moe.d_ff) == (cfg.d_model, cfg.d_ff)
        # the decoder: the same config, the grid's decoder changes, or token-choice top-2 under expert choice
        dec_block = dict(s.params.get("decoder_moe") or {})
        if dec_block:
            assert cfg.decoder_moe == dataclasses.replace(cfg.moe, **dec_block), s.id
        elif cfg.moe.router == "expert_choice":
            d = cfg.decoder_moe
            assert d is not None and d.router == "token_choice" and d.top_k == 2 and d.causal_safe, (s.id, d)
            assert d.eval_capacity_factor == cfg.moe.eval_capacity_factor, s.id
            same = {k for k in exp if k not in ("router", "top_k", "second_policy", "capacity_factor", "eval_capacity_factor")}
            assert {k: getattr(d, k) for k in same} == {k: getattr(cfg.moe, k) for k in same}, s.id
        else:
            assert cfg.decoder_moe is None and cfg.decoder_moe_config is cfg.moe, s.id
        name = block.get("preset", "switch")
        z = s.params["z_coef"] if s.params.get("z_coef") is not None else (1e-3 if name == "st_moe" else 0.0)
        assert cfg.z_coef == pytest.approx(z) and cfg.balance_coef == p["balance_coef"], s.id
        assert cfg.encoder_sparse_layers, s.id   # the model really has MoE layers


def test_moe_config_check_can_fail():
    "The comparison above notices a value the grid did not ask for."
    cfg = MoEConfig.preset("gshard", 64, 128, 8)
    assert not _diff(cfg, _expected_encoder({"preset": "gshard"}))
    assert _diff(cfg, _expected_encoder({"preset": "st_moe"})) == {"second_policy": ("random", "all")}
    assert _diff(cfg, _expected_encoder({"preset": "gshard", "eval_capacity_factor": None})) == {"eval_capacity_factor": (2.0, None)}


def _small(cfg):
    "The setup-0 ModelConfig at a CPU-cheap size (same MoE routing, d_model 32, 2 + 2 layers)."
    shrink = dict(d_model=32, d_ff=64)
    moe = dataclasses.replace(cfg.moe, **shrink)
    dec = dataclasses.replace(cfg.decoder_moe, **shrink) if cfg.decoder_moe is not None else None
    return dataclasses.replace(cfg, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                               vocab_size=512, moe=moe, decoder_moe=dec)


def _chain(spec, by_id):
    "The stages from the setup-0 run to `spec`, in order."
    chain = [spec]
    while _setup(chain[0]) != 0:
        assert len(chain[0].deps) == 1, chain[0].id
        chain.insert(0, by_id[chain[0].deps[0]])
    return chain


def _later_moe_points():
    out = []
    for path in GRIDS:
        _, specs = _grid(path)
        for s in specs:
            if _setup(s) != 0 and s.params.get("moe"): out.append(pytest.param(path, s.id, id=f"{path.stem}:{s.id}"))
    return out


def _layer_cfgs(model):
    return [(m.cfg, m.router.cfg) for m in model.modules() if isinstance(m, MoELayer)]


@pytest.mark.parametrize("path,rid", _later_moe_points())
def test_later_stage_changes_exactly_their_fields(path, rid):
    import torch
    from flanmoe_nb import model as M
    _, specs = _grid(path)
    by_id = {s.id: s for s in specs}
    chain = _chain(by_id[rid], by_id)
    s0 = chain[0]
    assert s0.params.get("model") == "moe", f"{rid} changes MoE knobs but starts from {s0.id}, a dense run"
    torch.manual_seed(0)
    net = M.EncoderDecoder(_small(runs.model_config(_s0_params(s0), vocab_size=512)))
    for stage in chain[1:]:
        changes = dict(stage.params.get("moe") or {})
        before, enc, dec = _layer_cfgs(net), net.cfg.moe, net.cfg.decoder_moe
        assert before
        runs.apply_moe_changes(net, changes)
        after = _layer_cfgs(net)
        assert len(after) == len(before)
        for (b, _), (a, r) in zip(before, after):
            assert a == dataclasses.replace(b, **changes), (stage.id, a, b, changes)   # those fields, nothing else
            for k, v in changes.items(): assert getattr(a, k) == v and getattr(r, k) == v, (stage.id, k)
            for f in dataclasses.fields(r):                                          # the router routes by the same config
                assert getattr(r, f.name) == getattr(a, f.name), (stage.id, f.name)
        assert net.cfg.moe == dataclasses.replace(enc, **changes), stage.id
        if dec is not None: assert net.cfg.decoder_moe == dataclasses.replace(dec, **changes), stage.id


def test_routing_ablation_runs_four_different_routers():
    points = {s.id: (p, cfg) for s, p, cfg in _moe_points(ROOT / "papermill_runs/ablation_routing.yaml")}
    named = {"s0_switch": "switch", "s0_gshard": "gshard", "s0_ec": "expert_choice", "s0_st_moe": "st_moe"}
    assert set(points) == set(named)
    for rid, preset in named.items():
        assert points[rid][0]["moe"]["preset"] == preset, rid
    encs = {rid: cfg.moe for rid, (_, cfg) in points.items()}
    assert len({repr(c) for c in encs.values()}) == 4, encs        # four different encoder MoEConfigs
    for a in encs:
        for b in encs:
            if a < b: assert encs[a] != encs[b], (a, b)
    sw, gs, ec, st = (points[r][1] for r in ("s0_switch", "s0_gshard", "s0_ec", "s0_st_moe"))
    assert sw.moe.router == "token_choice" and sw.moe.top_k == 1 and sw.z_coef == 0.0
    assert gs.moe.router == "token_choice" and gs.moe.top_k == 2 and gs.moe.second_policy == "random" and gs.z_coef == 0.0
    assert ec.moe.router == "expert_choice" and ec.decoder_moe.router == "token_choice" and ec.decoder_moe.top_k == 2
    assert st.moe.router == "token_choice" and st.moe.top_k == 2 and st.moe.second_policy == "all" and st.z_coef == pytest.approx(1e-3)
    assert len({s.moe.num_experts for s in (sw, gs, ec, st)}) == 1          # only the router differs
    # every instruction-tuning point starts from the router its id names
    _, specs = _grid(ROOT / "papermill_runs/ablation_routing.yaml")
    for s in specs:
        if _setup(s) == 2:
            router = re.match(r"s2_(.+)_seed\d+$", s.id).group(1)
            assert s.deps == [f"s0_{router}"], s.id


def _stage_points():
    out = []
    for path in GRIDS:
        _, specs = _grid(path)
        out += [pytest.param(path, s.id, id=f"{path.stem}:{s.id}") for s in specs]
    return out


@pytest.mark.parametrize("path,rid", _stage_points())
def test_stage_parameters_reach_train_config(path, rid, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)                     # the deepspeed launcher finds papermill_runs/deepspeed/<preset>.json
    _, specs = _grid(path)
    s = {x.id: x for x in specs}[rid]
    setup = _setup(s)
    p = runs.experiment_params(setup=setup, **s.params)
    tc = runs.train_config({**p, "out_dir": str(tmp_path)})
    for k in ("freeze", "expert_dropout", "steps", "lr", "batch_size", "seed"):
        want = s.params.get(k, runs.PARAMS[k].default)
        assert getattr(tc, k) == want, (rid, k, getattr(tc, k), want)
    if setup != 0:   # the loss coefficients belong to the model: a later stage sets them on the loaded one
        net = SimpleNamespace(cfg=SimpleNamespace(balance_coef=0.5, z_coef=0.25))
        runs.set_loss_coefficients(net, p)
        assert net.cfg.balance_coef == s.params.get("balance_coef", runs.PARAMS["balance_coef"].default), rid
        assert net.cfg.z_coef == (0.25 if s.params.get("z_coef") is None else s.params["z_coef"]), rid


def test_ablation_stage_parameters_vary():
    "The ablations' varied stage parameters really differ between their points."
    def values(name, key):
        _, specs = _grid(ROOT / f"papermill_runs/{name}.yaml")
        return sorted({repr(runs.train_config({**runs.experiment_params(setup=_setup(s), **s.params), "out_dir": "x"}).__dict__[key])
                       for s in specs if _setup(s) == 2})
    assert values("ablation_freezing", "freeze") == sorted(map(repr, ["none", "router", "experts", "moe", "non_moe"]))
    def coefs(s):   # what a setup-2 point sets on the model it loads
        net = SimpleNamespace(cfg=SimpleNamespace(balance_coef=None, z_coef=None))
        runs.set_loss_coefficients(net, runs.experiment_params(setup=2, **s.params)); return net.cfg.balance_coef, net.cfg.z_coef
    _, specs = _grid(ROOT / "papermill_runs/ablation_aux_losses.yaml")
    assert sorted({coefs(s) for s in specs if _setup(s) == 2}) == [(0.0, 0.0), (0.0, 0.001), (0.01, 0.0), (0.01, 0.001)]
    if (ROOT / "papermill_runs/ablation_expert_dropout.yaml").exists():
        assert len(values("ablation_expert_dropout", "expert_dropout")) >= 3
    cf = {s.id: s.params["moe"]["capacity_factor"] for s, _, _ in _moe_points(ROOT / "papermill_runs/ablation_capacity_factor.yaml")}
    assert sorted(cf.values()) == [0.5, 1.0, 1.25, 2.0], cf
    ne = sorted(cfg.moe.num_experts for _, _, cfg in _moe_points(ROOT / "papermill_runs/ablation_num_experts.yaml"))
    assert ne == [4, 8, 16, 32]
