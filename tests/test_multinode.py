"Multi-node launch from a grid: launcher commands, hostfiles, Slurm scripts, `flanmoe grid --dry-run`, and two simulated nodes on localhost against one process."
import json, os, shutil, socket, sys
from dataclasses import replace
from pathlib import Path
import pytest, torch

from flanmoe_nb import runs
from flanmoe_nb.checks import ConfigError

ROOT = Path(__file__).parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def params(**kw):
    return runs.experiment_params(0, **{"out_dir": "/x/run", "run_id": "r", **kw})


def test_torchrun_one_node_is_standalone():
    (host, cmd), = runs.launch_commands(params(launcher="torchrun", nproc=4), "/x/run/stage.json")
    assert cmd == [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "flanmoe_nb.experiment", "/x/run/stage.json"]


def test_torchrun_two_nodes_on_localhost_share_one_rendezvous():
    cmds = runs.launch_commands(params(launcher="torchrun", nodes=2, nproc=1, master_port=31234), "/x/s.json")
    assert [h for h, _ in cmds] == ["localhost", "localhost"]
    for i, (_, cmd) in enumerate(cmds):
        assert cmd == [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={i}",
                       "--master_addr=127.0.0.1", "--master_port=31234", "-m", "flanmoe_nb.experiment", "/x/s.json"]


def test_hostfile_nodes_go_by_ssh(tmp_path):
    hf = tmp_path / "hosts"; hf.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    cmds = runs.launch_commands(params(launcher="torchrun", nodes=2, nproc=8, hostfile=str(hf)), "/x/s.json")
    assert [h for h, _ in cmds] == ["node-a", "node-b"]
    assert all(c[:2] == ["ssh", h] for h, c in cmds)
    assert "--node_rank=1 --master_addr=node-a --master_port=29500" in cmds[1][1][2]
    (_, ds), = runs.launch_commands(params(launcher="deepspeed", nodes=2, nproc=8, hostfile=str(hf)), "/x/s.json")
    assert Path(ds[0]).name == "deepspeed" and ds[1:] == ["--num_gpus=8", "--num_nodes=2", f"--hostfile={hf}", "--master_addr=node-a",
                  "--master_port=29500", "--module", "flanmoe_nb.experiment", "/x/s.json"]


def test_slurm_script_starts_one_torchrun_per_node():
    p = params(launcher="slurm", nodes=2, nproc=8, engine="deepspeed")
    (_, cmd), = runs.launch_commands(p, "/x/run/stage.json")
    assert cmd == ["sbatch", "--wait", "/x/run/sbatch.sh"]
    s = runs.sbatch_script(p, "/x/run/stage.json")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "srun --kill-on-bad-exit=1 bash -c"):
        assert line in s
    assert "--node_rank=$SLURM_NODEID --master_addr=$MASTER_ADDR --master_port=29500" in s
    assert runs.train_config(p).engine == "deepspeed"


@pytest.mark.parametrize("kw,msg", [
    (dict(launcher="torchrun2", nodes=2), "launcher='torchrun2' is one node"),
    (dict(launcher="local", nodes=2), "launcher='local' is one process"),
    (dict(launcher="deepspeed", nodes=2), "needs a hostfile"),
    (dict(launcher="torchrun", nodes=3, hostfile="HOSTS"), "fewer than nodes=3"),
    (dict(launcher="torchrun", nodes=2, nproc=16, hostfile="HOSTS"), "fewer than nproc=16"),
    (dict(launcher="torchrun", nodes=2, hostfile="BAD"), "expected 'host slots=N'"),
    (dict(launcher="torchrun", nodes=2, hostfile="/no/such/file"), "hostfile not found")])
def test_bad_layouts_are_clear_errors(kw, msg, tmp_path):
    (tmp_path / "HOSTS").write_text("a slots=8\nb slots=8\n"); (tmp_path / "BAD").write_text("a gpus=8\n")
    kw = {k: (str(tmp_path / v) if k == "hostfile" and not v.startswith("/") else v) for k, v in kw.items()}
    with pytest.raises(ConfigError, match=msg): runs.launch_commands(params(**kw), "/x/s.json")


def test_bad_parameter_values_name_the_parameter():
    with pytest.raises(ConfigError, match="master_port"): params(master_port=70000)
    with pytest.raises(ConfigError, match="nodes"): params(nodes=0)
    with pytest.raises(ConfigError, match="launcher"): params(launcher="mpirun")


