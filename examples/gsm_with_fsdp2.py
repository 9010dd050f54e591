"""GSM on a model sharded with FSDP2: an MLP on generated data pruned 10x, its weights split over the ranks.

    torchrun --nproc-per-node 2 examples/gsm_with_fsdp2.py --out /tmp/gsm_fsdp2          # CPU, gloo
    torchrun --nproc-per-node 8 examples/gsm_with_fsdp2.py --out /tmp/gsm_fsdp2          # GPUs, nccl

What a user has to know, each shown below:
  - shard as usual (`fully_shard` on the blocks, then on the root) and give `GSM` the sharded parameters: every
    rank ranks its own shards and the ranks agree on one global threshold, so they keep exactly the weights
    that GSM on the whole model would keep;
  - `optimizer.hard_mask(model)`, `gsm.apply_mask_to_weights` and `gsm.save_sparse` are collectives: call them
    on every rank (the mask comes back whole on each; rank 0 writes the export); `gsm.save_mask` writes
    whatever it is given: call it on one rank;
  - the export is a plain model's state: `gsm.load_sparse` fills an unsharded copy, which computes what the
    sharded model computes.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import gsm


def make_model() -> nn.Sequential:
    torch.manual_seed(0)  # the same weights on every rank before they are sharded
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def batches(steps: int, device: torch.device):
    """Generated classification batches, the same on every rank (FSDP averages the ranks' gradients)."""
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(32, 10, generator=generator)
    for _ in range(steps):
        x = torch.randn(64, 32, generator=generator)
        yield x.to(device), (x @ teacher).argmax(1).to(device)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for mask.hdf5 and pruned_sparse.hdf5")
    parser.add_argument("--steps", type=int, default=600, help="GSM steps (default: 600)")
    parser.add_argument("--ratio", type=float, default=10.0, help="compression ratio (default: 10)")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run it under torchrun, e.g. torchrun --nproc-per-node 2 examples/gsm_with_fsdp2.py --out DIR")
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    model = make_model().to(device)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = gsm.GSM(model.parameters(), lr=0.05, momentum=0.95, weight_decay=1e-2, nonzero_ratio=1 / args.ratio)
    for step, (x, y) in enumerate(batches(args.steps, device)):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if rank == 0 and (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f}, {optimizer.num_active} of {optimizer.num_prunable} "
                  f"prunable weights took their gradient", flush=True)

    x, y = next(iter(batches(1, device)))  # a batch to evaluate on, before and after the hard prune
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    mask = optimizer.hard_mask(model)  # every rank
    gsm.apply_mask_to_weights(model, mask)  # every rank: each zeroes its own shards
    args.out.mkdir(parents=True, exist_ok=True)
    gsm.save_sparse(model, args.out / "pruned_sparse.hdf5", names=optimizer.prunable_names(model))  # every rank
    with torch.no_grad():
        sharded_out = model(x)
    if rank == 0:
        gsm.save_mask(mask, args.out / "mask.hdf5")
        plain = make_model()
        gsm.load_sparse(args.out / "pruned_sparse.hdf5", plain)
        with torch.no_grad():
            plain_out = plain(x.cpu())
        kept = gsm.mask_count(mask)
        print(f"{dist.get_world_size()} ranks; kept {kept} of {optimizer.num_prunable} prunable weights "
              f"({optimizer.num_prunable / kept:.1f}x); loss {before:.3f} before the hard prune, "
              f"{F.cross_entropy(sharded_out, y).item():.3f} after; "
              f"the export, loaded into an unsharded model, computes the same outputs: "
              f"{torch.allclose(plain_out, sharded_out.cpu(), atol=1e-5)}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
