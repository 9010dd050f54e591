"""The lottery-ticket pipeline end to end at smoke scale: the scripts' CLI, the folders and files they write,
the tickets, skipping and resuming, and the one-line errors for bad input."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import gsm
import gsm.experiments.lottery
import gsm.experiments.pipeline
from gsm import GSM
from gsm.experiments import layout
from gsm.experiments.configs import RunOptions
from gsm.experiments.lottery import LotteryConfig, run_lottery
from gsm.experiments.train_log import PruneResult
from script_runs import call_script, entries, run_script, script_env

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {net: REPO_ROOT / "gsm" / f"gsm_lottery_ticket_{net}.py" for net in ("lenet300", "lenet5")}
SHOW_LOG = REPO_ROOT / "show_log.py"
SMOKE = ["--scale", "0.01", "--device", "cpu", "--no-progress"]
# (net, ratio) -> (weights kept by the hard prune, prunable weights): docs/design.md, sections 1 and 3. At x5 the LeNet-300-100
# ticket keeps weights in every layer, so its retrain is a live network (at x60 on a barely trained base the
# global magnitude mask keeps nothing of linear1 and the retrain cannot move any weight).
EXPECTED = {("lenet300", 60): (4437, 266200), ("lenet5", 125): (3444, 430500), ("lenet300", 5): (53240, 266200)}
EVAL_RE = re.compile(r" train INFO: (validate at epoch (\d+), .*)$")


def exps(out_root: Path) -> Path:
    return out_root / layout.LOTTERY_EXPS


def folder_names(net: str, ratio: int, recipe: str = "") -> dict:
    gsm_part = f"compress{ratio}_{recipe}_" if recipe else f"compress{ratio}_"
    return {"base": f"lottery_{net}_base", "gsm": f"lottery_{net}_{gsm_part}gsm",
            "gsm_retrain": f"lottery_{net}_{gsm_part}gsm_retrain",
            "magnitude_retrain": f"lottery_{net}_compress{ratio}_magnitude_retrain"}


def tensors(path: Path) -> dict:
    return {k: torch.from_numpy(v) for k, v in gsm.read_hdf5(path).items()}


def assert_same_file_arrays(a: Path, b: Path) -> None:
    left, right = gsm.read_hdf5(a), gsm.read_hdf5(b)
    assert left.keys() == right.keys()
    for key in left:
        assert left[key].dtype == right[key].dtype and np.array_equal(left[key], right[key]), (a, key)


def evaluations(log: Path) -> list:
    return [(int(m.group(2)), m.group(1)) for m in map(EVAL_RE.search, log.read_text().splitlines()) if m]


def snapshot(root: Path) -> dict:
    """{relative path: (bytes, mtime_ns)} of every file under root but the run locks (no result in them)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and ".locks" not in p.relative_to(root).parts}


