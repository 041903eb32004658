"The built docs site keeps its links inside itself, and neither it nor the committed runs carry machine paths or raw markup."
import html, json, posixpath, re
from pathlib import Path
from urllib.parse import urlsplit
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real references a page may leave the site for: the paper, package pages, library docs, the theme's credits.
ALLOWED_HOSTS = {"arxiv.org", "pypi.org", "pytorch.org", "huggingface.co", "www.sphinx-doc.org", "pradyunsg.me",
                 "docs.pytorch.org", "nbdev.fast.ai", "fastcore.fast.ai", "papermill.readthedocs.io"}
ALLOWED_PREFIXES = ("https://github.com/pradyunsg/furo", "https://github.com/open-thought/reasoning-gym")
HREF = re.compile(r'<[a-zA-Z][^<>]*?\shref="([^"]*)"')
ID = re.compile(r'\sid="([^"]+)"')
ABS_PATH = re.compile(r"(?<![\w.:/~-])(?:/(?:work|home|root|tmp|Users|mnt|scratch|private/var)/[\w.-]+|[A-Z]:\\\\?Users)")
MARKUP = re.compile(r'\{target=|\{\.[\w-]+\}|style="float:right')
CODE = re.compile(r"<(pre|code)\b.*?</\1>", re.S)   # documented examples may show the markup they remove


def _pages(site: Path):
    return sorted(site.rglob("*.html"))


def test_every_href_resolves_inside_the_site(docs_site):
    root, index, report = docs_site
    site = index.parent
    files = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    ids, problems, n_int, n_ext = {}, [], 0, 0
    for p in _pages(site):
        page = p.relative_to(site).as_posix()
        for href in map(html.unescape, HREF.findall(p.read_text(errors="replace"))):
            if re.match(r"^[a-zA-Z][\w+.-]*:|^//", href):
                n_ext += 1
                if urlsplit(href).hostname not in ALLOWED_HOSTS and not href.startswith(ALLOWED_PREFIXES):
                    problems.append(f"{page}: leaves the site for {href}")
                continue
            path, _, anchor = href.partition("#")
            if not path and not anchor: continue   # "#": the top of this page
            target = posixpath.normpath(posixpath.join(posixpath.dirname(page), path.split("?")[0])) if path else page
            n_int += 1
            if target not in files: problems.append(f"{page}: {href} -> missing {target}"); continue
            if anchor and target.endswith(".html"):
                if target not in ids: ids[target] = set(ID.findall((site / target).read_text(errors="replace")))
                if anchor not in ids[target]: problems.append(f"{page}: {href} -> no id {anchor!r} in {target}")
    assert not problems, f"{len(problems)} bad links, e.g.\n" + "\n".join(problems[:40])
    assert n_int > 1000 and n_ext > 0, (n_int, n_ext)
    assert (n_int, n_ext) == (report["links"]["internal"], report["links"]["external"])   # the build's own count agrees
    assert not report["links"]["broken"] and not report["links"]["missing_anchors"]


def test_cross_links_are_relative_and_named_as_nbdev_names_pages(docs_site):
    root, index, _ = docs_site
    site = index.parent
    idx = index.read_text()
    assert 'href="moe.html#moeconfig"' in idx and 'href="moe.html#moelayer"' in idx
    moe = (site / "moe.html").read_text()
    assert 'href="#moeconfig"' in moe and "flanmoe.github.io" not in moe
    assert not (site / "03_moe.html").exists() and (site / "moe.html.md").exists()   # nbdev's llms.txt links to moe.html.md
    assert "MoEConfig" in (site / "moe.html.md").read_text()


def _committable(folder: Path) -> list:
    "Files under `folder` that git would commit (tracked, or untracked and not ignored: not checkpoints); every file outside git."
    import subprocess
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0: return sorted(folder.rglob("*"))
    return sorted(ROOT / f for f in r.stdout.split("\0") if f)


def test_no_machine_paths_or_leftover_markup(docs_site):
    root, index, _ = docs_site
    site, problems = index.parent, []
    for p in _pages(site):
        text = p.read_text(errors="replace")
        prose = CODE.sub("", text)
        if m := MARKUP.search(prose): problems.append(f"site {p.relative_to(site)}: raw markup {prose[m.start():m.start() + 60]!r}")
        if m := ABS_PATH.search(text): problems.append(f"site {p.relative_to(site)}: machine path {m.group(0)!r}")
    for p in _committable(ROOT / "papermill_runs"):
        if not p.is_file() or p.suffix not in (".ipynb", ".yaml", ".json", ".jsonl", ".csv", ".txt", ".md"): continue
        if m := ABS_PATH.search(p.read_text(errors="replace")): problems.append(f"{p.relative_to(ROOT)}: machine path {m.group(0)!r}")
    assert not problems, "\n".join(problems[:40])


def test_full_introductions_and_one_parameters_cell(docs_site):
    root, index, _ = docs_site
    from flanmoe_nb.docs import _intro, doc_notebooks, page_name
    site, nbs, cut = index.parent, root / "nbs", []
    squash = lambda s: re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html.unescape(s))).replace("\u2019", "'")   # (smart quotes)
    for nb in doc_notebooks(nbs):
        intro = _intro(json.loads(nb.read_text())["cells"])
        if not intro or nb.name == "index.ipynb": continue
        page = squash((site / f"{page_name(nb.relative_to(nbs))}.html").read_text())
        tail = re.sub(r"`", "", intro)[-40:]
        if tail not in page: cut.append(f"{nb.name}: {tail!r}")
    assert not cut, cut
    results = squash((site / "experiments/results.html").read_text()).lower()
    assert results.count("# parameters") == 1, "the results page shows more than one parameters cell"


def test_docs_summary_is_short(docs_site, capsys):
    from flanmoe_nb.docs import docs_summary
    root, index, report = docs_site
    out = docs_summary(report, index, 1.0)
    assert len(out.splitlines()) == 3 + len(report["notes"]) and "warning:" not in out, out
    assert not report["notes"], report["notes"]


def test_source_links_follow_the_git_remote(tmp_path):
    "With an `origin` remote, source links point at the file at the current commit; without one there is no link."
    import subprocess
    from flanmoe_nb.docs import git_source_url, fix_source_links
    md = '[source](https://github.com/flanmoe/flanmoe_nb/blob/main/flanmoe_nb/moe.py#L34){target="_blank" style="float:right"}\n\n### MoEConfig'
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q"); (tmp_path / "f").write_text("x"); git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "x")
    assert git_source_url(tmp_path) is None and fix_source_links(md, git_source_url(tmp_path)) == "### MoEConfig"
    git("remote", "add", "origin", "git@example.org:lab/flanmoe_nb.git")
    url = git_source_url(tmp_path)("flanmoe_nb/moe.py", 34)
    assert url == f"https://example.org/lab/flanmoe_nb/blob/{git('rev-parse', 'HEAD')}/flanmoe_nb/moe.py#L34"
    assert fix_source_links(md, git_source_url(tmp_path)) == f"[source]({url})\n\n### MoEConfig"
