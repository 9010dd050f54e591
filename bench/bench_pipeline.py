"""Benchmark on real trajectories: the GSM stage's iteration time against the base stage's SGD iteration, at
the states where a lottery pipeline really spends its time, on real MNIST batches; or the per-stage epoch
times of finished runs, read from their logs.

    MNIST_PATH=/path/to/data python bench/bench_pipeline.py             # LeNet-300-100 60x: trains, then times
    MNIST_PATH=... python bench/bench_pipeline.py --base-from ROOT      # starts GSM from ROOT's base finish.hdf5
    MNIST_PATH=... python bench/bench_pipeline.py --base-from ROOT --epochs 4   # and whole epochs in turns
    python bench/bench_pipeline.py --logs ROOT [ROOT ...]               # epoch times of finished runs

Timing mode trains as the pipeline does (the trainer's epoch loop, schedules and param groups; the base unless
--base-from gives one), then GSM from the base result, and stops at the start of each chosen GSM epoch (and after
the last). There, copies of the state run side by side, iteration by iteration in turn, on the same real
batches of that epoch: GSM continuing from the state; SGD continuing the base stage from its last epoch (the
reference of every ratio: what a base epoch costs); and, for diagnosis, SGD with the base settings on the GSM
state's weights (slow where those weights make subnormal products). The table gives each method's median
iteration time and GSM / base SGD; with --epochs N, also GSM / base SGD over N whole epochs of each, in turns
(what a run's log compares, without the drift of the machine's speed between the stages of a run). Late GSM
weights lie near 1e-30, where x86 arithmetic on subnormal results is many times slower unless flushed to zero
(`gsm.flush_denormals`, on here; --no-flush shows the cost).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import dataset
from base_model import MODEL_DATASETS, build_model, trains_channels_last
from gsm import host_kernels
from gsm.experiments import layout
from gsm.denormals import flush_denormals, set_flush_denormals
from gsm.experiments.configs import DEFAULT_RECIPE, LENET_BASE, LENET_GSM, RECIPES, TrainConfig, gsm_config
from gsm.experiments.lr_schedule import learning_rate
from gsm.experiments.trainer import build_optimizer, train_epoch
from gsm.weights_io import load_hdf5

METHODS = ("GSM", "base SGD", "SGD at state")
TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, 1.2e-38


def cpu_model() -> str:
    """The processor's model name (figures depend on it: the subnormal penalty differs between vendors)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lr_function(config: TrainConfig, iters_per_epoch: int) -> Callable[[int], float]:
    warmup, drops = config.warmup_iters(iters_per_epoch), config.drop_iters(iters_per_epoch)
    return lambda iteration: learning_rate(iteration, config.lr, warmup, drops)


