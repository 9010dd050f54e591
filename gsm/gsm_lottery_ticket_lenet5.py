"""Lottery tickets of LeNet-5 on MNIST: GSM-found vs magnitude-found tickets at compression R."""
import sys
from typing import List, Optional

from gsm.experiments.cli import lottery_main, run_main


def main(argv: Optional[List[str]] = None) -> int:
    return lottery_main("lenet5", "LeNet-5", "125 and 300", argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
