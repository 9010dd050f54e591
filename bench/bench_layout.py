"""Memory layout of the convolutional models: a training iteration (forward, cross-entropy, backward, SGD step)
in the default layout against channels_last, measured side by side on copies of the same model, and how far
each layout's gradients are from a float64 computation of the same batch. The scripts train a model in
channels_last where `base_model.trains_channels_last` says so; this bench shows why.

    python bench/bench_layout.py                       # lenet5, rc20 and rc56 on cpu (or cuda when present)
    python bench/bench_layout.py --models lenet5 --iters 40
"""
import argparse
import copy
import statistics
import time
from typing import Dict, Tuple

import torch
from torch import nn

from base_model import build_model, trains_channels_last
from bench_gsm_step import synchronize  # bench/ is on sys.path when a bench runs

# model: (batch, input shape without the batch): the experiments' batch sizes.
SETUPS: Dict[str, Tuple[int, Tuple[int, ...]]] = {
    "lenet5": (256, (1, 28, 28)),
    "rc20": (64, (3, 32, 32)),
    "rc56": (64, (3, 32, 32)),
}
LAYOUTS = {"default": torch.contiguous_format, "channels_last": torch.channels_last}


def gradient_error(model: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   memory_format: torch.memory_format) -> float:
    """max over parameters of max |g - g64| / max |g64|, g64 being the float64 gradient of the same batch."""
    for m, images in ((model, x.contiguous(memory_format=memory_format)), (reference, x.double())):
        m.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(images), y).backward()
    return max(float((p.grad.double() - r.grad).abs().max() / r.grad.abs().max())
               for p, r in zip(model.parameters(), reference.parameters()))


def bench_model(name: str, device: torch.device, iters: int, warmup: int) -> None:
    batch, shape = SETUPS[name]
    torch.manual_seed(0)
    base = build_model(name).to(device)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, *shape, generator=generator).to(device),
                torch.randint(0, 10, (batch,), generator=generator).to(device)) for _ in range(4)]

    reference = copy.deepcopy(base).double()
    errors = {label: gradient_error(copy.deepcopy(base).to(memory_format=fmt), reference, *batches[0], fmt)
              for label, fmt in LAYOUTS.items()}

    runs = {}
    for label, fmt in LAYOUTS.items():
        model = copy.deepcopy(base).to(memory_format=fmt)
        runs[label] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4), fmt)
    times = {label: [] for label in LAYOUTS}
    for i in range(warmup + iters):
        x, y = batches[i % len(batches)]
        for label, (model, optimizer, fmt) in (runs.items() if i % 2 else reversed(list(runs.items()))):
            images = x.contiguous(memory_format=fmt)
            synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), y).backward()
            optimizer.step()
            synchronize(device)
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    default_ms, cl_ms = (1e3 * statistics.median(times[label]) for label in LAYOUTS)
    print(f"{device.type:<6} {name:<7} {batch:>5} {default_ms:11.2f} {cl_ms:13.2f} {default_ms / cl_ms:8.2f}x "
          f"{errors['default']:12.1e} {errors['channels_last']:12.1e}   "
          f"{'channels_last' if trains_channels_last(name, device) else 'default'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=sorted(SETUPS), default=["lenet5", "rc20", "rc56"])
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per layout (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed iterations first (default: %(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; iteration = forward, cross-entropy, "
          f"backward, SGD step; median ms per layout, iterations interleaved")
    print(f"{'device':<6} {'model':<7} {'batch':>5} {'default ms':>11} {'chan.last ms':>13} {'speed-up':>9} "
          f"{'grad err def':>12} {'grad err cl':>12}   scripts use")
    for name in args.models:
        bench_model(name, device, args.iters, args.warmup)
    print("grad err: max over parameters of max |g - g_float64| / max |g_float64| on one batch")


if __name__ == "__main__":
    main()
