"""Fault injection. Real runs of the LeNet-300-100 lottery script are killed with SIGKILL at chosen points
(mid-epoch, mid-write of a checkpoint or weights file, between stages) and the same command is run again:
the results must equal an uninterrupted run's bit for bit, no log line may be lost or doubled, and no stage
may be trained twice from scratch. Also: a disk that fills up during a checkpoint write, and the divergence
guard at the script level."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch

import dataset
import gsm
import gsm.experiments.trainer as trainer
from base_model import build_model
from conftest import write_fake_mnist
from crafted import MakesFolder
from gsm.experiments import layout
from gsm.experiments.checkpoint import remove_stale_temp_files
from gsm.experiments.configs import TrainConfig
from gsm.experiments.trainer import TrainingDiverged, train_stage
from gsm.wrappers import unwrap_model
from loader_hooks import BatchHookLoader, nan_images
from script_runs import call_script, entries, fingerprint, run_script

# 2048 training images at the LeNet batch of 256: 8 iterations per epoch. At --scale 0.01 every stage runs
# 2 epochs (base and retrains: 200 x 0.01; GSM: 240 x 0.01 rounded). Ratio 5 keeps weights in every layer,
# so both tickets are live networks.
NUM_TRAIN, NUM_TEST = 2048, 256
ARGS = ["5", "--scale", "0.01", "--device", "cpu", "--no-progress"]
FOLDERS = {"base": "lottery_lenet300_base", "gsm": "lottery_lenet300_compress5_gsm",
           "gsm_retrain": "lottery_lenet300_compress5_gsm_retrain",
           "magnitude_retrain": "lottery_lenet300_compress5_magnitude_retrain"}
INIT, FINISH, PRUNED = layout.INIT_WEIGHTS, layout.FINISH_WEIGHTS, layout.PRUNED_WEIGHTS
CONFIG, LOG, CHECKPOINT = layout.STAGE_CONFIG, layout.LOG, layout.CHECKPOINT
TEMP_NAME = re.compile(r"\.tmp\d+$")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} train INFO: (.*)$")


@dataclass(frozen=True)
class Kill:
    """One SIGKILL, in the stage folder of `kind`, and what the files must look like right after it."""
    name: str
    kind: str
    point: dict  # for tests/kill_run.py, less the folder
    checkpoint: Dict[str, Optional[int]]  # {kind: next_epoch of its checkpoint.pt, None: no checkpoint}
    finished: tuple = ()  # exactly the kinds whose finish.hdf5 exists
    temp: tuple = ()  # exactly the kinds whose folder holds a temp file `*.tmp<pid>`
    present: Dict[str, bool] = field(default_factory=dict)  # {"kind" or "kind/file": exists}


# Two chains of kills: each run of the command is killed at the next point, the last run completes. Each
# rerun is the same command, so each kill is also a test of resuming from the state the previous one left.
CHAINS = {
    "boundaries": [
        Kill("base_mid_epoch", "base", {"at": "batch", "epoch": 1, "iteration": 4}, {"base": 1}),
        Kill("base_checkpoint_write", "base", {"at": "checkpoint", "next_epoch": 2}, {"base": 1},
             temp=("base",)),
        # After the base's finish.hdf5 is in place, before its checkpoint is removed: both exist.
        Kill("base_finish_renamed", "base", {"at": "renamed", "file": FINISH}, {"base": 2}, finished=("base",),
             present={"gsm": False}),
        Kill("gsm_first_checkpoint_write", "gsm", {"at": "checkpoint", "next_epoch": 1},
             {"base": None, "gsm": None}, finished=("base",), temp=("gsm",)),
        # After the GSM finish.hdf5, before the hard prune's finish_pruned.hdf5.
        Kill("gsm_finish_renamed", "gsm", {"at": "renamed", "file": FINISH}, {"gsm": 2},
             finished=("base", "gsm"), present={"gsm/" + PRUNED: False}),
        Kill("pruned_write", "gsm", {"at": "hdf5_partial", "file": PRUNED, "datasets": 3}, {"gsm": None},
             finished=("base", "gsm"), temp=("gsm",), present={"gsm/" + PRUNED: False}),
        # After the hard prune's log line, before the retrains start.
        Kill("hard_prune_logged", "gsm", {"at": "logged", "marker": "hard-pruned model:"}, {"gsm": None},
             finished=("base", "gsm"), present={"gsm/" + PRUNED: True, "gsm_retrain": False}),
    ],
    "mid_stage": [
        Kill("base_first_epoch", "base", {"at": "batch", "epoch": 0, "iteration": 3}, {"base": None},
             present={"base/" + INIT: True}),
        Kill("gsm_mid_epoch", "gsm", {"at": "batch", "epoch": 1, "iteration": 5}, {"base": None, "gsm": 1},
             finished=("base",)),
        Kill("gsm_finish_write", "gsm", {"at": "hdf5_partial", "file": FINISH, "datasets": 2}, {"gsm": 2},
             finished=("base",), temp=("gsm",)),
        Kill("gsm_retrain_mid_epoch", "gsm_retrain", {"at": "batch", "epoch": 1, "iteration": 2},
             {"gsm": None, "gsm_retrain": 1}, finished=("base", "gsm")),
        Kill("magnitude_retrain_checkpoint_write", "magnitude_retrain", {"at": "checkpoint", "next_epoch": 2},
             {"gsm_retrain": None, "magnitude_retrain": 1}, finished=("base", "gsm", "gsm_retrain"),
             temp=("magnitude_retrain",)),
    ],
}
KILLS = [(chain, index) for chain, kills in CHAINS.items() for index in range(len(kills))]
KILL_IDS = [CHAINS[chain][index].name for chain, index in KILLS]


@dataclass
class Step:
    kill: Kill
    result: subprocess.CompletedProcess
    state: dict  # observe() right after the kill


@dataclass
class ChainRun:
    steps: List[Step]
    final: subprocess.CompletedProcess
    final_state: dict
    out_root: Path

    def state_after(self, index: int) -> dict:
        """The files after the run that followed kill `index` (killed at the next point, or the last run)."""
        return self.steps[index + 1].state if index + 1 < len(self.steps) else self.final_state


@dataclass
class FaultRuns:
    data_root: Path
    reference: subprocess.CompletedProcess
    reference_root: Path
    chains: Dict[str, ChainRun]


def exps(out_root: Path) -> Path:
    return Path(out_root) / layout.LOTTERY_EXPS


def observe(out_root: Path) -> dict:
    """{kind: {"files": fingerprints, "checkpoint": next_epoch or None, "log": text}} of each stage folder.
    Loading every checkpoint also checks that no kill ever leaves an unreadable one."""
    state = {}
    for kind, name in FOLDERS.items():
        folder = exps(out_root) / name
        if not folder.is_dir():
            continue
        checkpoint = folder / CHECKPOINT
        state[kind] = {
            "files": fingerprint(folder),
            "checkpoint": torch.load(checkpoint, weights_only=True)["next_epoch"] if checkpoint.exists() else None,
            "log": (folder / LOG).read_text() if (folder / LOG).exists() else "",
        }
    return state


def run_chain(kills: List[Kill], out_root: Path, data_root: Path, cwd: Path) -> ChainRun:
    args = [*ARGS, "--out-root", out_root, "--data-root", data_root]
    steps = []
    for kill in kills:
        point = json.dumps({**kill.point, "folder": FOLDERS[kill.kind]})
        steps.append(Step(kill, run_script("lenet300", args, cwd, kill_point=point), observe(out_root)))
    final = run_script("lenet300", args, cwd)
    return ChainRun(steps, final, observe(out_root), out_root)


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory) -> FaultRuns:
    """The uninterrupted reference run and the two chains of killed runs, side by side on the two cores."""
    work = tmp_path_factory.mktemp("faults")
    data_root = write_fake_mnist(work / "data", num_train=NUM_TRAIN, num_test=NUM_TEST)
    reference_root = work / "reference"

    def reference_then_mid_stage():
        reference = run_script("lenet300", [*ARGS, "--out-root", reference_root, "--data-root", data_root], work)
        return reference, run_chain(CHAINS["mid_stage"], work / "mid_stage", data_root, work)

    with ThreadPoolExecutor(max_workers=2) as pool:
        boundaries = pool.submit(run_chain, CHAINS["boundaries"], work / "boundaries", data_root, work)
        reference, mid_stage = pool.submit(reference_then_mid_stage).result()
        chains = {"boundaries": boundaries.result(), "mid_stage": mid_stage}
    return FaultRuns(data_root, reference, reference_root, chains)


def events(log_path: Path) -> List[str]:
    """The log's messages without timestamps, less the `epoch N done` lines (they carry timings) and the
    `resumed from` lines: what remains (start, evaluations, hard prune) must match an uninterrupted run."""
    messages = []
    for line in Path(log_path).read_text().splitlines():
        match = LOG_LINE.match(line)
        assert match, f"{log_path}: malformed line {line!r}"  # no partial or glued lines
        message = match.group(1)
        if not re.match(r"epoch \d+ done: ", message) and not message.startswith("resumed from "):
            messages.append(message)
    return messages


def assert_same_arrays(path: Path, expected_path: Path) -> None:
    actual, expected = gsm.read_hdf5(path), gsm.read_hdf5(expected_path)
    assert list(actual) == list(expected), path
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, (path, key)
        assert np.array_equal(actual[key], expected[key]), (path, key)


def assert_same_results(out_root: Path, reference_root: Path) -> None:
    """Every stage folder holds the reference's files (no checkpoint or temp file left), the same arrays bit
    for bit, the same configuration and the same sequence of logged events."""
    for kind, name in FOLDERS.items():
        folder, expected = exps(out_root) / name, exps(reference_root) / name
        assert entries(folder) == entries(expected), kind
        for file_name in (INIT, FINISH, PRUNED):
            if (expected / file_name).exists():
                assert_same_arrays(folder / file_name, expected / file_name)
        assert (folder / CONFIG).read_bytes() == (expected / CONFIG).read_bytes(), kind
        assert events(folder / LOG) == events(expected / LOG), kind


# ---------------------------------------------------------------------------------------------------------
# Killed runs


def test_reference_run(fault_runs):
    reference = fault_runs.reference
    assert reference.returncode == 0, reference.stderr[-3000:]
    folders = {kind: exps(fault_runs.reference_root) / name for kind, name in FOLDERS.items()}
    assert entries(exps(fault_runs.reference_root)) == sorted(FOLDERS.values())
    # What the comparisons compare: each stage starts once and evaluates at epochs 0 and 2; GSM also logs its
    # prune readiness at each evaluation and a hard-pruned copy at the end, then prunes.
    for kind, folder in folders.items():
        logged = [m.split(":")[0].split(",")[0] for m in events(folder / LOG)]
        assert events(folder / LOG)[0].startswith("start training: ") and f'"stage": "{kind}"' in events(
            folder / LOG)[0], kind
        if kind == "gsm":
            assert logged[1:] == ["validate at epoch 0", "prune readiness at epoch 0", "validate at epoch 2",
                                  "prune readiness at epoch 2", "hard-pruned copy at epoch 2", "hard-pruned model"]
        else:
            assert logged[1:] == ["validate at epoch 0", "validate at epoch 2"], kind
    assert events(folders["gsm"] / LOG)[-1].startswith("hard-pruned model: kept 53240 of 266200 prunable weights")
    # Eight iterations per epoch, so the mid-epoch kill points lie inside epochs.
    train_loader, _ = dataset.build_loaders("mnist", 256, "cpu", root=str(fault_runs.data_root), download=False)
    assert len(train_loader) == 8


@pytest.mark.parametrize("chain, index", KILLS, ids=KILL_IDS)
def test_kill_is_a_sigkill_that_leaves_the_expected_files(fault_runs, chain, index):
    step = fault_runs.chains[chain].steps[index]
    kill, state = step.kill, step.state
    assert step.result.returncode == -signal.SIGKILL, step.result.stderr[-3000:]
    assert "Traceback" not in step.result.stderr
    assert {kind for kind, s in state.items() if FINISH in s["files"]} == set(kill.finished)
    assert {kind for kind, s in state.items() if any(TEMP_NAME.search(f) for f in s["files"])} == set(kill.temp)
    for kind, next_epoch in kill.checkpoint.items():
        assert state[kind]["checkpoint"] == next_epoch, kind
    for what, exists in kill.present.items():
        kind, _, file_name = what.partition("/")
        assert (kind in state and (not file_name or file_name in state[kind]["files"])) == exists, what
    if kill.name == "hard_prune_logged":
        assert state["gsm"]["log"].count("hard-pruned model:") == 1


@pytest.mark.parametrize("chain, index", KILLS, ids=KILL_IDS)
def test_rerun_continues_the_killed_stage_without_training_it_again(fault_runs, chain, index):
    run = fault_runs.chains[chain]
    step, after = run.steps[index], run.state_after(index)
    kind = step.kill.kind
    before = step.state[kind]
    log = after[kind]["log"]
    assert log.count("start training") == 1, kind
    if kind in step.kill.finished:
        # A finished stage is skipped: its files are neither rewritten nor touched.
        for file_name in (INIT, FINISH, CONFIG):
            assert after[kind]["files"][file_name] == before["files"][file_name], file_name
        assert log.startswith(before["log"])
        assert CHECKPOINT not in after[kind]["files"]  # the one a kill left beside finish.hdf5 is gone
    elif before["checkpoint"] is None:
        # Killed before the stage's first checkpoint: it starts over, without doubling a line.
        assert "resumed from" not in log
    else:
        # Resumed from the checkpoint, not started over: init.hdf5 is the original file, untouched.
        assert f"resumed from {CHECKPOINT} at epoch {before['checkpoint']}" in log
        assert after[kind]["files"][INIT] == before["files"][INIT]


@pytest.mark.parametrize("chain", CHAINS)
def test_finished_stages_are_never_touched_again(fault_runs, chain):
    run = fault_runs.chains[chain]
    states = [step.state for step in run.steps] + [run.final_state]
    for kind in FOLDERS:
        first = next(i for i, state in enumerate(states) if kind in state and FINISH in state[kind]["files"])
        finished = states[first][kind]
        for later in states[first + 1:]:
            for file_name in (INIT, FINISH, CONFIG, PRUNED):
                if file_name in finished["files"]:
                    assert later[kind]["files"][file_name] == finished["files"][file_name], (kind, file_name)
            if kind == "gsm":  # the hard prune appends its line once the GSM training has finished
                assert later[kind]["log"].startswith(finished["log"])
            else:
                assert later[kind]["log"] == finished["log"], kind


@pytest.mark.parametrize("chain", CHAINS)
def test_killed_and_rerun_equals_uninterrupted(fault_runs, chain):
    run = fault_runs.chains[chain]
    assert run.final.returncode == 0, run.final.stderr[-3000:]
    assert "Traceback" not in run.final.stderr
    assert_same_results(run.out_root, fault_runs.reference_root)


def test_stale_temp_files_are_removed_unless_their_writer_runs(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()  # a pid that no longer runs
    running = subprocess.Popen(["sleep", "60"])
    try:
        names = [f"checkpoint.pt.tmp{finished.pid}", f"finish.hdf5.tmp{finished.pid}",
                 f"init.hdf5.tmp{running.pid}", f"finish_pruned.hdf5.tmp{os.getpid()}",
                 "notes.tmp", "log.txt", "finish.hdf5"]
        for name in names:
            (tmp_path / name).write_text("x")
        (tmp_path / f"folder.tmp{finished.pid}").mkdir()
        removed = remove_stale_temp_files(tmp_path)
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:] + [f"folder.tmp{finished.pid}"])
    assert remove_stale_temp_files(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------------------
# A full disk during a checkpoint write (in process)


def test_disk_full_during_a_checkpoint_write(fault_runs, tmp_path, monkeypatch, capsys, single_thread):
    out_root = tmp_path / "out"
    args = [*ARGS, "--out-root", out_root, "--data-root", fault_runs.data_root]
    base = exps(out_root) / FOLDERS["base"]
    real_save = torch.save
    failed = []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        """The second base checkpoint: half of it reaches the temp file, then the disk is full."""
        name = str(getattr(f, "name", ""))
        if isinstance(obj, dict) and obj.get("next_epoch") == 2 and f"{base.name}/{CHECKPOINT}.tmp" in name:
            data = io.BytesIO()
            real_save(obj, data)
            f.write(data.getvalue()[: len(data.getvalue()) // 2])
            f.flush()
            failed.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    status, _, err = call_script("lenet300", args, monkeypatch, capsys)
    assert failed and status == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines == [lines[0]], err
    assert lines[0].startswith("gsm_lottery_ticket_lenet300.py: error: No space left on device; free some disk "
                               "space, then run the same command again to resume"), lines[0]
    # The previous checkpoint is intact and loadable, and the half-written temp file is gone.
    assert entries(base) == sorted([CHECKPOINT, CONFIG, INIT, LOG])
    checkpoint = torch.load(base / CHECKPOINT, weights_only=True)
    assert checkpoint["next_epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in checkpoint["model"].values())
    assert not (exps(out_root) / FOLDERS["gsm"]).exists()

    # Space is back: the same command resumes and ends where the uninterrupted run ends.
    monkeypatch.setattr(torch, "save", real_save)
    status, _, err = call_script("lenet300", args, monkeypatch, capsys)
    assert status == 0, err
    assert f"resumed from {CHECKPOINT} at epoch 1" in (base / LOG).read_text()
    assert_same_results(out_root, fault_runs.reference_root)


# ---------------------------------------------------------------------------------------------------------
# Divergence: the stage stops with the epoch and iteration, and the last good checkpoint stays


def poison(kind: str, at_epoch: int):
    """A stand-in for trainer.train_epoch that, in the first stage's epoch `at_epoch`, feeds NaN images at
    iteration 3 (kind "loss"), or lets the epoch end and then sets one bias to +inf, so that every loss of
    the epoch stays finite (kind "weights")."""
    real_train_epoch = trainer.train_epoch
    done = []

    def train_epoch(model, optimizer, loader, epoch, *args, **kwargs):
        hit = epoch == at_epoch and not done
        if hit:
            done.append(epoch)
        if hit and kind == "loss":
            loader = BatchHookLoader(loader, 3, nan_images)
        losses = real_train_epoch(model, optimizer, loader, epoch, *args, **kwargs)
        if hit and kind == "weights":
            with torch.no_grad():
                unwrap_model(model).linear2.bias[7] = float("inf")
        return losses

    return train_epoch


@pytest.mark.parametrize("kind, message", [
    ("loss", "non-finite loss at epoch 1, iteration 3 (global iteration 11); the last good checkpoint "),
    ("weights", "non-finite weights after epoch 1, iteration 7 (global iteration 15; every loss of the epoch "
                "was finite) in linear2.bias; the last good checkpoint "),
])
def test_divergence_stops_the_script_in_one_line_and_keeps_the_checkpoint(kind, message, fault_runs, tmp_path,
                                                                          monkeypatch, capsys, single_thread):
    out_root = tmp_path / "out"
    monkeypatch.setattr(trainer, "train_epoch", poison(kind, at_epoch=1))
    status, out, err = call_script("lenet300", [*ARGS, "--out-root", out_root, "--data-root",
                                                fault_runs.data_root], monkeypatch, capsys)
    assert status == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines == [lines[0]], err
    assert lines[0].startswith(f"gsm_lottery_ticket_lenet300.py: error: {message}"), lines[0]
    base = exps(out_root) / FOLDERS["base"]
    assert f"{base / CHECKPOINT} is kept: lower the learning rate or check the data, then rerun to resume" in lines[0]
    assert entries(base) == sorted([CHECKPOINT, CONFIG, INIT, LOG])
    checkpoint = torch.load(base / CHECKPOINT, weights_only=True)
    assert checkpoint["next_epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in checkpoint["model"].values())
    log = (base / LOG).read_text()
    assert "epoch 0 done" in log and "epoch 1 done" not in log  # the diverged epoch is not logged as done
    assert not (exps(out_root) / FOLDERS["gsm"]).exists()


# 8 iterations per epoch on the 512 images of the shared fake MNIST at batch 64.
SMALL = TrainConfig(epochs=3, batch_size=64, lr=0.05, lr_drop_epochs=(2,), momentum=0.9, weight_decay=5e-4,
                    warmup_epochs=1, bias_lr_factor=2.0)
STAGE = {"stage": "test", "train": SMALL.to_dict()}


def lenet300(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("lenet300")


def test_non_finite_weights_with_finite_losses_then_resume(mnist_loaders, tmp_path, monkeypatch, single_thread):
    train, test = mnist_loaders
    folder = tmp_path / "stage"
    monkeypatch.setattr(trainer, "train_epoch", poison("weights", at_epoch=1))
    with pytest.raises(TrainingDiverged) as info:
        train_stage(lenet300(), folder, SMALL, train, test, stage_config=STAGE, progress=False)
    assert str(info.value).startswith("non-finite weights after epoch 1, iteration 7 (global iteration 15; every "
                                      "loss of the epoch was finite) in linear2.bias; the last good checkpoint")
    assert torch.load(folder / CHECKPOINT, weights_only=True)["next_epoch"] == 1
    assert not (folder / FINISH).exists()

    # The cause removed, the same call resumes from the kept checkpoint and ends like a clean run.
    monkeypatch.undo()
    resumed = lenet300()
    assert train_stage(resumed, folder, SMALL, train, test, stage_config=STAGE, progress=False) == "resumed"
    clean = lenet300()
    train_stage(clean, tmp_path / "clean", SMALL, train, test, stage_config=STAGE, progress=False)
    for key, value in clean.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert events(folder / LOG) == events(tmp_path / "clean" / LOG)


def test_divergence_in_the_first_epoch_says_there_is_no_checkpoint(mnist_loaders, tmp_path, monkeypatch,
                                                                 single_thread):
    train, test = mnist_loaders
    folder = tmp_path / "stage"
    monkeypatch.setattr(trainer, "train_epoch", poison("loss", at_epoch=0))
    with pytest.raises(TrainingDiverged) as info:
        train_stage(lenet300(), folder, SMALL, train, test, stage_config=STAGE, progress=False)
    assert str(info.value) == (
        "non-finite loss at epoch 0, iteration 3 (global iteration 3); no epoch of this stage had finished, so "
        "there is no checkpoint: lower the learning rate or check the data, then rerun to start the stage again")
    assert not (folder / CHECKPOINT).exists() and not (folder / FINISH).exists()


# ---------------------------------------------------------------------------------------------------------
# A checkpoint from elsewhere must not run code


def test_crafted_checkpoint_is_refused_without_running_it(fault_runs, tmp_path):
    """A checkpoint.pt whose unpickling would create a folder, planted in the unfinished magnitude retrain: the
    script stops in one line that says how to recover, exit 1; the folder never appears; every other file is
    as it was."""
    out_root = tmp_path / "out"
    shutil.copytree(fault_runs.reference_root, out_root)
    folder = exps(out_root) / FOLDERS["magnitude_retrain"]
    (folder / FINISH).unlink()
    marker = tmp_path / "marker"
    torch.save({"model": {}, "next_epoch": 1, "payload": MakesFolder(str(marker))}, folder / CHECKPOINT)
    before = fingerprint(out_root)
    result = run_script("lenet300", [*ARGS, "--out-root", out_root, "--data-root", fault_runs.data_root], tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused to load" in lines[0] and f"delete {CHECKPOINT}" in lines[0], lines
    assert "weights_only=False" not in lines[0]  # no advice to load it anyway
    assert not marker.exists()
    assert fingerprint(out_root) == before
