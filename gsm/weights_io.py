"""hdf5 weights files in the released code's format: one dataset per state-dict key ('/' stored as '+').

The readers here and in gsm.pruned_io take a file as data from elsewhere: the metadata of each entry (its link,
where its data lies, its declared shape and dtype) is checked before any of its data is read or allocated, so that
a malformed or crafted file raises WeightsFileError in one line naming the file and the entry, instead of
allocating whatever size it declares, reading another file, or broadcasting into a model."""
import contextlib
import math
import os
import warnings
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from gsm.atomic_write import write_atomic
from gsm.wrappers import unwrap_model

NUMERIC_KINDS = "biuf"  # numpy dtype kinds: bool, signed and unsigned integers, floats
# What each kind rule says when a dataset breaks it.
_DTYPE_RULES = {NUMERIC_KINDS: "a weights file holds only numeric arrays", "b": "a mask file holds only bool arrays",
                "iu": "indices must be integers"}
# The numeric dtypes a tensor can hold (torch.from_numpy): no float128, complex, strings or records.
_TENSOR_DTYPES = frozenset(["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                            "float16", "float32", "float64"])
# deflate, the strongest of hdf5's standard filters, expands its input at most 1032 times (a 258-byte match costs
# at least 2 bits): a filtered dataset that declares more bytes than that per stored byte cannot be genuine.
MAX_EXPANSION = 1032
# What h5py and numpy raise on a file that passed the checks but is corrupted further in.
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, OverflowError, MemoryError)


class WeightsFileError(ValueError):
    """A weights file that is missing, unreadable, malformed, or does not fit the model. Its message is always one
    line (any line break in what it quotes from the file or from h5py becomes a space)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(" ".join(line.strip() for line in str(message).splitlines()))


def stored_name(key: str) -> str:
    """The hdf5 dataset name of a state-dict key ('/' would make a group: stored as '+')."""
    return key.replace("/", "+")


def key_name(stored: str) -> str:
    return stored.replace("+", "/")


def state_dict_of(model: nn.Module) -> Dict[str, Tensor]:
    """The state dict of a model with the keys of the plain model (no wrapper prefixes)."""
    return unwrap_model(model).state_dict()


def write_hdf5_atomic(path: Union[str, os.PathLike], write: Callable[[h5py.File], None]) -> None:
    """Create an hdf5 file by `write(file)`, atomically (gsm.atomic_write): a crash never leaves a partial file
    under `path`. Entries keep the order of writing."""
    def write_file(temporary: str) -> None:
        with h5py.File(temporary, "w", track_order=True) as f:
            write(f)
    write_atomic(path, write_file)


def save_hdf5(model: Union[nn.Module, Mapping[str, Tensor]], path: Union[str, os.PathLike]) -> None:
    """Write every state-dict entry as a numpy dataset, atomically (see write_hdf5_atomic)."""
    tensors = state_dict_of(model) if isinstance(model, nn.Module) else model

    def write(f: h5py.File) -> None:
        for key, value in tensors.items():
            array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            f.create_dataset(stored_name(key), data=array)
    write_hdf5_atomic(path, write)


def read_hdf5(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """Every dataset of a weights file by state-dict key. Raises WeightsFileError with a one-line reason for a
    missing file, a file that is not hdf5, or one with no arrays, with non-numeric data, or with an entry that
    checked_dataset refuses (a link, a group, data stored elsewhere, more declared than stored)."""
    path = os.fspath(path)
    with entry_errors(path), open_hdf5(path) as f:
        return {key_name(name): read_dataset(dataset, path) for name, dataset in _weights_datasets(f, path).items()}


def load_hdf5(path: Union[str, os.PathLike], model: nn.Module) -> nn.Module:
    """Load a weights file into `model` in place (all keys must match) and return the model. Raises
    WeightsFileError naming the missing, unexpected, mis-shaped and mis-typed keys (up to ten of each kind, and
    how many more), found from the file's metadata before any data is read; the model is changed only when the
    whole file fits. (The order `load_hdf5(model, path)` of earlier versions still works, with a
    DeprecationWarning: every loader takes the path first, every saver the object first.)"""
    if isinstance(path, nn.Module):
        warnings.warn("load_hdf5(model, path) is deprecated: call load_hdf5(path, model), as every gsm loader takes "
                      "the path first", DeprecationWarning, stacklevel=2)
        path, model = model, path
    path = os.fspath(path)
    target = state_dict_of(model)
    with entry_errors(path), open_hdf5(path) as f:
        datasets = {key_name(name): dataset for name, dataset in _weights_datasets(f, path).items()}
        check_fits(path, {key: (dataset.shape, dataset.dtype) for key, dataset in datasets.items()}, target)
        arrays = {key: read_dataset(datasets[key], path) for key in target}
    copy_into(path, target, arrays)
    return model


def _weights_datasets(f: h5py.File, path: str) -> Dict[str, h5py.Dataset]:
    """The checked datasets of a weights file by stored name; a marked file (mask, export) or none is refused."""
    marked = format_attribute(f, path)
    if marked is not None:
        raise WeightsFileError(f"{path}: a {marked} file, not a weights file (read it with gsm.load_mask or "
                               f"gsm.load_sparse; display_hdf5.py shows all three)")
    datasets = checked_datasets(f, path)
    if not datasets:
        raise WeightsFileError(f"{path}: the file holds no arrays")
    return datasets


def check_fits(path: str, declared: Mapping[str, Tuple[Sequence[int], np.dtype]], target: Mapping[str, Tensor]
               ) -> None:
    """Raise WeightsFileError unless the file's {key: (shape, dtype)} has the model's keys and shapes, each of a
    dtype that the model's tensor can take (see _takes); the message names every problem in one line."""
    missing = [k for k in target if k not in declared]
    unexpected = [k for k in declared if k not in target]
    common = [k for k in target if k in declared]
    misshaped = [f"{k} (file {tuple(declared[k][0])}, model {tuple(target[k].shape)})"
                 for k in common if tuple(declared[k][0]) != tuple(target[k].shape)]
    mistyped = [f"{k} (file {declared[k][1]}, model {target[k].dtype})"
                for k in common if not _takes(target[k].dtype, declared[k][1])]
    problems = [f"{kind} keys: {_first_names(names)}" for kind, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                 ("mis-typed", mistyped)) if names]
    if problems:
        raise WeightsFileError(f"{path} does not fit the model: " + "; ".join(problems))


