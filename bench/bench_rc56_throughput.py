"""Training throughput of ResNet-56 on CIFAR-10-sized data: GSM against plain SGD through the real training
loop (`gsm.experiments.trainer.train_epoch`, device-resident data with batched augmentation), measured side by side.
On CUDA it also times a full epoch with each speed option of gsm_rc56.py (plain, --amp, --amp --compile, and
--amp --compile reduce-overhead, which adds CUDA graphs) and projects the time of the whole 1100-epoch
experiment (500 base + 600 GSM epochs, evaluations every second epoch)."""
import argparse
import statistics
import time
from typing import Optional

import torch

import dataset
from base_model import build_model, trains_channels_last
from gsm.experiments.configs import RC_BASE, RC_GSM, gsm_config
from gsm.experiments.lr_schedule import learning_rate
from gsm.experiments.trainer import build_optimizer, evaluate, train_epoch

CIFAR_TRAIN, CIFAR_TEST, BATCH = 50000, 10000, 64
WARMUP_ITERS = 30  # iterations that compile the model and record its CUDA graphs before the timed epochs


def synthetic_loaders(num_train: int, device: torch.device, channels_last: bool):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_train, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (num_train,), generator=generator)
    common = dict(normalize=dataset.CIFAR10_NORMALIZE, device=device, channels_last=channels_last)
    train = dataset.DeviceLoader(images, labels, BATCH, train=True, augment=True, **common)
    test_images = torch.randint(0, 256, (CIFAR_TEST, 3, 32, 32), dtype=torch.uint8, generator=generator)
    test = dataset.DeviceLoader(test_images, labels.new_zeros(CIFAR_TEST), 1000, train=False, augment=False,
                                **common)
    return train, test


def make_model(device, channels_last: bool, compile_mode: Optional[str]):
    """rc56, compiled in torch.compile's `compile_mode` ("default", ...) unless it is None (eager)."""
    torch.manual_seed(0)
    model = build_model("rc56").to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model if compile_mode is None else torch.compile(model, mode=compile_mode)


def timed_epoch(model, optimizer, loader, epoch, config, amp, device) -> float:
    lr_at = lambda it: learning_rate(it, config.lr, 0, ())  # noqa: E731 - constant lr after warmup
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses = train_epoch(model, optimizer, loader, epoch, lr_at, amp=amp)
    float(losses.sum())  # waits for the device
    return time.perf_counter() - start


def compare_gsm_sgd(args, device, channels_last) -> None:
    loader, _ = synthetic_loaders(args.iters * BATCH, device, channels_last)
    configs = {"sgd": RC_BASE, "gsm": gsm_config(RC_GSM, 10)}
    runs = {}
    for name, config in configs.items():  # two models with the same initial weights
        model = make_model(device, channels_last, None)
        runs[name] = (model, build_optimizer(model, config))
    for name, (model, optimizer) in runs.items():  # warm-up
        timed_epoch(model, optimizer, loader, 0, configs[name], False, device)
    times = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, (model, optimizer) in runs.items():
            times[name].append(timed_epoch(model, optimizer, loader, repeat + 1, configs[name], False, device))
    images = args.iters * BATCH
    print(f"rc56, batch {BATCH}, {args.iters} iterations per measurement, {args.repeats} interleaved repeats, "
          f"device {device}")
    for name in runs:
        print(f"  {name:>3}: {images / statistics.median(times[name]):8.1f} images/s "
              f"(median of {args.repeats})")
    ratios = [s / g for s, g in zip(times["sgd"], times["gsm"])]
    print(f"  GSM throughput / SGD throughput: {statistics.median(ratios):.3f} "
          f"(per-repeat min {min(ratios):.3f}, max {max(ratios):.3f})")


def project_full_experiment(args, device) -> None:
    """Full-epoch times for each speed option and the projected 1100-epoch wall time (CUDA)."""
    loader, test_loader = synthetic_loaders(CIFAR_TRAIN, device, channels_last=True)
    warmup_loader, _ = synthetic_loaders(WARMUP_ITERS * BATCH, device, channels_last=True)
    print(f"\nfull epochs ({len(loader)} iterations of {BATCH}) on {torch.cuda.get_device_name(device)}")
    print(f"  {'options':<33} {'SGD epoch s':>12} {'GSM epoch s':>12} {'eval s':>8} {'1100 epochs, min':>17}")
    for label, amp, compile_mode in (("plain", False, None), ("--amp", True, None),
                                     ("--amp --compile", True, "default"),
                                     ("--amp --compile reduce-overhead", True, "reduce-overhead")):
        started = time.perf_counter()
        try:
            epoch_times, eval_seconds = time_option(args, device, loader, warmup_loader, test_loader, amp,
                                                    compile_mode)
        except Exception as exc:  # one option failing (e.g. a compiler error) must not hide the others
            print(f"  {label:<33} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", flush=True)
            continue
        evaluations = RC_BASE.epochs // 2 + RC_GSM.epochs // 2 + 2
        total = RC_BASE.epochs * epoch_times["sgd"] + RC_GSM.epochs * epoch_times["gsm"] + evaluations * eval_seconds
        print(f"  {label:<33} {epoch_times['sgd']:12.2f} {epoch_times['gsm']:12.2f} {eval_seconds:8.2f} "
              f"{total / 60:17.1f}   (measured in {time.perf_counter() - started:.0f} s)", flush=True)


def time_option(args, device, loader, warmup_loader, test_loader, amp: bool, compile_mode: Optional[str]):
    """Median full-epoch seconds of SGD and GSM with one speed option, and the seconds of one evaluation.
    Both optimizers train the same model, so that it is compiled once; `warmup_loader`'s short epochs
    compile it (and record its CUDA graphs) before any timing."""
    model = make_model(device, True, compile_mode)
    configs = {"sgd": RC_BASE, "gsm": gsm_config(RC_GSM, 10)}
    optimizers = {name: build_optimizer(model, config) for name, config in configs.items()}
    for name, optimizer in optimizers.items():
        timed_epoch(model, optimizer, warmup_loader, 0, configs[name], amp, device)
    epoch_times = {}
    for name, optimizer in optimizers.items():
        epoch_times[name] = statistics.median(
            timed_epoch(model, optimizer, loader, e, configs[name], amp, device) for e in range(1, 1 + args.epochs))
    evaluate(model, test_loader)  # warm-up (evaluation runs the plain module, in float32)
    torch.cuda.synchronize()
    start = time.perf_counter()
    evaluate(model, test_loader)
    return epoch_times, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations per GSM/SGD measurement (default: 15 on CPU, 300 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="CUDA: full epochs timed per option after a warm-up epoch (default: %(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.iters = args.iters or (300 if device.type == "cuda" else 15)
    compare_gsm_sgd(args, device, channels_last=trains_channels_last("rc56", device))  # as gsm_rc56.py does
    if device.type == "cuda":
        project_full_experiment(args, device)


if __name__ == "__main__":
    main()
