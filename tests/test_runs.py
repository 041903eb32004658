"Grid runner: a grid with a broken point, dependencies, skip-if-done, --force, results table (tiny dummy notebooks)."
import json
from pathlib import Path
import nbformat, pytest, yaml
from flanmoe_nb import grid, runs


def _nb(path, body):
    nb = nbformat.v4.new_notebook()
    # untagged on purpose: nbdev-clean strips tags, the runner finds the cell by its `# parameters` comment
    nb.cells = [nbformat.v4.new_code_cell("# parameters\nout_dir = '.'\nrun_id = ''\nx = 1\ninit = ''"),
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)

STAGE = """import json, pathlib
if x < 0: raise ValueError(f'x must be >= 0 (got x={x})')
prev = json.loads(pathlib.Path(init, 'eval.json').read_text())['score'] if init else 0.0
pathlib.Path(out_dir, 'metrics.jsonl').write_text(json.dumps({'step': 1, 'loss': 2.5}) + '\\n')
pathlib.Path(out_dir, 'eval.json').write_text(json.dumps({'score': prev + x / 10, 'per_cluster': {'c': x}}))
print('stage ran', x)"""

GRID = """
name: g
defaults: {x: 1}
runs:
  - {id: "a{x}", notebook: stage, product: {x: [1, 2]}}
  - {id: chained, notebook: stage, params: {x: 3, init: "${a2}"}}
  - {id: bad, notebook: stage, params: {x: -1}}
  - {id: after_bad, notebook: stage, params: {init: "${bad}"}}
"""

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    (root / "pyproject.toml").touch(); (root / "nbs/experiments").mkdir(parents=True)
    _nb(root / "nbs/experiments/stage.ipynb", STAGE)
    (root / "papermill_runs").mkdir(); (root / "papermill_runs/g.yaml").write_text(GRID)
    return root


def test_load_grid_product_refs_and_order(project):
    header, specs = runs.load_grid(project / "papermill_runs/g.yaml")
    assert header["name"] == "g" and Path(header["out"]) == project / "papermill_runs/g"
    assert [s.id for s in specs] == ["a1", "a2", "chained", "bad", "after_bad"]
    assert specs[2].deps == ["a2"] and specs[2].params == {"x": 3, "init": "${a2}"}


def test_grid_errors(tmp_path):
    (tmp_path / "pyproject.toml").touch(); (tmp_path / "nbs/experiments").mkdir(parents=True)
    _nb(tmp_path / "nbs/experiments/n.ipynb", "pass")
    for text, msg in [("runs: []", "non-empty"), ("runs: [{id: a}]", "notebook"),
                      ("runs: [{id: a, notebook: n, params: {init: '${zz}'}}]", "zz"),
                      ("runs: [{id: a, notebook: n}, {id: a, notebook: n}]", "duplicate"),
                      ("runs: [{id: a, notebook: n, params: {init: '${b}'}}, {id: b, notebook: n, params: {init: '${a}'}}]", "cycle"),
                      ("runs: [{id: a, notebook: n, product: {x: 3}}]", "lists")]:
        (tmp_path / "x.yaml").write_text(text)
        with pytest.raises(ValueError, match=msg): runs.load_grid(tmp_path / "x.yaml")


