"Trustworthy runs (issue #16): checked configs, skip limits, resume that never loses data, weights-only checkpoints, progress."
import io, json, os, pickle, random, shutil, sys, warnings
from dataclasses import fields
from pathlib import Path
import numpy as np
import pytest, torch

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as W
import flanmoe_nb.train as T
from flanmoe_nb.checks import ConfigError
from flanmoe_nb.model import EncoderDecoder
from flanmoe_nb.moe import MoEConfig
from flanmoe_nb.train import TrainConfig, TRAIN_SCHEMA, TrainingDiverged, train, run_stage
from flanmoe_nb.checkpoint import CheckpointError, load_model, latest_checkpoint, complete_checkpoints, model_config_from_dict

torch.set_num_threads(1)


def model():
    torch.manual_seed(0)
    return EncoderDecoder(W.tiny())


def cfg(out, **kw):
    return TrainConfig(**{**dict(steps=4, lr=1e-2, out_dir=str(out), progress=False), **kw})


def nan_hook(m, when):
    "Make the encoder output non-finite on the forward calls numbered in `when` (1-based; `None` = every call)."
    calls = {"n": 0}
    def hook(mod, inp, out):
        calls["n"] += 1
        if when is None or calls["n"] in when: return (out[0] * float("nan"), out[1])
    return m.encoder.register_forward_hook(hook)


def metric_steps(path):
    return [json.loads(l)["step"] for l in open(path)]


# --- 1. the config schema ---------------------------------------------------------------------------
def test_schema_names_every_field():
    assert set(TRAIN_SCHEMA) == {f.name for f in fields(TrainConfig)}


@pytest.mark.parametrize("field,value,allowed", [
    ("grad_clip", -1, "> 0, or None"), ("grad_clip", 0, "> 0, or None"), ("grad_clip", float("inf"), "finite"),
    ("keep_checkpoints", -1, ">= 0"), ("steps", 2.5, "an int >= 1"), ("steps", 0, "an int >= 1"),
    ("lr", float("inf"), "finite number > 0"), ("lr", float("nan"), "finite number > 0"), ("lr", 0.0, "> 0"),
    ("lr", "1e-3", "finite number"), ("warmup_steps", -1, ">= 0"), ("batch_size", True, "an int"),
    ("bf16", 1, "True or False"), ("progress", "yes", "True or False"), ("compile", None, "True or False"),
    ("optimizer", "sgd", "one of"), ("engine", "jax", "one of"), ("nan_policy", "ignore", "one of"),
    ("resume", "yes", "one of"), ("resume", 1, "one of"), ("resume", None, "one of"),
    ("max_consecutive_skips", 0, ">= 1"), ("max_skipped_fraction", 1.5, "<= 1"),
    ("max_skipped_fraction", -0.1, ">= 0"), ("seed", -1, ">= 0"), ("out_dir", "", "non-empty"),
    ("deepspeed_config", 3, "a path, a dict or None"), ("expert_dropout", 1.0, "< 1"), ("min_lr_ratio", 2.0, "<= 1"),
    ("ckpt_every", -5, ">= 0"), ("log_every", 0, ">= 1"), ("eval_every", 1.5, "int"), ("ep_size", 0, ">= 1"),
    ("weight_decay", -0.1, ">= 0"), ("lr", float("nan"), "finite"), ("export_hf", 0, "True or False"),
])
def test_bad_values_fail_naming_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    msg = str(e.value)
    assert f"TrainConfig.{field}" in msg and f"{field}={value!r}" in msg and allowed in msg, msg


def test_good_values_are_kept_and_normalised(tmp_path):
    c = TrainConfig(lr=1, grad_clip=None, keep_checkpoints=0, resume="auto", out_dir=tmp_path, max_consecutive_skips=None,
                    max_skipped_fraction=1.0, deepspeed_config={"zero_optimization": {"stage": 1}})
    assert c.lr == 1.0 and isinstance(c.lr, float) and c.out_dir == str(tmp_path) and c.resume == "auto"
    assert TrainConfig().max_consecutive_skips == 10 and TrainConfig().max_skipped_fraction == 0.1
    from dataclasses import replace
    with pytest.raises(ConfigError, match="grad_clip"): replace(c, grad_clip=-1)   # replace re-validates


