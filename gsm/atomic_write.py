"""Files written whole or not at all: a temporary file beside the target, flushed to disk, then renamed."""
import os
import re
from typing import Callable, Union

PathLike = Union[str, os.PathLike]
# `<name>.tmp<pid>`: the temporary name of a file being written by process <pid>.
TEMP_NAME = re.compile(r"\.tmp(\d+)$")


def write_atomic(path: PathLike, write: Callable[[str], None]) -> None:
    """Create `path` by `write(temporary_path)`, then fsync the temporary file and rename it over `path`: a
    crash, a kill or a full disk leaves the previous file (or none) under `path`, never part of a new one. The
    temporary file is removed when writing fails; one left by a killed process is named `<path>.tmp<pid>`
    (see TEMP_NAME)."""
    path = os.fspath(path)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (see write_atomic)."""
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)
