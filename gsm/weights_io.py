"""hdf5 weights files in the released code's format: one dataset per state-dict key ('/' stored as '+')."""
import os
from typing import Callable, Dict, Mapping, Union

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from base_model import unwrap_model


class WeightsFileError(ValueError):
    """A weights file that is missing, unreadable, or does not fit the model."""


def stored_name(key: str) -> str:
    """The hdf5 dataset name of a state-dict key ('/' would make a group: stored as '+')."""
    return key.replace("/", "+")


def key_name(stored: str) -> str:
    return stored.replace("+", "/")


def state_dict_of(model: nn.Module) -> Dict[str, Tensor]:
    """The state dict of a model with the keys of the plain model (no wrapper prefixes)."""
    return unwrap_model(model).state_dict()


def write_hdf5_atomic(path: Union[str, os.PathLike], write: Callable[[h5py.File], None]) -> None:
    """Create an hdf5 file by `write(file)` under a temporary name in the same folder, fsync it and rename it,
    so that a crash never leaves a partial file under `path`."""
    path = os.fspath(path)
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp_path, "w", track_order=True) as f:  # keep the order of writing
            write(f)
            f.flush()
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def save_hdf5(model: Union[nn.Module, Mapping[str, Tensor]], path: Union[str, os.PathLike]) -> None:
    """Write every state-dict entry as a numpy dataset, atomically (see write_hdf5_atomic)."""
    tensors = state_dict_of(model) if isinstance(model, nn.Module) else model

    def write(f: h5py.File) -> None:
        for key, value in tensors.items():
            array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            f.create_dataset(stored_name(key), data=array)
    write_hdf5_atomic(path, write)


def read_hdf5(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """Every dataset of a weights file by state-dict key. Raises WeightsFileError with a one-line reason
    for a missing file, a file that is not hdf5, or one with no arrays or with non-numeric data."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise WeightsFileError(f"{path}: is a folder, not an hdf5 weights file")
    if os.path.getsize(path) == 0:
        raise WeightsFileError(f"{path}: the file is empty (0 bytes), not an hdf5 weights file")
    try:
        with h5py.File(path, "r") as f:
            marked = f.attrs.get("format")
            if marked is not None:
                marked = marked.decode() if isinstance(marked, bytes) else marked
                raise WeightsFileError(f"{path}: a {marked} file, not a weights file (read it with gsm.load_mask or "
                                       f"gsm.load_sparse; display_hdf5.py shows all three)")
            arrays = {}
            for name, item in f.items():
                if not isinstance(item, h5py.Dataset):
                    raise WeightsFileError(f"{path}: '{name}' is a group; a weights file holds only arrays")
                value = np.asarray(item[()])
                if value.dtype.kind not in "biuf":  # e.g. strings or records: not a tensor
                    raise WeightsFileError(f"{path}: '{name}' holds {value.dtype} data; a weights file holds "
                                           f"only numeric arrays")
                arrays[key_name(name)] = value
    except OSError as exc:
        raise WeightsFileError(f"{path}: not a readable hdf5 file ({exc.__class__.__name__})") from exc
    if not arrays:
        raise WeightsFileError(f"{path}: the file holds no arrays")
    return {k: np.asarray(v) for k, v in arrays.items()}


def load_hdf5(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a weights file into `model` in place (all keys must match). Raises WeightsFileError naming the
    missing, unexpected and mis-shaped keys (up to ten of each kind, and how many more)."""
    arrays = read_hdf5(path)
    target = state_dict_of(model)
    missing = [k for k in target if k not in arrays]
    unexpected = [k for k in arrays if k not in target]
    misshaped = [f"{k} (file {tuple(arrays[k].shape)}, model {tuple(target[k].shape)})"
                 for k in target if k in arrays and tuple(arrays[k].shape) != tuple(target[k].shape)]
    problems = []
    if missing:
        problems.append("missing keys: " + _first_names(missing))
    if unexpected:
        problems.append("unexpected keys: " + _first_names(unexpected))
    if misshaped:
        problems.append("mis-shaped keys: " + _first_names(misshaped))
    if problems:
        raise WeightsFileError(f"{os.fspath(path)} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in target.items():
            # ascontiguousarray turns a 0-d array (num_batches_tracked) into shape (1,): restore the shape.
            array = np.ascontiguousarray(arrays[key]).reshape(arrays[key].shape)
            tensor.copy_(torch.from_numpy(array).to(tensor.dtype))
    return model


def _first_names(names, limit: int = 10) -> str:
    """Up to `limit` names, then how many more: another model's file would otherwise list hundreds."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
