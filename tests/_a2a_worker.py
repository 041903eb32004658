"""Helper process for tests/test_plan.py (not a test module): one rank of a 2-process gloo run with ep_size=2 that
records the bytes every expert-parallel all-to-all carries in one forward + backward.

torchrun --nproc_per_node 2 tests/_a2a_worker.py OUT
"""
import json, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from flanmoe_nb.model import EncoderDecoder, ModelConfig
from flanmoe_nb import parallel

B, S, T = 4, 24, 12


def config():
    return ModelConfig.preset("tiny", moe=dict(num_experts=4, top_k=2, capacity_factor=None), dropout=0.0)


def main(out):
    env = parallel.init_distributed(ep_size=2, num_experts=4)
    torch.manual_seed(0)
    model = parallel.expert_parallel(EncoderDecoder(config()), env)
    parallel.broadcast_parameters(model, env)
    g = torch.Generator().manual_seed(1 + env.rank)            # each rank its own batch
    x, y = torch.randint(2, 512, (B, S), generator=g), torch.randint(2, 512, (B, T), generator=g)
    sent = {"total": 0, "off_device": 0, "calls": 0}
    real = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if input.is_floating_point():                           # token rows (the int64 count exchange is not payload)
            row = input[0].numel() * input.element_size() if input.dim() > 1 and input.shape[0] else 0
            splits = input_split_sizes if input_split_sizes is not None else [input.shape[0] // 2] * 2
            me = dist.get_rank(group)
            sent["total"] += sum(splits) * row
            sent["off_device"] += sum(s for r, s in enumerate(splits) if r != me) * row
            sent["calls"] += 1
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    model(x, labels=y).loss.backward()
    dist.all_to_all_single = real
    with open(f"{out}/a2a_rank{env.rank}.json", "w") as f: json.dump(sent, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
