"""Run an experiment script exactly as `python SCRIPT ARGS...` would, but SIGKILL the process at one chosen
point: a test helper for tests/test_faults.py that needs no hook in the library.

    python tests/kill_run.py '<kill point as JSON>' SCRIPT [ARGS...]

The kill point names the stage folder it applies to ("folder", e.g. "lottery_lenet300_base") and one of:
  {"at": "batch", "epoch": E, "iteration": I}          before training batch I of epoch E is used
  {"at": "checkpoint", "next_epoch": E}                 halfway through writing that checkpoint's temp file
  {"at": "hdf5_partial", "file": NAME, "datasets": K}   after K arrays of NAME's temp file are on disk
  {"at": "renamed", "file": NAME}                       right after NAME was renamed into place
  {"at": "logged", "marker": TEXT}                      right after a log line containing TEXT was written
The process kills itself with SIGKILL, like the out-of-memory killer or `kill -9`: no `finally`, no atexit,
no flush. If the point is never reached the script runs to its end and exits as usual.
"""
import io
import json
import os
import runpy
import signal
import sys
from pathlib import Path

from loader_hooks import BatchHookLoader  # tests/ is first on sys.path when this file runs as a script


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def in_folder(path, folder: str) -> bool:
    return Path(os.fspath(path)).parent.name == folder


def arm(point: dict) -> None:
    """Install the one patch that kills at `point` (modules are patched in this doomed process only)."""
    folder, at = point["folder"], point["at"]
    if at == "batch":
        import gsm.experiments.trainer as trainer

        current = {"folder": None}
        load_checkpoint, train_epoch = trainer.load_checkpoint, trainer.train_epoch

        def recording_load_checkpoint(path, *args, **kwargs):  # called once as each trained stage starts
            current["folder"] = Path(path).parent.name
            return load_checkpoint(path, *args, **kwargs)

        def killing_train_epoch(model, optimizer, loader, epoch, *args, **kwargs):
            if current["folder"] is None:  # the trainer no longer loads a checkpoint first: fail loudly
                raise RuntimeError("kill_run.py: cannot tell which stage is training")
            if current["folder"] == folder and epoch == point["epoch"]:
                loader = BatchHookLoader(loader, point["iteration"], lambda *batch: die())
            return train_epoch(model, optimizer, loader, epoch, *args, **kwargs)

        trainer.load_checkpoint, trainer.train_epoch = recording_load_checkpoint, killing_train_epoch
    elif at == "checkpoint":
        import torch

        save = torch.save

        def killing_save(obj, f, *args, **kwargs):
            name = getattr(f, "name", f)
            if (isinstance(obj, dict) and obj.get("next_epoch") == point["next_epoch"] and ".tmp" in str(name)
                    and in_folder(name, folder)):
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
            return save(obj, f, *args, **kwargs)

        torch.save = killing_save
    elif at == "hdf5_partial":
        import h5py

        create_dataset = h5py.Group.create_dataset
        written = []

        def killing_create_dataset(group, *args, **kwargs):
            dataset = create_dataset(group, *args, **kwargs)
            path = Path(group.file.filename)
            if in_folder(path, folder) and path.name.startswith(point["file"] + ".tmp"):
                written.append(path)
                if len(written) == point["datasets"]:
                    group.file.flush()  # those arrays reach the disk: the temp file is a valid, partial hdf5
                    die()
            return dataset

        h5py.Group.create_dataset = killing_create_dataset
    elif at == "renamed":
        replace = os.replace

        def killing_replace(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if in_folder(dst, folder) and Path(os.fspath(dst)).name == point["file"]:
                die()

        os.replace = killing_replace
    elif at == "logged":
        from gsm.experiments.train_log import StageLog

        info = StageLog.info

        def killing_info(self, message):
            info(self, message)
            if self.path is not None and in_folder(self.path, folder) and point["marker"] in message:
                die()

        StageLog.info = killing_info
    else:
        raise ValueError(f"unknown kill point {at!r}")


if __name__ == "__main__":
    kill_point, script, *script_args = sys.argv[1:]
    arm(json.loads(kill_point))
    sys.argv = [script, *script_args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # what `python SCRIPT` puts first on sys.path
    runpy.run_path(script, run_name="__main__")
