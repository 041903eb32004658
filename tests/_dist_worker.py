"""Helper processes for tests/test_train.py and tests/test_parallel.py (not a test module).

python tests/_dist_worker.py resume OUT STEPS [--resume]   one training run (killable; resumable)
torchrun --nproc_per_node 2 tests/_dist_worker.py ep OUT    2-process ep_size=2 run: outputs, grads, losses, checkpoint
"""
import json, os, sys
import torch
torch.set_num_threads(1)
from flanmoe_nb.model import EncoderDecoder, ModelConfig
from flanmoe_nb import parallel
from flanmoe_nb.train import TrainConfig, train


def tiny(dropout=0.0, expert_dropout=0.0, num_experts=4, capacity_factor=1.25):
    return ModelConfig.preset("tiny", moe=dict(num_experts=num_experts, top_k=1, capacity_factor=capacity_factor,
                                               expert_dropout=expert_dropout), dropout=dropout, num_encoder_layers=2,
                              num_decoder_layers=2, z_coef=1e-3)


def batches(n, bs=4, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(2, 512, (bs, L), generator=g)
        out.append(dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x.flip(1).clone()))
    return out


def resume_run(out, steps, resume):
    torch.manual_seed(0)
    model = EncoderDecoder(tiny(dropout=0.1, expert_dropout=0.2))
    slow_from = int(os.environ.get("SLOW_FROM_STEP", "0"))   # test hook: the forward of later steps waits
    if slow_from:                                          # (so a kill after step N lands before step N+1)
        import time
        calls = [0]
        def wait(module, args, kwargs):
            calls[0] += 1
            if calls[0] > slow_from: time.sleep(5)
        model.register_forward_pre_hook(wait, with_kwargs=True)
    cfg = TrainConfig(steps=steps, lr=3e-3, ckpt_every=3, out_dir=out, resume=resume, progress=False,
                      schedule="inverse_sqrt", warmup_steps=2, keep_checkpoints=0)
    res = train(model, batches(5), cfg)
    print("RESUMED_FROM", res.resumed_from, flush=True)
    print("DONE", json.dumps(res.losses), flush=True)


def grads_of(model, env):
    "Full gradients, experts gathered per global index."
    g = {}
    for n, p in model.named_parameters():
        t = p.grad.detach().clone()
        layer = None
        if parallel.is_expert_param(n):
            layer = model.get_submodule(n.rsplit(".experts.", 1)[0])
            t = parallel._gather_experts(t, layer, env)
        g[n] = t
    return g


def ep_run(out):
    env = parallel.init_distributed(ep_size=2, num_experts=4)
    torch.manual_seed(0)
    model = EncoderDecoder(tiny())
    bs = batches(2, seed=1)
    mine = bs[env.rank]
    parallel.broadcast_parameters(model, env)
    parallel.expert_parallel(model, env)
    model.train()
    o = model(**mine)
    o.loss.backward()
    parallel.sync_gradients(model, env)
    grads = grads_of(model, env)
    logits = [torch.empty_like(o.logits) for _ in range(2)]
    torch.distributed.all_gather(logits, o.logits.detach().contiguous())
    model.zero_grad(set_to_none=True)
    cfg = TrainConfig(steps=3, optimizer="adamw", lr=1e-3, out_dir=out, progress=False, ep_size=2)
    res = train(model, [mine], cfg, env=env)
    model.eval()
    with torch.no_grad(): after = model(**mine).logits
    # the same 3 steps with Adafactor (per-expert update scaling), from the same initial model
    torch.manual_seed(0)
    model = EncoderDecoder(tiny())
    parallel.broadcast_parameters(model, env)
    parallel.expert_parallel(model, env)
    cfg = TrainConfig(steps=3, optimizer="adafactor", lr=1e-2, out_dir=os.path.join(out, "adafactor"),
                      progress=False, ep_size=2)
    ada = train(model, [mine], cfg, env=env)
    if env.rank == 0:
        torch.save(dict(grads=grads, logits=torch.cat(logits), losses=res.losses, after=after,
                        loss0=[float(o.loss)], adafactor_losses=ada.losses), os.path.join(out, "ep_result.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def ep_resume_run(out, steps, resume):
    "2 processes, ep_size=2, Adafactor, examples sharded by `Batches`; checkpoints every 2 steps."
    examples = [dict(input_ids=list(range(2 + i, 12 + i)), labels=list(range(20 + i, 10 + i, -1))) for i in range(16)]
    def collate(rows):
        x, y = torch.tensor([r["input_ids"] for r in rows]), torch.tensor([r["labels"] for r in rows])
        return dict(input_ids=x, attention_mask=torch.ones_like(x), labels=y)
    cfg = TrainConfig(steps=steps, batch_size=2, ep_size=2, out_dir=out, progress=False, ckpt_every=2,
                      keep_checkpoints=0, resume=resume)
    from flanmoe_nb.train import run_stage
    _, res = run_stage(tiny(dropout=0.1, expert_dropout=0.1), examples, cfg, collate=collate)
    if torch.distributed.get_rank() == 0:
        print("RESUMED_FROM", res.resumed_from, flush=True); print("DONE", json.dumps(res.losses), flush=True)
    torch.distributed.destroy_process_group()


def ds_run(out, stage):
    "Short AdamW run on the DeepSpeed engine (ZeRO `stage`, gloo); under 2 processes rank r takes batch r."
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = EncoderDecoder(tiny())
    ds = os.path.join(os.path.dirname(__file__), "..", "papermill_runs", "deepspeed", "tiny.json")
    ds = {**json.load(open(ds)), "zero_optimization": {"stage": int(stage)}}
    cfg = TrainConfig(steps=3, optimizer="adamw", lr=1e-3, batch_size=4, out_dir=out, progress=False,
                      engine="deepspeed", deepspeed_config=ds)
    res = train(model, [batches(2, seed=1)[rank]], cfg)
    if rank == 0: print("DONE", json.dumps(res.losses), flush=True)


def ds_resume_run(out, steps, resume):
    "ZeRO-2 AdamW run over 2 processes, checkpoint every 2 steps; `--resume` continues from the latest."
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = EncoderDecoder(tiny())
    ds = os.path.join(os.path.dirname(__file__), "..", "papermill_runs", "deepspeed", "tiny.json")
    ds = {**json.load(open(ds)), "zero_optimization": {"stage": 2}}
    cfg = TrainConfig(steps=steps, optimizer="adamw", lr=3e-3, batch_size=4, out_dir=out, progress=False,
                      engine="deepspeed", deepspeed_config=ds, ckpt_every=2, keep_checkpoints=0, resume=resume)
    res = train(model, batches(4, seed=rank), cfg)
    if rank == 0:
        print("RESUMED_FROM", res.resumed_from, flush=True); print("DONE", json.dumps(res.losses), flush=True)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "resume": resume_run(out, int(sys.argv[3]), "--resume" in sys.argv)
    elif mode == "ep": ep_run(out)
    elif mode == "ds": ds_run(out, sys.argv[3])
    elif mode == "ds_resume": ds_resume_run(out, int(sys.argv[3]), "--resume" in sys.argv)
    elif mode == "ep_resume": ep_resume_run(out, int(sys.argv[3]), "--resume" in sys.argv)