def test_broken_point_then_rerun_skips(project, capsys):
    grid = str(project / "papermill_runs/g.yaml")
    out = project / "papermill_runs/g"
    assert runs.grid_main([grid]) == 1
    printed = capsys.readouterr().out
    assert "failed" in printed and "blocked" in printed and "bad" in printed
    for rid in ("a1", "a2", "chained"):
        assert (out / rid / "DONE").exists() and (out / rid / "notebook.ipynb").exists()
        assert yaml.safe_load((out / rid / "params.yaml").read_text())["params"]["out_dir"] == "."   # relative: no machine paths
        assert json.loads((out / rid / "DONE").read_text())["fingerprint"]
    # the dependency was resolved to a2's folder and the chained run read its eval.json
    assert json.loads((out / "chained/eval.json").read_text())["score"] == pytest.approx(0.5)
    # the failure: no DONE, error.txt with the failing cell's traceback, and the traceback kept in the notebook
    assert not (out / "bad/DONE").exists()
    err = (out / "bad/error.txt").read_text()
    assert "ValueError: x must be >= 0 (got x=-1)" in err and "raise ValueError" in err and "Traceback" in err
    nb = nbformat.read(out / "bad/notebook.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors and errors[0].ename == "ValueError" and errors[0].traceback
    assert not (out / "after_bad").exists()          # blocked: never started
    # re-run: finished points are skipped (their DONE untouched), the broken one fails again
    stamp = (out / "a1/DONE").read_text()
    assert runs.grid_main([grid]) == 1
    table = capsys.readouterr().out
    assert (out / "a1/DONE").read_text() == stamp
    status = {l.split()[0]: l.split()[2] for l in table.splitlines() if l.split() and l.split()[0] in ("a1", "a2", "chained", "bad", "after_bad")}
    assert status == {"a1": "reused", "a2": "reused", "chained": "reused", "bad": "failed", "after_bad": "blocked"}
    assert "[1/5] a1: reused (same parameters and code)" in table
    # --only a finished run: exit 0 and nothing reruns; --force reruns it
    assert runs.grid_main([grid, "--only", "a1"]) == 0
    capsys.readouterr()
    assert runs.grid_main([grid, "--only", "a1", "--force"]) == 0
    assert "a1: rerun (--force)" in capsys.readouterr().out
    assert runs.grid_main([grid, "--only", "nope"]) == 2 and "nope" in capsys.readouterr().err
    # results table
    df = runs.collect_results(project / "papermill_runs").set_index("run_id")
    assert df.loc["bad", "status"] == "failed" and df.loc["a2", "status"] == "done"
    assert df.loc["chained", "score"] == pytest.approx(0.5) and df.loc["a2", "per_cluster.c"] == 2
    assert df.loc["a1", "final_loss"] == 2.5


def test_tagged_copy(tmp_path):
    nb = nbformat.v4.new_notebook(); nb.cells = [nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(nb, tmp_path / "a.ipynb")
    with pytest.raises(ValueError, match="no parameters cell"): runs.tagged_copy(tmp_path / "a.ipynb", tmp_path / "b.ipynb")
    nb.cells.append(nbformat.v4.new_code_cell("# Parameters\ny = 2")); nbformat.write(nb, tmp_path / "a.ipynb")
    out = nbformat.read(runs.tagged_copy(tmp_path / "a.ipynb", tmp_path / "b.ipynb"), as_version=4)
    assert [c.metadata.get("tags", []) for c in out.cells] == [[], ["parameters"]]
    # cells papermill injected in earlier in-place runs (tag dropped by nbdev-clean) are removed, not kept
    nb.cells[1:2] = [nbformat.v4.new_code_cell("# parameters\ny = 2"), nbformat.v4.new_code_cell("# Parameters\ny = 3\n"),
                     nbformat.v4.new_code_cell("# Parameters\ny = 4\n"), nbformat.v4.new_code_cell("z = y")]
    nbformat.write(nb, tmp_path / "a.ipynb")
    out = nbformat.read(runs.tagged_copy(tmp_path / "a.ipynb", tmp_path / "b.ipynb"), as_version=4)
    assert [c.source for c in out.cells] == ["x = 1", "# parameters\ny = 2", "z = y"]


def test_experiment_notebooks_have_parameters_cells():
    root = Path(__file__).resolve().parents[1] / "nbs/experiments"
    for nb in sorted(root.glob("*.ipynb")):
        cells = [c for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "code"]
        assert any(grid._PARAM_MARK.match(c.source) for c in cells), nb.name
    p = runs.experiment_params(setup=1, model="moe", init_checkpoint="x")
    assert p["task"] == "syllogism" and p["moe"] == {}
    with pytest.raises(ValueError, match="init_checkpoint"): runs.experiment_params(setup=3)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"): runs.experiment_params(nope=1)
    with pytest.raises(ValueError, match="takes no parameter|unknown parameter 'task'"): runs.experiment_params(setup=0, task="syllogism")
    assert runs.train_config(runs.experiment_params(torch_compile=True)).compile
    assert not runs.train_config(runs.experiment_params()).compile
    with pytest.raises(ValueError, match="launcher"): runs.experiment_params(launcher="mpirun")


def test_reuse_needs_same_parameters_even_when_stale(project, capsys):
    "A DONE point is reused only with its fingerprint; --reuse-stale accepts older code but never changed parameters."
    grid = project / "papermill_runs/g.yaml"
    out = project / "papermill_runs/g_reuse"
    assert runs.grid_main([str(grid), "--out", str(out), "--only", "a1"]) == 0
    done = json.loads((out / "a1/DONE").read_text())
    assert done["fingerprint"] and done["params_fingerprint"]
    # the code changed (simulated by another recorded fingerprint): rerun by default, reused with --reuse-stale
    (out / "a1/DONE").write_text(json.dumps({**done, "fingerprint": "older-code"}))
    capsys.readouterr()
    assert runs.grid_main([str(grid), "--out", str(out), "--only", "a1", "--reuse-stale"]) == 0
    assert "a1: reused (same parameters, older code: --reuse-stale)" in capsys.readouterr().out
    # the parameters changed: rerun even with --reuse-stale, and the earlier attempt is kept aside
    (out / "a1/DONE").write_text(json.dumps({**done, "fingerprint": "older-code", "params_fingerprint": "other-params"}))
    assert runs.grid_main([str(grid), "--out", str(out), "--only", "a1", "--reuse-stale"]) == 0
    assert "a1: rerun (parameters or code changed)" in capsys.readouterr().out
    assert len(list((out / ".previous").glob("a1-*"))) == 1


def test_compare_runs_against_a_lab_book(tmp_path):
    "compare_runs: same score, within the spread of the point's seeds, outside it, or no lab-book run."
    def run(root, rid, score):
        d = root / "g" / rid; d.mkdir(parents=True)
        (d / "params.yaml").write_text(yaml.safe_dump({"notebook": "setup1_direct_finetune.ipynb", "params": {"model": "moe"}}))
        (d / "eval.json").write_text(json.dumps({"score": score})); (d / "DONE").write_text("{}")
    for rid, s in [("s1_seed0", 0.70), ("s1_seed1", 0.80), ("s1_seed2", 0.75)]: run(tmp_path / "lab", rid, s)
    for rid, s in [("s1_seed0", 0.70), ("s1_seed1", 0.72), ("s1_seed2", 0.90), ("s1_seed3", 0.75)]: run(tmp_path / "new", rid, s)
    got = runs.compare_runs(tmp_path / "new", tmp_path / "lab").set_index("run_id")["reproduced"].to_dict()
    assert got == {"s1_seed0": "same score", "s1_seed1": "within the seeds' spread", "s1_seed2": "outside the seeds' spread",
                   "s1_seed3": "no lab-book run"}


def test_results_csv_is_tidy_one_row_per_run_and_metric(tmp_path, monkeypatch, capsys):
    "`flanmoe results --no-execute` writes results.csv as grid, run_id, setup, model, seed, status, metric, value."
    import shutil, pandas as pd
    from flanmoe_nb.runs import results_main, collect_results
    root = Path(__file__).resolve().parents[1]
    for f in (root / "papermill_runs/tiny").glob("*/*"):
        if f.name in ("params.yaml", "eval.json", "DONE", "metrics.jsonl"):
            dst = tmp_path / "tiny" / f.parent.name / f.name; dst.parent.mkdir(parents=True, exist_ok=True); shutil.copy(f, dst)
    monkeypatch.chdir(root)
    assert results_main(["--runs", str(tmp_path), "--no-execute"]) == 0
    assert "results.csv" in capsys.readouterr().out
    t = pd.read_csv(tmp_path / "results.csv")
    assert list(t.columns) == ["grid", "run_id", "setup", "model", "seed", "status", "metric", "value"]
    assert not t.duplicated(["grid", "run_id", "metric"]).any() and t.value.notna().all()
    wide = collect_results(tmp_path).set_index("run_id")
    s = t[t.metric.eq("score")].set_index("run_id").value
    assert len(s) == 20 and (abs(s - wide.score.loc[s.index]) < 1e-12).all()
    assert not {"lr", "steps", "seed", "moe.num_experts"} & set(t.metric)        # parameters are not metrics


def test_export_grid_exports_finished_runs_only(tmp_path):
    import shutil, sys, torch
    sys.path.insert(0, str(Path(__file__).parent))
    import _dist_worker as W
    from flanmoe_nb.hf import load_pretrained
    from flanmoe_nb.model import EncoderDecoder
    from flanmoe_nb.runs import export_grid, ConfigError
    from flanmoe_nb.checkpoint import save_checkpoint
    src = Path(__file__).resolve().parents[1] / "papermill_runs/tiny/s0_moe"
    grid = tmp_path / "tiny"
    torch.manual_seed(0); m = EncoderDecoder(W.tiny()).eval()
    for rid, done, ckpt in [("a", True, True), ("b", True, False), ("c", False, True)]:
        d = grid / rid; d.mkdir(parents=True)
        shutil.copy(src / "params.yaml", d)
        if done: shutil.copy(src / "DONE", d)
        if ckpt: save_checkpoint(d / "checkpoints", 1, m)
    rows = {r["run_id"]: r for r in export_grid(grid, tmp_path / "exp")}
    assert set(rows) == {"a", "b"} and rows["b"]["error"] == "no complete checkpoint"
    assert rows["a"]["error"] is None and rows["a"]["path"] == str(tmp_path / "exp/a")
    x = torch.randint(2, 50, (1, 6)); y = torch.randint(2, 50, (1, 4))
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "exp/a")(x, decoder_input_ids=y).logits, m(x, decoder_input_ids=y).logits)
    with pytest.raises(ConfigError, match="runs_dir"): export_grid(tmp_path / "nope", tmp_path / "exp")


