"""Command-line plumbing shared by the experiment scripts: common options, argument checks, and turning
the errors a user can cause into one-line messages."""
import argparse
import errno
import os
import sys
from typing import Callable, List, Optional

import torch

from gsm.experiment_config import RunOptions


def compression_ratio(text: str) -> float:
    """argparse type: a compression ratio R > 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"compression ratio must be a number > 1, got {text!r}") from None
    if not value > 1 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"compression ratio must be a finite number > 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of every experiment script (DESIGN 4)."""
    parser.add_argument("--scale", type=positive_float, default=1.0,
                        help="multiply every epoch count, lr boundary and warmup by this (a smoke run: 0.01)")
    parser.add_argument("--device", default=default_device(),
                        help="torch device to train on, e.g. cpu, cuda, cuda:1 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order")
    parser.add_argument("--out-root", default=".",
                        help="folder under which the experiment folders are written (default: current folder)")
    parser.add_argument("--data-root", default="",
                        help="dataset root (default: $MNIST_PATH / $CIFAR10_PATH, else ./data)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunOptions:
    """Check the common options (usage errors exit 2) and bundle them."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: unknown device {args.device!r} (e.g. cpu, cuda, cuda:0)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device: CUDA is not available on this machine; use --device cpu")
    check_writable(args.out_root, parser)
    return RunOptions(scale=args.scale, device=str(device), seed=args.seed, out_root=args.out_root,
                      data_root=args.data_root, progress=not args.no_progress)


def check_writable(folder: str, parser: argparse.ArgumentParser) -> None:
    """Create `folder` if missing; a usage error if it cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out-root: cannot create {folder}: {exc.strerror}")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"--out-root: {folder} is not a writable folder; choose another with --out-root")


def run_main(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run a script's main, reporting the errors a user can cause in one line on stderr (exit 1)."""
    from dataset import DatasetError
    from gsm.checkpoint import CheckpointError
    from gsm.trainer import StageConfigMismatch, TrainingDiverged
    from gsm.weights_io import WeightsFileError

    prog = os.path.basename(sys.argv[0]) or "gsm"
    try:
        return main(argv)
    except (DatasetError, CheckpointError, StageConfigMismatch, TrainingDiverged, WeightsFileError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume from the last epoch checkpoint",
              file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            print(f"{prog}: error: {exc.strerror}: {exc.filename or ''}; the last checkpoint is intact, "
                  f"free space or fix permissions and run the same command again to resume", file=sys.stderr)
            return 1
        raise
