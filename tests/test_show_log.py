"""Tests for show_log.py: log parsing, the last-ten means, folder names and the printed rows."""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import show_log
from gsm.experiments.train_log import PruneResult
from show_log import Evaluation, Summary, experiment_name, main, parse_log, summarize

SCRIPT = Path(__file__).resolve().parents[1] / "show_log.py"
STAMP = "2026-11-26 21:03:04,123 train INFO: "


def eval_line(epoch: int, top1: float, top5: float, loss: float) -> str:
    """A `validate at epoch` record exactly as the trainer logs it (docs/design.md, section 3)."""
    return f"{STAMP}validate at epoch {epoch}, top1={top1:.5f}, top5={top5:.5f}, loss={loss:.6f}\n"


def ramp(count: int, first_epoch: int = 0) -> list[Evaluation]:
    """Evaluations at every even epoch; top1 = 80 + i, top5 = 95 + i/4, loss = 0.5 - i/100 for the i-th one."""
    return [Evaluation(first_epoch + 2 * i, 80.0 + i, 95.0 + 0.25 * i, round(0.5 - 0.01 * i, 6)) for i in range(count)]


def write_log(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def log_of(evaluations: list[Evaluation], noise: bool = True) -> str:
    """A log holding these evaluations among the other lines a training run writes."""
    lines = [f"{STAMP}config: Config(lr=0.03, epochs=200)\n"] if noise else []
    for e in evaluations:
        lines.append(eval_line(e.epoch, e.top1, e.top5, e.loss))
        if noise:
            lines.append(f"{STAMP}epoch {e.epoch + 1} iter 234/234, loss=0.12345, 12345 examples/s, lr=0.03\n")
    return "".join(lines)


def tokens(line: str) -> dict[str, str]:
    """{'name': ..., 'top1': ..., ...} from one printed row."""
    name, *fields = line.split()
    return {"name": name, **dict(field.split("=", 1) for field in fields)}


@pytest.fixture
def experiments(tmp_path: Path) -> Path:
    """A results tree with both families, a resumed log, an empty log and logs show_log must not read."""
    gsm = tmp_path / "gsm_exps"
    lottery = tmp_path / "gsm_lottery_ticket_exps"
    write_log(gsm / "rc56_base_train" / "log.txt", log_of(ramp(15)))
    write_log(gsm / "rc56_gsm" / "log.txt", log_of([
        Evaluation(2, 91.0, 99.5, 0.3), Evaluation(4, 92.0, 99.6, 0.2), Evaluation(6, 93.5, 99.7, 0.25)]))
    # Only messages: the run died before its first evaluation.
    write_log(lottery / "lottery_lenet300_base" / "log.txt", f"{STAMP}start training\n{STAMP}saved init.hdf5\n")
    # Crashed after epoch 14, resumed from the epoch-10 checkpoint: epochs 10..14 appear twice.
    crashed = ramp(8)  # epochs 0..14
    resumed = [Evaluation(10 + 2 * i, 70.0 + i, 90.0, 0.1) for i in range(6)]  # epochs 10..20
    write_log(lottery / "lottery_lenet300_compress60_gsm" / "log.txt",
              log_of(crashed) + "Traceback (most recent call last):\nRuntimeError: CUDA error\n" + log_of(resumed))
    write_log(lottery / "lottery_lenet300_compress60_gsm_retrain" / "log.txt", log_of(ramp(10, first_epoch=20)))
    write_log(lottery / "lottery_lenet300_compress60_magnitude_retrain" / "log.txt", log_of(ramp(11)))
    # Not experiment logs: wrong family, too deep, wrong file name.
    write_log(tmp_path / "other_exps" / "x_train" / "log.txt", log_of(ramp(3)))
    write_log(gsm / "rc56_gsm" / "old" / "log.txt", log_of(ramp(3)))
    write_log(gsm / "rc56_gsm_retrain" / "log.txt.bak", log_of(ramp(3)))
    return tmp_path


EXPECTED_ROWS = [
    # name, top1, top5, loss, n, last_epoch
    ("rc56_base", "89.500", "97.375", "0.405000", "10", "28"),  # i = 5..14 of ramp(15)
    ("rc56_gsm", "92.167", "99.600", "0.250000", "3", "6"),
    ("lottery_lenet300_base", "-", "-", "-", "0", "-"),
    # last ten lines in order: crashed epochs 8..14 (i = 4..7) then resumed epochs 10..20 (top1 70..75)
    ("lottery_lenet300_compress60_gsm", "77.700", "92.550", "0.238000", "10", "20"),
    ("lottery_lenet300_compress60_gsm_retrain", "84.500", "96.125", "0.455000", "10", "38"),
    ("lottery_lenet300_compress60_magnitude_retrain", "85.500", "96.375", "0.445000", "10", "20"),
]


def expected_tokens(row: tuple[str, ...]) -> dict[str, str]:
    return dict(zip(("name", "top1", "top5", "loss", "n", "last_epoch"), row))


# ---- parse_log -------------------------------------------------------------------------------------------

def test_parse_log_keeps_only_complete_evaluation_lines(tmp_path: Path) -> None:
    content = b"".join([
        f"{STAMP}config: Config(lr=0.03)\n".encode(),
        eval_line(0, 11.35, 51.2, 2.302585).encode(),
        f"{STAMP}epoch 1 iter 100/234, loss=0.3, 20000 examples/s\n".encode(),
        f"{STAMP}hard-pruned model: top1=97.10000, top5=99.90000, loss=0.100000\n".encode(),
        b"Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyboardInterrupt\n",
        b"\xff\xfe\x00\x01garbage \x85 \x0c form feed mid-file\x0c\n",
        # an evaluation inside a message, and one with a broken number, are not evaluations
        f"{STAMP}note: validate at epoch 5, top1=1.00000, top5=1.00000, loss=1.000000 was slow\n".encode(),
        f"{STAMP}validate at epoch 6, top1=9x.00000, top5=99.00000, loss=0.100000\n".encode(),
        "validate at epoch 7, top1=50.00000, top5=60.00000, loss=0.700000\n".encode(),
        eval_line(2, 97.81, 99.95, 0.071234).encode(),
        b"\x00\x00\x00\xde\xad\xbe\xef\n",
        # the crash cut the last record short: its loss looks like a number but may be truncated
        f"{STAMP}validate at epoch 4, top1=98.00000, top5=99.99000, loss=0.05".encode(),
    ])
    log = write_log(tmp_path / "log.txt", content)
    assert parse_log(log) == [Evaluation(0, 11.35, 51.2, 2.302585), Evaluation(2, 97.81, 99.95, 0.071234)]


def test_parse_log_accepts_windows_line_ends_and_non_finite_loss(tmp_path: Path) -> None:
    content = eval_line(8, 10.0, 50.0, float("nan")).replace("\n", "\r\n") + eval_line(10, 12.5, 55.0, 2.5)
    evaluations = parse_log(write_log(tmp_path / "log.txt", content))
    assert [(e.epoch, e.top1, e.top5) for e in evaluations] == [(8, 10.0, 50.0), (10, 12.5, 55.0)]
    assert evaluations[0].loss != evaluations[0].loss  # nan: a diverged run still shows up
    assert evaluations[1].loss == 2.5


def test_parse_log_of_empty_file_is_empty(tmp_path: Path) -> None:
    assert parse_log(write_log(tmp_path / "log.txt", b"")) == []


# ---- summarize -------------------------------------------------------------------------------------------

def test_summarize_averages_the_last_ten() -> None:
    summary = summarize(ramp(15))
    assert summary.count == 10
    assert summary.top1 == pytest.approx(89.5, abs=1e-12)  # mean of 85..94
    assert summary.top5 == pytest.approx(97.375, abs=1e-12)
    assert summary.loss == pytest.approx(0.405, abs=1e-12)
    assert summary.last_epoch == 28


def test_summarize_uses_all_when_fewer_than_ten() -> None:
    summary = summarize(ramp(4))
    assert (summary.count, summary.last_epoch) == (4, 6)
    assert summary.top1 == pytest.approx(81.5, abs=1e-12)
    assert summary.top5 == pytest.approx(95.375, abs=1e-12)
    assert summary.loss == pytest.approx(0.485, abs=1e-12)


def test_summarize_last_epoch_is_the_last_line_not_the_largest_epoch() -> None:
    resumed = ramp(6) + [Evaluation(4, 50.0, 60.0, 1.0)]
    summary = summarize(resumed, last=2)
    assert (summary.count, summary.last_epoch) == (2, 4)
    assert summary.top1 == pytest.approx((85.0 + 50.0) / 2, abs=1e-12)


def test_summarize_without_evaluations() -> None:
    assert summarize([]) == Summary(0, None, None, None, None)
    with pytest.raises(ValueError, match="Invalid number of evaluations"):
        summarize(ramp(3), last=0)


# ---- names -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder, name", [
    ("rc56_base_train", "rc56_base"),
    ("rc56_gsm", "rc56_gsm"),
    ("lottery_lenet300_compress60_gsm_retrain", "lottery_lenet300_compress60_gsm_retrain"),
    ("lottery_lenet5_compress125_magnitude_retrain", "lottery_lenet5_compress125_magnitude_retrain"),
    ("my_train_run", "my_train_run"),  # `_train` only as a suffix
    ("train", "train"),
    ("a_train_train", "a_train"),  # one suffix only
])
def test_experiment_name(folder: str, name: str) -> None:
    assert experiment_name(folder) == name