def iteration(model: nn.Module, optimizer: torch.optim.Optimizer, lr: float, x: Tensor, y: Tensor) -> None:
    """One training iteration as the trainer runs it (train_epoch's body, without a gradient mask)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def fork(model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig):
    """An independent copy of (model, optimizer) at the same state, optimised under `config`."""
    twin = copy.deepcopy(model)
    twin_optimizer = build_optimizer(twin, config)
    twin_optimizer.load_state_dict(optimizer.state_dict())
    return twin, twin_optimizer


def weight_census(model: nn.Module) -> Tuple[int, int]:
    """(prunable weights with 0 < |w| < 1e-30, of them subnormal) of a model."""
    tiny = subnormal = 0
    for p in model.parameters():
        if p.dim() > 1:
            magnitude = p.detach().abs()
            tiny += int(((magnitude > 0) & (magnitude < 1e-30)).sum())
            subnormal += int(((magnitude > 0) & (magnitude < TINY)).sum())
    return tiny, subnormal


def time_state(runners: Dict[str, Callable[[Tensor, Tensor], None]], batches: List[Tuple[Tensor, Tensor]],
               rounds: int, warmup: int, block: int) -> Dict[str, float]:
    """Median ms per iteration of each runner: `rounds` passes over `batches`, the runners taking turns every
    `block` batches (which one goes first rotates), after `warmup` untimed iterations each. Blocks of
    consecutive iterations keep a runner's tensors in the cache as in training; iteration-by-iteration turns
    would make every runner evict the others' and inflate what each step costs."""
    names = list(runners)
    for x, y in batches[:warmup]:
        for name in names:
            runners[name](x, y)
    times: Dict[str, List[float]] = {name: [] for name in names}
    turn = 0
    for _ in range(rounds):
        for first in range(0, len(batches), block):
            shift = turn % len(names)
            turn += 1
            for name in names[shift:] + names[:shift]:
                for x, y in batches[first:first + block]:
                    start = time.perf_counter()
                    runners[name](x, y)
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def time_epochs(runners: Dict[str, Tuple[nn.Module, torch.optim.Optimizer, float]], loader, epoch: int,
                count: int) -> Dict[str, float]:
    """Seconds of `count` whole epochs of each runner (model, optimizer, lr), through the trainer's epoch loop,
    the runners taking turns epoch by epoch (which one goes first alternates): what a run's log measures, side
    by side, so that the machine's drift between the stages of a run cannot enter the ratio."""
    names = list(runners)
    seconds = {name: 0.0 for name in names}
    for turn in range(count):
        for name in names if turn % 2 == 0 else names[::-1]:
            model, optimizer, lr = runners[name]
            started = time.perf_counter()
            losses = train_epoch(model, optimizer, loader, epoch, lambda _, lr=lr: lr)
            float(losses.mean())
            seconds[name] += time.perf_counter() - started
    return seconds


def train_epochs(model, optimizer, loader, lr_at, first: int, last: int, label: str) -> None:
    """Epochs [first, last) of a stage, as the trainer runs them; one progress line per 10 epochs."""
    for epoch in range(first, last):
        started = time.perf_counter()
        train_epoch(model, optimizer, loader, epoch, lr_at)
        if epoch % 10 == 0 or epoch == last - 1:
            print(f"  {label} epoch {epoch}: {time.perf_counter() - started:.2f} s", flush=True)


def run_timing(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    base_config = LENET_BASE.scaled(args.scale)
    gsm_train_config = gsm_config(LENET_GSM[args.recipe], args.ratio).scaled(args.scale)
    channels_last = trains_channels_last(args.net, device)
    train_loader, _ = dataset.build_loaders(MODEL_DATASETS[args.net], base_config.batch_size, device,
                                            seed=args.seed, channels_last=channels_last)
    iters = len(train_loader)
    base_lr_at, gsm_lr_at = lr_function(base_config, iters), lr_function(gsm_train_config, iters)
    torch.manual_seed(args.seed)
    model = build_model(args.net)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_optimizer = build_optimizer(model, base_config)
    if args.base_from:
        path = layout.lottery_base_dir(args.base_from, args.net) / layout.FINISH_WEIGHTS
        load_hdf5(path, model)
        print(f"base: {path}")
        # The base's last epoch, run again from its result, gives the SGD reference its momentum buffers.
        train_epochs(model, base_optimizer, train_loader, base_lr_at, base_config.num_epochs - 1,
                     base_config.num_epochs, "base")
    else:
        train_epochs(model, base_optimizer, train_loader, base_lr_at, 0, base_config.num_epochs, "base")
    base_model, base_state_optimizer = fork(model, base_optimizer, base_config)
    base_lr = base_lr_at(base_config.num_epochs * iters - 1)

    gsm_optimizer = build_optimizer(model, gsm_train_config)
    if not args.flush:
        set_flush_denormals(False)  # after GSM's constructor, which turns flushing on for CPU parameters
    num_epochs = gsm_train_config.num_epochs
    states = sorted({min(max(0, e), num_epochs) for e in (args.states or default_states(gsm_train_config))})
    rows = []
    done = 0
    for state in states:
        train_epochs(model, gsm_optimizer, train_loader, gsm_lr_at, done, state, "GSM")
        done = state
        gsm_lr = gsm_lr_at(min(state, num_epochs - 1) * iters)
        if args.save_states:
            Path(args.save_states).mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": gsm_optimizer.state_dict(), "epoch": state,
                        "lr": gsm_lr}, Path(args.save_states) / f"gsm_epoch{state}.pt")
        gsm_twin, gsm_twin_optimizer = fork(model, gsm_optimizer, gsm_train_config)
        base_twin, base_twin_optimizer = fork(base_model, base_state_optimizer, base_config)
        state_twin = copy.deepcopy(model)
        state_twin_optimizer = build_optimizer(state_twin, base_config)
        runners = {
            "GSM": lambda x, y: iteration(gsm_twin, gsm_twin_optimizer, gsm_lr, x, y),
            "base SGD": lambda x, y: iteration(base_twin, base_twin_optimizer, base_lr, x, y),
            "SGD at state": lambda x, y: iteration(state_twin, state_twin_optimizer, base_lr, x, y),
        }
        train_loader.set_epoch(min(state, num_epochs - 1))
        batches = [batch for _, batch in zip(range(args.steps), train_loader)]
        ms = time_state(runners, batches, args.rounds, args.warmup, args.block)
        tiny, subnormal = weight_census(model)
        if args.epochs:
            seconds = time_epochs({"GSM": (gsm_twin, gsm_twin_optimizer, gsm_lr),
                                   "base SGD": (base_twin, base_twin_optimizer, base_lr)},
                                  train_loader, min(state, num_epochs - 1), args.epochs)
            ms["epoch ratio"] = seconds["GSM"] / seconds["base SGD"]
        rows.append((state, gsm_lr, tiny, subnormal, gsm_optimizer.num_active, ms))
        epochs = f", whole epochs {ms['epoch ratio']:.3f}" if args.epochs else ""
        print(f"  state {state}: GSM {ms['GSM']:.2f} ms, base SGD {ms['base SGD']:.2f} ms, "
              f"ratio {ms['GSM'] / ms['base SGD']:.3f}{epochs}", flush=True)
    print_timing(args, rows, gsm_optimizer.keep_count, gsm_optimizer.num_prunable)


