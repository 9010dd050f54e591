"""Pruning results as files: masks ({parameter name: bool} in hdf5) and the compressed export of a pruned model
(positions and values of the non-zeros of each prunable tensor, the other tensors dense).

Both are hdf5 files marked by a `format` attribute on the root, so that neither is taken for a weights file (which
holds only arrays; docs/design.md, section 3), and both are written atomically (gsm.atomic_write)."""
import math
import os
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from gsm.wrappers import unwrap_model
from gsm.pruning import prunable_parameters
from gsm.sharded import full, is_sharded, local, rank
from gsm.weights_io import (NUMERIC_KINDS, WeightsFileError, attribute_where, check_fits, checked_dataset,
                            checked_datasets, copy_into, describe_value, entry_errors, entry_name, format_attribute,
                            format_bytes, hard_linked, key_name, open_hdf5, read_attribute, read_dataset,
                            state_dict_of, stored_name, write_hdf5_atomic)

MASK_FORMAT = "gsm-mask-v1"
SPARSE_FORMAT = "gsm-sparse-v1"
PathLike = Union[str, os.PathLike]
MAX_DIMS = 64  # numpy's limit on the dimensions of an array
INT64_MAX = 2 ** 63 - 1


def file_format(path: PathLike) -> Optional[str]:
    """The `format` attribute of an hdf5 file (MASK_FORMAT, SPARSE_FORMAT), None for a plain weights file. Raises
    WeightsFileError for a file that is missing or not hdf5, or whose attribute is not a string."""
    path = os.fspath(path)
    with entry_errors(path), open_hdf5(path) as f:
        return format_attribute(f, path)


def save_mask(mask: Mapping[str, Tensor], path: PathLike) -> None:
    """Write a mask {parameter name: bool tensor} as one bool dataset per name ('/' stored as '+')."""
    def write(f: h5py.File) -> None:
        f.attrs["format"] = MASK_FORMAT
        for name, values in mask.items():
            f.create_dataset(stored_name(name), data=values.detach().cpu().numpy().astype(bool))
    write_hdf5_atomic(path, write)


def load_mask(path: PathLike) -> Dict[str, Tensor]:
    """The mask written by `save_mask`, as {parameter name: bool tensor} on the CPU. Raises WeightsFileError for
    a file of another format, or an entry that is not a bool dataset (see weights_io.checked_dataset)."""
    path = os.fspath(path)
    with entry_errors(path), _open(path, MASK_FORMAT) as f:
        datasets = checked_datasets(f, path, kinds="b")
        return {key_name(name): torch.from_numpy(read_dataset(dataset, path)) for name, dataset in datasets.items()}


def save_sparse(model: Union[nn.Module, Mapping[str, Tensor]], path: PathLike,
                names: Optional[Iterable[str]] = None) -> None:
    """Export a pruned model compressed: for each prunable tensor (`names`; default every parameter of dim > 1)
    the positions of its non-zeros in row-major order (int32, or int64 beyond 2^31 elements) and their values;
    every other state-dict entry dense. A -0.0 left by the hard prune counts as zero (it comes back as +0.0).
    A tied weight (state-dict keys that are one tensor, as an output layer tied to the embedding) is stored once,
    under its first key; the others are listed in the root attribute `tied` as [key, first key] pairs and come
    back as the same tensor. It is compressed when any of its keys is in `names`. A model sharded by FSDP2 is
    gathered (every rank must call it) and written by rank 0."""
    state = unwrap_model(model).state_dict() if isinstance(model, nn.Module) else dict(model)
    if names is None:
        names = prunable_parameters(model).keys() if isinstance(model, nn.Module) else \
            [k for k, v in state.items() if v.dim() > 1]
    sparse = set(names)
    unknown = sparse - set(state)
    if unknown:
        raise KeyError(f"not in the model: {', '.join(sorted(unknown))}")
    tied = _tied_keys({key: local(value) for key, value in state.items()})
    sparse |= {tied[key] for key in sparse if key in tied}
    if any(is_sharded(value) for value in state.values()):  # gathered on every rank, written by rank 0
        state = {key: value if key in tied else full(value) for key, value in state.items()}
        if rank() != 0:
            return

    def write(f: h5py.File) -> None:
        f.attrs["format"] = SPARSE_FORMAT
        f.attrs["keys"] = np.array([stored_name(k) for k in state], dtype=h5py.string_dtype())
        if tied:
            f.attrs["tied"] = np.array([[stored_name(k), stored_name(v)] for k, v in tied.items()],
                                       dtype=h5py.string_dtype())
        dense, compressed = f.create_group("dense"), f.create_group("sparse")
        for key, value in state.items():
            if key in tied:
                continue
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


