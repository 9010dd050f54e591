"""Benchmark: a LeNet-300-100 training epoch fed by DeviceLoader versus by pre-sliced, pre-normalised batches.

Run from the repository root:  MNIST_PATH=/path/to/data python bench/bench_loader.py
The two feeds alternate within one run (their order swapping every repeat, so drift in machine load hits
both alike); the printed ratio loader / pre-sliced, the median over repeats of the two epochs' time ratio,
is the loader's overhead; the target is <= 1.10.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, List, Tuple

import torch
from torch import Tensor, nn

import dataset  # the project is installed editable (requirements.txt), so no sys.path editing
from base_model import build_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_epoch(step: Callable[[Tensor, Tensor], None], batches, device: torch.device) -> float:
    """Seconds for one pass of `step` over `batches` (an iterable of (images, labels))."""
    synchronize(device)
    start = time.perf_counter()
    for images, labels in batches:
        step(images, labels)
    synchronize(device)
    return time.perf_counter() - start


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed epochs per feed (default 20)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256, as DESIGN 2)")
    parser.add_argument(
        "--data-root", default=None,
        help="folder holding MNIST/ (default: $MNIST_PATH, else ./data)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and the shuffling")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    device = torch.device(args.device)
    try:
        images, labels = dataset.load_mnist(True, root=args.data_root, download=False)
    except dataset.DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    torch.manual_seed(args.seed)
    model = build_model("lenet300")
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    loader = dataset.DeviceLoader(
        images, labels, args.batch_size, train=True, normalize=dataset.MNIST_NORMALIZE, augment=False,
        device=device, seed=args.seed,
    )
    # The baseline: one epoch of the same batches, already on the device, sliced and normalised.
    presliced: List[Tuple[Tensor, Tensor]] = [(x.clone(), y.clone()) for x, y in loader.epoch_batches(0)]

    def loader_epoch(epoch: int) -> float:
        loader.set_epoch(epoch)
        return time_epoch(step, loader, device)

    def presliced_epoch(_: int) -> float:
        return time_epoch(step, presliced, device)

    # Warm-up: allocator, thread pool and caches settle during the first epochs.
    loader_epoch(0)
    presliced_epoch(0)

    loader_times: List[float] = []
    presliced_times: List[float] = []
    for repeat in range(args.repeats):
        feeds = [(loader_epoch, loader_times), (presliced_epoch, presliced_times)]
        if repeat % 2:
            feeds.reverse()
        for run, times in feeds:
            times.append(run(repeat + 1))
        print(f"repeat {repeat + 1}: loader {loader_times[-1]:.3f} s, pre-sliced {presliced_times[-1]:.3f} s",
              flush=True)

    # Each repeat's two epochs ran back to back under the same machine load, so the median of the paired
    # ratios is robust to load that changes between repeats; the ratio of the fastest epochs is a second view.
    paired = [a / b for a, b in zip(loader_times, presliced_times)]
    print(f"model lenet300, SGD lr 0.03 momentum 0.9; device {device}, {len(loader)} batches of "
          f"{args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"median epoch: loader {statistics.median(loader_times):.3f} s, "
          f"pre-sliced {statistics.median(presliced_times):.3f} s; "
          f"fastest: loader {min(loader_times):.3f} s, pre-sliced {min(presliced_times):.3f} s "
          f"(ratio {min(loader_times) / min(presliced_times):.3f})")
    print(f"ratio loader/pre-sliced = {statistics.median(paired):.3f} (median of {len(paired)} paired repeats; "
          f"target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
