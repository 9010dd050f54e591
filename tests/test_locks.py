"""One run per experiment folder, with real concurrent processes: a run whose own folders are in use exits at
once, a shared folder (the base) is waited for, a killed run never blocks the next, and under torchrun the
ranks other than 0 learn that rank 0 gave up. Plus whole log lines and an atomic config.json."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import write_fake_mnist
from gsm.experiments import layout
from gsm.atomic_write import write_text_atomic
from gsm.experiments.folder_lock import FolderLock, lock_or_fail, FolderBusy
from gsm.experiments.train_log import StageLog
from script_runs import REPO_ROOT, SCRIPTS, run_script, script_env

pytestmark = pytest.mark.skipif(os.name != "posix", reason="folder locks are POSIX flock")

ARGS = ["5", "--scale", "0.01", "--device", "cpu", "--no-progress"]
BASE, OWN_GSM = "lottery_lenet300_base", "lottery_lenet300_compress5_gsm"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("lock_data"), num_train=512, num_test=128)


def hold_lock(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process that takes `folder`'s lock, says so on stdout, holds it `seconds`, then exits."""
    code = ("import sys, time; from gsm.experiments.folder_lock import FolderLock; lock = FolderLock(sys.argv[1]); "
            "assert lock.try_acquire(); print('locked', flush=True); time.sleep(float(sys.argv[2]))")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), str(seconds)], stdout=subprocess.PIPE,
                              text=True, env=script_env())
    assert holder.stdout.readline().strip() == "locked"
    return holder


def lenet300_command(out_root: Path, data_root: Path, ratio: str = "5") -> list:
    return [sys.executable, str(SCRIPTS["lenet300"]), ratio, *map(str, ARGS[1:]), "--out-root", str(out_root),
            "--data-root", str(data_root)]


def run_lenet300(out_root: Path, data_root: Path, cwd: Path, ratio: str = "5") -> subprocess.CompletedProcess:
    return run_script("lenet300", [ratio, *ARGS[1:], "--out-root", out_root, "--data-root", data_root], cwd)


def test_a_run_whose_own_folder_is_in_use_exits_at_once(data_root, tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out / layout.LOTTERY_EXPS / OWN_GSM, 120)
    try:
        started = time.perf_counter()
        result = run_lenet300(out, data_root, tmp_path)
        elapsed = time.perf_counter() - started
    finally:
        holder.kill()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and OWN_GSM in lines[0] and f"pid {holder.pid}" in lines[0], lines
    assert elapsed < 60
    # Nothing was written: the run stopped before its first stage.
    assert not [p for p in (out / layout.LOTTERY_EXPS).iterdir() if not p.name.startswith(".")]


