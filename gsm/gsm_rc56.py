"""ResNet-56 on CIFAR-10 pruned 10x by GSM: base training, GSM training, hard prune."""
import argparse
import sys
from typing import List, Optional

from gsm.experiments.cli import add_run_options, check_ratio_keeps_weights, compression_ratio, run_main, run_options
from gsm.experiments.rc56 import ResNetConfig, run_resnet

ARCHS = ("rc20", "rc32", "rc44", "rc56", "rc110")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a CIFAR-10 ResNet (skipped when gsm_exps/<arch>_base_train/finish.hdf5 exists), "
                    "GSM-train it at compression ratio R and hard-prune it to "
                    "gsm_exps/<arch>_gsm/finish_pruned.hdf5. Rerunning resumes or skips finished stages. "
                    "Multi-GPU: torchrun --nproc_per_node=N gsm/gsm_rc56.py ...")
    parser.add_argument("--ratio", type=compression_ratio, default=10.0,
                        help="compression ratio R > 1 (default: %(default)s, as in the paper)")
    parser.add_argument("--arch", choices=ARCHS, default="rc56", help="ResNet depth (default: %(default)s)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for forward passes (GPU)")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                        help="torch.compile the model. MODE is torch.compile's mode: default (when omitted), "
                             "reduce-overhead (also replays every forward and backward pass as a CUDA graph, which "
                             "saves the launch cost of each kernel on a GPU), max-autotune or "
                             "max-autotune-no-cudagraphs")
    add_run_options(parser)
    args = parser.parse_args(argv)
    check_ratio_keeps_weights(parser, args.ratio, args.arch)
    run_resnet(ResNetConfig(args.arch, args.ratio, args.amp, args.compile, run_options(args, parser)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
