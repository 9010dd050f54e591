"""Lottery tickets of LeNet-5 on MNIST: GSM-found vs magnitude-found tickets at compression R."""
import argparse
import sys
from typing import List, Optional

from gsm.cli import add_run_options, check_ratio_keeps_weights, compression_ratio, run_main, run_options
from gsm.experiment_config import DEFAULT_RECIPE, RECIPES
from gsm.lottery import LotteryConfig, run_lottery

NET = "lenet5"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train LeNet-5 on MNIST (the base, shared by every ratio), find a ticket by GSM and "
                    "one by global magnitude at compression ratio R, and retrain both tickets. Writes "
                    "gsm_lottery_ticket_exps/lottery_lenet5_*; rerunning resumes or skips finished stages.")
    parser.add_argument("ratio", type=compression_ratio, help="compression ratio R > 1 (the paper: 125 and 300)")
    parser.add_argument("--recipe", choices=RECIPES, default=DEFAULT_RECIPE,
                        help="GSM schedule: 'paper' (240 epochs, lr 3e-2, near-lossless hard prune) or "
                             "'released' (280 epochs, lr 1e-2, the released code's final version)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    check_ratio_keeps_weights(parser, args.ratio, NET)
    run_lottery(LotteryConfig(NET, args.ratio, args.recipe, run_options(args, parser)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
