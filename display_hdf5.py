"""Print every array of hdf5 weights files with its statistics and each file's sparsity summary; --plot draws
the per-layer densities of the files side by side."""
import argparse
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from gsm.pruning import sparsity_report
from gsm.pruned_io import MASK_FORMAT, SPARSE_FORMAT, file_format, load_mask, load_sparse
from gsm.weights_io import WeightsFileError, read_hdf5
from gsm.experiments.plots import plot_path, pyplot


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


def read_arrays(path: str) -> Dict[str, np.ndarray]:
    """The arrays of a weights file, of a compressed export (gsm.save_sparse: made dense again) or of a mask
    file (gsm.save_mask: bool arrays, True where a weight is kept)."""
    try:
        kind = file_format(path)
    except WeightsFileError:
        kind = None  # not hdf5, missing...: read_hdf5 says which in one line
    if kind == SPARSE_FORMAT:
        return {k: v.numpy() for k, v in load_sparse(path).items()}
    if kind == MASK_FORMAT:
        return {k: v.numpy() for k, v in load_mask(path).items()}
    return read_hdf5(path)


def layer_densities(files: Dict[str, Dict[str, np.ndarray]], names: Optional[List[str]] = None
                    ) -> Tuple[List[str], Dict[str, List[Tuple[int, int]]]]:
    """(the prunable layers (`names`, default the arrays of dim > 1) in the first file's order, {file:
    [(elements, non-zeros) per layer]}), what the density plot draws; a layer missing from a file counts as
    (0, 0) there."""
    reports = {label: sparsity_report(arrays, names) for label, arrays in files.items()}
    layers: List[str] = []
    for report in reports.values():
        layers += [layer.name for layer in report.layers if layer.name not in layers]
    counts = {}
    for label, report in reports.items():
        by_name = {layer.name: (layer.elements, layer.nonzeros) for layer in report.layers}
        counts[label] = [by_name.get(name, (0, 0)) for name in layers]
    return layers, counts


def draw_densities(files: Dict[str, Dict[str, np.ndarray]], path: str, names: Optional[List[str]] = None) -> None:
    """Per-layer density of each file side by side (log scale), each bar labelled with its kept count."""
    plt = pyplot()
    layers, counts = layer_densities(files, names)
    width = 0.8 / max(1, len(counts))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(layers) * max(1, len(counts)) / 2 + 2), 4.6))
    for i, (label, per_layer) in enumerate(counts.items()):
        xs = [j + (i - (len(counts) - 1) / 2) * width for j in range(len(layers))]
        densities = [nonzeros / elements if elements else 0.0 for elements, nonzeros in per_layer]
        total_kept = sum(nonzeros for _, nonzeros in per_layer)
        bars = ax.bar(xs, densities, width=width, label=f"{label} ({total_kept} kept)")
        for bar, (_, nonzeros) in zip(bars, per_layer):
            ax.annotate(str(nonzeros), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, rotation=90 if len(layers) > 6 else 0)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=30 if len(layers) > 3 else 0, ha="right" if len(layers) > 3 else "center",
                       fontsize=8)
    ax.set_yscale("log")
    densest = max((n / e for per_layer in counts.values() for e, n in per_layer if e and n), default=1.0)
    ax.set_ylim(top=min(1.0, densest) * 12)  # room for the legend above the bars
    ax.set_ylabel("density (non-zeros / elements)")
    ax.set_title("per-layer density of the prunable weights")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Show the arrays of hdf5 weights files (name, shape, mean, std, positive/negative/zero "
                    "counts), then each file's prunable parameter count (arrays of dim > 1), non-zeros, "
                    "sparsity, compression ratio and a per-layer density table; --plot draws the per-layer "
                    "densities of the files side by side.")
    parser.add_argument("files", nargs="+", metavar="file",
                        help="hdf5 weights files (or compressed exports, or masks), e.g. "
                             "gsm_exps/rc56_gsm/finish_pruned.hdf5")
    parser.add_argument("--labels", nargs="+", metavar="NAME",
                        help="names of the files in the plot, one per file (default: folder/file name)")
    parser.add_argument("--mask", metavar="MASK_FILE",
                        help="count as prunable the parameters a mask file names (e.g. a retrain folder's mask.hdf5, "
                             "or one written by gsm.save_mask(optimizer.hard_mask(model), ...)) instead of every array "
                             "of dim > 1")
    parser.add_argument("--plot", type=plot_path, metavar="FILE",
                        help="draw the per-layer densities (and kept counts) of every file into FILE (.png or .pdf)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    files = {}
    try:
        names = list(load_mask(args.mask)) if args.mask else None
        for path in args.files:
            files[path] = read_arrays(path)
    except WeightsFileError as exc:
        print(f"display_hdf5.py: error: {exc}; give the path of an hdf5 weights file, e.g. "
              f"gsm_exps/rc56_gsm/finish_pruned.hdf5", file=sys.stderr)
        return 1
    for i, (path, arrays) in enumerate(files.items()):
        if len(files) > 1:
            print(("\n" if i else "") + f"== {path}")
        print(describe_arrays(arrays))
        print()
        report = sparsity_report(arrays, names)
        if report.layers:
            print(report.format())
        else:
            print("prunable parameters: 0 (no array of dim > 1)")
    if args.plot:
        if args.labels and len(args.labels) != len(files):
            print(f"display_hdf5.py: error: {len(args.labels)} --labels for {len(files)} files", file=sys.stderr)
            return 2
        labels = args.labels or [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))),
                                              os.path.basename(path)) for path in files]
        draw_densities(dict(zip(labels, files.values())), args.plot, names)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into `head`
        sys.exit(0)
