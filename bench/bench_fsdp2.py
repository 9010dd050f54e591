"""GSM's step on a model sharded by FSDP2 against unsharded GSM's and against SGD's on the same shards: what the
global selection over ranks costs. Run under torchrun (gloo on the CPU, nccl on GPUs):

    torchrun --nproc-per-node 2 bench/bench_fsdp2.py --size 5e6
    torchrun --nproc-per-node 4 bench/bench_fsdp2.py --size 1e8 --device cuda

The model is bench_scale's transformer-shaped blocks, each matrix sharded with fully_shard and the root too.
Every rank sets the same fresh gradients before each step (outside the timed region) and the steps of sharded
GSM, sharded SGD (foreach) and unsharded GSM (on each rank's own whole copy) are timed in turn, round after
round; rank 0 prints the medians over rounds of the slowest rank's time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from bench_pipeline import cpu_model  # this folder's scripts import each other when run from it
from bench_scale import LR, MOMENTUM, WEIGHT_DECAY, Blocks, width_for
from gsm import GSM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=5e6, help="weights of the model (default: 5M)")
    parser.add_argument("--ratio", type=float, default=0.1, help="nonzero ratio (default: 1/10)")
    parser.add_argument("--layers", type=int, default=10, help="blocks of four matrices (default: 10)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are printed")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("run it under torchrun, e.g. torchrun --nproc-per-node 2 bench/bench_fsdp2.py")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    width = width_for(args.size, args.layers)
    whole = Blocks(width, args.layers).to(device)
    sharded = Blocks(width, args.layers).to(device)
    sharded.load_state_dict(whole.state_dict())
    for block in sharded.blocks:
        for layer in block.values():
            fully_shard(layer)
    fully_shard(sharded)
    gradients = [[torch.randn_like(p) * 1e-3 for p in whole.parameters()] for _ in range(2)]
    common = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    runs = {"GSM sharded": (sharded, GSM(sharded.parameters(), nonzero_ratio=args.ratio, **common)),
            "SGD sharded": (sharded, torch.optim.SGD(sharded.parameters(), foreach=True, **common)),
            "GSM whole": (whole, GSM(whole.parameters(), nonzero_ratio=args.ratio, **common))}
    times = {name: [] for name in runs}
    for round_index in range(args.rounds + 1):  # the first round creates the buffers and is not counted
        for name, (model, optimizer) in runs.items():
            for p, g in zip(model.parameters(), gradients[round_index % 2]):
                p.grad = distribute_tensor(g, p.device_mesh, p.placements) if model is sharded else g.clone()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            began = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if round_index:
                times[name].append(float(elapsed))
    if rank == 0:
        median = {name: statistics.median(values) for name, values in times.items()}
        n = sum(p.numel() for p in whole.parameters())
        print(f"{cpu_model() if device.type == 'cpu' else torch.cuda.get_device_name(device)}, torch "
              f"{torch.__version__}, {world} ranks x {torch.get_num_threads()} threads, N={n / 1e6:.1f}M, "
              f"ratio 1/{round(1 / args.ratio)}")
        print(f"step: GSM sharded {median['GSM sharded'] * 1e3:.2f} ms, SGD sharded "
              f"{median['SGD sharded'] * 1e3:.2f} ms, GSM whole {median['GSM whole'] * 1e3:.2f} ms; "
              f"GSM sharded / SGD sharded {median['GSM sharded'] / median['SGD sharded']:.2f}, "
              f"GSM sharded / GSM whole {median['GSM sharded'] / median['GSM whole']:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