def check_lottery_folders(out_root: Path, net: str, ratio: int, recipe: str = "", gsm_epochs=(0, 2)) -> dict:
    """Every check of one finished lottery run at smoke scale; returns the folder paths by kind."""
    kept, total = EXPECTED[net, ratio]
    names = folder_names(net, ratio, recipe)
    folders = {kind: exps(out_root) / name for kind, name in names.items()}
    stage_files = {layout.INIT_WEIGHTS, layout.FINISH_WEIGHTS, layout.LOG, layout.STAGE_CONFIG}
    for kind, folder in folders.items():
        expected_files = stage_files | ({layout.PRUNED_WEIGHTS, layout.PRUNED_RESULT} if kind == "gsm" else
                                        {layout.MASK} if kind.endswith("retrain") else set())
        assert set(entries(folder)) == expected_files, folder  # no checkpoint or temp file left

    # The base and the retrains run 2 epochs (200 x 0.01): evaluations at epochs 0 and 2.
    for kind, folder in folders.items():
        epochs = gsm_epochs if kind == "gsm" else (0, 2)
        assert [e for e, _ in evaluations(folder / layout.LOG)] == list(epochs), folder

    base_init = tensors(folders["base"] / layout.INIT_WEIGHTS)
    base_finish = tensors(folders["base"] / layout.FINISH_WEIGHTS)
    prunable = [k for k, v in base_init.items() if v.dim() > 1]
    assert sum(base_init[k].numel() for k in prunable) == total

    # GSM starts from the base result; the pruned model is the global magnitude prune of its result.
    assert_same_file_arrays(folders["gsm"] / layout.INIT_WEIGHTS, folders["base"] / layout.FINISH_WEIGHTS)
    gsm_finish = tensors(folders["gsm"] / layout.FINISH_WEIGHTS)
    pruned = tensors(folders["gsm"] / layout.PRUNED_WEIGHTS)
    report = gsm.sparsity_report(gsm.read_hdf5(folders["gsm"] / layout.PRUNED_WEIGHTS))
    assert (report.nonzeros, report.elements) == (kept, total)
    gsm_mask = {k: pruned[k] != 0 for k in prunable}
    assert gsm.mask_count(gsm_mask) == kept
    hard_mask = gsm.global_magnitude_mask(gsm_finish, 1.0 / ratio)
    assert all(torch.equal(hard_mask[k], gsm_mask[k]) for k in prunable)
    for k, v in pruned.items():
        assert torch.equal(v, gsm_finish[k] * gsm_mask[k] if k in gsm_mask else gsm_finish[k]), k
    gsm_log = (folders["gsm"] / layout.LOG).read_text()
    assert gsm_log.count(f"hard-pruned model: kept {kept} of {total} prunable weights") == 1
    result = PruneResult.load(folders["gsm"] / layout.PRUNED_RESULT)  # the same, as data
    assert (result.kept, result.prunable, result.keep_count) == (kept, total, int(1.0 / ratio * total))
    assert f"top1={result.top1:.5f}, top5={result.top5:.5f}, loss={result.loss:.6f}" in gsm_log

    # Tickets: the base init times each mask; retraining keeps every pruned weight at exactly zero.
    magnitude_mask = gsm.global_magnitude_mask(base_finish, 1.0 / ratio)
    assert gsm.mask_count(magnitude_mask) == kept
    for kind, mask in (("gsm_retrain", gsm_mask), ("magnitude_retrain", magnitude_mask)):
        ticket = tensors(folders[kind] / layout.INIT_WEIGHTS)
        finish = tensors(folders[kind] / layout.FINISH_WEIGHTS)
        assert ticket.keys() == base_init.keys()
        for k, v in ticket.items():
            if k in mask:
                assert torch.equal(v, base_init[k] * mask[k]), (kind, k)
                assert int(torch.count_nonzero(v)) == int(mask[k].sum()), (kind, k)
                assert int(torch.count_nonzero(finish[k][~mask[k]])) == 0, (kind, k)
            else:
                assert torch.equal(v, base_init[k]), (kind, k)  # biases are not masked
        assert sum(int(torch.count_nonzero(ticket[k])) for k in prunable) == kept
        saved = gsm.load_mask(folders[kind] / layout.MASK)  # the ticket's mask, kept beside it
        assert saved.keys() == mask.keys() and all(torch.equal(saved[k], mask[k]) for k in mask), kind
    return folders


# ---------------------------------------------------------------------------------------------------------
# End to end through the scripts


@pytest.fixture(scope="module")
def lenet300_run(tmp_path_factory, mnist_root):
    """One smoke run of the LeNet-300-100 script into an out-root that does not exist yet."""
    work = tmp_path_factory.mktemp("lenet300")
    out_root = work / "not" / "yet" / "there"
    started = time.perf_counter()
    result = run_script("lenet300", ["60", *SMOKE, "--out-root", out_root, "--data-root", mnist_root], cwd=work)
    return out_root, result, time.perf_counter() - started


def test_lenet300_lottery_end_to_end(lenet300_run):
    out_root, result, _ = lenet300_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert entries(exps(out_root)) == sorted(folder_names("lenet300", 60).values())
    folders = check_lottery_folders(out_root, "lenet300", 60)
    # The GSM run trains: its result differs from the base it started from.
    assert not np.array_equal(gsm.read_hdf5(folders["gsm"] / layout.FINISH_WEIGHTS)["linear1.weight"],
                              gsm.read_hdf5(folders["base"] / layout.FINISH_WEIGHTS)["linear1.weight"])


