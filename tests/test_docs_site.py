"The rendered docs site in headless Chromium: every page loads, shows its figures, and holds no error output."
import json, os, re, shutil, subprocess
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)")

PROBE = """<script>window.addEventListener('load', () => setTimeout(() => {
  const imgs = [...document.images].filter(i => !i.closest('.sidebar-drawer, .toc-drawer, header'));
  const b = document.body;
  b.setAttribute('data-imgs', imgs.length);
  b.setAttribute('data-imgs-ok', imgs.filter(i => i.complete && i.naturalWidth > 0).length);
  b.setAttribute('data-text-len', (document.querySelector('article') || b).innerText.length);
  const pres = [...document.querySelectorAll('article pre')];   // long lines wrap or scroll, never cut off
  b.setAttribute('data-clipped', pres.filter(p => p.scrollWidth > p.clientWidth + 1
      && !['auto', 'scroll'].includes(getComputedStyle(p).overflowX)).length);
  const sigs = [...document.querySelectorAll('article .cell_output div.highlight pre')];   // show_doc signatures wrap
  b.setAttribute('data-sig-overflow', sigs.filter(p => p.scrollWidth > p.clientWidth + 1).length);
}, 100));</script>"""


def _render(html: Path) -> str:
    "DOM of `html` after load, as Chromium serialises it."
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--window-size=1280,900",
           "--disable-dev-shm-usage", "--allow-file-access-from-files", "--virtual-time-budget=4000",
           "--dump-dom", html.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"chromium failed on {html}: {r.stderr[-2000:]}"
    return r.stdout


def _images_in(nb_path: Path) -> int:
    "Number of image outputs stored in a (processed) notebook."
    nb = json.loads(nb_path.read_text())
    return sum(1 for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
               if any(k.startswith("image/") for k in o.get("data", {})) and "remove-output" not in c.get("metadata", {}).get("tags", []))


@pytest.fixture(scope="module")
def site(docs_site):
    root, index, _ = docs_site
    return root, index


def test_every_page_loads_with_figures_and_no_errors(site):
    root, index = site
    proc = root / "_proc"
    pages = sorted(p for p in proc.rglob("*.ipynb") if "_build" not in p.parts)
    assert (root / "_docs/index.html").exists() and len(pages) >= 3
    problems, figures = [], 0
    for nb in pages:
        rel = nb.relative_to(proc).with_suffix(".html")
        html = root / "_docs" / rel
        if not html.exists(): problems.append(f"{rel}: page missing"); continue
        html.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
        dom = _render(html)
        body = re.search(r"<body[^>]*>", dom).group(0)
        attr = lambda k: int(re.search(fr'{k}="(\d+)"', body).group(1)) if re.search(fr'{k}="(\d+)"', body) else -1
        want = _images_in(nb); figures += want
        if attr("data-text-len") < 50: problems.append(f"{rel}: page has (almost) no text ({attr('data-text-len')} chars)")
        if attr("data-imgs-ok") < want:
            problems.append(f"{rel}: {attr('data-imgs-ok')} of {want} figures loaded ({attr('data-imgs')} img tags)")
        if attr("data-clipped") != 0: problems.append(f"{rel}: {attr('data-clipped')} code blocks cut off at the right edge")
        if attr("data-sig-overflow") != 0: problems.append(f"{rel}: {attr('data-sig-overflow')} signatures wider than the column")
        text = re.sub(r"<[^>]+>", " ", dom)
        if "Traceback (most recent call last)" in text or re.search(r'class="[^"]*output (traceback|error)', dom):
            problems.append(f"{rel}: error output on the page")
    assert not problems, "\n".join(problems)
    assert figures > 0 or os.environ.get("FLANMOE_DOCS_ONLY"), "no page has a figure: the image check checked nothing"


def test_experiment_pages_are_in_the_site(site):
    root, _ = site
    exp = sorted((root / "_docs/experiments").glob("*.html")) if (root / "_docs/experiments").exists() else []
    names = {p.stem for p in exp}
    assert {"results", "setup0_pretrain", "setup2_instruction_tuning"} <= names or os.environ.get("FLANMOE_DOCS_ONLY"), names
    dom = _render(root / "_docs/index.html")
    assert "experiments/results.html" in dom


def test_executed_runs_are_pages(site):
    root, _ = site
    runs = sorted((ROOT / "papermill_runs").glob("*/*/notebook.ipynb"))
    assert runs, "no executed run is committed under papermill_runs/"
    index = (root / "_docs/index.html").read_text()
    for nb in runs:
        page = f"runs/{nb.parts[-3]}/{nb.parts[-2]}.html"
        assert (root / "_docs" / page).exists(), page
        assert page in index, f"{page} is not in the table of contents"


CLICK = """<script>window.addEventListener('load', () => setTimeout(() => {
  const a = [...document.querySelectorAll('article a')].find(a => a.getAttribute('href') === HREF);
  if (a) a.click(); else document.title = 'NO SUCH LINK';
}, 100));</script>"""


def _cross_link(page: Path) -> str:
    "The first link in the page's article to another page of the site, one with an anchor if there is one (else an in-page anchor)."
    art = re.search(r"<article.*?</article>", page.read_text(), re.S).group(0)
    hrefs = [h for h in re.findall(r'<a [^>]*href="([^"]+)"', art) if not re.match(r"^[a-z]+:|^//", h)]
    other = [h for h in hrefs if not h.startswith("#")]
    for pick in ([h for h in other if "#" in h], other, [h for h in hrefs if len(h) > 1]):
        if pick: return pick[0]
    raise AssertionError(f"{page.name} has no cross-link to follow")


@pytest.mark.parametrize("page", ["index.html", "moe.html", "experiments/results.html", "runs/tiny/s2_moe_seed0.html"])
def test_cross_links_land_on_site_pages_with_their_anchor(site, page):
    "Click a cross-link in Chromium: the browser lands on a page of the site (its title) with the anchor present."
    root, _ = site
    src = root / "_docs" / page
    href = _cross_link(src)
    probe = src.with_name(f"_click_{src.name}")   # same folder, so the relative link resolves as on the page
    probe.write_text(src.read_text().replace("</body>", CLICK.replace("HREF", json.dumps(href)) + "</body>"))
    dom = _render(probe)
    probe.unlink()
    path, _, anchor = href.partition("#")
    target = (src.parent / path).resolve() if path else src
    assert target.is_file() and root / "_docs" in target.parents, f"{page}: {href} leaves the site"
    want = re.search(r"<title>(.*?)</title>", target.read_text(), re.S).group(1).strip()
    got = re.search(r"<title>(.*?)</title>", dom, re.S).group(1).strip()
    assert got == want, f"{page}: clicking {href} landed on {got!r}, not {want!r}"
    if anchor: assert f'id="{anchor}"' in dom, f"{page}: {href} landed without the anchor {anchor!r}"