def _takes(tensor_dtype: torch.dtype, dtype: np.dtype) -> bool:
    """Whether `dtype` data keeps its meaning in a `tensor_dtype` tensor: no float in an integer, only bool in bool."""
    if tensor_dtype == torch.bool:
        return dtype.kind == "b"
    if tensor_dtype.is_floating_point or tensor_dtype.is_complex:
        return True
    return dtype.kind in "biu"


def copy_into(path: str, target: Mapping[str, Tensor], arrays: Mapping[str, np.ndarray]) -> None:
    """Copy each array into the model's tensor of the same key once all of them are checked: the same shape
    (never broadcast), and values within an integer tensor's range. Nothing is copied unless all pass."""
    for key, tensor in target.items():
        array = arrays[key]
        if tuple(array.shape) != tuple(tensor.shape):
            raise WeightsFileError(f"{path}: '{key}' holds shape {tuple(array.shape)}, the model's tensor has shape "
                                   f"{tuple(tensor.shape)}")
        if array.size and array.dtype.kind in "iu" and not (tensor.dtype.is_floating_point or tensor.is_complex()):
            info = torch.iinfo(tensor.dtype)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise WeightsFileError(f"{path}: '{key}' holds values from {low} to {high}, outside the range of "
                                       f"the model's {tensor.dtype}")
    with torch.no_grad():
        for key, tensor in target.items():
            tensor.copy_(torch.from_numpy(arrays[key]).to(tensor.dtype))


