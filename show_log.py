"""Summarise the evaluations in every experiment's log.txt, one line per experiment (and one per hard-pruned
model), over one or several output roots (seeds); --plot draws the curves and the accuracy against compression."""
from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from gsm.experiments import layout
from gsm.experiments.plots import plot_path, pyplot
from gsm.experiments.train_log import PruneResult

# The experiment families, in the order their rows are printed.
EXPERIMENT_DIRS = (layout.GSM_EXPS, layout.LOTTERY_EXPS)
LOG_NAME = layout.LOG
LAST_EVALUATIONS = 10

_FLOAT = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
# `<asctime> <logger> INFO: validate at epoch <e>, top1=<%.5f>, top5=<%.5f>, loss=<%.6f>`
_EVALUATION_RE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ INFO: "
    rf"validate at epoch (\d+), top1=({_FLOAT}), top5=({_FLOAT}), loss=({_FLOAT})\s*$"
)
_STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ INFO: "
# A GSM stage's lines: its prune readiness at each evaluation, and its hard-pruned copies (gsm.experiments.train_log).
_READINESS_RE = re.compile(
    _STAMP + rf"prune readiness at epoch (\d+): (\d+) of (\d+) weights the hard prune removes have \|w\| > 0\.01 "
    rf"\({_FLOAT}%\), (\d+) > 0\.001 \({_FLOAT}%\); removed/kept norm ({_FLOAT})\s*$")
_PRUNED_COPY_RE = re.compile(
    _STAMP + rf"hard-pruned copy at epoch (\d+): kept (\d+) of (\d+), top1=({_FLOAT}), top5=({_FLOAT}), "
    rf"loss=({_FLOAT})\s*$")
PRUNED_SUFFIX = "_pruned"


@dataclass(frozen=True)
class Evaluation:
    """One `validate at epoch` line: top1 and top5 in percent, loss the mean test cross-entropy."""

    epoch: int
    top1: float
    top5: float
    loss: float


@dataclass(frozen=True)
class Readiness:
    """One `prune readiness` line: of the `removed` weights the hard prune would remove at that epoch, how many
    have |w| above 0.01 and above 0.001, and their L2 norm against that of the kept ones."""

    epoch: int
    above_1e_2: int
    removed: int
    above_1e_3: int
    norm_ratio: float

    @property
    def share_above_1e_2(self) -> float:
        return self.above_1e_2 / self.removed if self.removed else 0.0


@dataclass(frozen=True)
class Summary:
    """Means over the last `count` evaluations of one log; the values are None when count is 0."""

    count: int
    top1: float | None
    top5: float | None
    loss: float | None
    last_epoch: int | None


def parse_log(path: Path | str) -> list[Evaluation]:
    """The evaluations of a log in file order; every other line is ignored.

    A last line without its newline is ignored too: each record is written with its newline at once, so an
    unterminated line is a record cut short by a crash (or one being written right now), and its numbers may be
    truncated. Raises OSError when the file cannot be read.
    """
    return parse_records(path).evaluations


@dataclass(frozen=True)
class Records:
    """What a log holds: its evaluations, and for a GSM stage its prune readiness and hard-pruned copies (the
    copies as Evaluations, by epoch)."""

    evaluations: list[Evaluation]
    readiness: list[Readiness]
    pruned_copies: list[Evaluation]


def parse_records(path: Path | str) -> Records:
    """Every record of a log in file order, whole lines only (see parse_log)."""
    with open(path, encoding="utf-8", errors="replace") as log:
        text = log.read()
    # Universal newlines turned \r\n and \r into \n; the piece after the last \n is unterminated.
    records = Records([], [], [])
    for line in text.split("\n")[:-1]:
        match = _EVALUATION_RE.match(line)
        if match is not None:
            epoch, top1, top5, loss = match.groups()
            records.evaluations.append(Evaluation(int(epoch), float(top1), float(top5), float(loss)))
            continue
        match = _READINESS_RE.match(line)
        if match is not None:
            epoch, above_1e_2, removed, above_1e_3, norm_ratio = match.groups()
            records.readiness.append(Readiness(int(epoch), int(above_1e_2), int(removed), int(above_1e_3),
                                               float(norm_ratio)))
            continue
        match = _PRUNED_COPY_RE.match(line)
        if match is not None:
            epoch, _, _, top1, top5, loss = match.groups()
            records.pruned_copies.append(Evaluation(int(epoch), float(top1), float(top5), float(loss)))
    return records


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