def test_lenet300_second_run_trains_nothing(lenet300_run, mnist_root, monkeypatch, capsys):
    out_root, first, _ = lenet300_run
    assert first.returncode == 0, first.stderr
    before = snapshot(out_root)
    status, out, err = call_script("lenet300", ["60", *SMOKE, "--out-root", out_root, "--data-root", mnist_root],
                                   monkeypatch, capsys)
    assert status == 0, err
    assert snapshot(out_root) == before  # no file written, rewritten or touched
    assert "validate at epoch" not in out and "start training" not in out


def test_released_recipe_has_its_own_gsm_folders(lenet300_run, tmp_path, mnist_root, monkeypatch, capsys,
                                                 single_thread):
    source, first, _ = lenet300_run
    assert first.returncode == 0, first.stderr
    out_root = tmp_path / "out"
    shutil.copytree(source, out_root)
    shared = {kind: snapshot(exps(out_root) / name)
              for kind, name in folder_names("lenet300", 60).items() if kind in ("base", "magnitude_retrain")}
    status, _, err = call_script("lenet300", ["60", "--recipe", "released", *SMOKE, "--out-root", out_root,
                                              "--data-root", mnist_root], monkeypatch, capsys)
    assert status == 0, err
    assert entries(exps(out_root)) == sorted(
        set(folder_names("lenet300", 60).values()) | set(folder_names("lenet300", 60, "released").values()))
    assert "lottery_lenet300_compress60_released_gsm" in set(entries(exps(out_root)))
    for kind, files in shared.items():
        assert snapshot(exps(out_root) / folder_names("lenet300", 60)[kind]) == files, kind
    # The released recipe runs 3 GSM epochs (280 x 0.01 = 2.8): evaluations at 0, 2 and 3.
    folders = check_lottery_folders(out_root, "lenet300", 60, recipe="released", gsm_epochs=(0, 2, 3))
    assert '"recipe": "released"' in (folders["gsm"] / layout.STAGE_CONFIG).read_text()
    assert '"epochs": 280' in (folders["gsm"] / layout.STAGE_CONFIG).read_text()


def test_show_log_lists_the_experiments(lenet300_run, monkeypatch, capsys):
    out_root, first, _ = lenet300_run
    assert first.returncode == 0, first.stderr
    status, shown, err = call_script("show_log", [out_root], monkeypatch, capsys)
    assert status == 0, err
    rows = shown.splitlines()
    names = folder_names("lenet300", 60)
    pruned_name = names["gsm"] + "_pruned"
    assert [row.split()[0] for row in rows] == sorted([*names.values(), pruned_name])
    for row in rows:
        if row.startswith(pruned_name):  # the hard-pruned model: one evaluation, its kept count
            assert "n=1" in row.split() and "kept=4437/266200" in row.split(), row
        else:
            assert "n=2" in row.split() and "last_epoch=2" in row.split(), row
    # The base row's top1 is the mean of its log's two evaluations.
    base_top1 = [float(re.search(r"top1=(\S+),", line).group(1))
                 for _, line in evaluations(exps(out_root) / names["base"] / layout.LOG)]
    base_row = dict(field.split("=") for field in rows[0].split()[1:])
    assert float(base_row["top1"]) == pytest.approx(sum(base_top1) / 2, abs=5e-4)

    grepped = subprocess.run(f'"{sys.executable}" "{SHOW_LOG}" | grep retrain', shell=True, cwd=out_root,
                             capture_output=True, text=True, timeout=60)
    assert grepped.returncode == 0
    assert [row.split()[0] for row in grepped.stdout.splitlines()] == [names["gsm_retrain"],
                                                                      names["magnitude_retrain"]]


