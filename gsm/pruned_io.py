"""Pruning results as files: masks ({parameter name: bool} in hdf5) and the compressed export of a pruned model
(positions and values of the non-zeros of each prunable tensor, the other tensors dense).

Both are hdf5 files marked by a `format` attribute on the root, so that neither is taken for a weights file of
DESIGN 3 (which holds only arrays, and which `weights_io.read_hdf5` keeps reading exactly), and both are
written atomically (a temporary file, fsynced, then renamed)."""
import os
from typing import Dict, Iterable, Mapping, Optional, Union

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from base_model import unwrap_model
from gsm.pruning import prunable_parameters
from gsm.weights_io import WeightsFileError, key_name, stored_name, write_hdf5_atomic

MASK_FORMAT = "gsm-mask-v1"
SPARSE_FORMAT = "gsm-sparse-v1"
PathLike = Union[str, os.PathLike]


def file_format(path: PathLike) -> Optional[str]:
    """The `format` attribute of an hdf5 file (MASK_FORMAT, SPARSE_FORMAT), None for a plain weights file."""
    with h5py.File(os.fspath(path), "r") as f:
        value = f.attrs.get("format")
    return value.decode() if isinstance(value, bytes) else value


def save_mask(mask: Mapping[str, Tensor], path: PathLike) -> None:
    """Write a mask {parameter name: bool tensor} as one bool dataset per name ('/' stored as '+')."""
    def write(f: h5py.File) -> None:
        f.attrs["format"] = MASK_FORMAT
        for name, values in mask.items():
            f.create_dataset(stored_name(name), data=values.detach().cpu().numpy().astype(bool))
    write_hdf5_atomic(path, write)


def load_mask(path: PathLike) -> Dict[str, Tensor]:
    """The mask written by `save_mask`, as {parameter name: bool tensor} on the CPU."""
    path = os.fspath(path)
    with _open(path, MASK_FORMAT) as f:
        return {key_name(name): torch.from_numpy(np.asarray(item[()], dtype=bool)) for name, item in f.items()}


def save_sparse(model: Union[nn.Module, Mapping[str, Tensor]], path: PathLike,
                names: Optional[Iterable[str]] = None) -> None:
    """Export a pruned model compressed: for each prunable tensor (`names`; default every parameter of dim > 1)
    the positions of its non-zeros in row-major order (int32, or int64 beyond 2^31 elements) and their values;
    every other state-dict entry dense. A -0.0 left by the hard prune counts as zero (it comes back as +0.0)."""
    state = unwrap_model(model).state_dict() if isinstance(model, nn.Module) else dict(model)
    if names is None:
        names = prunable_parameters(model).keys() if isinstance(model, nn.Module) else \
            [k for k, v in state.items() if v.dim() > 1]
    sparse = set(names)
    unknown = sparse - set(state)
    if unknown:
        raise KeyError(f"not in the model: {', '.join(sorted(unknown))}")

    def write(f: h5py.File) -> None:
        f.attrs["format"] = SPARSE_FORMAT
        f.attrs["keys"] = np.array([stored_name(k) for k in state], dtype=h5py.string_dtype())
        dense, compressed = f.create_group("dense"), f.create_group("sparse")
        for key, value in state.items():
            array = value.detach().cpu().contiguous().numpy()
            if key not in sparse:
                dense.create_dataset(stored_name(key), data=array)
                continue
            flat = array.reshape(-1)
            positions = np.flatnonzero(flat)
            group = compressed.create_group(stored_name(key))
            group.attrs["shape"] = np.array(array.shape, dtype=np.int64)
            index_type = np.int32 if flat.size < 2 ** 31 else np.int64
            group.create_dataset("indices", data=positions.astype(index_type))
            group.create_dataset("values", data=flat[positions])
    write_hdf5_atomic(path, write)


def load_sparse(path: PathLike, model: Optional[nn.Module] = None) -> Dict[str, Tensor]:
    """The state dict of a file written by `save_sparse` (dense tensors, in the saved order); loaded into
    `model` too when one is given (every key must match, as for a weights file)."""
    path = os.fspath(path)
    with _open(path, SPARSE_FORMAT) as f:
        state = {}
        for stored in f.attrs["keys"]:
            stored = stored.decode() if isinstance(stored, bytes) else stored
            if stored in f["dense"]:
                state[key_name(stored)] = torch.from_numpy(np.asarray(f["dense"][stored][()]))
                continue
            group = f["sparse"][stored]
            values = np.asarray(group["values"][()])
            flat = np.zeros(int(np.prod(group.attrs["shape"])), dtype=values.dtype)
            flat[np.asarray(group["indices"][()], dtype=np.int64)] = values
            state[key_name(stored)] = torch.from_numpy(flat.reshape(tuple(group.attrs["shape"])))
    if model is not None:
        target = unwrap_model(model)
        problems = sorted(set(state) ^ set(target.state_dict()))
        if problems:
            raise WeightsFileError(f"{path} does not fit the model: keys {', '.join(problems[:10])} differ")
        with torch.no_grad():
            for key, tensor in target.state_dict().items():
                tensor.copy_(state[key])
    return state


class _open:
    """Open an hdf5 file of the given format, or raise WeightsFileError in one line."""

    def __init__(self, path: str, expected: str) -> None:
        self.path, self.expected, self.file = path, expected, None

    def __enter__(self) -> h5py.File:
        if not os.path.isfile(self.path):
            raise WeightsFileError(f"{self.path}: no such file")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise WeightsFileError(f"{self.path}: not a readable hdf5 file ({exc.__class__.__name__})") from exc
        found = self.file.attrs.get("format")
        found = found.decode() if isinstance(found, bytes) else found
        if found != self.expected:
            self.file.close()
            raise WeightsFileError(f"{self.path}: holds {found or 'plain weights'}, not {self.expected}")
        return self.file

    def __exit__(self, *exc_info) -> None:
        self.file.close()
