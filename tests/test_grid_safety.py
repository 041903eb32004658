"""Grid and notebook safety (issue #16): typos and bad values are caught at load with the file, the line and the
closest valid name; run ids cannot escape the output folder; a grid outside a project writes nothing into the
package; `--check` runs nothing; one grid per output folder; a forced rerun that fails is not DONE; `--log`
shows the notebook's output; the setup notebooks work under plain papermill and share one parameter source.
Tiny dummy notebooks everywhere except the plain-papermill cases, which run a real setup notebook."""
import json, os, re, subprocess, sys, time
from pathlib import Path
import nbformat, pytest
import flanmoe_nb
from flanmoe_nb import runs
from flanmoe_nb.checks import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NBS = ROOT / "nbs/experiments"
MARK = "HELLO" + "_FROM_NOTEBOOK"          # only the notebook's own print writes it in one piece

STAGE = """import json, pathlib
if flag and pathlib.Path(flag).exists(): raise RuntimeError(f'boom: {flag} exists')
print('HELLO' + '_FROM_NOTEBOOK', steps)
pathlib.Path(out_dir, 'metrics.jsonl').write_text(json.dumps({'step': steps, 'loss': 1.0}) + '\\n')
pathlib.Path(out_dir, 'eval.json').write_text(json.dumps({'score': steps / 10}))"""


def _nb(path, body=STAGE):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("# parameters\nout_dir = '.'\nrun_id = ''\nsteps = 1\nflag = ''"),
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def project(tmp_path):
    "A throw-away project (pyproject.toml + nbs/experiments/stage.ipynb, a dummy notebook)."
    root = tmp_path / "proj"
    (root / "nbs/experiments").mkdir(parents=True); (root / "pyproject.toml").touch(); (root / "papermill_runs").mkdir()
    _nb(root / "nbs/experiments/stage.ipynb")
    return root


def _grid(root: Path, text: str, name: str = "g") -> Path:
    f = root / "papermill_runs" / f"{name}.yaml"; f.write_text(text); return f


def _load_error(path) -> str:
    with pytest.raises(ConfigError) as e: runs.load_grid(path)
    return str(e.value)


# ---------------------------------------------------------------- typos and bad values, at load
GOOD = "name: g\ndefaults: {steps: 1}\nruns:\n  - id: a\n    notebook: stage\n    params: {steps: 2}\n"
TYPOS = {   # level: (grid text, typo, its line, the valid name)
    "params": (GOOD.replace("params: {steps: 2}", "params: {stpes: 2}"), "stpes", 6, "steps"),
    "top_level": (GOOD.replace("defaults:", "defualts:"), "defualts", 2, "defaults"),
    "run_entry": (GOOD.replace("params:", "parmas:"), "parmas", 6, "params"),
    "product": (GOOD.replace("params: {steps: 2}", "product: {stpes: [1, 2]}"), "stpes", 6, "steps"),
}


def test_good_grid_loads(project):
    _, specs = runs.load_grid(_grid(project, GOOD))
    assert [(s.id, s.params) for s in specs] == [("a", {"steps": 2})]


@pytest.mark.parametrize("level", list(TYPOS))
def test_typo_names_key_file_line_and_closest(project, level):
    text, typo, line, valid = TYPOS[level]
    f = _grid(project, text)
    msg = _load_error(f)
    assert f"{f}:{line}:" in msg and repr(typo) in msg and f"did you mean {valid!r}" in msg, msg


def test_typo_in_real_setup_notebook_params(project):
    f = _grid(project, f"name: g\nnotebooks: {NBS}\nruns:\n  - id: a\n    notebook: setup0_pretrain\n    params: {{stpes: 2}}\n")
    msg = _load_error(f)
    assert f"{f}:6:" in msg and "'stpes'" in msg and "did you mean 'steps'" in msg, msg


def test_typo_in_defaults_suggests_closest(project):
    f = _grid(project, "name: g\ndefaults: {stpes: 1}\nruns:\n  - id: a\n    notebook: stage\n")
    msg = _load_error(f)
    assert f"{f}:2:" in msg and "'stpes'" in msg and "did you mean 'steps'" in msg, msg


