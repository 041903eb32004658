"Trainer: schedules, freezing, NaN guards, atomic checkpoints and exact resume after SIGKILL."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as W
from flanmoe_nb.model import EncoderDecoder
from flanmoe_nb.train import TrainConfig, train, utilisation_entropy
from flanmoe_nb.optim import lr_lambda, build_optimizer, apply_freezing, is_frozen
from flanmoe_nb.batches import Batches
from flanmoe_nb.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

ROOT = Path(__file__).parents[1]
torch.set_num_threads(1)


def model():
    torch.manual_seed(0)
    return EncoderDecoder(W.tiny())


def cfg(tmp_path, **kw):
    return TrainConfig(**{**dict(steps=3, lr=1e-2, out_dir=str(tmp_path), progress=False), **kw})


def test_schedules():
    c = TrainConfig(steps=10, warmup_steps=4, schedule="inverse_sqrt")
    assert [lr_lambda(c)(s) for s in (0, 3, 15)] == [0.25, 1.0, 0.5]
    c = TrainConfig(steps=10, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_lambda(c)(0) == 1.0 and abs(lr_lambda(c)(5) - 0.55) < 1e-12
    assert lr_lambda(TrainConfig(schedule="constant", warmup_steps=2))(7) == 1.0


@pytest.mark.parametrize("freeze", ["router", "experts", "moe", "non_moe"])
def test_freezing_really_freezes(tmp_path, freeze):
    m = model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    train(m, W.batches(2), cfg(tmp_path, freeze=freeze, optimizer="adamw"))
    frozen = {n for n, _ in m.named_parameters() if is_frozen(n, freeze)}
    assert frozen and len(frozen) < len(before)
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n
        assert p.requires_grad == (n not in frozen)
    opt = build_optimizer(m, cfg(tmp_path, freeze=freeze))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in m.named_parameters() if n not in frozen}


def test_optimizer_state_only_for_trainable(tmp_path):
    m = model(); apply_freezing(m, "moe")
    opt = build_optimizer(m, cfg(tmp_path, optimizer="adamw"))
    m(**W.batches(1)[0]).loss.backward(); opt.step()
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(".router." not in names[id(p)] and ".experts." not in names[id(p)] for p in opt.state)
    assert len(opt.state) == sum(p.requires_grad for p in m.parameters())


def test_expert_dropout_override(tmp_path):
    m = model()
    train(m, W.batches(1), cfg(tmp_path, steps=1, expert_dropout=0.3))
    assert all(l.ffn.experts.dropout == 0.3 for l in m.encoder.blocks if l.is_moe)


def _nan_hook(m, when):
    calls = {"n": 0}
    def hook(mod, inp, out):
        calls["n"] += 1
        if calls["n"] in when: return (out[0] * float("nan"), out[1])
    return m.encoder.register_forward_hook(hook)