def _tied_keys(state: Mapping[str, Tensor]) -> Dict[str, str]:
    """{key: the first key of the same tensor} for every state entry that repeats an earlier one: the same memory,
    dtype, shape and strides."""
    first: Dict[tuple, str] = {}
    tied = {}
    for key, value in state.items():
        if value.numel() == 0:
            continue
        identity = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if identity in first:
            tied[key] = first[identity]
        else:
            first[identity] = key
    return tied


def load_sparse(path: PathLike, model: Optional[nn.Module] = None) -> Dict[str, Tensor]:
    """The state dict of a file written by `save_sparse` (dense tensors, in the saved order); loaded into
    `model` too when one is given (every key, shape and dtype kind must match, as for a weights file).

    Raises WeightsFileError for a malformed file: the structure, the declared shapes and dtypes (and the model's,
    when given) are checked before any data is read, the indices after they are read and before the dense arrays
    are allocated, and nothing is copied into the model unless the whole file passed."""
    path = os.fspath(path)
    target = None if model is None else state_dict_of(model)
    with entry_errors(path), _open(path, SPARSE_FORMAT) as f:
        entries = _sparse_entries(f, path)
        if target is not None:
            check_fits(path, {key: _declared(entry) for key, entry in entries.items()}, target)
        read: Dict[int, np.ndarray] = {}  # a tied weight's entry is read once
        arrays = {}
        for key, entry in entries.items():
            if id(entry) not in read:
                read[id(entry)] = _read_entry(entry, path)
            arrays[key] = read[id(entry)]
    if target is not None:
        copy_into(path, target, arrays)
    tensors: Dict[int, Tensor] = {}  # and comes back as one tensor under each of its keys
    return {key: tensors.setdefault(id(array), torch.from_numpy(array)) for key, array in arrays.items()}


class _Sparse(NamedTuple):
    """A checked compressed entry: its declared dense shape and its (not yet read) positions and values."""
    where: str
    shape: Tuple[int, ...]
    indices: h5py.Dataset
    values: h5py.Dataset


def _declared(entry: Union[h5py.Dataset, _Sparse]) -> Tuple[Tuple[int, ...], np.dtype]:
    """The (shape, dtype) that an entry declares, dense or compressed."""
    if isinstance(entry, _Sparse):
        return entry.shape, entry.values.dtype
    return entry.shape, entry.dtype


def _sparse_entries(f: h5py.File, path: str) -> Dict[str, Union[h5py.Dataset, _Sparse]]:
    """The entries of an export by key in `keys` order, each in one of `dense` and `sparse`, which hold no more,
    or tied to one that is (the same entry object under both keys)."""
    keys = _stored_keys(f, path)
    tied = _tied_attribute(f, path, keys)
    dense, sparse = _root_groups(f, path)
    with entry_errors(path):
        dense_names, sparse_names = set(dense.keys()), set(sparse.keys())
    for stored in keys:
        if stored in tied:
            if stored in dense_names or stored in sparse_names:
                raise WeightsFileError(f"{path}: key '{stored}' is tied to '{tied[stored]}' but also stored")
        elif (stored in dense_names) == (stored in sparse_names):
            where = "both" if stored in dense_names else "neither"
            raise WeightsFileError(f"{path}: key '{stored}' is in {where} of the groups 'dense' and 'sparse'")
    unlisted = sorted((dense_names | sparse_names) - set(keys))
    if unlisted:
        group = "dense" if unlisted[0] in dense_names else "sparse"
        raise WeightsFileError(f"{path}: '{group}/{unlisted[0]}' is not one of the keys the attribute 'keys' lists")
    entries = {stored: checked_dataset(dense, stored, path) if stored in dense_names
               else _sparse_entry(sparse, stored, path) for stored in keys if stored not in tied}
    return {key_name(stored): entries[tied.get(stored, stored)] for stored in keys}