def test_grid_cli_has_export_option(capsys):
    from flanmoe_nb.runs import grid_main
    with pytest.raises(SystemExit): grid_main(["--help"])
    assert "--export DIR" in capsys.readouterr().out


def test_scrub_paths_removes_run_project_and_python_prefix(tmp_path):
    import sys, json
    out = tmp_path / "grid" / "run1"; out.mkdir(parents=True)
    nb = out / "notebook.ipynb"
    lines = [f"{out}/eval.json", f"{sys.prefix}/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning"]
    nb.write_text(json.dumps({"cells": [{"outputs": [{"text": lines}]}]}))
    runs._scrub_paths(nb, out)
    text = nb.read_text()
    assert str(tmp_path) not in text and sys.prefix not in text
    assert json.loads(text)["cells"][0]["outputs"][0]["text"] == ["./eval.json", "<python>/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning"]


CKPT_STAGE = """import json, pathlib
if init: assert pathlib.Path(init, 'checkpoints/step_1/w.txt').exists(), 'parent checkpoint missing'
pathlib.Path(out_dir, 'checkpoints/step_1').mkdir(parents=True, exist_ok=True)
pathlib.Path(out_dir, 'checkpoints/step_1/w.txt').write_text(str(x))
pathlib.Path(out_dir, 'train.json').write_text(json.dumps({'checkpoint': 'checkpoints/step_1', 'status': 'trained'}))
pathlib.Path(out_dir, 'eval.json').write_text(json.dumps({'score': x}))"""


