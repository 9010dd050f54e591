"""A stage folder's records: `log.txt`, appended lines `<asctime> train INFO: <message>` for people (docs/design.md,
section 3), the TensorBoard scalars (event files in the folder, as the released code wrote them), and the GSM
stage's result as data (`finish_pruned.json`), which programs read."""
import errno
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from gsm.atomic_write import write_text_atomic


def format_evaluation(epoch: int, top1: float, top5: float, loss: float) -> str:
    return f"validate at epoch {epoch}, top1={top1:.5f}, top5={top5:.5f}, loss={loss:.6f}"


def format_readiness(epoch: int, readiness) -> str:
    """A GSM stage's prune readiness (gsm.PruneReadiness) as one log line."""
    r = readiness
    return (f"prune readiness at epoch {epoch}: {r.outside_above_1e_2} of {r.removed} weights the hard prune removes "
            f"have |w| > 0.01 ({100 * r.share_above_1e_2:.4f}%), {r.outside_above_1e_3} > 0.001 "
            f"({100 * r.share_above_1e_3:.4f}%); removed/kept norm {r.norm_ratio:.6g}")


def format_pruned_copy(epoch: int, kept: int, prunable: int, top1: float, top5: float, loss: float) -> str:
    """The evaluation of a hard-pruned copy taken during a GSM stage, as one log line."""
    return (f"hard-pruned copy at epoch {epoch}: kept {kept} of {prunable}, "
            f"top1={top1:.5f}, top5={top5:.5f}, loss={loss:.6f}")


class StageLog:
    """Appends timestamped lines to a log file and echoes them to the console (above any progress bar).
    A log with `path=None` only echoes (used on non-writing ranks, where `echo` is False too)."""

    def __init__(self, path: Optional[Path], echo: bool = True) -> None:
        self.path = path
        self.echo = echo

    def info(self, message: str) -> None:
        """Append one line. It is written with a single write call, after cutting any partial last line (left
        by a crash or a full disk in the middle of a write), so the file holds whole lines only."""
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
        line = f"{stamp} train INFO: {message}"
        if self.path is not None:
            data = (line + "\n").encode("utf-8")
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _cut_partial_line(fd)
                written = os.write(fd, data)
                if written != len(data):  # the disk filled up: take the piece back and report it
                    _cut_partial_line(fd)
                    raise OSError(errno.ENOSPC, "no space left to write a whole log line", str(self.path))
            finally:
                os.close(fd)
        if self.echo:
            tqdm.write(line)

    def size(self) -> int:
        """Bytes written so far: recorded in checkpoints, so a resumed run can drop the lines logged after
        its checkpoint (they are logged again) and no line is doubled."""
        if self.path is None or not self.path.exists():
            return 0
        return self.path.stat().st_size

    def complete_lines(self) -> List[str]:
        """The log's whole lines (a partial last line, without its newline, left out)."""
        if self.path is None or not self.path.exists():
            return []
        with open(self.path, encoding="utf-8", errors="replace", newline="") as f:
            return f.read().split("\n")[:-1]

    def truncate(self, size: int) -> None:
        if self.path is not None and self.path.exists() and self.path.stat().st_size > size:
            with open(self.path, "r+b") as f:
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())


def _cut_partial_line(fd: int) -> None:
    """Truncate the open file `fd` after its last newline, if anything follows it."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - 4096)
        chunk = os.pread(fd, end - start, start)
        if end == size and chunk.endswith(b"\n"):
            return
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            os.ftruncate(fd, start + cut + 1)
            return
        end = start
    if size:
        os.ftruncate(fd, 0)


class StageEvents:
    """TensorBoard scalars of one stage, written into its folder (`tensorboard --logdir <out-root>` shows every
    stage). A resumed stage passes its first epoch as `purge_step`: TensorBoard then drops the points the
    interrupted run wrote from that epoch on, which are written again, so that no point is doubled. With
    `folder=None` (ranks other than 0) nothing is written. The writer opens on the first scalar."""

    def __init__(self, folder: Optional[Path], purge_step: int = 0) -> None:
        self.folder = folder
        self.purge_step = purge_step
        self._writer = None

    def scalars(self, step: int, **values: float) -> None:
        """Record `values` ({tag: value}, '/' in tags written as '__' by keyword: train__loss -> train/loss)."""
        if self.folder is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported here: a second of start-up otherwise

            self._writer = SummaryWriter(str(self.folder), purge_step=self.purge_step or None)
        for tag, value in values.items():
            self._writer.add_scalar(tag.replace("__", "/"), value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass(frozen=True)
class PruneResult:
    """What a GSM stage's hard prune gave: the pruned model's evaluation (top1 and top5 in percent, mean loss),
    the prunable weights it keeps of how many, GSM's Q, and how many weights had |w| > `alive_magnitude` just
    before the prune (near Q when the prune is nearly lossless)."""
    top1: float
    top5: float
    loss: float
    kept: int
    prunable: int
    keep_count: int
    alive: int
    alive_magnitude: float

    @property
    def compression(self) -> float:
        return self.prunable / self.kept if self.kept else float("inf")

    def save(self, path: Path) -> None:
        """Write it as a small JSON object, atomically."""
        write_text_atomic(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Optional["PruneResult"]:
        """The result saved at `path`; None when there is none, or when it cannot be read as one (a reader
        such as show_log then shows no hard-pruned row; the pipeline writes it again)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (OSError, ValueError, TypeError, KeyError):
            return None