def _tied_attribute(f: h5py.File, path: str, keys: List[str]) -> Dict[str, str]:
    """The root's optional `tied` attribute as {stored key: stored key it repeats}: an (n, 2) array of strings,
    both of each pair among `keys`, the second one stored (not itself tied), each tied key listed once."""
    if "tied" not in f.attrs:
        return {}
    with entry_errors(path, "attribute 'tied'"):
        value = read_attribute(f, "tied", path)
        if not (isinstance(value, np.ndarray) and value.ndim == 2 and value.shape[1] == 2
                and value.dtype.kind in "OSU"):
            raise WeightsFileError(f"{path}: attribute 'tied' holds {describe_value(value)}, not an (n, 2) array of "
                                   f"strings")
        pairs = [[item.decode() if isinstance(item, bytes) else item for item in pair] for pair in value.tolist()]
    known = set(keys)
    tied: Dict[str, str] = {}
    for key, source in pairs:
        if not (isinstance(key, str) and isinstance(source, str)):
            raise WeightsFileError(f"{path}: attribute 'tied' holds a pair that is not two strings")
        for name in (key, source):
            if name not in known:
                raise WeightsFileError(f"{path}: attribute 'tied' names '{name}', not one of the keys")
        if key in tied or key == source:
            raise WeightsFileError(f"{path}: attribute 'tied' ties '{key}' twice or to itself")
        tied[key] = source
    chained = sorted(set(tied.values()) & set(tied))
    if chained:
        raise WeightsFileError(f"{path}: attribute 'tied' ties '{chained[0]}', and ties another key to it")
    return tied


def _stored_keys(f: h5py.File, path: str) -> List[str]:
    """The root's `keys` attribute: a 1-D array of distinct strings (the stored names, in state-dict order)."""
    with entry_errors(path, "attribute 'keys'"):
        if "keys" not in f.attrs:
            raise WeightsFileError(f"{path}: attribute 'keys' is missing")
        value = read_attribute(f, "keys", path)
        if not (isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "OSU"):
            raise WeightsFileError(f"{path}: attribute 'keys' holds {describe_value(value)}, not a 1-D array of "
                                   f"strings")
        keys = [item.decode() if isinstance(item, bytes) else item for item in value.tolist()]
    seen = set()
    for key in keys:
        if not isinstance(key, str):
            raise WeightsFileError(f"{path}: attribute 'keys' holds {describe_value(key)}, not a string")
        if key in seen:
            raise WeightsFileError(f"{path}: attribute 'keys' lists '{key}' twice")
        seen.add(key)
    return keys


def _root_groups(f: h5py.File, path: str) -> Tuple[h5py.Group, h5py.Group]:
    """The groups `dense` and `sparse` of an export, the only members of its root."""
    with entry_errors(path):
        extra = sorted(set(f.keys()) - {"dense", "sparse"})
    if extra:
        raise WeightsFileError(f"{path}: '{extra[0]}' is neither the group 'dense' nor 'sparse'")
    return _group(f, "dense", path), _group(f, "sparse", path)


def _group(parent: h5py.Group, name: str, path: str) -> h5py.Group:
    """Member `name` of `parent`, which must be a group reached by a hard link."""
    group = hard_linked(parent, name, path)
    if not isinstance(group, h5py.Group):
        raise WeightsFileError(f"{path}: '{entry_name(parent, name)}' is not a group")
    return group