def test_grid_dry_run_prints_every_points_commands(tmp_path, capsys):
    (tmp_path / "pyproject.toml").touch()
    shutil.copytree(ROOT / "nbs/experiments", tmp_path / "nbs/experiments")
    (tmp_path / "papermill_runs").mkdir()
    (tmp_path / "papermill_runs/g.yaml").write_text(
        "name: g\nnotebooks: nbs/experiments\ndefaults: {preset: tiny, launcher: torchrun, nodes: 2, nproc: 1, master_port: 30001}\n"
        "runs:\n  - id: s0\n    notebook: setup0_pretrain\n  - id: s1\n    notebook: setup1_direct_finetune\n"
        "    params: {init_checkpoint: '${s0}', launcher: slurm}\n")
    assert runs.grid_main([str(tmp_path / "papermill_runs/g.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    s0 = tmp_path / "papermill_runs/g/s0"
    assert f"--node_rank=1 --master_addr=127.0.0.1 --master_port=30001 -m flanmoe_nb.experiment {s0}/stage.json" in out
    assert out.count("[localhost]") == 3 and "#SBATCH --nodes=2" in out
    assert not (tmp_path / "papermill_runs/g").exists()             # nothing ran


@pytest.mark.slow
def test_two_localhost_nodes_give_the_single_process_result(tmp_path):
    "torchrun on 'node' 0 and 'node' 1 (1 process each, gloo, one rendezvous) against one process accumulating both halves."
    from flanmoe_nb import data, train as T
    p = runs.experiment_params(0, preset="tiny", model="moe", moe={"preset": "switch", "num_experts": 4, "capacity_factor": None},
                               steps=3, batch_size=4, bucket_factor=0, dropout=0.0, optimizer="adamw", launcher="torchrun",
                               nodes=2, nproc=1, master_port=free_port(), out_dir=str(tmp_path / "two"))
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    res = runs.train_experiment(p)
    assert (tmp_path / "two/launcher-node0.log").exists() and (tmp_path / "two/launcher-node1.log").exists()
    two = [json.loads(l)["loss"] for l in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    # one process: the same global batches as two micro-batches of 4 (rank r's half is micro-batch r)
    q = {**p, "launcher": "local", "nodes": 1, "out_dir": str(tmp_path / "one")}
    tok, rows, _ = runs.stage_data(q)
    model = runs.stage_model(q, len(tok))
    collate = data.Collator(pad_id=tok.pad_token_id, decoder_start_id=model.cfg.decoder_start_token_id)
    one = T.train(model, rows, replace(runs.train_config(q), grad_accum=2), collate=collate).losses
    assert len(two) == 3
    print("losses two nodes", two, "one process", one)
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)
    sd2 = T.load_model(tmp_path / "two/checkpoints").state_dict()
    for k, v in T.load_model(tmp_path / "one/checkpoints").state_dict().items():
        torch.testing.assert_close(sd2[k], v, rtol=0, atol=3e-5, msg=k)   # AdamW, 3 steps of lr 1e-3: fp32 reduction order only



def test_slurm_ignores_the_hostfile():
    p = params(launcher="slurm", nodes=2, nproc=8, hostfile="/not/written")
    assert "--master_addr=$MASTER_ADDR" in runs.sbatch_script(p, "/x/s.json")


def test_base_2nodes_dry_run(tmp_path, capsys, monkeypatch):
    "The committed two-node grid: the deepspeed launcher over the hostfile's two nodes for all 20 points, MoE experts 8-way sharded."
    (tmp_path / "pyproject.toml").touch()
    shutil.copytree(ROOT / "nbs/experiments", tmp_path / "nbs/experiments")
    (tmp_path / "papermill_runs").mkdir()
    shutil.copy(ROOT / "papermill_runs/base_2nodes.yaml", tmp_path / "papermill_runs")
    (tmp_path / "hostfile").write_text("node-a slots=8\nnode-b slots=8\n")
    monkeypatch.chdir(tmp_path)
    out = runs.dry_run(tmp_path / "papermill_runs/base_2nodes.yaml")
    cmds = [l for l in out.splitlines() if l.startswith("  [localhost] ") and "deepspeed --num_gpus" in l]
    assert len(cmds) == 20 and all(f"--num_gpus=8 --num_nodes=2 --hostfile={tmp_path / 'hostfile'} --master_addr=node-a" in c for c in cmds)
    header, specs = runs.load_grid(tmp_path / "papermill_runs/base_2nodes.yaml")
    assert {s.params["ep_size"] for s in specs} == {8}