# --- 2. a run is done only when it trained --------------------------------------------------------
def test_run_skipping_11_of_12_steps_fails_and_marks_nothing_complete(tmp_path):
    m = model(); nan_hook(m, set(range(2, 13)))
    with pytest.raises(TrainingDiverged) as e:
        train(m, W.batches(2), cfg(tmp_path, steps=12))
    err = e.value
    assert (err.step, err.skipped, err.consecutive, err.steps) == (3, 2, 2, 12)   # 0.1 * 12 -> at most 1 skipped
    assert "2 steps skipped" in str(err) and "max_skipped_fraction=0.1" in str(err)
    assert latest_checkpoint(tmp_path / "checkpoints") is None and complete_checkpoints(tmp_path / "checkpoints") == []
    assert metric_steps(tmp_path / "metrics.jsonl") == [1, 2, 3]                   # the failing step is still logged


def test_consecutive_limit(tmp_path):
    m = model(); nan_hook(m, None)
    with pytest.raises(TrainingDiverged) as e:
        train(m, W.batches(2), cfg(tmp_path, steps=20, max_consecutive_skips=3, max_skipped_fraction=1.0))
    assert (e.value.step, e.value.skipped, e.value.consecutive, e.value.max_consecutive_skips) == (4, 4, 4, 3)
    assert "4 in a row" in str(e.value)
    assert issubclass(TrainingDiverged, RuntimeError) and "TrainingDiverged" in T.__all__


def test_total_limit_keeps_earlier_checkpoints_and_names_the_last(tmp_path):
    m = model(); nan_hook(m, {1, 3, 5})                        # every other step: never more than 1 in a row
    with pytest.raises(TrainingDiverged) as e:
        train(m, W.batches(2), cfg(tmp_path, steps=10, ckpt_every=2, keep_checkpoints=0, max_skipped_fraction=0.2))
    assert (e.value.step, e.value.skipped, e.value.consecutive) == (5, 3, 1)
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000004", "step_00000002"]
    assert e.value.checkpoint.endswith("step_00000004")


def test_within_limits_result_carries_counts(tmp_path):
    m = model(); nan_hook(m, {2, 3})
    res = train(m, W.batches(2), cfg(tmp_path, steps=10, max_skipped_fraction=0.2))
    assert (res.skipped, res.max_consecutive_skipped, res.skipped_fraction) == (2, 2, 0.2)
    assert [json.loads(l)["consecutive_skips"] for l in open(tmp_path / "metrics.jsonl")][:4] == [0, 1, 2, 0]


# --- 3. resume never loses data ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return train(model(), W.batches(3), cfg(out, steps=6)).losses


def _two_checkpoints(out):
    "A 4-step run with checkpoints at steps 2 and 4 (of a 6-step stage, so the resume goes on)."
    train(model(), W.batches(3), cfg(out, steps=4, ckpt_every=2, keep_checkpoints=0))
    return out / "checkpoints/step_00000002", out / "checkpoints/step_00000004"


def _damage(f: Path, how: str):
    if how == "truncate": f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "garbage": f.write_bytes(os.urandom(64))
    else: f.unlink()


@pytest.mark.parametrize("name,how", [("model.safetensors", "truncate"), ("trainer.json", "garbage"),
                                      ("rank0.pt", "truncate"), ("rank0.pt", "garbage"), ("model.safetensors", "delete")])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, reference, name, how):
    older, newest = _two_checkpoints(tmp_path)
    _damage(newest / name, how)
    with pytest.warns(RuntimeWarning, match=rf"step_00000004.*{name}"):
        res = train(model(), W.batches(3), cfg(tmp_path, steps=6, resume=True))
    assert res.resumed_from == 2
    assert res.losses == reference                                    # the fallback resume is still exact
    assert metric_steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert metric_steps(tmp_path / "metrics.dropped-2.jsonl") == [3, 4]


