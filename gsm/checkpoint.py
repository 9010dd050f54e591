"""Atomic resume checkpoints: everything needed to continue a training stage in one file."""
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to the current run."""


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write `state` under a temporary name, fsync it, then rename: the previous checkpoint stays intact
    until the new one is complete (also when the disk fills up during the write)."""
    tmp_path = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def load_checkpoint(path: Path, map_location: Optional[torch.device] = None) -> Optional[Dict[str, Any]]:
    """The checkpoint at `path`, or None when there is none."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which and how to recover
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc.__class__.__name__}: {exc}); "
                              f"delete it to restart this stage from its beginning") from exc