def test_nan_skip_counts_and_keeps_params(tmp_path):
    m = model(); _nan_hook(m, {2})
    res = train(m, W.batches(2), cfg(tmp_path, steps=4, max_skipped_fraction=0.25))   # 1 of 4 skipped is allowed here
    assert res.skipped == 1 and res.max_consecutive_skipped == 1 and res.skipped_fraction == 0.25 and not torch.isfinite(torch.tensor(res.losses[1]))
    assert all(torch.isfinite(torch.tensor(res.losses[i])) for i in (0, 2, 3))
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["skipped"] for l in lines] == [0, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_nan_stop_raises(tmp_path):
    m = model(); _nan_hook(m, {2})
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(m, W.batches(2), cfg(tmp_path, steps=4, nan_policy="stop"))


def test_metrics_fields(tmp_path):
    train(model(), W.batches(2), cfg(tmp_path, steps=2, grad_accum=2))
    m = json.loads(open(tmp_path / "metrics.jsonl").readline())
    for k in ("loss", "ce", "balance", "z", "lr", "grad_norm", "tokens_per_s", "entropy", "dropped", "skipped"):
        assert k in m, k
    assert len(m["entropy"]) == 2 and m["tokens"] == 2 * 4 * 20
    assert utilisation_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert utilisation_entropy(torch.tensor([9, 0, 0, 0])) == pytest.approx(0.0)


def test_batches_resume_position():
    b = Batches(list(range(11)), 2, list, seed=3)
    seq = [next(b) for _ in range(9)]                       # crosses an epoch boundary
    c = Batches(list(range(11)), 2, list, seed=3)
    for _ in range(4): next(c)
    d = Batches(list(range(11)), 2, list, seed=3); d.load_state_dict(c.state_dict())
    assert [next(d) for _ in range(5)] == seq[4:]



def _padded_share(batches):
    "Real tokens / padded tokens over batches of token counts."
    return sum(sum(b) for b in batches) / sum(len(b) * max(b) for b in batches)


@pytest.mark.parametrize("world", [1, 2])
def test_bucketed_batches_cover_each_epoch_and_pad_less(world):
    import random
    rng = random.Random(0)
    rows = [{"input_ids": [1] * rng.randint(1, 300), "labels": [2] * rng.randint(1, 20)} for _ in range(1000)]
    lens = lambda b: [len(r["input_ids"]) + len(r["labels"]) for r in b]
    ids = lambda b: [id(r) for r in b]
    bs, per_epoch = 16, 1000 // (16 * world)
    for factor in (1, 4, 8):
        epoch = [i for rank in range(world) for b in
                 [next(s) for s in [Batches(rows, bs, ids, seed=5, bucket_factor=factor, rank=rank, world_size=world)]
                  for _ in range(per_epoch)] for i in b]
        assert len(epoch) == len(set(epoch)) == per_epoch * bs * world   # each row at most once, ranks disjoint
    plain = Batches(rows, bs, lens, seed=5)
    bucketed = Batches(rows, bs, lens, seed=5, bucket_factor=8)
    share = lambda s: _padded_share([next(s) for _ in range(per_epoch * world)])
    assert share(bucketed) > share(plain) + 0.2
    with pytest.raises(ValueError, match="bucket_factor"): Batches(rows, bs, lens, bucket_factor=-1)


def test_bucketed_batches_resume_position():
    rows = [{"input_ids": [1] * n, "labels": [2]} for n in range(1, 24)]
    lens = lambda b: [len(r["input_ids"]) for r in b]
    b = Batches(rows, 4, lens, seed=3, bucket_factor=2)
    seq = [next(b) for _ in range(13)]                      # crosses two epoch boundaries
    c = Batches(rows, 4, lens, seed=3, bucket_factor=2)
    for _ in range(6): next(c)
    d = Batches(rows, 4, lens, seed=3, bucket_factor=2); d.load_state_dict(c.state_dict())
    assert [next(d) for _ in range(7)] == seq[6:]
    assert seq[:5] != seq[5:10]                              # epochs are ordered differently


def test_incomplete_checkpoint_ignored(tmp_path):
    m = model()
    save_checkpoint(tmp_path, 1, m)
    (tmp_path / ".tmp_step_00000002").mkdir()                # a crashed write
    (tmp_path / "step_00000003").mkdir()                     # renamed but no COMPLETE marker (never happens, still ignored)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    with pytest.raises(FileNotFoundError): load_checkpoint(tmp_path / "step_00000003", m)


# --- SIGKILL + resume (subprocesses) ---------------------------------------------------------------
STEPS = 9


def _run(out, resume=False, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "tests/_dist_worker.py"), "resume", str(out), str(STEPS)]
                            + (["--resume"] if resume else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _losses(out):
    return [json.loads(l)["loss"] for l in open(Path(out) / "metrics.jsonl")]


def _wait(pred, proc, timeout=240):
    t = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t < timeout
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    p = _run(out); so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se[-2000:]
    return _losses(out)


def test_sigkill_mid_run_and_during_checkpoint_write_resume_exactly(tmp_path, reference_losses):
    assert len(reference_losses) == STEPS
    # 1) kill between checkpoints (after step 5; last checkpoint is step 3; step 6 waits 5 s for the kill)
    p = _run(tmp_path, env={"SLOW_FROM_STEP": "5"})
    _wait(lambda: (tmp_path / "metrics.jsonl").exists() and len(_losses(tmp_path)) >= 5, p)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last is not None and len(_losses(tmp_path)) > int(last.name[5:])
    # 2) resume, and kill inside the write of the next checkpoint (test hook sleeps there)
    nxt = int(last.name[5:]) + 3
    p = _run(tmp_path, resume=True, env={"FLANMOE_CKPT_SLEEP": "60"})
    line = ""
    while f"CKPT_WRITING {nxt}" not in line:
        line = p.stdout.readline()
        assert line or p.poll() is None, p.communicate()[1][-2000:]
    assert (tmp_path / f"checkpoints/.tmp_step_{nxt:08d}/model.safetensors").exists()
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert latest_checkpoint(tmp_path / "checkpoints") == last
    # 3) resume to the end: same losses as the uninterrupted run, bit for bit
    p = _run(tmp_path, resume=True); so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se[-2000:]
    assert f"RESUMED_FROM {int(last.name[5:])}" in so
    assert _losses(tmp_path) == reference_losses
    assert json.loads(so.split("DONE", 1)[1]) == reference_losses
    assert latest_checkpoint(tmp_path / "checkpoints").name == f"step_{STEPS:08d}"


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_match_one_process(tmp_path):
    "ZeRO-2 engine, 2 gloo processes (one micro-batch each) = plain loop in one process accumulating both."
    pytest.importorskip("deepspeed")
    import socket
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = str(s.getsockname()[1])
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", port, str(ROOT / "tests/_dist_worker.py"),
                        "ds", str(tmp_path / "deepspeed"), "2"],
                       capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ds = json.loads(r.stdout.split("DONE", 1)[1])
    torch.manual_seed(0)
    ref = train(EncoderDecoder(W.tiny()), W.batches(2, seed=1),
                cfg(tmp_path / "torch", optimizer="adamw", lr=1e-3, grad_accum=2)).losses
    torch.testing.assert_close(torch.tensor(ds), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "deepspeed/checkpoints/latest").exists()
    assert len(open(tmp_path / "deepspeed/metrics.jsonl").readlines()) == 3