def test_lenet5_lottery_end_to_end(tmp_path, mnist_root, monkeypatch, capsys, single_thread):
    # In process through the script's main (the lenet5 script's own process is run in script_failures).
    out_root = tmp_path / "out"
    monkeypatch.setenv("MNIST_PATH", str(mnist_root))
    layouts = []  # every stage trains LeNet-5 in channels_last, on its images in that layout
    original_train_stage = gsm.experiments.pipeline.train_stage

    def recording_train_stage(model, folder, config, train_loader, *args, **kwargs):
        images, _ = next(iter(train_loader))
        layouts.append((model.stem.conv2.weight.is_contiguous(memory_format=torch.channels_last),
                        train_loader.channels_last, images.is_contiguous(memory_format=torch.channels_last)))
        return original_train_stage(model, folder, config, train_loader, *args, **kwargs)

    for module in (gsm.experiments.lottery, gsm.experiments.pipeline):
        monkeypatch.setattr(module, "train_stage", recording_train_stage)
    status, out, err = call_script("lenet5", ["125", *SMOKE, "--out-root", out_root], monkeypatch, capsys)
    assert status == 0, err
    assert layouts == [(True, True, True)] * 4  # base, GSM, the two retrains
    assert "hard-pruned model: kept 3444 of 430500" in out
    assert entries(exps(out_root)) == sorted(folder_names("lenet5", 125).values())
    check_lottery_folders(out_root, "lenet5", 125)


# ---------------------------------------------------------------------------------------------------------
# Bad input: usage errors exit 2 with a one-line error, data errors exit 1 with one line, never a traceback.
# Each script process spends ~2 CPU-seconds importing torch, so the argument checks run in process through
# the scripts' own main and run_main (exactly what `python gsm/<script>.py` calls), and a few cases run as
# real processes to check the exit status and stderr of the script itself.


def assert_usage_error(status, out: str, err: str, script: str, message: str):
    assert status == 2, (status, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"usage: {script}")
    error_lines = [line for line in lines if "error:" in line]
    assert error_lines == [lines[-1]], err
    assert lines[-1].startswith(f"{script}: error: ")
    assert message in lines[-1], lines[-1]
    assert out == ""


@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
@pytest.mark.parametrize("ratio_args, message", [
    ([], "the following arguments are required: ratio"),
    (["abc"], "compression ratio must be a number > 1, got 'abc'"),
    (["1"], "compression ratio must be a finite number > 1, got '1'"),
    (["0"], "got '0'"),
    (["-5"], "got '-5'"),
    (["nan"], "got 'nan'"),
    (["inf"], "got 'inf'"),
    (["1e999"], "got '1e999'"),
    (["60", "--bogus"], "unrecognized arguments: --bogus"),
    (["60", "--recipe", "foo"], "argument --recipe: invalid choice: 'foo'"),
    (["60", "--scale", "0"], "argument --scale: expected a positive number, got '0'"),
    (["60", "--scale", "nan"], "argument --scale: expected a positive number, got 'nan'"),
    (["60", "--device", "nonsense"], "--device: unknown device 'nonsense'"),
])
def test_bad_arguments_exit_2_with_one_line(net, ratio_args, message, tmp_path, mnist_root, monkeypatch, capsys):
    out_root = tmp_path / "out"
    # The case's arguments last, so that they override the smoke options (e.g. --device).
    status, out, err = call_script(net, [*SMOKE, "--out-root", out_root, "--data-root", mnist_root, *ratio_args],
                                   monkeypatch, capsys)
    assert_usage_error(status, out, err, f"gsm_lottery_ticket_{net}.py", message)
    assert not out_root.exists(), "nothing is written before the arguments are valid"


def test_unwritable_out_root_is_a_usage_error(tmp_path, mnist_root, monkeypatch, capsys):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    out_root = tmp_path / "file.txt" / "sub"
    status, out, err = call_script("lenet300", ["60", *SMOKE, "--out-root", out_root, "--data-root", mnist_root],
                                   monkeypatch, capsys)
    assert_usage_error(status, out, err, "gsm_lottery_ticket_lenet300.py", f"--out-root: cannot create {out_root}")