def test_finished_run_without_its_checkpoint_reruns_only_when_a_later_point_needs_it(tmp_path, capsys):
    "A fresh clone has the committed runs but not their checkpoints: a parent is rerun when a child still has to start from it."
    (tmp_path / "pyproject.toml").touch(); (tmp_path / "nbs/experiments").mkdir(parents=True)
    _nb(tmp_path / "nbs/experiments/stage.ipynb", CKPT_STAGE)
    (tmp_path / "papermill_runs").mkdir()
    grid = tmp_path / "papermill_runs/c.yaml"
    grid.write_text('runs:\n  - {id: parent, notebook: stage}\n  - {id: "child{x}", notebook: stage, product: {x: [2, 3]}, params: {init: "${parent}"}}\n')
    out = tmp_path / "papermill_runs/c"
    assert runs.grid_main([str(grid)]) == 0
    capsys.readouterr()
    import shutil
    shutil.rmtree(out / "parent/checkpoints")          # as on a fresh clone; the children are finished: nothing to do
    assert runs.grid_main([str(grid)]) == 0
    assert "[1/3] parent: reused" in capsys.readouterr().out
    shutil.rmtree(out / "child3")                       # now child3 must start from parent: parent runs again first
    assert runs.grid_main([str(grid)]) == 0
    log = capsys.readouterr().out
    assert "parent: rerun (finished, but its checkpoint is not here and child3 starts from it)" in log
    assert "child2: reused" in log and (out / "parent/checkpoints/step_1/w.txt").exists() and (out / "child3/DONE").exists()


