"""The per-folder `log.txt`: appended lines `<asctime> train INFO: <message>` (DESIGN 3)."""
import os
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm


def format_evaluation(epoch: int, top1: float, top5: float, loss: float) -> str:
    return f"validate at epoch {epoch}, top1={top1:.5f}, top5={top5:.5f}, loss={loss:.6f}"


class StageLog:
    """Appends timestamped lines to a log file and echoes them to the console (above any progress bar).
    A log with `path=None` only echoes (used on non-writing ranks, where `echo` is False too)."""

    def __init__(self, path: Optional[Path], echo: bool = True) -> None:
        self.path = path
        self.echo = echo

    def info(self, message: str) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
        line = f"{stamp} train INFO: {message}"
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        if self.echo:
            tqdm.write(line)

    def size(self) -> int:
        """Bytes written so far: recorded in checkpoints, so a resumed run can drop the lines logged after
        its checkpoint (they are logged again) and no line is doubled."""
        if self.path is None or not self.path.exists():
            return 0
        return self.path.stat().st_size

    def truncate(self, size: int) -> None:
        if self.path is not None and self.path.exists() and self.path.stat().st_size > size:
            with open(self.path, "r+b") as f:
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())