def test_deepspeed_zero2_resume_restores_optimizer_state(tmp_path):
    "A ZeRO-2 run stopped after its step-2 checkpoint and resumed gives the uninterrupted run's later losses."
    pytest.importorskip("deepspeed")
    import socket
    def launch(out, steps, *flags):
        with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = str(s.getsockname()[1])
        torchrun = Path(sys.executable).parent / "torchrun"
        r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", port, str(ROOT / "tests/_dist_worker.py"),
                            "ds_resume", str(out), str(steps), *flags],
                           capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.split("RESUMED_FROM ", 1)[1].split()[0], json.loads(r.stdout.split("DONE", 1)[1])
    _, full = launch(tmp_path / "full", 4)
    launch(tmp_path / "cut", 2)
    resumed_from, rest = launch(tmp_path / "cut", 4, "--resume")
    assert resumed_from == "2" and len(rest) == 4
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(full), rtol=1e-5, atol=1e-6)


def test_eval_fn_bf16_and_hf_export(tmp_path):
    torch.manual_seed(0)
    from flanmoe_nb.model import ModelConfig
    mc = ModelConfig.preset("tiny", moe=dict(num_experts=4, capacity_factor=None, eval_capacity_factor=None),
                            activation="relu", dropout=0.0)
    m = EncoderDecoder(mc)
    calls = []
    res = train(m, W.batches(2), cfg(tmp_path, steps=2, bf16=True, eval_every=1, export_hf=True,
                                     optimizer="adamw", lr=1e-3),
                eval_fn=lambda model: calls.append(model.training) or {"acc": 0.5})
    assert calls == [False, False] and res.eval == {"acc": 0.5}
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert json.loads(open(tmp_path / "metrics.jsonl").readline())["eval"] == {"acc": 0.5}
    assert (tmp_path / "hf" / "config.json").exists()
    from transformers import SwitchTransformersForConditionalGeneration
    hf = SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    b = W.batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(hf(**b).logits, m.eval()(**b).logits, rtol=1e-4, atol=1e-4)


def test_adafactor_per_expert_equals_torch_per_slice_and_names_bad_args():
    from flanmoe_nb.optim import Adafactor
    torch.manual_seed(1)
    e = torch.randn(4, 5, 3) * torch.tensor([1e-3, 0.1, 1.0, 30.0])[:, None, None]
    b = torch.randn(7)
    ours_e, ours_b = e.clone().requires_grad_(), b.clone().requires_grad_()
    ref_e, ref_b = [e[i].clone().requires_grad_() for i in range(4)], b.clone().requires_grad_()
    ours = Adafactor([dict(params=[ours_b]), dict(params=[ours_e], moe=True)], lr=0.05, weight_decay=0.01)
    ref = torch.optim.Adafactor([ref_b, *ref_e], lr=0.05, weight_decay=0.01)
    for _ in range(4):
        ge, gb = torch.randn(4, 5, 3), torch.randn(7)
        ours_e.grad, ours_b.grad, ref_b.grad = ge, gb, gb.clone()
        for i in range(4): ref_e[i].grad = ge[i].clone()
        ours.step(); ref.step()
    torch.testing.assert_close(ours_e.detach(), torch.stack(ref_e).detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_b.detach(), ref_b.detach(), rtol=1e-5, atol=1e-7)
    sd = ours.state_dict()                               # resumable: state round-trips through a state dict
    again = Adafactor([dict(params=[ours_b]), dict(params=[ours_e], moe=True)], lr=0.05, weight_decay=0.01)
    again.load_state_dict(sd)
    assert float(again.state[ours_e]["step"]) == 4.0
    for bad, name in ((dict(lr=-1.0), "lr"), (dict(d=-1.0), "d"), (dict(weight_decay=-0.1), "weight_decay")):
        with pytest.raises(ValueError, match=name):
            Adafactor([torch.zeros(2, requires_grad=True)], **bad)