def _sparse_entry(sparse: h5py.Group, stored: str, path: str) -> _Sparse:
    """A compressed entry: a group of only 1-D `indices` and `values` of one length, at most its shape's size."""
    group = _group(sparse, stored, path)
    where = f"'{entry_name(group)}'"
    with entry_errors(path, where):
        members = sorted(group.keys())
    if members != ["indices", "values"]:
        raise WeightsFileError(f"{path}: {where} holds {members}, not exactly 'indices' and 'values'")
    shape = _declared_shape(group, path)
    indices = checked_dataset(group, "indices", path, kinds="iu")
    values = checked_dataset(group, "values", path, kinds=NUMERIC_KINDS)
    for dataset in (indices, values):
        if len(dataset.shape) != 1:
            raise WeightsFileError(f"{path}: '{entry_name(dataset)}' has shape {dataset.shape}, not one dimension")
    if indices.shape != values.shape:
        raise WeightsFileError(f"{path}: {where} holds {indices.shape[0]} indices but {values.shape[0]} values")
    if indices.shape[0] > math.prod(shape):
        raise WeightsFileError(f"{path}: {where} holds {indices.shape[0]} indices for shape {shape} of "
                               f"{math.prod(shape)} elements")
    return _Sparse(where, shape, indices, values)


def _declared_shape(group: h5py.Group, path: str) -> Tuple[int, ...]:
    """The `shape` attribute of an entry: 1-D, at most MAX_DIMS integer sizes, none negative, elements in an int64."""
    where = attribute_where(group, "shape")
    if "shape" not in group.attrs:
        raise WeightsFileError(f"{path}: {where} is missing")
    value = read_attribute(group, "shape", path)
    if not (isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu"):
        raise WeightsFileError(f"{path}: {where} holds {describe_value(value)}, not a 1-D array of integers")
    if len(value) > MAX_DIMS:
        raise WeightsFileError(f"{path}: {where} has {len(value)} sizes, more than {MAX_DIMS}")
    shape = tuple(int(size) for size in value.tolist())
    if any(size < 0 for size in shape):
        raise WeightsFileError(f"{path}: {where} holds a negative size: {shape}")
    if math.prod(max(size, 1) for size in shape) > INT64_MAX:
        raise WeightsFileError(f"{path}: {where} declares shape {shape}, more elements than an int64 counts")
    return shape


def _read_entry(entry: Union[h5py.Dataset, _Sparse], path: str) -> np.ndarray:
    """The dense array of an entry; a compressed one's indices are checked before its array is allocated."""
    if not isinstance(entry, _Sparse):
        return read_dataset(entry, path)
    size = math.prod(entry.shape)
    indices = read_dataset(entry.indices, path)
    if indices.size and not (indices[1:] > indices[:-1]).all():
        raise WeightsFileError(f"{path}: '{entry_name(entry.indices)}' is not strictly increasing")
    if indices.size and (indices[0] < 0 or indices[-1] >= size):
        raise WeightsFileError(f"{path}: '{entry_name(entry.indices)}' holds positions outside [0, {size}) "
                               f"(from {indices[0]} to {indices[-1]})")
    values = read_dataset(entry.values, path)
    try:
        dense = np.zeros(size, dtype=values.dtype).reshape(entry.shape)
    except (MemoryError, ValueError) as exc:  # ValueError: more bytes than an address can count
        raise WeightsFileError(f"{path}: {entry.where} declares shape {entry.shape} "
                               f"({format_bytes(size * values.dtype.itemsize)}), more than can be allocated") from exc
    dense.reshape(-1)[indices.astype(np.int64)] = values
    return dense


def _open(path: str, expected: str) -> h5py.File:
    """`path` opened read-only if its `format` attribute is `expected`, else WeightsFileError in one line."""
    f = open_hdf5(path)
    try:
        found = format_attribute(f, path)
    except BaseException:
        f.close()
        raise
    if found != expected:
        f.close()
        raise WeightsFileError(f"{path}: holds {found or 'plain weights'}, not {expected}")
    return f
