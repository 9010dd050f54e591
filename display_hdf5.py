"""Print every array of an hdf5 weights file with its statistics, and the file's sparsity summary."""
import argparse
import sys
from typing import List, Optional

import numpy as np

from gsm.pruning import sparsity_report
from gsm.weights_io import WeightsFileError, read_hdf5


def describe_arrays(arrays) -> str:
    """One line per array: name, shape, mean, std and the counts of positive, negative and zero values."""
    width = max(len(name) for name in arrays)
    lines = []
    for name, array in arrays.items():
        values = np.asarray(array, dtype=np.float64)
        mean = values.mean() if values.size else float("nan")
        std = values.std() if values.size else float("nan")
        lines.append(f"{name:<{width}}  shape={str(tuple(array.shape)):<16}  mean={mean: .6e}  std={std:.6e}  "
                     f"positive={int((values > 0).sum())}  negative={int((values < 0).sum())}  "
                     f"zero={int((values == 0).sum())}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Show the arrays of an hdf5 weights file (name, shape, mean, std, positive/negative/zero "
                    "counts), then the prunable parameter count (arrays of dim > 1), non-zeros, sparsity, "
                    "compression ratio and a per-layer density table.")
    parser.add_argument("file", help="hdf5 weights file, e.g. gsm_exps/rc56_gsm/finish_pruned.hdf5")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        arrays = read_hdf5(args.file)
    except WeightsFileError as exc:
        print(f"display_hdf5.py: error: {exc}; give the path of an hdf5 weights file, e.g. "
              f"gsm_exps/rc56_gsm/finish_pruned.hdf5", file=sys.stderr)
        return 1
    print(describe_arrays(arrays))
    print()
    report = sparsity_report(arrays)
    if report.layers:
        print(report.format())
    else:
        print("prunable parameters: 0 (no array of dim > 1)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into `head`
        sys.exit(0)