def run_from_state(args: argparse.Namespace) -> None:
    """Time a saved GSM state (--save-states) on real batches, with flush-to-zero on and off in turns: GSM
    continuing from the state, and SGD with the base settings on its weights. Shows what subnormal arithmetic
    costs on this processor, and that flushing removes it."""
    device = torch.device("cpu")
    state = torch.load(args.from_state, map_location=device, weights_only=True)
    base_config = LENET_BASE.scaled(args.scale)
    gsm_train_config = gsm_config(LENET_GSM[args.recipe], args.ratio).scaled(args.scale)
    channels_last = trains_channels_last(args.net, device)
    train_loader, _ = dataset.build_loaders(MODEL_DATASETS[args.net], base_config.batch_size, device,
                                            seed=args.seed, channels_last=channels_last)
    model = build_model(args.net)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(state["model"])
    optimizer = build_optimizer(model, gsm_train_config)
    optimizer.load_state_dict(state["optimizer"])
    iters = len(train_loader)
    base_lr = lr_function(base_config, iters)(base_config.num_epochs * iters - 1)
    # A state saved by --save-states, or a GSM stage's checkpoint.pt taken while it trains.
    epoch = int(state["epoch"] if "epoch" in state else state["next_epoch"])
    state.setdefault("epoch", epoch)
    state.setdefault("lr", lr_function(gsm_train_config, iters)(min(epoch, gsm_train_config.num_epochs - 1) * iters))
    train_loader.set_epoch(epoch)
    batches = [batch for _, batch in zip(range(args.steps), train_loader)]
    tiny, subnormal = weight_census(model)
    print(f"{args.from_state}: GSM epoch {state['epoch']}, lr {state['lr']:.3g}; {tiny} prunable weights with "
          f"0 < |w| < 1e-30 ({subnormal} subnormal)")
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.steps} real "
          f"batches x {args.rounds} rounds, flush-to-zero on and off in turns, turns of {args.block}; medians")
    runners = {}
    for flush in (True, False):
        gsm_twin, gsm_twin_optimizer = fork(model, optimizer, gsm_train_config)
        sgd_twin = copy.deepcopy(model)
        sgd_twin_optimizer = build_optimizer(sgd_twin, base_config)
        runners[("GSM", flush)] = (lambda m, o: lambda x, y: iteration(m, o, state["lr"], x, y))(
            gsm_twin, gsm_twin_optimizer)
        runners[("SGD at state", flush)] = (lambda m, o: lambda x, y: iteration(m, o, base_lr, x, y))(
            sgd_twin, sgd_twin_optimizer)
    times: Dict[tuple, List[float]] = {key: [] for key in runners}
    for round_index in range(args.rounds + 1):  # the first round warms up
        for first in range(0, len(batches), args.block):
            for flush in ((True, False) if round_index % 2 == 0 else (False, True)):
                set_flush_denormals(flush)
                for key in [k for k in runners if k[1] == flush]:
                    for x, y in batches[first:first + args.block]:
                        start = time.perf_counter()
                        runners[key](x, y)
                        if round_index:
                            times[key].append(time.perf_counter() - start)
    set_flush_denormals(True)
    ms = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    print(f"{'method':<14}  {'flush on ms':>11}  {'flush off ms':>12}  {'off / on':>8}")
    for method in ("GSM", "SGD at state"):
        on, off = ms[(method, True)], ms[(method, False)]
        print(f"{method:<14}  {on:>11.2f}  {off:>12.2f}  {off / on:>8.2f}")


