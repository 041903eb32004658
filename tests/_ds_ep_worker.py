"""Helper process for tests/test_ds_ep.py (not a test module): one rank of a DeepSpeed + expert-parallel run.

torchrun --nproc_per_node N tests/_ds_ep_worker.py OUT STAGE EP_SIZE [STEPS] [--resume]
torchrun --nproc_per_node N tests/_ds_ep_worker.py OUT STAGE EP_SIZE --zero-sizes   (ZeRO's partition sizes per rank)
Rank r trains on batch r of `_dist_worker.batches(N, seed=1)` for STEPS (3) AdamW steps under ZeRO-STAGE with
ep_size EP_SIZE; rank 0 writes the losses, grad norms and the full (per-expert) state dict to OUT/result.pt.
"""
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
import _dist_worker as W
from flanmoe_nb.model import EncoderDecoder
from flanmoe_nb import parallel
from flanmoe_nb.train import TrainConfig, train

DS = os.path.join(os.path.dirname(__file__), "..", "papermill_runs", "deepspeed", "tiny.json")


def main(out, stage, ep, steps=3, resume=False):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    model = EncoderDecoder(W.tiny())
    slow_from = int(os.environ.get("SLOW_FROM_STEP", "0"))   # test hook: later forwards wait (a SIGKILL lands between steps)
    if slow_from:
        import time
        calls = [0]
        def wait(module, args, kwargs):
            calls[0] += 1
            if calls[0] > slow_from: time.sleep(5)
        model.register_forward_pre_hook(wait, with_kwargs=True)
    ds = {**json.load(open(DS)), "zero_optimization": {"stage": stage}}
    cfg = TrainConfig(steps=steps, optimizer="adamw", lr=1e-3, batch_size=4, out_dir=out, progress=False,
                      engine="deepspeed", deepspeed_config=ds, ep_size=ep, ckpt_every=2, keep_checkpoints=0, resume=resume)
    stream = W.batches(world, seed=1)[rank]
    res = train(model, [stream], cfg)
    sd = parallel.full_state_dict(model)                      # collective: experts gathered by global index
    if rank == 0:
        gn = [json.loads(l)["grad_norm"] for l in open(os.path.join(out, "metrics.jsonl"))]
        torch.save(dict(losses=res.losses, grad_norms=gn, state=sd, resumed_from=res.resumed_from,
                        local_experts=[l.num_local_experts for _, l in parallel.moe_layers(model)],
                        ds_moe=[type(l).__name__ for _, l in parallel.moe_layers(model)]), os.path.join(out, "result.pt"))
    torch.distributed.barrier()




def zero_sizes(out, stage, ep):
    "Per rank: elements of ZeRO's fp32 partitions and of AdamW's state after one step, dense and expert groups apart."
    from flanmoe_nb.optim import build_optimizer
    from flanmoe_nb.ds import deepspeed_engine
    from flanmoe_nb.train import _train_step_deepspeed
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    env = parallel.init_distributed(ep_size=ep, num_experts=4)
    torch.manual_seed(0)
    model = parallel.expert_parallel(EncoderDecoder(W.tiny()), env)
    cfg = TrainConfig(steps=1, optimizer="adamw", lr=1e-3, batch_size=4, out_dir=out, progress=False, engine="deepspeed",
                      deepspeed_config={**json.load(open(DS)), "zero_optimization": {"stage": stage}}, ep_size=ep)
    opt = build_optimizer(model, cfg)
    engine, opt, _ = deepspeed_engine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), cfg, env)
    _train_step_deepspeed(engine, iter([W.batches(world, seed=1)[rank]]), cfg, 0.0, 0.0, env)
    sizes = {}
    for i, part in enumerate(opt.single_partition_of_fp32_groups):
        kind = "expert" if opt.is_moe_param_group[i] else "dense"
        st = opt.optimizer.state[part]
        sizes[f"{kind}_master"] = part.numel()
        sizes[f"{kind}_state"] = sum(v.numel() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)
        sizes[f"{kind}_grad"] = opt.single_partition_of_fp32_groups[i].grad.numel() if part.grad is not None else 0
    allsizes = [None] * world
    torch.distributed.all_gather_object(allsizes, sizes)
    if rank == 0: json.dump(allsizes, open(os.path.join(out, "zero_sizes.json"), "w"))
    torch.distributed.barrier()


if __name__ == "__main__":
    a = [x for x in sys.argv[1:] if not x.startswith("--")]
    if "--zero-sizes" in sys.argv: zero_sizes(a[0], int(a[1]), int(a[2]))
    else: main(a[0], int(a[1]), int(a[2]), int(a[3]) if len(a) > 3 else 3, "--resume" in sys.argv)