def wait_for_file(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_shared_base_is_waited_for_then_used(data_root, tmp_path):
    """The run waits for the base's lock, which this test holds until the run has taken its own folders' locks
    and reached the base, then trains the base itself."""
    out = tmp_path / "out"
    holder = FolderLock(out / layout.LOTTERY_EXPS / BASE)
    assert holder.try_acquire()
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(run_lenet300, out, data_root, tmp_path)
        try:
            # The run locks its own GSM folders, builds its model, then asks for the base: give it that time.
            wait_for_file(holder.path.parent / f"{OWN_GSM}.lock")
            time.sleep(2.0)
        finally:
            holder.release()
        result = running.result()
    assert result.returncode == 0, result.stderr
    waiting = [line for line in result.stderr.splitlines() if line.startswith("waiting for")]
    assert len(waiting) == 1 and BASE in waiting[0] and f"pid {os.getpid()}" in waiting[0]
    assert (out / layout.LOTTERY_EXPS / BASE / layout.FINISH_WEIGHTS).exists()


def test_a_killed_run_never_blocks_the_next(data_root, tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out / layout.LOTTERY_EXPS / OWN_GSM, 120)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = run_lenet300(out, data_root, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "waiting" not in result.stderr


def test_two_runs_started_together_train_each_stage_once(data_root, tmp_path):
    """While a run trains, a second copy of the same command exits at once, and a run on another ratio waits
    for the base and then uses it: the base is trained once, and every log holds single lines."""
    out = tmp_path / "out"
    first = subprocess.Popen(lenet300_command(out, data_root), cwd=tmp_path, env=script_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock_file = out / layout.LOTTERY_EXPS / ".locks" / f"{BASE}.lock"
    deadline = time.time() + 60
    while not (lock_file.exists() and lock_file.read_text().strip() == str(first.pid)) and time.time() < deadline:
        time.sleep(0.02)
    same = run_lenet300(out, data_root, tmp_path)
    other_ratio = run_lenet300(out, data_root, tmp_path, ratio="4")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert same.returncode == 1 and OWN_GSM in same.stderr
    assert other_ratio.returncode == 0, other_ratio.stderr
    base_log = (out / layout.LOTTERY_EXPS / BASE / layout.LOG).read_text()
    assert base_log.count("start training") == 1
    for log in (out / layout.LOTTERY_EXPS).glob("*/log.txt"):
        lines = log.read_text().splitlines()
        assert len(lines) == len(set(lines)), f"{log}: doubled lines"


def test_lock_within_one_process_and_release(tmp_path):
    folder = tmp_path / "exps" / "stage"
    first = lock_or_fail(folder)
    assert first.held and first.owner() == os.getpid()
    with pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):
        lock_or_fail(folder)  # a second open file description conflicts, also in the same process
    first.release()
    with FolderLock(folder) as again:
        assert again.try_acquire()
    assert not folder.exists()  # the lock lives beside the folder, which it does not create


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_all_stop_when_rank_0_cannot_lock(tmp_path):
    """gsm_rc56.py under torchrun (2 gloo ranks): rank 0 finds the GSM folder in use and exits with the
    one-line error; rank 1 learns it and exits too, instead of waiting in a collective."""
    from test_rc56 import write_fake_cifar10

    data = write_fake_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    holder = hold_lock(layout.rc_gsm_dir(out, "rc20", 10), 120)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
             str(REPO_ROOT / "gsm" / "gsm_rc56.py"), "--arch", "rc20", "--scale", "0.002", "--device", "cpu",
             "--data-root", str(data), "--out-root", str(out), "--no-progress"],
            cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
    assert result.returncode != 0
    assert "rc20_gsm is in use by another run" in result.stderr
    assert "rank 0 could not lock" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Whole lines, atomic config


def test_log_lines_are_whole_after_a_partial_write(tmp_path):
    path = tmp_path / "log.txt"
    path.write_bytes(b"2026-01-01 00:00:00,000 train INFO: first\n2026-01-01 00:00:01,000 train INFO: hard-pru")
    log = StageLog(path, echo=False)
    assert [line.split("INFO: ")[1] for line in log.complete_lines()] == ["first"]
    log.info("second")
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and [line.split("INFO: ")[1] for line in lines[:-1]] == ["first", "second"]


def test_the_hard_prune_is_done_when_its_result_file_is_there(tmp_path, mnist_loaders):
    """The GSM stage's result is data (finish_pruned.json), not a sentence searched for in the log: with it and
    finish_pruned.hdf5 in place the stage is done, whatever the log holds; without it the prune is evaluated
    and recorded again, with the same numbers (the prune is deterministic)."""
    import torch
    from base_model import build_model
    from gsm.experiments.configs import LENET_GSM, gsm_config
    from gsm.experiments.pipeline import HARD_PRUNE_MARKER, gsm_stage
    from gsm.experiments.train_log import PruneResult

    train, test = mnist_loaders
    config = gsm_config(LENET_GSM["paper"], 5).scaled(0.004)  # one epoch
    folder = tmp_path / "gsm"
    torch.manual_seed(0)
    gsm_stage(build_model("lenet300"), folder, config, train, test, stage_config={"t": 1}, progress=False)
    log_path, result_path = folder / layout.LOG, folder / layout.PRUNED_RESULT
    result = PruneResult.load(result_path)
    whole = log_path.read_text()
    assert whole.count(HARD_PRUNE_MARKER) == 1 and f"top1={result.top1:.5f}" in whole.splitlines()[-1]
    assert result.prunable == 266200 and result.keep_count <= result.kept <= result.keep_count + 1
    log_path.write_text(whole[: whole.index(HARD_PRUNE_MARKER)])  # the log says nothing of the prune now
    gsm_stage(build_model("lenet300"), folder, config, train, test, stage_config={"t": 1}, progress=False)
    assert HARD_PRUNE_MARKER not in log_path.read_text() and PruneResult.load(result_path) == result
    result_path.unlink()
    gsm_stage(build_model("lenet300"), folder, config, train, test, stage_config={"t": 1}, progress=False)
    assert PruneResult.load(result_path) == result and log_path.read_text().count(HARD_PRUNE_MARKER) == 1


def test_config_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    write_text_atomic(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        write_text_atomic(path, '{"a": 2}')
    assert path.read_text() == '{"a": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
