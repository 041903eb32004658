"Shared fixtures: the docs site, built once per session from a copy of the notebooks and the committed runs."
import fnmatch, os, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Kernel paths are chosen by measurement, per machine (extension.choose_path). The tests compare numerics across
# processes and paths (e.g. DeepSpeed ranks against one process, where Adam turns a last-bit difference into a
# visible one), so they run the fixed defaults; the tests of the choice itself unset this (fixture choice_cache).
os.environ.setdefault("FLANMOE_DETERMINISTIC", "1")


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory):
    "(root, index, report) of a site built from a copy of `nbs/`, `pyproject.toml` and `papermill_runs/*/*/notebook.ipynb`."
    from flanmoe_nb.docs import build_docs
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(ROOT / "nbs", root / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    only = [g for g in os.environ.get("FLANMOE_DOCS_ONLY", "").split(",") if g]   # debugging: a subset of pages
    if only:
        for nb in (root / "nbs").rglob("*.ipynb"):
            rel = nb.relative_to(root / "nbs").as_posix()
            if rel != "index.ipynb" and not any(fnmatch.fnmatch(rel, g) for g in only): nb.unlink()
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    for f in (ROOT / "papermill_runs").glob("*/*/*"):   # executed runs become pages (with their params.yaml)
        if f.name in ("notebook.ipynb", "params.yaml"):
            dst = root / f.relative_to(ROOT); dst.parent.mkdir(parents=True, exist_ok=True); shutil.copy(f, dst)
    report = {}
    index = build_docs(root, out="_docs", report=report)
    return root, index, report