def test_typo_in_dotted_product_key_names_line(project):
    f = _grid(project, f"name: g\nnotebooks: {NBS}\nruns:\n  - id: a{{moe.num_expert}}\n    notebook: setup0_pretrain\n"
                       "    product: {moe.num_expert: [4]}\n    params: {model: moe}\n")
    msg = _load_error(f)
    assert f"{f}:6:" in msg and "'num_expert'" in msg and "did you mean 'num_experts'" in msg, msg


@pytest.mark.parametrize("value", ['"three"', "2.5"])
@pytest.mark.parametrize("where", ["params", "defaults"])
def test_bad_value_named_at_load(project, value, where):
    body = f"defaults: {{steps: {value}}}\nruns:\n  - id: a\n    notebook: setup0_pretrain\n" if where == "defaults" else \
           f"runs:\n  - id: a\n    notebook: setup0_pretrain\n    params: {{steps: {value}}}\n"
    f = _grid(project, f"name: g\nnotebooks: {NBS}\n" + body)
    msg = _load_error(f)
    line = 3 if where == "defaults" else 6
    assert f"{f}:{line}:" in msg and "steps must be an int" in msg and f"steps={'three' if 'three' in value else 2.5!r}" in msg, msg
    assert runs.grid_main([str(f), "--check"]) == 2


def test_unknown_notebook_at_load(project):
    f = _grid(project, f"name: g\nnotebooks: {NBS}\nruns:\n  - id: a\n    notebook: setup0_pretrian\n")
    msg = _load_error(f)
    assert f"{f}:5:" in msg and "'setup0_pretrian' not found" in msg and "did you mean 'setup0_pretrain'" in msg, msg


@pytest.mark.parametrize("block,msg", [('{capacity_factor: "two"}', "capacity_factor"), ("{capacity_factor: -1.0}", "capacity_factor"),
                                       ("{second_policy: bogus}", "second_policy")])
def test_later_stage_moe_values_checked_at_load(project, block, msg):
    f = _grid(project, f"name: g\nnotebooks: {NBS}\nruns:\n  - {{id: s0, notebook: setup0_pretrain, params: {{model: moe}}}}\n"
                       f"  - {{id: s2, notebook: setup2_instruction_tuning, params: {{model: moe, init_checkpoint: '${{s0}}', moe: {block}}}}}\n")
    assert msg in _load_error(f)


# ---------------------------------------------------------------- where a grid may write
@pytest.mark.parametrize("rid", ["../../escaped_run", "ABS", "{m}"])
def test_run_id_cannot_escape_out(tmp_path, project, rid, capsys):
    out = tmp_path / "deep/er/out"
    rid = str(tmp_path / "abs_escape") if rid == "ABS" else rid
    product = "    product: {m: ['../../escaped_run']}\n" if rid == "{m}" else ""
    f = _grid(project, f"name: g\nruns:\n  - id: '{rid}'\n    notebook: stage\n{product}")
    assert "run id must be a plain name" in _load_error(f)
    assert runs.grid_main([str(f), "--out", str(out)]) == 2
    assert "run id" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*escape*")) and not out.exists()


def test_grid_outside_project_needs_out(tmp_path, monkeypatch, capsys):
    assert runs.project_root(tmp_path) is None
    nbs = tmp_path / "notebooks"; nbs.mkdir(); _nb(nbs / "stage.ipynb")
    monkeypatch.chdir(tmp_path)
    name = f"outside{os.getpid()}"
    f = tmp_path / f"{name}.yaml"
    f.write_text(f"name: {name}\nnotebooks: {nbs}\nruns:\n  - {{id: a, notebook: stage}}\n")
    assert "outside a project" in _load_error(f)
    assert runs.grid_main([str(f)]) == 2 and "outside a project" in capsys.readouterr().err
    pkg = Path(flanmoe_nb.__file__).resolve().parent
    for d in (pkg, pkg.parent, pkg / "papermill_runs", pkg.parent / "papermill_runs", tmp_path):
        assert not (d / name).exists(), d
    assert not (pkg / "papermill_runs").exists()
    f.write_text(f"name: {name}\nnotebooks: {nbs}\nout: {tmp_path / 'o'}\nruns:\n  - {{id: a, notebook: stage}}\n")
    header, _ = runs.load_grid(f)
    assert header["out"] == str(tmp_path / "o")


