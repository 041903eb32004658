"2 gloo processes with ep_size=2 vs one process: losses, outputs, gradients; world-size-2 checkpoint at world size 1."
import os, subprocess, sys
from pathlib import Path
import pytest, torch

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as W
from flanmoe_nb import parallel
from flanmoe_nb.model import EncoderDecoder
from flanmoe_nb.train import TrainConfig, train
from flanmoe_nb.checkpoint import load_model

ROOT = Path(__file__).parents[1]


def free_port() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def ep_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", free_port(), str(ROOT / "tests/_dist_worker.py"),
                        "ep", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, torch.load(out / "ep_result.pt", weights_only=False)


def reference():
    torch.manual_seed(0)
    return EncoderDecoder(W.tiny())


def test_ep_outputs_and_gradients_match_one_process(ep_result):
    _, res = ep_result
    model = reference(); model.train()
    bs = W.batches(2, seed=1)
    logits = []
    for b in bs:
        o = model(**b); (o.loss / 2).backward(); logits.append(o.logits.detach())
    torch.testing.assert_close(res["logits"], torch.cat(logits), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(res["grads"][n], p.grad, rtol=1e-5, atol=1e-6, msg=n)
    assert any(".experts." in n for n in res["grads"])


def test_ep_losses_match_one_process_with_accumulation(ep_result, tmp_path):
    _, res = ep_result
    model = reference()
    cfg = TrainConfig(steps=3, optimizer="adamw", lr=1e-3, grad_accum=2, out_dir=str(tmp_path), progress=False)
    ref = train(model, W.batches(2, seed=1), cfg)
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)


def test_ep_adafactor_losses_match_one_process(ep_result, tmp_path):
    "Adafactor scales updates per expert, so expert parallelism (each rank a shard of the stack) is exact."
    _, res = ep_result
    cfg = TrainConfig(steps=3, optimizer="adafactor", lr=1e-2, grad_accum=2, out_dir=str(tmp_path), progress=False)
    ref = train(reference(), W.batches(2, seed=1), cfg)
    torch.testing.assert_close(torch.tensor(res["adafactor_losses"]), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
    assert ref.losses[-1] < ref.losses[0]


def test_world2_checkpoint_loads_at_world1(ep_result):
    out, res = ep_result
    model = load_model(out / "checkpoints").eval()
    with torch.no_grad(): logits = model(**W.batches(2, seed=1)[0]).logits
    torch.testing.assert_close(logits, res["after"], rtol=1e-5, atol=1e-5)
    assert (logits - res["after"]).abs().max() < 1e-5


def test_bad_parallel_configs_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="ep_size must divide the world size"):
        train(reference(), W.batches(1), TrainConfig(steps=1, ep_size=3, out_dir=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="num_experts must be divisible by ep_size"):
        parallel.check_parallel_config(4, 4, num_experts=6)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_local_rank_argument():
    assert parallel.local_rank_from_argv(["x", "--local_rank", "1"]) == 1
    assert parallel.local_rank_from_argv(["x"]) is None


def test_ep_resume_at_world2_is_exact(tmp_path):
    "Uninterrupted 2-process ep_size=2 run; then drop its last checkpoint and resume from step 4: same losses."
    import json, shutil
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    def run(*extra):
        r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", free_port(), str(ROOT / "tests/_dist_worker.py"),
                            "ep_resume", str(tmp_path), "6", *extra], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.split("RESUMED_FROM ", 1)[1].split()[0], json.loads(r.stdout.split("DONE", 1)[1])
    origin, full = run()
    assert origin == "None"
    shutil.rmtree(tmp_path / "checkpoints/step_00000006")      # `latest` now dangles: the scan finds step 4
    assert run("--resume") == ("4", full)
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == list(range(1, 7))
