"""Time one training iteration (forward, cross-entropy, backward, optimizer step) with GSM, with
torch.optim.SGD, and with a naive GSM (torch.cat + topk + float masks + SGD), interleaved on the same model
and the same synthetic batches.

    python bench/bench_gsm_step.py                      # lenet300 and rc56 on cpu (and cuda if present)
    python bench/bench_gsm_step.py --models lenet300 --steps 20 --repeats 7
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from base_model import build_model
from gsm import GSM

# (model, batch, input shape without batch, nonzero_ratio)
SETUPS: Dict[str, Tuple[int, Tuple[int, ...], float]] = {
    "lenet300": (256, (1, 28, 28), 1 / 60),
    "rc56": (64, (3, 32, 32), 1 / 10),
}
MOMENTUM, WEIGHT_DECAY, LR = 0.9, 5e-4, 0.01
METHODS = ("SGD", "GSM", "naive")


class NaiveGSM:
    """GSM as one would first write it: concatenate every |w * g|, topk(Q), threshold = the smallest of the
    top Q, float masks multiplied into the gradients, then a torch.optim.SGD step."""

    def __init__(self, params: List[nn.Parameter], nonzero_ratio: float, **sgd_args) -> None:
        self.prunable = [p for p in params if p.dim() > 1]
        self.keep_count = int(nonzero_ratio * sum(p.numel() for p in self.prunable))
        self.sgd = torch.optim.SGD(params, **sgd_args)
        self.last_mask: Optional[Tensor] = None

    @torch.no_grad()
    def step(self) -> None:
        metric = torch.cat([(p * p.grad).abs().reshape(-1) for p in self.prunable])
        threshold = metric.topk(self.keep_count).values.min()
        mask = metric >= threshold
        self.last_mask = mask  # counted after the timed region
        float_mask = mask.float()
        offset = 0
        for p in self.prunable:
            p.grad.mul_(float_mask[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        self.sgd.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)

    @property
    def num_active(self) -> int:
        return int(self.last_mask.sum())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_iteration(model: nn.Module, optimizer, batches: List[Tuple[Tensor, Tensor]]) -> Callable[[int], None]:
    def iteration(i: int) -> None:
        x, y = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return iteration


def bench_model(name: str, device: torch.device, steps: int, repeats: int, warmup: int, seed: int) -> dict:
    batch, shape, nonzero_ratio = SETUPS[name]
    torch.manual_seed(seed)
    base = build_model(name).to(device)
    models = {method: copy.deepcopy(base) for method in METHODS}
    sgd_args = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    optimizers = {
        "SGD": torch.optim.SGD(models["SGD"].parameters(), **sgd_args),
        "GSM": GSM(models["GSM"].parameters(), nonzero_ratio=nonzero_ratio, **sgd_args),
        "naive": NaiveGSM(list(models["naive"].parameters()), nonzero_ratio, **sgd_args),
    }
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(batch, *shape, generator=generator).to(device),
                torch.randint(0, 10, (batch,), generator=generator).to(device)) for _ in range(4)]
    iterations = {m: make_iteration(models[m], optimizers[m], batches) for m in METHODS}
    counters = {m: 0 for m in METHODS}
    active_counts: Dict[str, List[int]] = {"GSM": [], "naive": []}

    def run(method: str, timed: bool) -> Optional[float]:
        synchronize(device)
        start = time.perf_counter()
        iterations[method](counters[method])
        synchronize(device)
        elapsed = time.perf_counter() - start
        counters[method] += 1
        # Counted outside the timed region. GSM and naive GSM see the same weights and batches at the same
        # iteration number, so their active counts are compared iteration by iteration at the end.
        if method in active_counts:
            active_counts[method].append(optimizers[method].num_active)
        return elapsed if timed else None

    for _ in range(warmup):
        for method in METHODS:
            run(method, timed=False)
    per_repeat: Dict[str, List[float]] = {m: [] for m in METHODS}
    for r in range(repeats):
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]  # rotate, so no method always runs first
        # Iteration by iteration in turn, so that drift in the machine's speed hits every method alike.
        times: Dict[str, List[float]] = {m: [] for m in METHODS}
        for _ in range(steps):
            for method in order:
                times[method].append(run(method, timed=True))
        for method in METHODS:
            per_repeat[method].append(statistics.median(times[method]) * 1e3)
    gsm_opt = optimizers["GSM"]
    with torch.no_grad():
        drift = max(float((a - b).abs().max())
                    for a, b in zip(models["GSM"].parameters(), models["naive"].parameters()))
    mask_checks = len(active_counts["GSM"])
    mask_mismatches = sum(a != b for a, b in zip(active_counts["GSM"], active_counts["naive"]))
    return dict(name=name, device=str(device), batch=batch, q=gsm_opt.keep_count, n=gsm_opt.num_prunable,
                ms=per_repeat, mask_checks=mask_checks, mask_mismatches=mask_mismatches, drift=drift)


def summarize(result: dict) -> Tuple[Dict[str, float], Dict[str, Tuple[float, float]]]:
    medians = {m: statistics.median(v) for m, v in result["ms"].items()}
    spreads = {m: (min(v), max(v)) for m, v in result["ms"].items()}
    return medians, spreads


def print_table(results: List[dict]) -> None:
    header = (f"{'device':<6}  {'model':<8}  {'batch':>5}  {'Q / N':>14}  {'SGD ms':>8}  {'GSM ms':>8}  "
              f"{'naive ms':>8}  {'GSM/SGD':>7}  {'naive/SGD':>9}  {'GSM/naive':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        med, _ = summarize(r)
        print(f"{r['device']:<6}  {r['name']:<8}  {r['batch']:>5}  {str(r['q']) + ' / ' + str(r['n']):>14}  "
              f"{med['SGD']:>8.2f}  {med['GSM']:>8.2f}  {med['naive']:>8.2f}  {med['GSM'] / med['SGD']:>7.3f}  "
              f"{med['naive'] / med['SGD']:>9.3f}  {med['GSM'] / med['naive']:>9.3f}")
    print()
    print("ms/iter = median over repeats of each repeat's median iteration time; spread over repeats (min-max):")
    for r in results:
        _, spread = summarize(r)
        print(f"  {r['device']} {r['name']}: " + ", ".join(f"{m} {lo:.2f}-{hi:.2f}" for m, (lo, hi) in spread.items()))
    print()
    for r in results:
        identical = "yes" if r["mask_mismatches"] == 0 else "no"
        print(f"masks identical: {identical} ({r['device']} {r['name']}: GSM num_active == naive count on "
              f"{r['mask_checks'] - r['mask_mismatches']} of {r['mask_checks']} iterations; "
              f"max |w_GSM - w_naive| after the run {r['drift']:.3g})")


def main(argv: Optional[List[str]] = None) -> None:
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per method per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="round-robin rounds over the three methods")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per method before timing")
    parser.add_argument("--device", nargs="+", default=default_devices, help="devices to time on")
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS), help="models to time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic batches")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default: torch's choice, usually one per core)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"load average {os.getloadavg()[0]:.2f}; lr {LR}, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}; "
          f"{args.steps} steps x {args.repeats} repeats, {args.warmup} warm-up")
    results = []
    for device_name in args.device:
        device = torch.device(device_name)
        for name in args.models:
            start = time.perf_counter()
            results.append(bench_model(name, device, args.steps, args.repeats, args.warmup, args.seed))
            print(f"  {device_name} {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print()
    print_table(results)


if __name__ == "__main__":
    main()