def test_bench_train_cli_prints_ratio_rows(capsys):
    from flanmoe_nb import bench
    assert bench.main(["train", "--quick", "--reps", "1", "--experts", "4"]) == 0
    out = capsys.readouterr().out
    row = [l for l in out.splitlines() if l.strip().startswith("4 |")]
    assert row, out
    ours, hf, ratio = (c.strip() for c in row[0].split("|")[1:])
    assert float(ratio.rstrip("x")) == round(int(ours) / int(hf), 2)


def test_bench_train_times_the_same_function_both_ways():
    "The training benchmark compares like with like: HF's model is ours converted, so before any update both give the same loss on the same batch."
    from flanmoe_nb.train import bench_train
    r = bench_train(4, steps=1, rounds=1)
    assert abs(r["first_loss_ours"] - r["first_loss_hf"]) < 1e-4 * abs(r["first_loss_hf"]), r
    assert r["ratio"] == round(r["ours_tokens_per_s"] / r["hf_tokens_per_s"], 2)


def test_bench_train_bf16_runs_both_under_autocast(capsys):
    "--dtype bf16: both models train under CPU bf16 autocast (same function before any update, to bf16 rounding); other dtypes are refused by name."
    from flanmoe_nb import bench
    from flanmoe_nb.train import bench_train
    r = bench_train(4, steps=1, rounds=1, bf16=True)
    assert r["autocast"] == "bf16" and abs(r["first_loss_ours"] - r["first_loss_hf"]) < 2e-2 * abs(r["first_loss_hf"]), r
    assert bench.main(["train", "--quick", "--reps", "1", "--experts", "4", "--dtype", "bf16"]) == 0
    assert "bf16 autocast" in capsys.readouterr().out
    with pytest.raises(SystemExit): bench.main(["train", "--quick", "--dtype", "fp16"])
    assert "--dtype must be fp32 or bf16" in capsys.readouterr().err


def test_compiled_training_matches_eager(tmp_path):
    "TrainConfig(compile=True): the model runs as one torch.compile graph; losses equal eager training."
    def run(compile_, sub):
        torch.manual_seed(0)
        mcfg = W.tiny(capacity_factor=1.0)
        cfg = TrainConfig(steps=3, optimizer="adamw", lr=1e-3, out_dir=str(tmp_path / sub), progress=False,
                          compile=compile_)
        return train(EncoderDecoder(mcfg), W.batches(3), cfg).losses
    torch.testing.assert_close(torch.tensor(run(True, "c")), torch.tensor(run(False, "e")), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile=True, engine="deepspeed")


def test_build_optimizer_fuses_adamw_for_the_torch_engine():
    from flanmoe_nb.train import TrainConfig
    from flanmoe_nb.optim import adamw_fusable, build_optimizer
    m = torch.nn.Linear(4, 3)
    opt = build_optimizer(m, TrainConfig(optimizer="adamw"))
    assert opt.param_groups[0]["fused"] is True
    assert not adamw_fusable([torch.zeros(2, dtype=torch.float64)]) and adamw_fusable([torch.zeros(2)])
    # the fused update equals torch's per-tensor loop to fp32 rounding
    m2 = torch.nn.Linear(4, 3); m2.load_state_dict(m.state_dict())
    ref = torch.optim.AdamW(m2.parameters(), lr=opt.param_groups[0]["lr"], betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    x = torch.randn(5, 4)
    for _ in range(3):
        for mod, o in ((m, opt), (m2, ref)):
            o.zero_grad(); mod(x).square().sum().backward(); o.step()
    for a, b in zip(m.parameters(), m2.parameters()): torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _tb_scalars_of(logdir: Path) -> dict:
    "tag -> [(step, value)] from the TensorBoard event files under `logdir`."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir)); acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_event_files_match_metrics_jsonl(tmp_path):
    train(model(), W.batches(2), cfg(tmp_path, steps=3))
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tb = _tb_scalars_of(tmp_path / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [v for _, v in tb["train/lr"]] == pytest.approx([r["lr"] for r in rows], rel=1e-6)
    assert "train/entropy/0" in tb and "train/entropy/1" in tb     # per-layer lists become one scalar each


def test_tensorboard_resume_purges_replayed_steps_and_fresh_start_moves_it_aside(tmp_path):
    train(model(), W.batches(2), cfg(tmp_path, steps=2, ckpt_every=1))
    train(model(), W.batches(2), cfg(tmp_path, steps=4, resume=True))
    steps = [s for s, _ in _tb_scalars_of(tmp_path / "tensorboard")["train/loss"]]
    assert steps == [1, 2, 3, 4], steps
    with pytest.warns(RuntimeWarning, match="tensorboard"):
        train(model(), W.batches(2), cfg(tmp_path, steps=1))
    assert [s for s, _ in _tb_scalars_of(tmp_path / "tensorboard")["train/loss"]] == [1]
    assert len(list(tmp_path.glob("tensorboard.*"))) == 1
