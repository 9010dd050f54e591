"""Inference with a pruned model's linear layers dense (zeros included) against torch.sparse CSR, on the CPU.

    python bench/bench_sparse_inference.py --root OUT_ROOT     # the pruned files of finished lottery runs
    python bench/bench_sparse_inference.py --lenet300 FILE --lenet5 FILE

Takes LeNet-300-100 at 60x (all three layers are linear) and LeNet-5 at 300x (its two linear layers; the
convolutions stay dense), from the GSM stage's `finish_pruned.hdf5` under OUT_ROOT (or the files given), and
times one forward pass at batch 1 and 256 on real MNIST test images, dense and CSR interleaved call by call,
after checking that both give the same logits. It reports what it measures: CSR is slower than dense where it
is slower.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import dataset
from base_model import build_model
from bench_pipeline import cpu_model  # bench/ is on sys.path when a bench runs
from gsm import load_hdf5, sparsity_report
from gsm.experiments import layout

RATIOS = {"lenet300": 60, "lenet5": 300}


class SparseLinear(nn.Module):
    """A linear layer whose weight is stored as a torch.sparse CSR matrix: y = x W^T + b, as W x^T."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": what this bench measures
            warnings.simplefilter("ignore", UserWarning)
            self.weight = layer.weight.detach().to_sparse_csr()
        self.bias = None if layer.bias is None else layer.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.mm(self.weight, x.t()).t()
        return out if self.bias is None else out + self.bias


def with_sparse_linears(model: nn.Module) -> nn.Module:
    """A copy of `model` whose nn.Linear layers are SparseLinear (everything else as it was)."""
    import copy

    sparse = copy.deepcopy(model)
    for name, module in list(sparse.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, SparseLinear(child))
    return sparse


def time_interleaved(calls: Dict[str, Callable[[], torch.Tensor]], repeats: int) -> Dict[str, float]:
    """Median ms per call, the calls taking turns (which goes first alternates)."""
    names = list(calls)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def find_file(root: Path, net: str) -> Path:
    return layout.lottery_dir(root, net, RATIOS[net], "gsm") / layout.PRUNED_WEIGHTS


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="out-root of finished lottery runs")
    parser.add_argument("--lenet300", type=Path, help="a pruned LeNet-300-100 weights file (default: under --root)")
    parser.add_argument("--lenet5", type=Path, help="a pruned LeNet-5 weights file (default: under --root)")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per variant and batch size")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    files = {"lenet300": args.lenet300 or find_file(args.root, "lenet300"),
             "lenet5": args.lenet5 or find_file(args.root, "lenet5")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        parser.error(f"no pruned weights file at {', '.join(missing)}; run the lottery scripts first (a --scale run "
                     f"will do), or give the files with --lenet300 and --lenet5")
    images, _ = dataset.load_mnist(False)
    test = images.float().div(255).sub(dataset.MNIST_NORMALIZE[0][0]).div(dataset.MNIST_NORMALIZE[1][0])
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.repeats} calls "
          f"per variant, interleaved; medians")
    header = f"{'model':<9}  {'file':<44}  {'kept':>12}  {'batch':>5}  {'dense ms':>9}  {'CSR ms':>8}  {'CSR/dense':>9}"
    print(header)
    print("-" * len(header))
    for net, path in files.items():
        model = build_model(net)
        load_hdf5(path, model)
        model.eval()
        sparse = with_sparse_linears(model)
        linear = {name: p for name, p in model.named_parameters() if name.startswith("linear") and p.dim() == 2}
        report = sparsity_report(linear)
        for batch in (1, 256):
            x = test[:batch]
            with torch.no_grad():
                difference = float((model(x) - sparse(x)).abs().max())
                assert difference < 1e-4, f"{net}: CSR logits differ from dense by {difference}"
                ms = time_interleaved({"dense": lambda: model(x), "csr": lambda: sparse(x)}, args.repeats)
            shown = str(path) if len(str(path)) <= 44 else "..." + str(path)[-41:]
            print(f"{net:<9}  {shown:<44}  {f'{report.nonzeros}/{report.elements}':>12}  {batch:>5}  "
                  f"{ms['dense']:>9.3f}  {ms['csr']:>8.3f}  {ms['csr'] / ms['dense']:>9.2f}")
    print("kept: non-zeros of the linear layers (those CSR stores); convolutions run dense in both variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