# ---- main ------------------------------------------------------------------------------------------------

def test_main_prints_one_row_per_experiment(experiments: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(experiments)
    assert main([]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert [tokens(line) for line in lines] == [expected_tokens(row) for row in EXPECTED_ROWS]
    # aligned columns: every value column ends at the same place in every row
    column_ends = [[word.end() for word in re.finditer(r"\S+", line)][1:] for line in lines]
    assert all(ends == column_ends[0] for ends in column_ends)
    assert lines[4] == ("lottery_lenet300_compress60_gsm_retrain        top1=84.500  top5=96.125  loss=0.455000"
                        "  n=10  last_epoch=38")
    assert lines[2] == ("lottery_lenet300_base                               top1=-       top5=-         loss=-"
                        "   n=0   last_epoch=-")


def test_grep_retrain_leaves_exactly_the_retrain_rows(experiments: Path, capsys) -> None:
    assert main(["--root", str(experiments)]) == 0
    grepped = [line for line in capsys.readouterr().out.splitlines() if "retrain" in line]
    assert [tokens(line)["name"] for line in grepped] == [
        "lottery_lenet300_compress60_gsm_retrain", "lottery_lenet300_compress60_magnitude_retrain"]
    assert [tokens(line)["top1"] for line in grepped] == ["84.500", "85.500"]


def test_root_option_reads_another_folder(experiments: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    elsewhere = tmp_path / "elsewhere"
    write_log(elsewhere / "gsm_exps" / "lenet5_gsm" / "log.txt", log_of(ramp(2)))
    monkeypatch.chdir(elsewhere)
    assert main(["--root", str(experiments)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(EXPECTED_ROWS)
    monkeypatch.chdir(experiments)
    assert main(["--root", "elsewhere"]) == 0
    assert [tokens(line) for line in capsys.readouterr().out.splitlines()] == [
        expected_tokens(("lenet5_gsm", "80.500", "95.125", "0.495000", "2", "2"))]


def test_no_logs_is_a_message_not_an_error(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "gsm_exps" / "rc56_gsm").mkdir(parents=True)  # a folder without log.txt
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"no logs found under {tmp_path.resolve()}\n"


def test_missing_root_is_a_usage_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "not a folder" in capsys.readouterr().err


def test_unreadable_log_is_skipped_with_a_warning(experiments: Path, capsys) -> None:
    # a folder named log.txt cannot be read on any system, root included
    (experiments / "gsm_exps" / "a_broken" / "log.txt").mkdir(parents=True)
    assert main(["--root", str(experiments)]) == 0
    out, err = capsys.readouterr()
    assert [tokens(line) for line in out.splitlines()] == [expected_tokens(row) for row in EXPECTED_ROWS]
    assert err.startswith("warning: skipping ") and "a_broken" in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_log_without_read_permission_is_skipped(experiments: Path, capsys) -> None:
    log = experiments / "gsm_exps" / "rc56_gsm" / "log.txt"
    log.chmod(0)
    try:
        assert main(["--root", str(experiments)]) == 0
    finally:
        log.chmod(0o644)
    out, err = capsys.readouterr()
    assert [tokens(line)["name"] for line in out.splitlines()] == [
        row[0] for row in EXPECTED_ROWS if row[0] != "rc56_gsm"]
    assert "Permission denied" in err


def test_permission_error_is_reported_by_its_reason(experiments: Path, monkeypatch, capsys) -> None:
    # The same path as the test above, for runs as root (which reads any file whatever its mode).
    denied = experiments / "gsm_exps" / "rc56_gsm" / "log.txt"

    def open_or_deny(path, *args, **kwargs):
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(show_log, "open", open_or_deny, raising=False)
    assert main(["--root", str(experiments)]) == 0
    out, err = capsys.readouterr()
    assert [tokens(line)["name"] for line in out.splitlines()] == [
        row[0] for row in EXPECTED_ROWS if row[0] != "rc56_gsm"]
    assert err == f"warning: skipping {denied}: Permission denied\n"


def test_help_describes_the_output(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--root" in text and f"last {show_log.LAST_EVALUATIONS}" in text and "last_epoch" in text


def test_script_runs_from_the_command_line(experiments: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=experiments, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert [tokens(line) for line in result.stdout.splitlines()] == [expected_tokens(row) for row in EXPECTED_ROWS]


# ---- hard-pruned rows, several roots, plots ---------------------------------------------------------------

def write_pruned(folder: Path, kept: int, prunable: int, top1: float, top5: float = 99.9, loss: float = 0.06) -> None:
    """A GSM stage's hard-prune result, written as gsm/experiments/pipeline.py writes it (the log line is for
    people; show_log reads the file)."""
    PruneResult(top1=top1, top5=top5, loss=loss, kept=kept, prunable=prunable, keep_count=kept - 1, alive=kept + 400,
                alive_magnitude=0.01).save(folder / "finish_pruned.json")


def lottery_root(root: Path, ratios: dict[int, tuple[float, float, float]], shift: float = 0.0) -> Path:
    """A lottery results tree: for each ratio R, (hard-pruned, GSM ticket, magnitude ticket) top-1, each
    raised by `shift`; the base and GSM curves are ramps."""
    lottery = root / "gsm_lottery_ticket_exps"
    write_log(lottery / "lottery_lenet300_base" / "log.txt", log_of(ramp(12)))
    for ratio, (pruned, gsm_ticket, magnitude) in ratios.items():
        prefix = lottery / f"lottery_lenet300_compress{ratio}"
        kept = 266200 // ratio + 1
        write_log(Path(f"{prefix}_gsm") / "log.txt", log_of(ramp(12)))
        write_pruned(Path(f"{prefix}_gsm"), kept, 266200, pruned + shift)
        for kind, value in (("gsm_retrain", gsm_ticket), ("magnitude_retrain", magnitude)):
            write_log(Path(f"{prefix}_{kind}") / "log.txt",
                      log_of([Evaluation(2 * i, value + shift, 99.0, 0.1) for i in range(10)]))
    return root


def test_hard_pruned_rows_and_grep(tmp_path: Path, capsys) -> None:
    root = lottery_root(tmp_path, {60: (98.28, 98.09, 96.58)})
    # A stage whose result file is unreadable (cut short): no pruned row for it.
    folder = root / "gsm_lottery_ticket_exps" / "lottery_lenet300_compress30_gsm"
    write_log(folder / "log.txt", log_of(ramp(3)))
    write_pruned(folder, 8874, 266200, 98.0)
    (folder / "finish_pruned.json").write_text((folder / "finish_pruned.json").read_text()[:-40])
    assert main([str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [tokens(line)["name"] for line in lines]
    assert names == ["lottery_lenet300_base", "lottery_lenet300_compress30_gsm", "lottery_lenet300_compress60_gsm",
                     "lottery_lenet300_compress60_gsm_pruned", "lottery_lenet300_compress60_gsm_retrain",
                     "lottery_lenet300_compress60_magnitude_retrain"]
    pruned = [tokens(line) for line in lines if "pruned" in line]
    assert pruned == [{"name": "lottery_lenet300_compress60_gsm_pruned", "top1": "98.280", "top5": "99.900",
                       "loss": "0.060000", "n": "1", "last_epoch": "-", "kept": "4437/266200",
                       "compression": "60.00x"}]
    assert [tokens(line)["name"] for line in lines if "retrain" in line] == [
        "lottery_lenet300_compress60_gsm_retrain", "lottery_lenet300_compress60_magnitude_retrain"]


def test_several_roots_give_mean_and_spread(tmp_path: Path, capsys) -> None:
    roots = [lottery_root(tmp_path / f"seed{i}", {60: (98.0, 98.1, 96.5)}, shift=0.1 * i) for i in range(3)]
    (roots[2] / "gsm_lottery_ticket_exps" / "lottery_lenet300_compress60_magnitude_retrain" / "log.txt").unlink()
    assert main([str(root) for root in roots]) == 0
    rows = {tokens(line)["name"]: tokens(line) for line in capsys.readouterr().out.splitlines()}
    assert rows["lottery_lenet300_compress60_gsm_pruned"]["top1"] == "98.100+-0.100"
    assert rows["lottery_lenet300_compress60_gsm_pruned"]["roots"] == "3/3"
    assert rows["lottery_lenet300_compress60_gsm_pruned"]["kept"] == "4437"
    assert rows["lottery_lenet300_compress60_gsm_retrain"]["top1"] == "98.200+-0.100"
    magnitude = rows["lottery_lenet300_compress60_magnitude_retrain"]
    assert magnitude["top1"] == "96.550+-0.071" and magnitude["roots"] == "2/3"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_draws_curves_and_accuracy_against_compression(tmp_path: Path, capsys) -> None:
    root = lottery_root(tmp_path / "run", {10: (98.3, 98.3, 98.2), 60: (98.28, 98.09, 96.58), 240: (96.0, 97.5, 70.0)})
    # What the plot draws: a curve per experiment (with its hard-pruned point), and the three compression lines.
    experiments = show_log.read_experiments(root)
    curves = show_log.curves([experiments])
    assert list(curves) == ["lenet300"]
    gsm60 = next(c for c in curves["lenet300"] if c[0] == "lottery_lenet300_compress60_gsm")
    assert gsm60[1] == [2 * i for i in range(12)] and gsm60[2][0] == 80.0 and gsm60[3] == 98.28
    points = show_log.compression_points([experiments])["lenet300"]
    assert points == {"GSM, hard-pruned": [(10.0, 98.3), (60.0, 98.28), (240.0, 96.0)],
                      "GSM ticket": [(10.0, 98.3), (60.0, 98.09), (240.0, 97.5)],
                      "magnitude ticket": [(10.0, 98.2), (60.0, 96.58), (240.0, 70.0)]}
    # The dense base's final top-1, the reference line of the compression panel: the mean of its last ten.
    base = next(e for e in experiments if e.name == "lottery_lenet300_base")
    assert show_log.base_top1([experiments], "lenet300") == pytest.approx(
        statistics.fmean(e.top1 for e in base.evaluations[-10:]))
    assert show_log.base_top1([experiments], "lenet5") is None
    plot = tmp_path / "results.png"
    assert main([str(root), "--plot", str(plot)]) == 0
    width, height = png_size(plot)
    assert width == 2 * 640 and height == 460  # two panels: the curves and the compression sweep
    assert 10_000 < plot.stat().st_size < 200_000
    assert capsys.readouterr().err.strip() == f"plot written to {plot}"


@pytest.mark.parametrize("name, reason", [("plot.jpg", ".png or .pdf"), ("missing/plot.png", "cannot write")])
def test_plot_path_is_checked_before_reading(tmp_path: Path, capsys, name: str, reason: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--plot", str(tmp_path / name)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert reason in err and len(err.strip().splitlines()) == 2  # argparse: usage line, then the error line


def test_curve_styles_tell_ratio_by_colour_and_stage_by_line_style() -> None:
    sweep = ["lottery_lenet300_base"] + [f"lottery_lenet300_compress{r}_{kind}" for r in (60, 10, 240)
                                         for kind in ("gsm", "gsm_retrain", "magnitude_retrain")]
    styles = show_log.curve_styles(sweep)
    assert styles["lottery_lenet300_base"] == ("black", "-", "base")
    # One colour per ratio, ordered by ratio along the colour map; the stage is the line style.
    colours = {r: styles[f"lottery_lenet300_compress{r}_gsm"][0] for r in (10, 60, 240)}
    assert len(set(colours.values())) == 3
    for r in (10, 60, 240):
        assert [styles[f"lottery_lenet300_compress{r}_{kind}"][:2] for kind in ("gsm", "gsm_retrain",
                                                                              "magnitude_retrain")] == \
            [(colours[r], "-"), (colours[r], "--"), (colours[r], ":")]
    # Each ratio is named once in the legend.
    labels = [styles[name][2] for name in sweep]
    assert sorted(label for label in labels if label) == sorted(["base", "10x", "60x", "240x"])
    # One ratio: a colour per stage, the folder names as labels; other experiments keep matplotlib's colours.
    single = show_log.curve_styles(["lottery_lenet5_base", "lottery_lenet5_compress300_gsm",
                                    "lottery_lenet5_compress300_magnitude_retrain", "rc56_gsm"])
    assert single["lottery_lenet5_compress300_gsm"] == ("C1", "-", "compress300_gsm")
    assert single["lottery_lenet5_compress300_magnitude_retrain"] == ("C3", ":", "compress300_magnitude_retrain")
    assert single["rc56_gsm"] == (None, "-", "rc56_gsm")


def test_ratios_are_listed_by_value(tmp_path: Path, capsys) -> None:
    root = lottery_root(tmp_path, {120: (97.6, 97.7, 93.7), 30: (98.6, 98.6, 97.8), 240: (96.3, 96.9, 80.0)})
    assert main([str(root)]) == 0
    ratios = [re.search(r"compress(\d+)_gsm_pruned", line).group(1)
              for line in capsys.readouterr().out.splitlines() if "_pruned" in line]
    assert ratios == ["30", "120", "240"]
    assert sorted(["rc56_gsm", "rc110_gsm", "rc20_gsm"], key=show_log.natural_key) == \
        ["rc20_gsm", "rc56_gsm", "rc110_gsm"]


def test_readiness_and_hard_pruned_copies_are_read_and_drawn(tmp_path: Path, capsys) -> None:
    """The lines a GSM stage logs (written here by the trainer's own formatters) come back as numbers, averaged
    over the roots, and get the panel "soft vs hard-pruned during GSM"."""
    from gsm import PruneReadiness
    from gsm.experiments.train_log import format_pruned_copy, format_readiness

    roots = []
    for seed in range(2):
        root = lottery_root(tmp_path / f"seed{seed}", {60: (98.28, 98.09, 96.58)})
        lines = [f"{STAMP}start training\n"]
        for epoch in range(0, 12, 2):
            lines.append(eval_line(epoch, 90.0 + epoch + seed, 99.0, 0.1))
            readiness = PruneReadiness(prunable=266200, kept=4437, outside_above_1e_2=1000 // (epoch + 1) + seed,
                                       outside_above_1e_3=5000, removed_norm=0.5, kept_norm=10.0)
            lines.append(f"{STAMP}{format_readiness(epoch, readiness)}\n")
            if epoch in (6, 10):
                lines.append(f"{STAMP}{format_pruned_copy(epoch, 4437, 266200, 80.0 + epoch + seed, 95.0, 0.5)}\n")
        write_log(root / "gsm_lottery_ticket_exps" / "lottery_lenet300_compress60_gsm" / "log.txt", "".join(lines))
        roots.append(root)
    records = show_log.parse_records(roots[1] / "gsm_lottery_ticket_exps" / "lottery_lenet300_compress60_gsm" /
                                     "log.txt")
    assert [(r.epoch, r.above_1e_2, r.removed, r.above_1e_3, r.norm_ratio) for r in records.readiness][:2] == [
        (0, 1001, 261763, 5000, 0.05), (2, 334, 261763, 5000, 0.05)]
    assert [(e.epoch, e.top1, e.loss) for e in records.pruned_copies] == [(6, 87.0, 0.5), (10, 91.0, 0.5)]
    curves = show_log.readiness_curves([show_log.read_experiments(root) for root in roots])
    [(name, soft, copies, share)] = curves["lenet300"]
    assert name == "lottery_lenet300_compress60_gsm"
    assert soft == ([0, 2, 4, 6, 8, 10], [90.5, 92.5, 94.5, 96.5, 98.5, 100.5])
    assert copies == ([6, 10], [86.5, 90.5])
    assert share[0] == [0, 2, 4, 6, 8, 10] and share[1][0] == pytest.approx(1000.5 / 261763)
    plot = tmp_path / "readiness.png"
    assert main([str(root) for root in roots] + ["--plot", str(plot)]) == 0
    assert png_size(plot) == (2 * 640, 460)  # the curves, then soft vs hard-pruned
    capsys.readouterr()
