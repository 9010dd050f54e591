"""Summarise the evaluations in every experiment's log.txt, one line per experiment."""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

# The experiment families, in the order their rows are printed (DESIGN 3).
EXPERIMENT_DIRS = ("gsm_exps", "gsm_lottery_ticket_exps")
LOG_NAME = "log.txt"
LAST_EVALUATIONS = 10

_FLOAT = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
# `<asctime> <logger> INFO: validate at epoch <e>, top1=<%.5f>, top5=<%.5f>, loss=<%.6f>`
_EVALUATION_RE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ INFO: "
    rf"validate at epoch (\d+), top1=({_FLOAT}), top5=({_FLOAT}), loss=({_FLOAT})\s*$"
)


@dataclass(frozen=True)
class Evaluation:
    """One `validate at epoch` line: top1 and top5 in percent, loss the mean test cross-entropy."""

    epoch: int
    top1: float
    top5: float
    loss: float


@dataclass(frozen=True)
class Summary:
    """Means over the last `count` evaluations of one log; the values are None when count is 0."""

    count: int
    top1: float | None
    top5: float | None
    loss: float | None
    last_epoch: int | None


def parse_log(path: Path | str) -> list[Evaluation]:
    """Return the evaluations of a log in file order; every other line is ignored.

    A last line without its newline is ignored too: logging writes each record and its newline at once, so an
    unterminated line is a record cut short by a crash (or one being written right now), and its numbers may be
    truncated. Raises OSError when the file cannot be read.
    """
    with open(path, encoding="utf-8", errors="replace") as log:
        text = log.read()
    # Universal newlines turned \r\n and \r into \n; the piece after the last \n is unterminated.
    complete_lines = text.split("\n")[:-1]
    evaluations = []
    for line in complete_lines:
        match = _EVALUATION_RE.match(line)
        if match is None:
            continue
        epoch, top1, top5, loss = match.groups()
        evaluations.append(Evaluation(int(epoch), float(top1), float(top5), float(loss)))
    return evaluations


def summarize(evaluations: Sequence[Evaluation], last: int = LAST_EVALUATIONS) -> Summary:
    """Average the last `last` evaluations (all of them when there are fewer)."""
    if last < 1:
        raise ValueError(f"Invalid number of evaluations to average: {last}")
    window = list(evaluations)[-last:]
    if not window:
        return Summary(0, None, None, None, None)
    count = len(window)
    return Summary(
        count=count,
        top1=math.fsum(e.top1 for e in window) / count,
        top5=math.fsum(e.top5 for e in window) / count,
        loss=math.fsum(e.loss for e in window) / count,
        last_epoch=window[-1].epoch,
    )


def experiment_name(folder_name: str) -> str:
    """The folder name without a trailing `_train` (`rc56_base_train` -> `rc56_base`); `_retrain` stays."""
    if folder_name.endswith("_train") and not folder_name.endswith("_retrain"):
        return folder_name[: -len("_train")]
    return folder_name


def find_logs(root: Path) -> list[Path]:
    """Every `<family>/<experiment>/log.txt` under root, family by family, experiments sorted by folder name."""
    logs = []
    for family in EXPERIMENT_DIRS:
        logs.extend(sorted((root / family).glob(f"*/{LOG_NAME}"), key=lambda p: p.parent.name))
    return logs


def format_rows(rows: Iterable[tuple[str, Summary]]) -> list[str]:
    """Aligned lines `<name>  top1=<%.3f>  top5=<%.3f>  loss=<%.6f>  n=<count>  last_epoch=<epoch>`.

    Each `key=value` stays one whitespace-free word (for awk and split), right-aligned in its column.
    """

    def number(value: float | int | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    table = [
        (name, f"top1={number(s.top1, '.3f')}", f"top5={number(s.top5, '.3f')}", f"loss={number(s.loss, '.6f')}",
         f"n={s.count}", f"last_epoch={number(s.last_epoch, 'd')}")
        for name, s in rows
    ]
    if not table:
        return []
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]))]
    return [
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])
        for row in table
    ]


def build_parser() -> argparse.ArgumentParser:
    families = " and ".join(f"{family}/*/{LOG_NAME}" for family in EXPERIMENT_DIRS)
    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Read every {families}
under the root folder and print one line per experiment, sorted by folder
name, gsm_exps first:
  - the folder name without a trailing '_train' ('_retrain' is kept),
  - top1, top5 (percent) and loss: means over the last {LAST_EVALUATIONS} 'validate at epoch'
    evaluations of the log (all of them when it has fewer),
  - n: how many evaluations were averaged, last_epoch: the last epoch evaluated.
An experiment whose log has no evaluations gets n=0 and '-' for the values.
There is no header, so 'python show_log.py | grep retrain' leaves exactly the
retrain rows.""",
        epilog="""\
example row:
  lottery_lenet300_compress60_gsm_retrain  top1=98.123  top5=99.950  loss=0.065432  n=10  last_epoch=200""",
    )
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="folder holding gsm_exps/ and gsm_lottery_ticket_exps/ (default: the current folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root}: not a folder; pass the folder that holds gsm_exps/ and "
                     f"gsm_lottery_ticket_exps/")

    logs = find_logs(args.root)
    if not logs:
        print(f"no logs found under {args.root.resolve()}", file=sys.stderr)
        return 0
    rows = []
    for log_path in logs:
        try:
            evaluations = parse_log(log_path)
        except OSError as error:
            print(f"warning: skipping {log_path}: {error.strerror or error}", file=sys.stderr)
            continue
        rows.append((experiment_name(log_path.parent.name), summarize(evaluations)))
    for line in format_rows(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