def test_a_child_reruns_when_its_parent_was_rerun_with_other_weights(tmp_path, capsys, monkeypatch):
    "DONE records the digest of a run's weights and of the parents' weights it started from; a parent re-run with other weights (another CPU's kernels) makes its finished children stale."
    (tmp_path / "pyproject.toml").touch(); (tmp_path / "nbs/experiments").mkdir(parents=True)
    _nb(tmp_path / "nbs/experiments/stage.ipynb", CKPT_STAGE.replace("write_text(str(x))", "write_text(str(x) + os.environ.get('SALT', ''))")
        .replace("import json, pathlib", "import json, os, pathlib"))
    (tmp_path / "papermill_runs").mkdir()
    grid = tmp_path / "papermill_runs/c.yaml"
    grid.write_text('runs:\n  - {id: parent, notebook: stage}\n  - {id: "child{x}", notebook: stage, product: {x: [2, 3]}, params: {init: "${parent}"}}\n')
    out = tmp_path / "papermill_runs/c"
    import shutil
    monkeypatch.setenv("SALT", "a")
    assert runs.grid_main([str(grid)]) == 0
    done = json.loads((out / "child2/DONE").read_text())
    assert done["parents"] == {"parent": runs.weights_digest(out / "parent")} and done["weights"] == runs.weights_digest(out / "child2")
    capsys.readouterr()
    shutil.rmtree(out / "parent/checkpoints"); shutil.rmtree(out / "child3")
    assert runs.grid_main([str(grid)]) == 0                # parent re-run, same weights: child2 stays
    log = capsys.readouterr().out
    assert "parent: rerun (finished, but its checkpoint is not here" in log and "child2: reused" in log
    monkeypatch.setenv("SALT", "b")                        # the next re-run gives other weights
    shutil.rmtree(out / "parent/checkpoints"); shutil.rmtree(out / "child3")
    assert runs.grid_main([str(grid)]) == 0
    log = capsys.readouterr().out
    assert "child2: rerun (it started from parent, whose weights are not the ones parent has now)" in log, log
    assert json.loads((out / "child2/DONE").read_text())["parents"]["parent"] == runs.weights_digest(out / "parent")
    d = json.loads((out / "child2/DONE").read_text()); d.pop("parents")   # a run finished before DONE kept parents
    (out / "child2/DONE").write_text(json.dumps(d))
    assert runs.grid_main([str(grid)]) == 0                # nothing re-ran now: no reason to doubt it
    assert "child2: reused" in capsys.readouterr().out
    shutil.rmtree(out / "parent/checkpoints"); shutil.rmtree(out / "child3")
    assert runs.grid_main([str(grid)]) == 0                # the parent ran again and child2 kept no record: rerun
    assert "child2: rerun (it started from parent" in capsys.readouterr().out


CHOOSE = """import json, pathlib
from flanmoe_nb import extension as X
c = X.choose_path("demo", "grid", {"a": lambda: None, "b": lambda: None}, default="a")
pathlib.Path(out_dir, 'train.json').write_text(json.dumps({"kernel_choices": X.kernel_choices()}))
pathlib.Path(out_dir, 'eval.json').write_text(json.dumps({'score': 1.0 if c == 'b' else 0.0}))"""


def test_grid_replays_recorded_kernel_choices(tmp_path, monkeypatch, capsys):
    "--replay-kernels DIR: each run takes the paths DIR/<run_id>/ recorded, copied into its folder, even from its own previous attempt."
    import os
    from flanmoe_nb.checks import ConfigError
    monkeypatch.setenv("FLANMOE_KERNEL_CACHE", str(tmp_path / "choice.json"))
    (tmp_path / "pyproject.toml").touch(); (tmp_path / "nbs/experiments").mkdir(parents=True)
    _nb(tmp_path / "nbs/experiments/choose.ipynb", CHOOSE)
    g = tmp_path / "papermill_runs/r.yaml"; g.parent.mkdir()
    g.write_text("name: r\nruns:\n  - {id: p1, notebook: choose}\n")
    rec = tmp_path / "recorded/p1"; rec.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no recorded kernel choices.*\['p1'\]"):
        runs.run_grid(g, replay_kernels=tmp_path / "elsewhere", quiet=True)
    (rec / "train.json").write_text(json.dumps({"kernel_choices": {"demo/grid": {"choice": "b", "source": "measured"}}}))
    out = tmp_path / "papermill_runs/r"
    assert runs.run_grid(g, replay_kernels=tmp_path / "recorded", quiet=True)[0]["score"] == 1.0   # the default would give 0.0
    assert json.loads((out / "p1/train.json").read_text())["kernel_choices"]["demo/grid"]["source"] == "replayed"
    assert json.loads((out / "p1/kernel_choices.replay.json").read_text()) == {"demo/grid": "b"}
    assert yaml.safe_load((out / "p1/params.yaml").read_text())["kernel_choices_replayed_from"] == "../../../recorded/p1"
    assert "FLANMOE_KERNEL_CHOICES" not in os.environ                      # set for the run only
    # a rerun that replays its own previous attempt (moved aside before the notebook starts)
    assert runs.run_grid(g, force=True, replay_kernels=out, quiet=True)[0]["score"] == 1.0
    assert "previous attempt" in yaml.safe_load((out / "p1/params.yaml").read_text())["kernel_choices_replayed_from"]
    assert runs.run_grid(g, force=True, quiet=True)[0]["score"] == 0.0      # without it: the deterministic default