def _first_names(names, limit: int = 10) -> str:
    """Up to `limit` names, then how many more: another model's file would otherwise list hundreds."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# Reading hdf5 files from elsewhere, shared with gsm.pruned_io: open, look at the metadata, then read.

@contextlib.contextmanager
def entry_errors(path: str, where: Optional[str] = None) -> Iterator[None]:
    """Turn what h5py or numpy raise on a corrupted file into WeightsFileError naming the file and `where` in it
    (e.g. "'dense/0.bias'"); a WeightsFileError passes unchanged."""
    try:
        yield
    except WeightsFileError:
        raise
    except _READ_ERRORS as exc:
        place = f"{where} " if where else ""
        reason = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        raise WeightsFileError(f"{path}: {place}cannot be read ({reason})") from exc


def open_hdf5(path: str) -> h5py.File:
    """`path` opened read-only, or WeightsFileError saying why it cannot be (missing, a folder, empty, not hdf5)."""
    if not os.path.exists(path):
        raise WeightsFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise WeightsFileError(f"{path}: is a folder, not an hdf5 weights file")
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path}: not a regular file, not an hdf5 weights file")
    if os.path.getsize(path) == 0:
        raise WeightsFileError(f"{path}: the file is empty (0 bytes), not an hdf5 weights file")
    try:
        return h5py.File(path, "r")
    except _READ_ERRORS as exc:
        raise WeightsFileError(f"{path}: not a readable hdf5 file ({exc.__class__.__name__})") from exc


def format_attribute(f: h5py.File, path: str) -> Optional[str]:
    """The root's `format` attribute (what gsm.pruned_io marks its files with), None where there is none."""
    if "format" not in f.attrs:
        return None
    value = read_attribute(f, "format", path)
    if isinstance(value, bytes):
        with entry_errors(path, "attribute 'format'"):
            value = value.decode()
    if not isinstance(value, str):
        raise WeightsFileError(f"{path}: attribute 'format' holds {describe_value(value)}, not a string")
    return str(value)


def read_attribute(obj: Union[h5py.Group, h5py.Dataset], name: str, path: str):
    """The attribute `name` of `obj` as h5py reads it, once its declared number of values is checked against the
    bytes it stores (each value takes at least one), which bounds what reading it allocates."""
    where = attribute_where(obj, name)
    with entry_errors(path, where):
        attribute = obj.attrs.get_id(name)
        count = 0 if attribute.shape is None else math.prod(attribute.shape)  # None: a null dataspace
        if count:  # hdf5 reports an error for the storage size of an empty attribute
            stored = attribute.get_storage_size()
            if count > stored or stored > obj.file.id.get_filesize():
                raise WeightsFileError(f"{path}: {where} declares {count} values but stores {stored} bytes")
        return obj.attrs[name]


def attribute_where(obj: Union[h5py.Group, h5py.Dataset], name: str) -> str:
    """How messages name attribute `name` of `obj`: "attribute 'keys'" on the root, else "... of 'entry'"."""
    entry = entry_name(obj)
    return f"attribute '{name}'" + (f" of '{entry}'" if entry else "")


def entry_name(obj: Union[h5py.Group, h5py.Dataset], name: Optional[str] = None) -> str:
    """The path of `obj` (or of its member `name`) in its file, without the leading '/': what messages call it."""
    full = obj.name if name is None else f"{obj.name.rstrip('/')}/{name}"
    return full.lstrip("/")


def hard_linked(group: h5py.Group, name: str, path: str):
    """Member `name` of `group`, which must be reached by a hard link: a soft link could point anywhere in the file,
    an external link into another file."""
    where = f"'{entry_name(group, name)}'"
    with entry_errors(path, where):
        link = group.get(name, getlink=True)
        if link is None:
            raise WeightsFileError(f"{path}: {where} is missing")
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise WeightsFileError(f"{path}: {where} is {kind}; a weights file holds its entries itself")
        return group[name]


def checked_datasets(group: h5py.Group, path: str, kinds: str = NUMERIC_KINDS) -> Dict[str, h5py.Dataset]:
    """Every member of `group` by name, each checked by checked_dataset (so none is a group or a link)."""
    with entry_errors(path, f"'{entry_name(group)}'" if entry_name(group) else None):
        names = list(group.keys())
    return {name: checked_dataset(group, name, path, kinds) for name in names}