def test_help_names_the_options(monkeypatch, capsys):
    for net in SCRIPTS:
        status, out, err = call_script(net, ["--help"], monkeypatch, capsys)
        assert status == 0
        for option in ("--scale", "--recipe", "--device", "--seed", "--out-root", "--data-root", "--no-progress",
                       "paper", "released"):
            assert option in out, (net, option)
        assert err == ""


@pytest.fixture(scope="module")
def script_failures(tmp_path_factory):
    """Three failing script processes, run side by side: a bad ratio (lenet300), an unwritable out-root
    (lenet5), and an empty data root with downloads refused (lenet300)."""
    work = tmp_path_factory.mktemp("script_failures")
    (work / "file.txt").write_text("a file, not a folder")
    (work / "empty_data").mkdir()
    cases = {
        "bad_ratio": ("lenet300", ["abc", *SMOKE, "--out-root", work / "out_bad_ratio"], {}),
        "unwritable": ("lenet5", ["125", *SMOKE, "--out-root", work / "file.txt" / "sub"], {}),
        "missing_mnist": ("lenet300", ["60", *SMOKE, "--out-root", work / "out_missing"],
                          {"MNIST_PATH": str(work / "empty_data")}),
    }

    def run(item):
        name, (net, args, env) = item
        started = time.perf_counter()
        result = run_script(net, args, cwd=work, **env)
        return name, (result, time.perf_counter() - started)

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        return dict(pool.map(run, cases.items())), work


def test_script_process_usage_errors(script_failures):
    runs, work = script_failures
    result, _ = runs["bad_ratio"]
    assert_usage_error(result.returncode, result.stdout, result.stderr, "gsm_lottery_ticket_lenet300.py",
                       "got 'abc'")
    assert not (work / "out_bad_ratio").exists()
    result, _ = runs["unwritable"]
    assert_usage_error(result.returncode, result.stdout, result.stderr, "gsm_lottery_ticket_lenet5.py",
                       "--out-root: cannot create")


def test_missing_mnist_is_one_line_naming_path_and_variable(script_failures):
    runs, work = script_failures
    result, seconds = runs["missing_mnist"]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gsm_lottery_ticket_lenet300.py: error: ")
    assert str(work / "empty_data" / "MNIST" / "raw" / "train-images-idx3-ubyte") in lines[0]
    assert "MNIST_PATH" in lines[0]
    assert (work / "out_missing").is_dir()  # the missing out-root was created; no stage folder was
    assert not exps(work / "out_missing").exists()
    assert seconds < 60, "a refused download must fail fast"


def test_another_seed_on_a_used_out_root_is_refused(lenet300_run, mnist_root, monkeypatch, capsys):
    out_root, first, _ = lenet300_run
    assert first.returncode == 0, first.stderr
    before = snapshot(out_root)
    status, _, err = call_script("lenet300", ["60", *SMOKE, "--seed", "1", "--out-root", out_root,
                                              "--data-root", mnist_root], monkeypatch, capsys)
    assert status == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "lottery_lenet300_base holds a finished stage with another configuration (differs in: seed)" in lines[0]
    assert snapshot(out_root) == before


