"Workspace foundation: the extension loads (or explains itself), the CLI and the docs builder work."
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

import flanmoe_nb
from flanmoe_nb import kernels, extension, docs, cli

ROOT = Path(__file__).resolve().parents[1]


def test_extension_matches_installed_torch():
    assert kernels.extension_available(), extension._LOAD_ERROR
    info = kernels.extension_info()
    assert info["torch"] == torch.__version__
    assert info["threads"] >= 1
    assert json.loads((Path(flanmoe_nb.__file__).with_name("_build_info.json")).read_text())["torch"] == torch.__version__


def test_ops_registered_under_flanmoe_namespace():
    assert hasattr(torch.ops.flanmoe, "grouped_mm")
    assert hasattr(torch.ops.flanmoe, "grouped_mm_wgrad")


def test_missing_extension_gives_clear_error(monkeypatch):
    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "_LOAD_ERROR", "flanmoe_nb._C could not be imported (x); rebuild it")
    with pytest.raises(kernels.ExtensionError, match="rebuild"):
        kernels.grouped_mm(torch.randn(2, 3), torch.randn(1, 3, 4), torch.tensor([2]))


def test_extension_built_for_other_torch_is_explained(tmp_path):
    "A fake package whose _C reports another torch version must raise ExtensionError, not crash."
    pkg = tmp_path / "flanmoe_nb"
    shutil.copytree(Path(flanmoe_nb.__file__).parent, pkg,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (pkg / "_C.py").write_text("def torch_version(): return '0.0.1-other'\n")
    code = ("import torch, flanmoe_nb.kernels as k\n"
            "assert not k.extension_available()\n"
            "try: k.grouped_mm(torch.randn(2,3), torch.randn(1,3,4), torch.tensor([2]))\n"
            "except k.ExtensionError as e: print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert "built for torch 0.0.1-other" in r.stdout and torch.__version__ in r.stdout


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e: cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "bench", "docs"): assert cmd in out


def test_console_script_installed():
    exe = Path(sys.executable).with_name("flanmoe")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "docs" in r.stdout


def test_docs_site_builds_from_notebooks(tmp_path):
    "Build the site for a small project (index + the CLI notebook) into a folder of HTML pages."
    (tmp_path / "nbs").mkdir()
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for nb in ("index.ipynb", "12_cli.ipynb"): shutil.copy(ROOT / "nbs" / nb, tmp_path / "nbs")
    index = docs.build_docs(tmp_path)
    assert index.exists()
    page = (tmp_path / "_docs" / "cli.html").read_text()
    assert "build_parser" in page                      # show_doc signature of an exported function
    assert "#| export" not in page and "default_exp" not in page   # directives never leak
    assert "cli.html" in index.read_text()           # in the table of contents


def test_readme_renders_from_index(tmp_path):
    (tmp_path / "nbs").mkdir()
    shutil.copy(ROOT / "nbs" / "index.ipynb", tmp_path / "nbs")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    readme = docs.render_readme(tmp_path).read_text()
    assert "make run" in readme and "make test" in readme
    assert readme == (ROOT / "README.md").read_text(), "README.md is stale: run `flanmoe docs --readme-only`"


def test_notebooks_name_the_project_kernel_and_nbdev_clean_keeps_it(tmp_path):
    import copy, json
    from nbdev.clean import clean_nb
    nbs = sorted(p for p in (ROOT / "nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    assert len(nbs) >= 15
    wrong = {p.relative_to(ROOT).as_posix(): json.loads(p.read_text())["metadata"].get("kernelspec") for p in nbs}
    wrong = {k: v for k, v in wrong.items() if (v or {}).get("name") != "flanmoe_nb"}
    assert not wrong, f"notebooks not on the flanmoe_nb kernel: {wrong}"
    nb = json.loads((ROOT / "nbs/03_moe.ipynb").read_text())
    cleaned = copy.deepcopy(nb); clean_nb(cleaned)
    assert cleaned["metadata"]["kernelspec"] == nb["metadata"]["kernelspec"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_lab_allows_root_only_as_root():
    r = subprocess.run(["make", "-n", "-o", "install", "lab", "LAB_ARGS=--no-browser"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if "jupyter lab" in l)
    args = subprocess.run(["bash", "-c", "echo " + line.split("jupyter", 1)[1]], capture_output=True, text=True).stdout.split()
    assert args[:2] == ["lab", "--notebook-dir=nbs"] and args[-1] == "--no-browser"
    assert ("--allow-root" in args) == (os.getuid() == 0), args


def test_widgets_and_tensorboard_are_dependencies():
    import tomllib, importlib.util
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("ipywidgets", "tensorboard"):
        assert any(d.split()[0].split(">")[0].split("=")[0] == name for d in deps), name
        assert importlib.util.find_spec(name) is not None, f"{name} is a dependency but not installed"
