"JupyterLab as a user meets it: `make lab`'s command opens 03_moe on the flanmoe_nb kernel in headless Chromium, Shift+Enter runs cells, outputs show."
import base64, json, os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
websocket = pytest.importorskip("websocket", reason="websocket-client drives Chromium over CDP")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed")]


def _port():
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _wait(cond, secs, step=0.5):
    t0 = time.time()
    while time.time() - t0 < secs:
        try:
            if (v := cond()): return v
        except Exception: pass
        time.sleep(step)
    return None


def test_lab_opens_03_moe_and_runs_cells(tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    if "flanmoe_nb" not in KernelSpecManager().find_kernel_specs(): pytest.skip("the flanmoe_nb kernel is not registered (make install)")
    shutil.copytree(ROOT / "nbs", tmp_path / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    lp, cp = _port(), _port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    args = ["--allow-root"] if os.getuid() == 0 else []                       # what `make lab` adds as root
    lab = subprocess.Popen([str(Path(sys.executable).with_name("jupyter")), "lab", *args, "--no-browser", f"--port={lp}",
                            "--IdentityProvider.token=", f"--ServerApp.root_dir={tmp_path / 'nbs'}",
                            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                           env=env, stdout=open(tmp_path / "lab.log", "w"), stderr=subprocess.STDOUT)
    chrome = None
    try:
        assert _wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{lp}/lab", timeout=2), 90), (tmp_path / "lab.log").read_text()[-2000:]
        chrome = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                                   f"--remote-debugging-port={cp}", f"--user-data-dir={tmp_path / 'chrome'}", "about:blank"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tabs = _wait(lambda: json.load(urllib.request.urlopen(f"http://127.0.0.1:{cp}/json", timeout=2)), 30)
        ws = websocket.create_connection(next(t for t in tabs if t["type"] == "page")["webSocketDebuggerUrl"], timeout=60)
        n = [0]
        def cdp(method, **params):
            n[0] += 1; ws.send(json.dumps(dict(id=n[0], method=method, params=params)))
            while True:
                r = json.loads(ws.recv())
                if r.get("id") == n[0]: return r.get("result", r)
        js = lambda e: cdp("Runtime.evaluate", expression=e, returnByValue=True).get("result", {}).get("value")
        key = lambda t: cdp("Input.dispatchKeyEvent", type=t, key="Enter", code="Enter", windowsVirtualKeyCode=13, modifiers=8)
        cdp("Page.navigate", url=f"http://127.0.0.1:{lp}/lab/tree/03_moe.ipynb")
        kernel = "[...document.querySelectorAll('.jp-Toolbar-kernelName')].map(e => e.textContent).join('|')"
        assert _wait(lambda: "flanmoe_nb" in js(kernel) and js("document.querySelectorAll('.jp-Notebook .jp-CodeCell').length"), 120), \
            (js(kernel), (tmp_path / "lab.log").read_text()[-800:])
        time.sleep(3)   # (cells run as soon as the kernel is ready; Lab queues them until then)
        x, y = js("(() => { const r = document.querySelectorAll('.jp-Notebook .jp-Cell')[1].getBoundingClientRect(); return [r.x + 60, r.y + 10]; })()")
        for t in ("mousePressed", "mouseReleased"): cdp("Input.dispatchMouseEvent", type=t, x=x, y=y, button="left", clickCount=1)
        time.sleep(0.5); cdp("Input.dispatchKeyEvent", type="rawKeyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
        cells = json.loads((ROOT / "nbs/03_moe.ipynb").read_text())["cells"]
        ex = next(i for i, c in enumerate(cells) if "".join(c["source"]).startswith("cfg = MoEConfig.preset("))   # the example
        n_code = sum(c["cell_type"] == "code" for c in cells[1:ex + 1])                   # its execution count, run from cell 1
        for _ in range(ex): key("rawKeyDown"); key("keyUp"); time.sleep(1.0)   # Shift+Enter down to the MoEConfig example
        cell_ex = f"document.querySelectorAll('.jp-Notebook .jp-Cell')[{ex}]"
        assert _wait(lambda: js(f"{cell_ex}.querySelector('.jp-InputPrompt').textContent.trim()") == f"[{n_code}]:", 120), \
            js(f"[...document.querySelectorAll('.jp-InputPrompt')].slice(0, {ex + 1}).map(e => e.textContent)")
        js(f"{cell_ex}.scrollIntoView()")
        out = js(f"{cell_ex}.querySelector('.jp-OutputArea').innerText")
        assert "gated-gelu_tanh" in out and "must be <= num_experts" in out, out    # the fresh output of the run cell
        (tmp_path / "lab_03_moe.png").write_bytes(base64.b64decode(cdp("Page.captureScreenshot", format="png")["data"]))
    finally:
        if chrome: chrome.terminate()
        lab.terminate()
        try: lab.wait(20)
        except subprocess.TimeoutExpired: lab.kill()
