"""Atomic resume checkpoints: everything needed to continue a training stage in one file."""
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from gsm.atomic_write import TEMP_NAME, write_atomic


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to the current run."""


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write `state` atomically: the previous checkpoint stays intact until the new one is complete."""
    def write(temporary: str) -> None:
        with open(temporary, "wb") as f:
            torch.save(state, f)
    write_atomic(path, write)


def load_checkpoint(path: Path, map_location: Optional[torch.device] = None) -> Optional[Dict[str, Any]]:
    """The checkpoint at `path`, or None when there is none.

    A checkpoint holds only tensors and plain containers (dicts, lists, numbers, strings), and is read with
    `torch.load(weights_only=True)`, which builds nothing else: a file from elsewhere cannot run code."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused something that is not a tensor or container
        reason = " ".join(str(exc).split()[:40])
        raise CheckpointError(f"{path}: refused to load, it holds more than tensors and plain containers, so it was "
                              f"not written by this code and could run code ({reason} ...); delete {path.name} to "
                              f"restart this stage from its beginning (the folder's other files are kept)") from exc
    except Exception as exc:  # a truncated or foreign file: say which and how to recover
        reason = " ".join(str(exc).split())  # torch's messages can span lines; the report is one line
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc.__class__.__name__}: {reason}); "
                              f"delete it to restart this stage from its beginning") from exc


def remove_stale_temp_files(folder: Path) -> List[Path]:
    """Delete the temporary files `<name>.tmp<pid>` in `folder` whose writing process no longer runs.

    An atomic write removes its temporary file when it fails, but a process killed mid-write (SIGKILL, the
    out-of-memory killer, a power cut) leaves it behind, and a rerun has another pid, so nothing else would
    ever remove it. A file whose pid is alive on this machine (or is this process) is kept. Returns the
    removed paths."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        match = TEMP_NAME.search(path.name)
        if match and path.is_file() and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # elsewhere os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # e.g. PermissionError: it exists but belongs to another user
        return True
    return True