def default_states(config: TrainConfig) -> List[int]:
    """Early (1 and a fifth in), the first epoch after each lr drop, and the end of the stage."""
    num_epochs = config.num_epochs
    drops = [round(e * config.scale) for e in config.lr_drop_epochs if round(e * config.scale) < num_epochs]
    return [1, num_epochs // 5] + drops + [num_epochs]


def print_timing(args, rows, keep_count: int, num_prunable: int) -> None:
    print()
    print(f"{args.net} {args.ratio:g}x (Q = {keep_count} of {num_prunable}), recipe {args.recipe}, "
          f"--scale {args.scale:g}; flush-to-zero {'on' if args.flush else 'OFF'}")
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.steps} real batches x {args.rounds} rounds per state, in turns of {args.block}; medians")
    print(f"GSM's CPU kernels: {host_kernels.status()}")
    header = (f"{'GSM epoch':>9}  {'lr':>8}  {'|w|<1e-30':>9}  {'subnormal':>9}  {'active':>7}  "
              f"{'GSM ms':>7}  {'base SGD':>8}  {'SGD@state':>9}  {'GSM/base':>8}"
              + (f"  {'epochs GSM/base':>15}" if args.epochs else ""))
    print(header)
    print("-" * len(header))
    for state, lr, tiny, subnormal, active, ms in rows:
        print(f"{state:>9}  {lr:>8.2g}  {tiny:>9}  {subnormal:>9}  {active:>7}  {ms['GSM']:>7.2f}  "
              f"{ms['base SGD']:>8.2f}  {ms['SGD at state']:>9.2f}  {ms['GSM'] / ms['base SGD']:>8.3f}"
              + (f"  {ms['epoch ratio']:>15.3f}" if args.epochs else ""))
    worst = max(ms["GSM"] / ms["base SGD"] for *_, ms in rows)
    print(f"largest GSM / base SGD iteration ratio: {worst:.3f}")
    if args.epochs:
        mean = statistics.mean(ms["epoch ratio"] for *_, ms in rows)
        print(f"whole epochs, {args.epochs} of each per state in turns: GSM / base SGD {mean:.3f} on average over "
              f"the states, at most {max(ms['epoch ratio'] for *_, ms in rows):.3f}")


# `<asctime> train INFO: epoch <e> done: mean loss <l>, lr <lr>, <seconds> s, <n> images/s`
_EPOCH_RE = re.compile(r"^(\S+ \S+) \S+ INFO: epoch (\d+) done: .*?, ([0-9.]+) s, ")
_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def epoch_seconds(log_path: Path) -> Dict[int, float]:
    """{epoch: seconds} of a stage log's `epoch N done` lines (a repeated epoch, after a resume, counts once:
    its last line)."""
    seconds = {}
    with open(log_path, encoding="utf-8", errors="replace") as log:
        for line in log:
            match = _EPOCH_RE.match(line)
            if match:
                seconds[int(match.group(2))] = float(match.group(3))
    return seconds


