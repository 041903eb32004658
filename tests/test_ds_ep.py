"DeepSpeed + expert parallelism on CPU/gloo: ZeRO-1/2 with ep_size 2 and 4 against one process, world-size-free checkpoints, SIGKILL + resume, a clear error on a different layout."
import json, os, signal, socket, subprocess, sys, tempfile, time
from pathlib import Path
import pytest, torch

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as W
from flanmoe_nb import parallel
from flanmoe_nb.model import EncoderDecoder
from flanmoe_nb.train import TrainConfig, train
from flanmoe_nb.checkpoint import load_model, latest_checkpoint

pytest.importorskip("deepspeed")
ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def _port() -> str:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return str(s.getsockname()[1])


def _cmd(nproc, out, stage, ep, *extra):
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", _port(),
            str(ROOT / "tests/_ds_ep_worker.py"), str(out), str(stage), str(ep), *map(str, extra)]


def launch(nproc, out, stage, ep, *extra, check=True):
    r = subprocess.run(_cmd(nproc, out, stage, ep, *extra), capture_output=True, text=True, timeout=400,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check: assert r.returncode == 0, r.stderr[-3000:]
    return r


def _descendants(pid: int) -> list[int]:
    "Every live process below `pid` (torchrun starts its workers in sessions of their own)."
    kids = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try: ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError): continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []): out.append(c); todo.append(c)
    return out


def one_process(world, steps=3):
    "The plain loop in one process, accumulating the `world` ranks' micro-batches."
    torch.manual_seed(0)
    m = EncoderDecoder(W.tiny())
    d = tempfile.mkdtemp()
    res = train(m, W.batches(world, seed=1), TrainConfig(steps=steps, optimizer="adamw", lr=1e-3, batch_size=4, grad_accum=world,
                                                          out_dir=d, progress=False))
    return res.losses, [json.loads(l)["grad_norm"] for l in open(f"{d}/metrics.jsonl")], parallel.full_state_dict(m)


@pytest.mark.parametrize("nproc,stage,ep", [(2, 2, 2), (2, 1, 2), (4, 2, 2), (4, 2, 4)])
def test_ds_expert_parallel_matches_one_process(nproc, stage, ep, tmp_path):
    launch(nproc, tmp_path, stage, ep)
    r = torch.load(tmp_path / "result.pt", weights_only=False)
    assert r["local_experts"] == [4 // ep] * 2 and all(n.startswith("DeepSpeed") for n in r["ds_moe"])
    losses, norms, state = one_process(nproc)
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(losses), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(r["grad_norms"]), torch.tensor(norms), rtol=1e-6, atol=1e-6)   # clipped at 1.0
    assert set(r["state"]) == set(state)
    for k, v in state.items(): torch.testing.assert_close(r["state"][k], v, rtol=0, atol=5e-6, msg=k)
    # the checkpoint is world-size free: one process loads it with every expert by global index
    full = parallel.full_state_dict(load_model(tmp_path / "checkpoints"))
    for k, v in r["state"].items(): torch.testing.assert_close(full[k], v, rtol=0, atol=0, msg=k)


def test_ds_expert_parallel_sigkill_resume_and_layout_change(tmp_path):
    full = tmp_path / "full"; cut = tmp_path / "cut"
    launch(2, full, 2, 2, 4)
    ref = torch.load(full / "result.pt", weights_only=False)["losses"]
    p = subprocess.Popen(_cmd(2, cut, 2, 2, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "SLOW_FROM_STEP": "2"})
    t0 = time.time()
    while not (cut / "checkpoints/step_00000002/COMPLETE").exists():
        assert p.poll() is None and time.time() - t0 < 300, "run ended before its step-2 checkpoint"
        time.sleep(0.2)
    for pid in [p.pid, *_descendants(p.pid)]:           # the whole "node": launcher and workers
        try: os.kill(pid, signal.SIGKILL)
        except ProcessLookupError: pass
    p.wait()
    assert latest_checkpoint(cut / "checkpoints").name == "step_00000002"
    # a different layout: a clear error, not a silent mis-restore of ZeRO's partitions
    r = launch(4, cut, 2, 2, 4, "--resume", check=False)
    assert r.returncode != 0 and "world_size=2" in r.stderr and "world_size=4" in r.stderr
    launch(2, cut, 2, 2, 4, "--resume")
    res = torch.load(cut / "result.pt", weights_only=False)
    assert res["resumed_from"] == 2
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stage,ep", [(2, 2), (1, 4)])
def test_zero_partitions_are_the_planned_ones(stage, ep, tmp_path):
    "ZeRO's real fp32 partitions and AdamW state per rank (4 processes) equal the planner's optimizer bytes."
    from flanmoe_nb import plan as P
    launch(4, tmp_path, stage, ep, "--zero-sizes")
    sizes = json.loads((tmp_path / "zero_sizes.json").read_text())
    c = P.param_counts(W.tiny())
    planned = (P.zero_memory(c["dense"], 4, stage, "fp32", "adamw")["optimizer"]
               + P.zero_memory(c["expert"] // ep, 4 // ep, stage, "fp32", "adamw")["optimizer"])
    for s in sizes:
        assert s["dense_master"] == c["dense"] // 4 and s["expert_master"] == c["expert"] // ep // (4 // ep)
        assert 4 * (s["dense_master"] + s["dense_state"] + s["expert_master"] + s["expert_state"]) == planned
