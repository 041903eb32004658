"""Helper process for tests/test_ds_ep.py (not a test module): one rank of a DeepSpeed + expert-parallel run.

torchrun --nproc_per_node N tests/_ds_ep_worker.py OUT STAGE EP_SIZE [STEPS] [--resume]
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


if __name__ == "__main__":
    a = [x for x in sys.argv[1:] if not x.startswith("--")]
    main(a[0], int(a[1]), int(a[2]), int(a[3]) if len(a) > 3 else 3, "--resume" in sys.argv)