def stage_kind(folder_name: str) -> str:
    if folder_name.endswith("_base") or folder_name.endswith("_base_train"):
        return "base"
    if folder_name.endswith("_gsm"):
        return "GSM"
    return "retrain"


def report_logs(roots: Sequence[str]) -> int:
    for root in roots:
        folders = [p.parent for family in (layout.LOTTERY_EXPS, layout.GSM_EXPS)
                   for p in sorted(Path(root, family).glob(f"*/{layout.LOG}"))]
        if not folders:
            print(f"{root}: no stage logs under {layout.LOTTERY_EXPS}/ or {layout.GSM_EXPS}/", file=sys.stderr)
            return 1
        print(f"{root}")
        print(f"  {'stage':<48}  {'epochs':>6}  {'median s':>8}  {'mean s':>7}  {'sum s':>8}")
        by_kind: Dict[str, List[float]] = {"base": [], "GSM": [], "retrain": []}
        for folder in folders:
            seconds = list(epoch_seconds(folder / layout.LOG).values())
            if not seconds:
                continue
            by_kind[stage_kind(folder.name)].extend(seconds)
            print(f"  {folder.name:<48}  {len(seconds):>6}  {statistics.median(seconds):>8.3f}  "
                  f"{statistics.fmean(seconds):>7.3f}  {sum(seconds):>8.1f}")
        if by_kind["base"] and by_kind["GSM"]:
            base_mean = statistics.fmean(by_kind["base"])
            every = [s for values in by_kind.values() for s in values]
            print(f"  mean GSM epoch / mean base epoch: {statistics.fmean(by_kind['GSM']) / base_mean:.3f}")
            print(f"  all {len(every)} epochs: {sum(every):.1f} s = {sum(every) / (len(every) * base_mean):.3f} x "
                  f"({len(every)} x the mean base epoch)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--logs", nargs="+", metavar="ROOT",
                        help="report the epoch times of finished runs under these --out-root folders, then stop")
    parser.add_argument("--net", choices=("lenet300", "lenet5"), default="lenet300")
    parser.add_argument("--ratio", type=float, default=60.0, help="compression ratio R")
    parser.add_argument("--recipe", choices=RECIPES, default=DEFAULT_RECIPE)
    parser.add_argument("--base-from", metavar="ROOT",
                        help="start GSM from ROOT's base finish.hdf5 (a finished run's --out-root) instead of "
                             "training the base here")
    parser.add_argument("--states", type=int, nargs="+",
                        help="GSM epochs at whose start to time (the number of epochs: after the last); "
                             "default: 1, a fifth in, the first epoch after each lr drop, the end")
    parser.add_argument("--steps", type=int, default=40, help="real batches per state")
    parser.add_argument("--rounds", type=int, default=5, help="passes over those batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations per method at each state")
    parser.add_argument("--block", type=int, default=8, help="consecutive iterations per method and turn")
    parser.add_argument("--epochs", type=int, default=0,
                        help="also time this many whole epochs of GSM and of base SGD per state, in turns")
    parser.add_argument("--scale", type=float, default=1.0, help="the scripts' --scale (a smoke run: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--no-flush", dest="flush", action="store_false",
                        help="keep subnormal floats (to see what they cost on this processor)")
    parser.add_argument("--save-states", metavar="DIR", help="also save each timed state (model, optimizer)")
    parser.add_argument("--from-state", metavar="FILE",
                        help="time one state (saved by --save-states, or a GSM stage's checkpoint.pt) with "
                             "flush-to-zero on and off, then stop")
    args = parser.parse_args(argv)
    if args.logs:
        return report_logs(args.logs)
    if (min(args.steps, args.rounds, args.block) < 1 or min(args.warmup, args.epochs) < 0 or not args.ratio > 1
            or not args.scale > 0):
        parser.error("--steps, --rounds and --block must be >= 1, --warmup and --epochs >= 0, --ratio > 1, "
                     "--scale > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_state:
        run_from_state(args)
        return 0
    if args.flush:
        flush_denormals()
    run_timing(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