def test_no_loadable_checkpoint_is_an_error_naming_the_files(tmp_path):
    older, newest = _two_checkpoints(tmp_path)
    _damage(newest / "rank0.pt", "truncate"); _damage(older / "model.safetensors", "garbage")
    before = (tmp_path / "metrics.jsonl").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for resume in (True, "auto"):                                 # "auto" does not start over on damage either
            with pytest.raises(CheckpointError) as e:
                train(model(), W.batches(3), cfg(tmp_path, steps=6, resume=resume))
            assert str(newest / "rank0.pt") in str(e.value) and str(older / "model.safetensors") in str(e.value)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_resume_true_with_nothing_to_resume_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(FileNotFoundError) as e:
        train(model(), W.batches(2), cfg(tmp_path, resume=True))
    assert str(tmp_path) in str(e.value) and "step_*/COMPLETE" in str(e.value) and "resume='auto'" in str(e.value)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'     # untouched
    # lost markers: checkpoint directories without COMPLETE are nothing to resume from either
    _two_checkpoints(tmp_path / "run")
    for p in (tmp_path / "run/checkpoints").glob("step_*"): (p / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(model(), W.batches(2), cfg(tmp_path / "run", resume=True))
    assert metric_steps(tmp_path / "run/metrics.jsonl") == [1, 2, 3, 4]


def test_resume_auto_starts_fresh_and_moves_old_metrics_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 7, "loss": 5.0}\n')
    with pytest.warns(RuntimeWarning, match="moved aside"):
        res = train(model(), W.batches(2), cfg(tmp_path, steps=2, resume="auto"))
    assert res.resumed_from is None and metric_steps(tmp_path / "metrics.jsonl") == [1, 2]
    aside = [p for p in tmp_path.glob("metrics.*.jsonl")]
    assert len(aside) == 1 and aside[0].read_text() == '{"step": 7, "loss": 5.0}\n'
    res = train(model(), W.batches(2), cfg(tmp_path, steps=3, resume="auto"))      # now there is something
    assert res.resumed_from == 2


def test_fresh_start_keeps_the_previous_run(tmp_path):
    _two_checkpoints(tmp_path)
    old = (tmp_path / "metrics.jsonl").read_text()
    with pytest.warns(RuntimeWarning, match="moved aside"):
        train(model(), W.batches(2), cfg(tmp_path, steps=1))
    assert metric_steps(tmp_path / "metrics.jsonl") == [1]
    assert [p.read_text() for p in tmp_path.glob("metrics.*.jsonl")] == [old]
    moved = [p for p in tmp_path.glob("checkpoints.*") if p.is_dir()]
    assert len(moved) == 1 and [p.name for p in complete_checkpoints(moved[0])] == ["step_00000004", "step_00000002"]
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000001"]


def test_resume_truncation_keeps_dropped_and_torn_lines(tmp_path, reference):
    older, newest = _two_checkpoints(tmp_path)
    shutil.rmtree(newest)                                              # as if killed before the step-4 checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f: f.write('{"loss": 3.1, "st')   # a torn last line
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    res = train(model(), W.batches(3), cfg(tmp_path, steps=6, resume=True))
    assert res.resumed_from == 2 and res.losses == reference
    assert (tmp_path / "metrics.dropped-2.jsonl").read_text().splitlines() == lines[2:]
    assert metric_steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]


# --- 4. weights-only checkpoints ------------------------------------------------------------------------
class Evil:
    "Unpickling this runs a shell command that writes a marker file."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def test_checkpoint_files_are_safetensors_json_and_weights_only(tmp_path):
    res = train(model(), W.batches(2), cfg(tmp_path, steps=1))
    ck = Path(res.checkpoint)
    assert sorted(p.name for p in ck.iterdir()) == ["COMPLETE", "model.safetensors", "rank0.pt", "trainer.json"]
    meta = json.loads((ck / "trainer.json").read_text())
    assert meta["format"] == 2 and meta["model_cfg"]["moe"]["routing"]["num_experts"] == 4 and meta["train_cfg"]["steps"] == 1
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ck / "rank0.pt") == []