# ---------------------------------------------------------------- --check
def test_check_runs_nothing_and_prints_one_line(project, capsys):
    f = _grid(project, "name: g\nruns:\n  - {id: 'a{steps}', notebook: stage, product: {steps: [1, 2]}}\n")
    assert runs.grid_main([str(f), "--check"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines() == [f"{f}: ok, 2 runs -> {project / 'papermill_runs/g'}"] and not out.err
    assert not (project / "papermill_runs/g").exists()          # nothing ran, nothing written
    f.write_text("name: g\nruns:\n  - {id: a, notebook: stage, parmas: {steps: 2}}\n")
    assert runs.grid_main([str(f), "--check"]) == 2
    out = capsys.readouterr()
    assert not out.out and len(out.err.strip().splitlines()) == 1 and out.err.startswith("error: ") and "parmas" in out.err
    assert "Traceback" not in out.err


def test_check_cli_no_traceback(project):
    f = _grid(project, "name: g\nruns:\n  - {id: a, notebook: stage, params: {stpes: 2}}\n")
    r = subprocess.run([str(BIN / "flanmoe"), "grid", str(f), "--check"], capture_output=True, text=True, cwd=project, timeout=120)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "did you mean 'steps'" in r.stderr, r.stderr


# ---------------------------------------------------------------- one grid per output folder
ONE = "name: g\nruns:\n  - {id: a, notebook: stage}\n"


def test_second_grid_refused_while_lock_held(project, capsys):
    f = _grid(project, ONE); out = project / "papermill_runs/g"
    with runs.GridLock(out):
        assert runs.grid_main([str(f)]) == 2
        err = capsys.readouterr().err
        assert "in use by another grid" in err and f"pid {os.getpid()}" in err, err
        with pytest.raises(ConfigError, match="in use"): runs.run_grid(f, quiet=True)
    assert not (out / "a").exists()                    # the refused grid started nothing
    assert runs.grid_main([str(f)]) == 0 and (out / "a/DONE").exists()   # released: the next grid runs


def test_second_grid_refused_across_processes(project, capsys):
    f = _grid(project, ONE); out = project / "papermill_runs/g"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom flanmoe_nb import runs\n"
                               "with runs.GridLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)\n", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert runs.grid_main([str(f)]) == 2
        err = capsys.readouterr().err
        assert "in use by another grid" in err and f"pid {holder.pid}" in err, err
        assert not (out / "a").exists()
    finally:
        holder.kill(); holder.wait()
    with runs.GridLock(out): pass                      # the OS released it with the process


# ---------------------------------------------------------------- a forced rerun that fails
def test_forced_rerun_that_fails_is_not_done(project, tmp_path, capsys):
    flag = tmp_path / "fail_now"
    f = _grid(project, f"name: g\nruns:\n  - {{id: a, notebook: stage, params: {{flag: '{flag}'}}}}\n")
    out = project / "papermill_runs/g/a"
    assert runs.grid_main([str(f)]) == 0 and (out / "DONE").exists() and not (out / "error.txt").exists()
    df = runs.collect_results(project / "papermill_runs").set_index("run_id")
    assert df.loc["a", "status"] == "done"
    flag.touch()
    assert runs.grid_main([str(f), "--force"]) == 1
    assert not (out / "DONE").exists()
    assert "boom" in (out / "error.txt").read_text()
    df = runs.collect_results(project / "papermill_runs").set_index("run_id")
    assert df.loc["a", "status"] == "failed"
    assert "a: rerun (--force)" in capsys.readouterr().out
    assert runs.grid_main([str(f)]) == 1               # and a plain rerun does not reuse it


def test_forced_rerun_interrupted_is_not_done(project, monkeypatch):
    "Ctrl-C (or the kernel's death) during a forced rerun: no DONE, an error.txt, and the results table says failed."
    import papermill
    f = _grid(project, ONE); out = project / "papermill_runs/g/a"
    assert runs.grid_main([str(f)]) == 0 and (out / "DONE").exists()
    def interrupted(*a, **k): raise KeyboardInterrupt("stopped by hand")
    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt): runs.grid_main([str(f), "--force"])
    assert not (out / "DONE").exists() and "KeyboardInterrupt" in (out / "error.txt").read_text()
    assert runs.collect_results(project / "papermill_runs").set_index("run_id").loc["a", "status"] == "failed"


# ---------------------------------------------------------------- --log
def test_log_shows_notebook_output(project):
    f = _grid(project, ONE)
    def grid(*args):
        r = subprocess.run([str(BIN / "flanmoe"), "grid", str(f), *args], capture_output=True, text=True, cwd=project, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout + r.stderr
    assert MARK not in grid("--out", str(project / "quiet"))
    assert MARK in grid("--log", "--out", str(project / "loud"))


# ---------------------------------------------------------------- plain papermill on the setup notebooks
def _papermill(*args, timeout=300):
    return subprocess.run([str(BIN / "papermill"), *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def _check_trained_moe(out: Path, r):
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "train.json").read_text())
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [x["step"] for x in recs] == [1, 2] and all(x.get("entropy") for x in recs)   # per-MoE-layer routing stats
    assert info["checkpoint"].endswith("step_00000002")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["model"] == "moe" and ev["moe"]["num_experts"] == 4 and ev["setup"] == 0


def test_plain_papermill_trains_moe(tmp_path):
    "The documented command, with the MoE block as papermill YAML (`-y`)."
    out = tmp_path / "run"
    r = _papermill(NBS / "setup0_pretrain.ipynb", tmp_path / "OUT.ipynb", "-p", "steps", 2, "-p", "model", "moe",
                   "-y", "moe: {num_experts: 4}", "-p", "eval_per_task", 2, "-p", "out_dir", out)
    _check_trained_moe(out, r)


def test_plain_papermill_dict_parameter_as_json(tmp_path):
    out = tmp_path / "run"
    r = _papermill(NBS / "setup0_pretrain.ipynb", tmp_path / "OUT.ipynb", "-p", "steps", 2, "-p", "model", "moe",
                   "-p", "moe", '{"num_experts": 4}', "-p", "eval_per_task", 2, "-p", "out_dir", out)
    _check_trained_moe(out, r)


def test_plain_papermill_unknown_parameter(tmp_path):
    out = tmp_path / "run"
    r = _papermill(NBS / "setup0_pretrain.ipynb", tmp_path / "OUT.ipynb", "-p", "stpes", 2, "-p", "out_dir", out)
    assert r.returncode != 0
    assert "takes no parameter 'stpes'" in r.stderr and "did you mean 'steps'" in r.stderr, r.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists()        # nothing trained on the defaults


def test_help_notebook_lists_steps_with_default():
    r = _papermill("--help-notebook", NBS / "setup0_pretrain.ipynb", timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.strip().startswith("steps:"))
    assert f"(default {runs.PARAMS['steps'].default!r})" in line and runs.PARAMS["steps"].doc in line, line


@pytest.mark.parametrize("setup", sorted(runs.SETUPS))
def test_help_notebook_lists_every_parameter(setup):
    import papermill as pm
    nb = next(NBS.glob(f"setup{setup}_*.ipynb"))
    listed = set(pm.inspect_notebook(str(nb)))
    assert listed == set(runs.setup_params(setup)), sorted(set(runs.setup_params(setup)) - listed)


@pytest.mark.parametrize("setup", sorted(runs.SETUPS))
def test_parameters_cell_is_parameters_source(setup):
    nb = nbformat.read(next(NBS.glob(f"setup{setup}_*.ipynb")), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"setup {setup}: {len(cells)} cells tagged 'parameters'"
    assert cells[0].source == runs.parameters_source(setup)
    assert runs.notebook_schema(next(NBS.glob(f"setup{setup}_*.ipynb")))[0] == setup