def checked_dataset(group: h5py.Group, name: str, path: str, kinds: str = NUMERIC_KINDS) -> h5py.Dataset:
    """Dataset `name` of `group`, checked from its metadata alone, before anything is read or allocated: reached by
    a hard link, holding its own data in this file (no external storage, not virtual), of a dtype of one of the
    numpy `kinds` that a tensor can hold, and storing enough bytes for the shape it declares."""
    dataset = hard_linked(group, name, path)
    where = f"'{entry_name(group, name)}'"
    with entry_errors(path, where):
        if not isinstance(dataset, h5py.Dataset):
            kind = "group" if isinstance(dataset, h5py.Group) else "named datatype"
            raise WeightsFileError(f"{path}: {where} is a {kind}; a weights file holds only arrays")
        if dataset.external:
            raise WeightsFileError(f"{path}: {where} keeps its data in an external file ({dataset.external[0][0]}); "
                                   f"a weights file holds its data itself")
        if dataset.is_virtual:
            raise WeightsFileError(f"{path}: {where} is a virtual dataset (mapped from other datasets); a weights "
                                   f"file holds its data itself")
        dtype = dataset.dtype
        if dtype.kind not in kinds:
            raise WeightsFileError(f"{path}: {where} holds {dtype} data; {_DTYPE_RULES[kinds]}")
        if dtype.name not in _TENSOR_DTYPES or dtype.fields is not None:
            raise WeightsFileError(f"{path}: {where} holds {dtype} data, which a tensor cannot hold")
        if dataset.shape is None:
            raise WeightsFileError(f"{path}: {where} has a null dataspace (no shape); a weights file holds arrays")
        _check_storage(dataset, path, where)
    return dataset


def _check_storage(dataset: h5py.Dataset, path: str, where: str) -> None:
    """Refuse a dataset storing fewer bytes than it declares: unwritten storage reads as fill values of any size."""
    declared = math.prod(dataset.id.get_space().get_simple_extent_dims()) * dataset.id.get_type().get_size()
    if declared == 0:
        return
    stored = dataset.id.get_storage_size()
    file_size = dataset.file.id.get_filesize()
    if stored > file_size:
        raise WeightsFileError(f"{path}: {where} claims {stored} bytes of storage in a file of {file_size} bytes")
    filtered = dataset.id.get_create_plist().get_nfilters() > 0
    if not filtered and stored < declared:
        raise WeightsFileError(f"{path}: {where} declares shape {dataset.shape} ({format_bytes(declared)}) but "
                               f"stores {format_bytes(stored)}")
    if filtered and stored * MAX_EXPANSION < declared:
        raise WeightsFileError(f"{path}: {where} declares shape {dataset.shape} ({format_bytes(declared)}) but "
                               f"stores {stored} compressed bytes (deflate expands at most {MAX_EXPANSION}x)")


def read_dataset(dataset: h5py.Dataset, path: str) -> np.ndarray:
    """The data of a dataset that checked_dataset passed, in native byte order; a bool array must hold only the
    bytes 0 and 1 (hdf5 hands a bool's stored byte over unchanged)."""
    where = f"'{entry_name(dataset)}'"
    with entry_errors(path, where):
        array = np.asarray(dataset[()])
        if array.shape != dataset.shape:
            raise WeightsFileError(f"{path}: {where} read as shape {array.shape}, not its shape {dataset.shape}")
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
        if array.dtype == np.bool_ and array.view(np.uint8).max(initial=0) > 1:
            raise WeightsFileError(f"{path}: {where} holds bool values other than 0 and 1")
    return array


def format_bytes(count: int) -> str:
    """A byte count for messages: '1 byte', '512 bytes', '4.00 TiB'."""
    if count < 1024:
        return f"{count} byte" + ("" if count == 1 else "s")
    size = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB"):
        size /= 1024
        if size < 1024:
            break
    else:
        size, unit = size / 1024, "YiB"
    return f"{size:.2f} {unit}"


def describe_value(value) -> str:
    """What an unexpected attribute value is, for a message: 'int64', 'an array of int64 of shape (2,)'."""
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} of shape {value.shape}"
    return type(value).__name__