@pytest.mark.parametrize("layout", ["legacy_trainer", "legacy_raw_pickle", "rank_file"])
def test_malicious_pickle_is_refused_without_running(tmp_path, layout):
    marker = tmp_path / "PWNED"
    if layout == "rank_file":
        res = train(model(), W.batches(2), cfg(tmp_path / "run", steps=1))
        ck = Path(res.checkpoint)
        torch.save(dict(optimizer=None, rng=Evil(marker), data=None), ck / "rank0.pt")
        with pytest.warns(RuntimeWarning, match="rank0.pt"), pytest.raises(CheckpointError, match="refused to load"):
            train(model(), W.batches(2), cfg(tmp_path / "run", steps=2, resume=True))
        bad = ck / "rank0.pt"
    else:
        ck = tmp_path / "ckpt"; ck.mkdir(); (ck / "COMPLETE").write_text("1")
        torch.save({k: v for k, v in model().state_dict().items()}, ck / "model.pt")
        bad = ck / "trainer.pt"
        if layout == "legacy_trainer": torch.save(dict(step=1, world_size=1, ep_size=1, model_cfg=Evil(marker)), bad)
        else: bad.write_bytes(pickle.dumps(Evil(marker)))
        for load in (lambda: load_model(ck), lambda: run_stage(ck, W.batches(1), cfg(tmp_path / "out", steps=1))):
            with pytest.raises(CheckpointError) as e: load()
            assert "refused to load" in str(e.value) and str(bad) in str(e.value)
    assert not marker.exists()
    try: torch.load(bad, weights_only=False)                           # the payload is live: unsafe loading runs it
    except RuntimeError: pass                                          # (a raw pickle then fails torch's magic check)
    assert marker.exists()


def _to_legacy(ck: Path):
    "Rewrite a format-2 checkpoint as the previous format wrote it (model.pt, pickled trainer.pt, numpy RNG tuple)."
    from safetensors.torch import load_file
    torch.save(load_file(ck / "model.safetensors"), ck / "model.pt")
    meta = json.loads((ck / "trainer.json").read_text()); meta.pop("format")
    meta["model_cfg"] = model_config_from_dict(meta["model_cfg"])
    flat = lambda m: {**{k: v for k, v in m.__dict__.items() if k != "routing"}, **m.routing.__dict__}
    with pytest.MonkeyPatch.context() as mp:                            # format 1 pickled MoEConfig's fields flat
        mp.setattr(MoEConfig, "__getstate__", flat, raising=False)
        torch.save(meta, ck / "trainer.pt")
    rs = torch.load(ck / "rank0.pt", weights_only=True)
    n = rs["rng"]["numpy"]
    legacy_np = np.random.RandomState()
    legacy_np.set_state(dict(n, state=dict(key=n["state"]["key"].numpy().astype(np.uint32), pos=n["state"]["pos"])))
    rs["rng"]["numpy"] = legacy_np.get_state()                         # ('MT19937', uint32 array, pos, ...)
    torch.save(rs, ck / "rank0.pt")
    (ck / "model.safetensors").unlink(); (ck / "trainer.json").unlink()


def test_previous_format_checkpoints_still_load_weights_only(tmp_path, reference):
    older, newest = _two_checkpoints(tmp_path)
    for ck in (older, newest): _to_legacy(ck)
    assert "numpy.ndarray" in str(torch.serialization.get_unsafe_globals_in_checkpoint(newest / "rank0.pt"))
    assert "RouterConfig" not in str(torch.serialization.get_unsafe_globals_in_checkpoint(newest / "trainer.pt"))
    m = load_model(tmp_path / "checkpoints").eval()
    b = W.batches(1)[0]
    ref = train(model(), W.batches(3), cfg(tmp_path / "ref4", steps=4))
    with torch.no_grad(): torch.testing.assert_close(m(**b).logits, load_model(ref.checkpoint).eval()(**b).logits)
    res = train(model(), W.batches(3), cfg(tmp_path, steps=6, resume=True))
    assert res.resumed_from == 4 and res.losses == reference


# --- 5. progress bar ----------------------------------------------------------------------------------
def test_progress_bar_only_when_interactive(tmp_path, capsys, monkeypatch):
    train(model(), W.batches(1), cfg(tmp_path / "a", steps=2, progress=True))
    assert "2/2" not in capsys.readouterr().err                       # stderr is not a terminal here: no bar
    monkeypatch.setattr(T, "_show_progress", lambda: True)
    train(model(), W.batches(1), cfg(tmp_path / "b", steps=2, progress=True))
    err = capsys.readouterr().err
    assert "train" in err and "2/2" in err
    train(model(), W.batches(1), cfg(tmp_path / "c", steps=2, progress=False))
    assert "2/2" not in capsys.readouterr().err


def test_show_progress_follows_the_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self): return True
    monkeypatch.setattr(sys, "stderr", Tty()); assert T._show_progress()
    monkeypatch.setattr(sys, "stderr", io.StringIO()); assert not T._show_progress()