def test_interrupt_exits_130_and_the_rerun_completes(tmp_path, mnist_root, monkeypatch, capsys, single_thread):
    out_root = tmp_path / "out"
    args = ["60", *SMOKE, "--out-root", out_root, "--data-root", mnist_root]
    original_step = GSM.step

    def interrupt(self, closure=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(GSM, "step", interrupt)
    status, _, err = call_script("lenet300", args, monkeypatch, capsys)
    assert status == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted; run the same command again to resume" in lines[0], err
    monkeypatch.setattr(GSM, "step", original_step)
    status, _, err = call_script("lenet300", args, monkeypatch, capsys)
    assert status == 0, err
    check_lottery_folders(out_root, "lenet300", 60)


# ---------------------------------------------------------------------------------------------------------
# Resume across stages (in process)


def _config(out_root: Path, mnist_root: Path) -> LotteryConfig:
    options = RunOptions(scale=0.01, device="cpu", seed=0, out_root=str(out_root), data_root=str(mnist_root),
                         progress=False)
    return LotteryConfig("lenet300", (5.0,), "paper", options)


def test_interrupted_gsm_stage_resumes_to_the_uninterrupted_result(tmp_path, mnist_root, monkeypatch,
                                                                    single_thread):
    clean_root, resumed_root = tmp_path / "clean", tmp_path / "resumed"
    clean = run_lottery(_config(clean_root, mnist_root))

    # Interrupt the GSM stage at its 3rd step: epoch 1, iteration 0 (2 iterations per epoch).
    original_step = GSM.step
    steps = []

    def interrupting_step(self, closure=None):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return original_step(self, closure)

    monkeypatch.setattr(GSM, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        run_lottery(_config(resumed_root, mnist_root))
    monkeypatch.setattr(GSM, "step", original_step)

    names = folder_names("lenet300", 5)
    gsm_folder = exps(resumed_root) / names["gsm"]
    assert torch.load(gsm_folder / layout.CHECKPOINT, weights_only=True)["next_epoch"] == 1
    assert not (gsm_folder / layout.FINISH_WEIGHTS).exists()
    assert entries(exps(resumed_root)) == [names["base"], names["gsm"]]
    base_files = snapshot(exps(resumed_root) / names["base"])

    resumed = run_lottery(_config(resumed_root, mnist_root))
    assert set(resumed[5.0]) == set(clean[5.0]) == {"base", "gsm", "gsm_retrain", "magnitude_retrain"}
    assert snapshot(exps(resumed_root) / names["base"]) == base_files  # the base was not retrained
    gsm_log = (gsm_folder / layout.LOG).read_text()
    assert gsm_log.count("resumed from checkpoint.pt at epoch 1") == 1
    for kind, name in names.items():
        files = [layout.INIT_WEIGHTS, layout.FINISH_WEIGHTS] + (
            [layout.PRUNED_WEIGHTS] if kind == "gsm" else [])
        for file_name in files:
            assert_same_file_arrays(exps(resumed_root) / name / file_name, exps(clean_root) / name / file_name)
        assert evaluations(exps(resumed_root) / name / layout.LOG) == \
            evaluations(exps(clean_root) / name / layout.LOG), kind
    folders = check_lottery_folders(resumed_root, "lenet300", 5)
    # The tickets are live: retraining moves their kept weights and lowers the test loss, so the zeros checked
    # above were held by the gradient mask, not by a dead network.
    for kind in ("gsm_retrain", "magnitude_retrain"):
        ticket = gsm.read_hdf5(folders[kind] / layout.INIT_WEIGHTS)["linear1.weight"]
        finish = gsm.read_hdf5(folders[kind] / layout.FINISH_WEIGHTS)["linear1.weight"]
        kept = ticket != 0
        assert kept.sum() > 1000 and (finish[kept] != ticket[kept]).mean() > 0.99, kind
        losses = [float(line.rsplit("loss=", 1)[1]) for _, line in evaluations(folders[kind] / layout.LOG)]
        assert losses[-1] < losses[0], (kind, losses)


def test_a_run_on_a_terminal_prints_progress_and_log_lines_only(tmp_path, mnist_root):
    """Under a pseudo-terminal (so that the progress bars draw, as for a user at a console), the console shows
    no warning of any kind."""
    import pty
    import select

    import fcntl
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size
    process = subprocess.Popen([sys.executable, str(SCRIPTS["lenet300"]), "5", "--scale", "0.01", "--device", "cpu",
                                "--out-root", str(tmp_path / "out"), "--data-root", str(mnist_root)],
                               cwd=tmp_path, env=script_env(), stdin=secondary,
                               stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    output = b""
    deadline = time.time() + 300
    while time.time() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed: the process ended
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(primary)
    assert process.wait(timeout=60) == 0, output.decode(errors="replace")[-2000:]
    text = output.decode(errors="replace")
    assert "validate at epoch" in text and ("it/s" in text or "s/it" in text)  # log lines and progress bars
    assert "Warning" not in text and "warn" not in text.lower(), text[-3000:]
