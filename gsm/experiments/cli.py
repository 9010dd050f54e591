"""Command-line plumbing shared by the experiment scripts: common options, argument checks, and turning
the errors a user can cause into one-line messages."""
import argparse
import errno
import os
import sys
from typing import Callable, List, Optional

import torch

from base_model import build_model
from gsm.denormals import flush_denormals
from gsm.experiments.configs import RunOptions
from gsm.pruning import prunable_parameters
from gsm.selection import keep_count


def compression_ratio(text: str) -> float:
    """argparse type: a compression ratio R > 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"compression ratio must be a number > 1, got {text!r}") from None
    if not value > 1 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"compression ratio must be a finite number > 1, got {text!r}")
    return value


def check_ratio_keeps_weights(parser: argparse.ArgumentParser, ratio: float, model_name: str) -> None:
    """A usage error when R leaves no weight to keep: Q = int(N / R) = 0 for the model's N prunable weights
    (GSM would rank nothing, and past R ~ 1e16 the hard prune fails after the base has trained)."""
    with torch.device("meta"):  # only the shapes are needed: no memory, no random initialisation
        num_prunable = sum(p.numel() for p in prunable_parameters(build_model(model_name)).values())
    if keep_count(num_prunable, 1.0 / ratio) < 1:
        parser.error(f"compression ratio {ratio:g} keeps none of the {num_prunable} prunable weights of "
                     f"{model_name}; use a ratio of at most {num_prunable}")


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
    """The options of every experiment script."""
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
    parser.add_argument("--eval-pruned-every", type=non_negative_int, metavar="K",
                        help="during GSM, evaluate a hard-pruned copy of the model (never trained) every K epochs "
                             "and at the end; 0: never (default: at the lr drops and the end)")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


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
                      data_root=args.data_root, progress=not args.no_progress,
                      eval_pruned_every=args.eval_pruned_every)


def check_writable(folder: str, parser: argparse.ArgumentParser) -> None:
    """Create `folder` if missing; a usage error if it cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out-root: cannot create {folder}: {exc.strerror}; choose another with --out-root")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"--out-root: {folder} is not a writable folder; choose another with --out-root")


def run_main(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run a script's main, reporting the errors a user can cause in one line on stderr (exit 1)."""
    from dataset import DatasetError
    from gsm.experiments.checkpoint import CheckpointError
    from gsm.experiments.folder_lock import FolderBusy
    from gsm.experiments.trainer import StageConfigMismatch, TrainingDiverged
    from gsm.weights_io import WeightsFileError

    prog = os.path.basename(sys.argv[0]) or "gsm"
    # Before any training: late GSM weights make subnormal products, which x86 computes many times slower.
    flush_denormals()
    try:
        return main(argv)
    except (DatasetError, CheckpointError, FolderBusy, StageConfigMismatch, TrainingDiverged, WeightsFileError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the cause
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume from the last epoch checkpoint",
              file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only file system, a file where a folder should be
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


def describe_os_error(exc: OSError) -> str:
    """One line: what failed, on which file, and what to do. Every write of a stage is atomic, so the files
    already written (and the last epoch checkpoint) are intact and the same command resumes."""
    reason = " ".join((exc.strerror or str(exc) or type(exc).__name__).split())
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space, then run the same command again to resume from the last epoch checkpoint"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make that location writable, then run the same command again to resume"
    else:
        fix = ("fix that path" if exc.filename else "fix the cause") + ", then run the same command again to resume"
    return f"{reason}{where}; {fix} (files already written are intact)"


def lottery_main(net: str, title: str, paper_ratios: str, argv: Optional[List[str]] = None) -> int:
    """The lottery-ticket scripts' command line: parse, check, and run the pipeline for network `net`."""
    from gsm.experiments.configs import DEFAULT_RECIPE, RECIPES
    from gsm.experiments.lottery import LotteryConfig, run_lottery

    parser = argparse.ArgumentParser(
        description=f"Train {title} on MNIST (the base, shared by every ratio), find a ticket by GSM and one by "
                    f"global magnitude at each compression ratio R, and retrain both tickets. Writes "
                    f"gsm_lottery_ticket_exps/lottery_{net}_*; rerunning resumes or skips finished stages.")
    parser.add_argument("ratios", nargs="+", type=compression_ratio, metavar="ratio",
                        help=f"compression ratios R > 1, run one after the other on one base (the paper: "
                             f"{paper_ratios}; a sweep: e.g. 10 30 60 120 240)")
    parser.add_argument("--recipe", choices=RECIPES, default=DEFAULT_RECIPE,
                        help="GSM schedule: 'paper' (240 epochs, lr 3e-2, near-lossless hard prune) or "
                             "'released' (280 epochs, lr 1e-2, the released code's final version)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    for ratio in args.ratios:  # every ratio checked before anything trains
        check_ratio_keeps_weights(parser, ratio, net)
    ratios = tuple(dict.fromkeys(args.ratios))  # each once, in the order given
    run_lottery(LotteryConfig(net, ratios, args.recipe, run_options(args, parser)))
    return 0