def natural_key(name: str) -> list:
    """A sort key that orders the numbers in a name by value: compress30 before compress120."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def find_logs(root: Path) -> list[Path]:
    """Every `<family>/<experiment>/log.txt` under root, family by family, experiments sorted by folder name
    (numbers by value, so that a sweep's ratios come in order)."""
    logs = []
    for family in EXPERIMENT_DIRS:
        logs.extend(sorted((root / family).glob(f"*/{LOG_NAME}"), key=lambda p: natural_key(p.parent.name)))
    return logs


@dataclass(frozen=True)
class Experiment:
    """One experiment folder of one root: its evaluations and, for a GSM stage, its hard-pruned model."""

    name: str
    evaluations: list[Evaluation]
    pruned: PruneResult | None
    readiness: list[Readiness] = field(default_factory=list)
    pruned_copies: list[Evaluation] = field(default_factory=list)


def read_experiments(root: Path) -> list[Experiment]:
    """Every experiment under `root` (see find_logs); an unreadable log is skipped with a warning."""
    experiments = []
    for log_path in find_logs(root):
        try:
            records = parse_records(log_path)
        except OSError as error:
            print(f"warning: skipping {log_path}: {error.strerror or error}", file=sys.stderr)
            continue
        pruned = PruneResult.load(log_path.parent / layout.PRUNED_RESULT)
        experiments.append(Experiment(experiment_name(log_path.parent.name), records.evaluations, pruned,
                                      records.readiness, records.pruned_copies))
    return experiments


# A row's values: (top1, top5, loss) and what else it prints.
Values = Dict[str, Optional[float]]


def row_values(experiments: Iterable[Experiment]) -> Dict[str, Values]:
    """{row name: values} in print order: each experiment's summary, then its hard-pruned model's row."""
    rows: Dict[str, Values] = {}
    for experiment in experiments:
        s = summarize(experiment.evaluations)
        rows[experiment.name] = {"top1": s.top1, "top5": s.top5, "loss": s.loss, "n": s.count,
                                 "last_epoch": s.last_epoch}
        if experiment.pruned is not None:
            p = experiment.pruned
            rows[experiment.name + PRUNED_SUFFIX] = {"top1": p.top1, "top5": p.top5, "loss": p.loss, "n": 1,
                                                     "kept": p.kept, "prunable": p.prunable}
    return rows


def _number(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cells(values: Values) -> list[str]:
    """The `key=value` words of one root's row."""
    cells = [f"top1={_number(values['top1'], '.3f')}", f"top5={_number(values['top5'], '.3f')}",
             f"loss={_number(values['loss'], '.6f')}", f"n={values['n']}"]
    if "kept" in values:
        compression = values["prunable"] / values["kept"] if values["kept"] else math.inf
        cells += ["last_epoch=-", f"kept={values['kept']}/{values['prunable']}", f"compression={compression:.2f}x"]
    else:
        cells.append(f"last_epoch={_number(values['last_epoch'], 'd')}")
    return cells


def _mean_cells(runs: list[Values], total_roots: int) -> list[str]:
    """The words of a row over several roots: mean+-standard deviation of top1, top5 and loss over the roots
    that have a value, and how many of the roots have the experiment."""
    cells = []
    for key, spec in (("top1", ".3f"), ("top5", ".3f"), ("loss", ".6f")):
        values = [run[key] for run in runs if run[key] is not None]
        if not values:
            cells.append(f"{key}=-")
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(f"{key}={format(statistics.fmean(values), spec)}+-{format(spread, spec)}")
    cells.append(f"roots={len(runs)}/{total_roots}")
    if "kept" in runs[0]:
        kept = sorted({run["kept"] for run in runs})
        cells.append(f"kept={'/'.join(map(str, kept))}")
    return cells


def format_table(rows: list[tuple[str, list[str]]]) -> list[str]:
    """Aligned lines: the name, then each `key=value` word right-aligned in its column (one whitespace-free
    word each, for awk and split); rows may have more words than others."""
    if not rows:
        return []
    columns = max(len(cells) for _, cells in rows)
    widths = [max(len(name) for name, _ in rows)] + [
        max((len(cells[i]) for _, cells in rows if i < len(cells)), default=0) for i in range(columns)]
    return ["  ".join([name.ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(cells, widths[1:])])
            for name, cells in rows]


def format_rows(rows: Iterable[tuple[str, Summary]]) -> list[str]:
    """Aligned lines `<name>  top1=<%.3f>  top5=<%.3f>  loss=<%.6f>  n=<count>  last_epoch=<epoch>`."""
    return format_table([(name, _cells({"top1": s.top1, "top5": s.top5, "loss": s.loss, "n": s.count,
                                        "last_epoch": s.last_epoch})) for name, s in rows])


def table_lines(per_root: list[list[Experiment]]) -> list[str]:
    """The printed table: one root's rows as they are; several roots' rows as means over the roots."""
    values = [row_values(experiments) for experiments in per_root]
    names: List[str] = []
    for rows in values:
        names += [name for name in rows if name not in names]
    if len(per_root) == 1:
        return format_table([(name, _cells(values[0][name])) for name in names])
    return format_table([(name, _mean_cells([rows[name] for rows in values if name in rows], len(per_root)))
                         for name in names])


# ---------------------------------------------------------------------------------------------------------
# Plots

_LOTTERY_RE = re.compile(r"^lottery_(?P<net>[a-z0-9]+)_(?:base|compress(?P<ratio>[0-9.]+)_(?:(?P<recipe>[a-z]+)_)?"
                         r"(?P<kind>gsm|gsm_retrain|magnitude_retrain))$")
COMPRESSION_LINES = {"gsm": "GSM, hard-pruned", "gsm_retrain": "GSM ticket", "magnitude_retrain": "magnitude ticket"}


def network_of(name: str) -> str:
    """The network an experiment trains: `lottery_lenet300_...` -> lenet300, `rc56_gsm` -> rc56."""
    match = _LOTTERY_RE.match(name)
    return match.group("net") if match else name.split("_")[0]


def curves(per_root: list[list[Experiment]]) -> Dict[str, List[Tuple[str, List[int], List[float], Optional[float]]]]:
    """{network: [(experiment, epochs, top1 at each epoch, hard-pruned top1 or None)]}, each value the mean over
    the roots that evaluated that epoch."""
    gathered: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    pruned: Dict[str, List[float]] = defaultdict(list)
    for experiments in per_root:
        for experiment in experiments:
            for evaluation in experiment.evaluations:
                gathered[experiment.name][evaluation.epoch].append(evaluation.top1)
            if experiment.pruned is not None:
                pruned[experiment.name].append(experiment.pruned.top1)
    result: Dict[str, list] = defaultdict(list)
    for name, by_epoch in gathered.items():
        epochs = sorted(by_epoch)
        result[network_of(name)].append((name, epochs, [statistics.fmean(by_epoch[e]) for e in epochs],
                                         statistics.fmean(pruned[name]) if pruned[name] else None))
    return dict(result)


def compression_points(per_root: list[list[Experiment]]) -> Dict[str, Dict[str, List[Tuple[float, float]]]]:
    """{network: {line: [(compression ratio, top1)] by ratio}} for the default recipe's lottery folders: the GSM
    hard-pruned model, the GSM ticket and the magnitude ticket (final top1, the mean of the last evaluations),
    each value the mean over the roots. Only networks with two ratios or more."""
    found: Dict[str, Dict[str, Dict[float, List[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for experiments in per_root:
        for experiment in experiments:
            match = _LOTTERY_RE.match(experiment.name)
            if not match or not match.group("ratio") or match.group("recipe"):
                continue
            kind, ratio = match.group("kind"), float(match.group("ratio"))
            if kind == "gsm":
                value = experiment.pruned.top1 if experiment.pruned else None
            else:
                value = summarize(experiment.evaluations).top1
            if value is not None:
                found[match.group("net")][COMPRESSION_LINES[kind]][ratio].append(value)
    points = {}
    for net, lines in found.items():
        ratios = {ratio for by_ratio in lines.values() for ratio in by_ratio}
        if len(ratios) >= 2:
            points[net] = {line: sorted((r, statistics.fmean(v)) for r, v in by_ratio.items())
                           for line, by_ratio in lines.items()}
    return points


STAGE_STYLES = {"gsm": ("-", "GSM"), "gsm_retrain": ("--", "GSM ticket, retrained"),
                "magnitude_retrain": (":", "magnitude ticket, retrained")}
SINGLE_RATIO_COLORS = {"gsm": "C1", "gsm_retrain": "C2", "magnitude_retrain": "C3"}


def _ratio_key(name: str) -> Optional[Tuple[float, str]]:
    """(ratio, recipe or "") of a lottery folder of one ratio; None for the base and other experiments."""
    match = _LOTTERY_RE.match(name)
    if not match or not match.group("ratio"):
        return None
    return float(match.group("ratio")), match.group("recipe") or ""


def _ratio_label(key: Tuple[float, str]) -> str:
    """`30x`, or `30x released` for another recipe's folders."""
    ratio, recipe = key
    return f"{ratio:g}x {recipe}" if recipe else f"{ratio:g}x"


def sweep_ratios(names: Sequence[str]) -> List[Tuple[float, str]]:
    """The (ratio, recipe) keys of one network's curves, by ratio: a sweep when there are several."""
    return sorted({key for key in map(_ratio_key, names) if key is not None})


def curve_styles(names: Sequence[str]) -> Dict[str, Tuple[Optional[str], str, str]]:
    """{experiment: (colour, line style, legend label)} for one network's curves. With several ratios (a sweep)
    the colour tells the ratio and the line style the stage, so that twenty curves stay readable: the legend
    then names each ratio once (`label` is the ratio, or "" for a curve that a ratio's entry already names).
    With one ratio each stage has its own colour. Experiments outside the lottery layout get None: matplotlib's
    colour cycle and their own name."""
    keys = sweep_ratios(names)
    sweep = len(keys) > 1
    colours = {}
    if sweep:
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
        colours = {k: cmap(0.9 * i / (len(keys) - 1)) for i, k in enumerate(keys)}
    styles: Dict[str, Tuple[Optional[str], str, str]] = {}
    labelled = set()
    for name in names:
        match = _LOTTERY_RE.match(name)
        if not match:
            styles[name] = (None, "-", name)
            continue
        net, kind, key = match.group("net"), match.group("kind"), _ratio_key(name)
        if key is None:  # the base
            styles[name] = ("black", "-", "base")
        elif sweep:
            styles[name] = (colours[key], STAGE_STYLES[kind][0], "" if key in labelled else _ratio_label(key))
            labelled.add(key)
        else:
            styles[name] = (SINGLE_RATIO_COLORS[kind], STAGE_STYLES[kind][0], name.replace(f"lottery_{net}_", ""))
    return styles


def _draw_curves(ax, net: str, network_curves) -> None:
    from matplotlib.lines import Line2D

    names = [name for name, *_ in network_curves]
    styles, sweep = curve_styles(names), len(sweep_ratios(names)) > 1
    for name, epochs, top1, pruned in network_curves:
        colour, linestyle, label = styles[name]
        (line,) = ax.plot(epochs, top1, color=colour, linestyle=linestyle, linewidth=1.2, label=label or None)
        if pruned is not None:
            ax.plot([epochs[-1]], [pruned], marker="*", markersize=12, color=line.get_color(), linestyle="none",
                    label=None if sweep else f"{label} hard-pruned")
    finals = [v for _, _, top1, _ in network_curves for v in top1[-3:]]
    if finals:
        ax.set_ylim(max(0.0, min(finals) - 2.0), min(100.0, max(finals) + 0.5))
    if sweep:  # the ratios' colours (from the curves), then what each line style and the stars mean
        handles, labels = ax.get_legend_handles_labels()
        for linestyle, text in STAGE_STYLES.values():
            handles.append(Line2D([], [], color="grey", linestyle=linestyle))
            labels.append(text)
        handles.append(Line2D([], [], color="grey", marker="*", markersize=10, linestyle="none"))
        labels.append("GSM, hard-pruned")
        ax.legend(handles, labels, fontsize=7, ncol=2, loc="lower right")
    else:
        ax.legend(fontsize=7)
    ax.set_xlabel("epoch")
    ax.set_title(f"{net}: top-1 during training")


def _mean_by_epoch(series: Iterable[Iterable[Tuple[int, float]]]) -> Tuple[List[int], List[float]]:
    """(epochs, mean value at each) over several runs' (epoch, value) points."""
    by_epoch: Dict[int, List[float]] = defaultdict(list)
    for points in series:
        for epoch, value in points:
            by_epoch[epoch].append(value)
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def readiness_curves(per_root: list[list[Experiment]]) -> Dict[str, List[Tuple[str, tuple, tuple, tuple]]]:
    """{network: [(GSM experiment, soft top-1, hard-pruned copy top-1, share of the removed weights above 0.01)]}
    for the GSM stages that logged hard-pruned copies, each curve (epochs, values) the mean over the roots."""
    found: Dict[str, List[Experiment]] = defaultdict(list)
    for experiments in per_root:
        for experiment in experiments:
            if experiment.pruned_copies:
                found[experiment.name].append(experiment)
    result: Dict[str, list] = defaultdict(list)
    for name, runs in found.items():
        result[network_of(name)].append((
            name,
            _mean_by_epoch([(e.epoch, e.top1) for e in run.evaluations] for run in runs),
            _mean_by_epoch([(e.epoch, e.top1) for e in run.pruned_copies] for run in runs),
            _mean_by_epoch([(r.epoch, r.share_above_1e_2) for r in run.readiness] for run in runs)))
    return dict(result)


def _draw_readiness(ax, net: str, network_curves) -> None:
    """Soft (GSM-trained) top-1 as lines, the hard-pruned copies' top-1 as markers of the same colour, and on a
    second axis the share of the weights the prune would remove that are still above 0.01 (dotted)."""
    share_ax = ax.twinx()
    values = []
    for name, soft, copies, share in network_curves:
        label = name.replace(f"lottery_{net}_", "")
        (line,) = ax.plot(*soft, linewidth=1.2, label=f"{label}: GSM-trained")
        ax.plot(*copies, marker="o", linestyle="--", linewidth=0.8, color=line.get_color(),
                label=f"{label}: hard-pruned copy")
        if share[0]:
            share_ax.plot(share[0], [max(v, 1e-6) for v in share[1]], linestyle=":", color=line.get_color())
        values += soft[1][-3:] + copies[1]
    if values:
        ax.set_ylim(max(0.0, min(values) - 2.0), min(100.0, max(values) + 0.5))
    share_ax.set_yscale("log")
    share_ax.set_ylabel("removed weights with |w| > 0.01 (share, dotted)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("epoch")
    ax.set_title(f"{net}: soft vs hard-pruned during GSM")


def _draw_compression(ax, net: str, lines: Dict[str, List[Tuple[float, float]]], base: Optional[float]) -> None:
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ratios = sorted({r for values in lines.values() for r, _ in values})
    for line_name, values in lines.items():
        ax.plot([r for r, _ in values], [v for _, v in values], marker="o", label=line_name)
    if base is not None:
        ax.axhline(base, color="black", linewidth=0.8, linestyle="--", label="base (dense)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ratios))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([f"{r:g}x" for r in ratios])
    ax.set_xlabel("compression ratio (prunable weights / kept)")
    ax.set_title(f"{net}: top-1 against compression")
    ax.legend(fontsize=7)


def base_top1(per_root: list[list[Experiment]], net: str) -> Optional[float]:
    """The lottery base's final top-1 of a network (the mean of its last evaluations), averaged over the roots."""
    values = [summarize(e.evaluations).top1 for experiments in per_root for e in experiments
              if e.name == f"lottery_{net}_base" and e.evaluations]
    return statistics.fmean(values) if values else None


def draw(per_root: list[list[Experiment]], path: Path) -> None:
    """Top-1 against epoch, one panel per network (the hard-pruned models marked), then a panel of top-1
    against compression for each network with several ratios, then a panel "soft vs hard-pruned during GSM" for
    each network whose GSM stages logged hard-pruned copies; written to `path` (headless)."""
    plt = pyplot()
    by_network, compression, readiness = curves(per_root), compression_points(per_root), readiness_curves(per_root)
    panels = [("curve", net) for net in by_network] + [("compression", net) for net in compression] + \
        [("readiness", net) for net in readiness]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    for ax, (kind, net) in zip(axes[0], panels):
        if kind == "curve":
            _draw_curves(ax, net, by_network[net])
        elif kind == "readiness":
            _draw_readiness(ax, net, readiness[net])
        else:
            _draw_compression(ax, net, compression[net], base_top1(per_root, net))
        ax.set_ylabel("top-1 (%)")
        ax.grid(True, alpha=0.3)
    if len(per_root) > 1:
        fig.suptitle(f"means over {len(per_root)} roots")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    families = " and ".join(f"{family}/*/{LOG_NAME}" for family in EXPERIMENT_DIRS)
    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Read every {families}
under each root folder and print one line per experiment, sorted by folder
name, gsm_exps first:
  - the folder name without a trailing '_train' ('_retrain' is kept),
  - top1, top5 (percent) and loss: means over the last {LAST_EVALUATIONS} 'validate at epoch'
    evaluations of the log (all of them when it has fewer),
  - n: how many evaluations were averaged, last_epoch: the last epoch evaluated.
A GSM stage's hard-pruned model gets a row of its own, named after the folder
with '{PRUNED_SUFFIX}', with its one evaluation, the weights it keeps and its
compression. An experiment whose log has no evaluations gets n=0 and '-'.
With several roots (e.g. one per seed) each row gives mean+-std over the roots
that have it, and roots=<how many>/<all>.
There is no header, so 'python show_log.py | grep retrain' leaves exactly the
retrain rows, and 'grep pruned' the hard-pruned ones.""",
        epilog="""\
example rows:
  lottery_lenet300_compress60_gsm_pruned   top1=98.280  top5=99.960  loss=0.060000  n=1  last_epoch=-  kept=4437/266200  compression=59.99x
  lottery_lenet300_compress60_gsm_retrain  top1=98.123  top5=99.950  loss=0.065432  n=10  last_epoch=200""",
    )
    parser.add_argument("roots", nargs="*", type=Path, metavar="ROOT",
                        help="folders holding gsm_exps/ and gsm_lottery_ticket_exps/ (default: the current folder)")
    parser.add_argument("--root", type=Path, action="append", default=[], help="a root, as the positional ones")
    parser.add_argument("--plot", type=plot_path, metavar="FILE",
                        help="also draw top-1 against epoch (and against compression where a network has several "
                             "ratios, and soft vs hard-pruned top-1 during GSM where the stages logged it) into FILE "
                             "(.png or .pdf)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    roots = list(args.roots) + list(args.root) or [Path(".")]
    for root in roots:
        if not root.is_dir():
            given = f"--root {root}" if root in args.root else str(root)
            parser.error(f"{given}: not a folder; pass the folder that holds gsm_exps/ and gsm_lottery_ticket_exps/")
    per_root = [read_experiments(root) for root in roots]
    per_root = [experiments for experiments in per_root if experiments]
    if not per_root:
        print(f"no logs found under {', '.join(str(root.resolve()) for root in roots)}", file=sys.stderr)
        return 0
    for line in table_lines(per_root):
        print(line)
    if args.plot:
        draw(per_root, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into `head`
        sys.exit(0)
