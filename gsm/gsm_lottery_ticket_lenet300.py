"""Lottery tickets of LeNet-300-100 on MNIST: GSM-found vs magnitude-found tickets at compression R."""
import sys
from typing import List, Optional

from gsm.experiments.cli import lottery_main, run_main


def main(argv: Optional[List[str]] = None) -> int:
    return lottery_main("lenet300", "LeNet-300-100", "60", argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
