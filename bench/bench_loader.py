"""Benchmark: a LeNet-300-100 training epoch fed by DeviceLoader versus by pre-sliced, pre-normalised batches.

Run from the repository root:  MNIST_PATH=/path/to/data python bench/bench_loader.py

Two copies of the same model train side by side, iteration by iteration: one takes each batch from the
loader (the gather, uint8 -> float conversion and normalisation happen inside its timed iteration), the other
takes the same-shaped batch from a list built before timing (one epoch's batches, already sliced, normalised
and on the device). Which copy goes first alternates every iteration, so drift in the machine's speed hits both
alike. A feed's epoch time is the sum of its iteration times; the printed ratio, loader / pre-sliced, is the
median over the timed epochs of the two epoch times' ratio. The target is <= 1.10.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, List, Tuple

import torch
from torch import Tensor, nn

import dataset  # the project is installed editable (requirements.txt), so no sys.path editing
from base_model import build_model
from bench_gsm_step import synchronize  # bench/ is on sys.path when a bench runs


def make_step(model: nn.Module, lr: float, momentum: float) -> Callable[[Tensor, Tensor], None]:
    """One SGD iteration (forward, cross-entropy, backward, step) of `model` on a batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def interleaved_epoch(loader: dataset.DeviceLoader, epoch: int, loader_step, presliced: List[Tuple[Tensor, Tensor]],
                      presliced_step, device: torch.device) -> Tuple[float, float, float]:
    """One epoch of each feed, iteration by iteration. Returns seconds (loader epoch, of which fetching the
    batches, pre-sliced epoch)."""
    loader.set_epoch(epoch)
    batches = iter(loader)
    loader_s = fetch_s = presliced_s = 0.0
    for i, (x_pre, y_pre) in enumerate(presliced):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            synchronize(device)
            start = time.perf_counter()
            if which == 0:
                x, y = next(batches)
                fetched = time.perf_counter()
                loader_step(x, y)
            else:
                presliced_step(x_pre, y_pre)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if which == 0:
                loader_s += elapsed
                fetch_s += fetched - start
            else:
                presliced_s += elapsed
    return loader_s, fetch_s, presliced_s


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=12, help="timed epochs per feed (default 12)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256, the LeNets')")
    parser.add_argument(
        "--data-root", default=None,
        help="folder holding MNIST/ (default: $MNIST_PATH, else ./data)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and the shuffling")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")

    device = torch.device(args.device)
    try:
        images, labels = dataset.load_mnist(True, root=args.data_root, download=False)
    except dataset.DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    torch.manual_seed(args.seed)
    loader_model = build_model("lenet300").to(device)
    presliced_model = copy.deepcopy(loader_model)
    lr, momentum = 0.03, 0.9
    loader_step = make_step(loader_model, lr, momentum)
    presliced_step = make_step(presliced_model, lr, momentum)

    loader = dataset.DeviceLoader(
        images, labels, args.batch_size, train=True, normalize=dataset.MNIST_NORMALIZE, augment=False,
        device=device, seed=args.seed,
    )
    # The baseline feed: one epoch of batches, already on the device, sliced and normalised. Cloned, so that
    # each is its own tensor as a pre-built list of batches would be.
    presliced: List[Tuple[Tensor, Tensor]] = [(x.clone(), y.clone()) for x, y in loader.epoch_batches(0)]

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, load average "
          f"{os.getloadavg()[0]:.2f}; lenet300, SGD lr {lr} momentum {momentum}, {len(loader)} batches of "
          f"{args.batch_size}", flush=True)
    # Warm-up epoch: allocator, thread pool and caches settle.
    interleaved_epoch(loader, 0, loader_step, presliced, presliced_step, device)

    loader_times: List[float] = []
    fetch_times: List[float] = []
    presliced_times: List[float] = []
    for repeat in range(args.repeats):
        loader_s, fetch_s, presliced_s = interleaved_epoch(
            loader, repeat + 1, loader_step, presliced, presliced_step, device)
        loader_times.append(loader_s)
        fetch_times.append(fetch_s)
        presliced_times.append(presliced_s)
        print(f"epoch {repeat + 1}: loader {loader_s:.3f} s (fetching batches {1e3 * fetch_s:.1f} ms), "
              f"pre-sliced {presliced_s:.3f} s, ratio {loader_s / presliced_s:.3f}", flush=True)

    paired = [a / b for a, b in zip(loader_times, presliced_times)]
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print(f"median epoch: loader {statistics.median(loader_times):.3f} s, "
          f"pre-sliced {statistics.median(presliced_times):.3f} s; "
          f"loader's own work (fetching batches) {1e3 * statistics.median(fetch_times):.1f} ms per epoch")
    print(f"ratios over the {len(paired)} epochs: min {min(paired):.3f}, max {max(paired):.3f}; "
          f"total {sum(loader_times) / sum(presliced_times):.3f}")
    print(f"ratio loader/pre-sliced = {statistics.median(paired):.3f} (median of {len(paired)} epochs; "
          f"target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
