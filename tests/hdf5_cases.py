"""Damaged hdf5 files for the tests of the readers (test_weights_io, test_pruned_io, test_file_fuzz).

Valid files of the three kinds (a weights file, a mask, a compressed export) of a tiny model; a catalogue of ways
to damage them, each saying what a reader must then do (a Verdict); and `check_outcome`, which loads a file with
every reader of its kind and asserts that each either returns exactly what the file holds (read independently,
with plain h5py) or raises WeightsFileError in one line naming the file, leaving the model unchanged.

Run as a script, it serves `check_outcome` to a parent process (one JSON line per file): libhdf5 can hang or crash
on some corrupted files, which the parent must survive."""
from __future__ import annotations

import json
import math
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch
from torch import nn

import gsm
from gsm.weights_io import WeightsFileError, key_name

KINDS = ("weights", "mask", "sparse")
SOURCE = "source.hdf5"  # an intact copy beside the damaged file: what external links and storage point to
# The dtypes a tensor can hold; every other dtype is refused.
TENSOR_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                 "float32", "float64"}


def tiny_model(seed: int = 0) -> nn.Module:
    """Linear 4->3, BatchNorm, Linear 3->2: a few weights zero (what the export leaves out), the BatchNorm buffers
    (one of them the int64 num_batches_tracked) not at their defaults."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0, :2] = 0.0
        model[2].weight[1, 1] = 0.0
        model[1].running_mean.uniform_(-1.0, 1.0)
        model[1].num_batches_tracked.fill_(7 + seed)
    return model


MODEL_STATE = tiny_model().state_dict()


def write_valid(kind: str, path: Path) -> None:
    """The file of `kind` that the writers make for tiny_model(0); the mask keeps the non-zero parameters."""
    model = tiny_model()
    if kind == "weights":
        gsm.save_hdf5(model, path)
    elif kind == "mask":
        gsm.save_mask({name: p != 0 for name, p in model.named_parameters()}, path)
    else:
        gsm.save_sparse(model, path)


def dataset_names(path: Path) -> list:
    """The paths of every dataset in a file (what the data mutations act on)."""
    with h5py.File(path, "r") as f:
        return dataset_names_of(f)


def dataset_names_of(f: h5py.File) -> list:
    """The paths of the datasets of an open file."""
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def sparse_names(path: Path) -> list:
    """The stored names of the compressed entries of an export."""
    with h5py.File(path, "r") as f:
        return list(f["sparse"])


# What a reader must do with a damaged file.

class Verdict(NamedTuple):
    """file_ok: what the readers without a model must do (True: load, False: refuse, None: either); model_ok: the
    same for loading into tiny_model; same: the file holds the intact file's arrays (stored another way)."""
    file_ok: Optional[bool]
    model_ok: Optional[bool]
    same: bool = False


KEEPS, SAME, MISFITS, BREAKS, EITHER = (Verdict(True, True), Verdict(True, True, True), Verdict(True, False),
                                        Verdict(False, False), Verdict(None, None))


def takes(tensor_dtype: torch.dtype, dtype: np.dtype) -> bool:
    """The spec: float tensors take any number, integer tensors integers and bools, bool tensors only bools."""
    if tensor_dtype == torch.bool:
        return dtype.kind == "b"
    return tensor_dtype.is_floating_point or dtype.kind in "biu"


def role(kind: str, name: str) -> str:
    """What dataset `name` is in a file of `kind`: 'mask', 'indices', 'values', or 'tensor' (a dense entry)."""
    if kind == "mask":
        return "mask"
    if kind == "sparse" and name.startswith("sparse/"):
        return name.rsplit("/", 1)[1]
    return "tensor"


def model_key(name: str) -> str:
    """The state-dict key of a dataset path ('dense/0.bias', 'sparse/0.weight/values', '0.bias')."""
    parts = name.split("/")
    return key_name(parts[1] if parts[0] in ("dense", "sparse") else parts[0])


def data_verdict(kind: str, name: str, old_shape: tuple, shape: tuple, dtype: np.dtype) -> Verdict:
    """The verdict for dataset `name` rewritten with `shape` and `dtype` (values that stay valid)."""
    numeric = dtype.kind in "biuf" and dtype.name in TENSOR_DTYPES and dtype.fields is None
    part = role(kind, name)
    if part == "mask":
        return Verdict(dtype.kind == "b" and numeric, None)
    if part == "indices":
        return KEEPS if numeric and dtype.kind in "iu" and shape == old_shape else BREAKS
    target = MODEL_STATE[model_key(name)]
    fits = numeric and takes(target.dtype, dtype)
    if part == "values":
        return Verdict(True, fits) if numeric and shape == old_shape else BREAKS
    return Verdict(numeric, fits and shape == tuple(target.shape))


# The catalogue. Each mutation damages the file at `path` (its entry `target`, when it takes one) and returns the
# Verdict; CATALOGUE says which file kinds and targets each applies to and the choices of its parameters.

def h5_mutation(mutate: Callable) -> Callable:
    """A mutation that edits the file through h5py (opened read-write) rather than as bytes."""
    def apply(path: Path, kind: str, target: Optional[str], **params) -> Verdict:
        with h5py.File(path, "r+") as f:
            return mutate(f, kind, target, **params)
    apply.__name__ = mutate.__name__
    return apply


def _replace(f: h5py.File, name: str, data=None, **kwargs) -> None:
    """Dataset `name` deleted and made again from `data` and create_dataset's keyword arguments."""
    del f[name]
    f.create_dataset(name, data=data, **kwargs)


def _entry_shape(f: h5py.File, name: str) -> tuple:
    """The dense shape of the entry that dataset `name` belongs to."""
    parts = name.split("/")
    return tuple(f["sparse"][parts[1]].attrs["shape"]) if parts[0] == "sparse" else f[name].shape


@h5_mutation
def new_values(f, kind, target, seed: int) -> Verdict:
    """Other valid values in place: random numbers, bools, or other sorted positions for indices."""
    old = f[target][()]
    rng = np.random.default_rng(seed)
    if role(kind, target) == "indices":
        new = np.sort(rng.choice(math.prod(_entry_shape(f, target)), size=old.size, replace=False))
    elif old.dtype.kind == "b":
        new = rng.random(old.shape) < 0.5
    elif old.dtype.kind in "iu":
        new = rng.integers(0, 100, old.shape)
    else:
        new = rng.standard_normal(old.shape)
    f[target][()] = np.asarray(new).astype(old.dtype)
    return KEEPS


LAYOUTS = {"gzip": dict(compression="gzip", compression_opts=9), "shuffle+gzip": dict(compression="gzip", shuffle=True),
           "lzf": dict(compression="lzf"), "chunked": dict(chunks=True), "fletcher32": dict(fletcher32=True),
           "big-endian": {}}


@h5_mutation
def restore(f, kind, target, layout: str) -> Verdict:
    """The same data stored another way: compressed, chunked, checksummed, or big-endian."""
    data = f[target][()]
    if layout == "big-endian" or np.ndim(data) == 0:  # a scalar cannot be chunked
        _replace(f, target, data.astype(data.dtype.newbyteorder(">")) if data.dtype.kind != "b" else data)
    else:
        _replace(f, target, data, **LAYOUTS[layout])
    return SAME


@h5_mutation
def retype(f, kind, target, dtype: str, nan: bool) -> Verdict:
    """The data converted to another dtype (strings, complex and long double included), a NaN first if float."""
    old = f[target][()]
    new_dtype = np.dtype(dtype)
    if new_dtype.kind == "b":
        new = old != 0
    elif new_dtype.kind in "iu" and role(kind, target) != "indices":
        info = np.iinfo(new_dtype)
        new = np.clip(np.round(old.astype(np.float64) * 10), info.min, info.max).astype(new_dtype)
    else:
        new = np.asarray(old.astype(new_dtype))
        if nan and new_dtype.kind in "fc" and new.size:
            new.reshape(-1)[0] = np.nan
    _replace(f, target, new)
    return data_verdict(kind, target, old.shape, new.shape, new.dtype)


RESHAPES = {"flat": lambda shape: (math.prod(shape),), "row": lambda shape: (1, math.prod(shape)),
            "extra dim": lambda shape: shape + (1,), "empty": lambda shape: (0,) + shape[1:],
            "one value": lambda shape: (1,), "scalar": lambda shape: ()}


@h5_mutation
def reshape(f, kind, target, how: str) -> Verdict:
    """The data under another shape: flattened, one row, a dimension more, empty, or its first value alone (as an
    array or a scalar)."""
    old = f[target][()]
    shape = RESHAPES[how](old.shape)
    new = old.reshape(-1)[:math.prod(shape)].reshape(shape)
    _replace(f, target, new)
    return data_verdict(kind, target, old.shape, shape, old.dtype)


@h5_mutation
def unstored(f, kind, target, how: str) -> Verdict:
    """A dataset that declares more than it stores: never written, partly written chunks, or 2^40 elements."""
    old = f[target]
    shape, dtype = old.shape, old.dtype
    if how == "partly written" and old.size > 1:
        _replace(f, target, shape=shape, dtype=dtype, chunks=(1,) * len(shape))
        f[target][(0,) * len(shape)] = 1
    elif how == "huge":
        _replace(f, target, shape=(2 ** 20, 2 ** 20), dtype="f4")
    elif how == "huge with fill value":
        _replace(f, target, shape=(2 ** 20, 2 ** 20), dtype="f4", chunks=(1024, 1024), fillvalue=1.0)
    elif how == "huge compressed":
        _replace(f, target, shape=(2 ** 20, 2 ** 20), dtype="f4", chunks=(1024, 1024), compression="gzip")
        f[target][:1024, :1024] = 0.0
    else:
        _replace(f, target, shape=shape, dtype=dtype)
    return BREAKS


@h5_mutation
def replace(f, kind, target, what: str) -> Verdict:
    """The dataset replaced by something else at its name: a link, a group, data stored elsewhere, a string..."""
    old = f[target][()]
    source = str(Path(f.filename).parent / SOURCE)
    if what in LINKS or what in ("group", "named datatype"):
        other = next(name for name in dataset_names_of(f) if name != target)
        del f[target]
        if what == "group":
            f.create_group(target)
        elif what == "named datatype":
            f[target] = np.dtype("f4")
        else:
            f[target] = LINKS[what](source, target, other)
    if what == "external storage":
        raw = Path(f.filename).parent / "raw.bin"
        raw.write_bytes(np.ascontiguousarray(old).tobytes())
        _replace(f, target, shape=old.shape, dtype=old.dtype, external=[(str(raw), 0, old.nbytes)])
    elif what == "virtual":
        layout = h5py.VirtualLayout(shape=old.shape, dtype=old.dtype)
        layout[...] = h5py.VirtualSource(source, "/" + target, shape=old.shape)
        del f[target]
        f.create_virtual_dataset(target, layout)
    elif what == "null dataspace":
        _replace(f, target, h5py.Empty(old.dtype))
    elif what == "strings":
        _replace(f, target, np.array([b"w"] * max(1, old.size)))
    elif what == "records":
        _replace(f, target, np.zeros(max(1, old.size), dtype=[("x", "f4"), ("y", "i4")]))
    return BREAKS


LINKS = {"soft link": lambda source, target, other: h5py.SoftLink("/" + other),
         "dangling soft link": lambda source, target, other: h5py.SoftLink("/nowhere"),
         "external link": lambda source, target, other: h5py.ExternalLink(source, "/" + target)}


@h5_mutation
def drop(f, kind, target) -> Verdict:
    """An entry of a weights or mask file deleted."""
    del f[target]
    return Verdict(True, None) if kind == "mask" else MISFITS


@h5_mutation
def add(f, kind, target, link: bool) -> Verdict:
    """An entry added to a weights or mask file: a copy of `target`, or a second hard link to it."""
    if link:
        f[target + ".again"] = f[target]
    else:
        f[target + ".again"] = f[target][()]
    return Verdict(True, None) if kind == "mask" else MISFITS


def _keys(f: h5py.File) -> list:
    """The attribute `keys` of an export as a list of str."""
    return [k.decode() if isinstance(k, bytes) else k for k in f.attrs["keys"]]


def _set_keys(f: h5py.File, keys) -> None:
    """Write the attribute `keys` as the writer does."""
    f.attrs["keys"] = np.array(keys, dtype=h5py.string_dtype())


@h5_mutation
def drop_key(f, kind, target, where: str) -> Verdict:
    """A key of an export deleted from its group, from the attribute `keys`, or from both."""
    stored = target.split("/")[1]
    if where in ("group", "both"):
        del f[target]
    if where in ("keys", "both"):
        _set_keys(f, [k for k in _keys(f) if k != stored])
    return MISFITS if where == "both" else BREAKS


@h5_mutation
def add_key(f, kind, target, where: str) -> Verdict:
    """A copy of an export's entry `target` under a new key, listed in `keys` or not, or in the other group too."""
    group, stored = target.split("/")[:2]
    if where == "other group":
        other = "sparse" if group == "dense" else "dense"
        f.copy(f[group][stored], f[other], name=stored)
        return BREAKS
    f.copy(f[group][stored], f[group], name=stored + ".again")
    if where == "keys":
        _set_keys(f, _keys(f) + [stored + ".again"])
        return MISFITS
    return BREAKS


KEYS_CHANGES = {
    "duplicate": lambda keys: np.array(keys + keys[:1], dtype=h5py.string_dtype()),
    "reversed": lambda keys: np.array(keys[::-1], dtype=h5py.string_dtype()),
    "fixed-length bytes": lambda keys: np.array([k.encode() for k in keys]),
    "scalar": lambda keys: keys[0],
    "2-D": lambda keys: np.array([keys], dtype=h5py.string_dtype()),
    "integers": lambda keys: np.arange(len(keys)),
    "a path": lambda keys: np.array(["dense/" + keys[0]] + keys[1:], dtype=h5py.string_dtype()),
    "the group itself": lambda keys: np.array(["."] + keys[1:], dtype=h5py.string_dtype()),
    "missing": None,
}


@h5_mutation
def keys_attribute(f, kind, target, change: str) -> Verdict:
    """The attribute `keys` of an export changed: reordered or bytes (still valid), or malformed."""
    if change == "missing":
        del f.attrs["keys"]
    else:
        f.attrs["keys"] = KEYS_CHANGES[change](_keys(f))
    return SAME if change in ("reversed", "fixed-length bytes") else BREAKS


@h5_mutation
def members(f, kind, target, change: str) -> Verdict:
    """The groups of an export changed: a member added to the root or to an entry, a group turned into a dataset,
    an entry without values."""
    if change == "root member":
        f["extra"] = np.zeros(2)
    elif change == "entry member":
        f[target]["extra"] = np.zeros(2)
    elif change == "entry as dataset":
        values = f[target]["values"][()]
        del f[target]
        f[target] = values
    elif change == "no values":
        del f[target]["values"]
    else:
        del f["dense"]
        f["dense"] = np.zeros(2)
    return BREAKS


SHAPES = {"one row": lambda shape: [1, math.prod(shape)], "swapped": lambda shape: list(shape[::-1]),
          "extra dim": lambda shape: list(shape) + [1], "first dim 1": lambda shape: [1] + list(shape[1:]),
          "negative": lambda shape: [-shape[0]] + list(shape[1:]), "empty": lambda shape: np.zeros(0, np.int64),
          "floats": lambda shape: np.array(shape, dtype=np.float64), "scalar": lambda shape: np.int64(shape[0]),
          "2-D": lambda shape: np.array([shape]), "65 dims": lambda shape: list(shape) + [1] * 63,
          "overflow": lambda shape: [2 ** 40, 2 ** 40], "too big to allocate": lambda shape: [2 ** 31, 2 ** 31],
          "string": lambda shape: str(shape), "unsigned": lambda shape: np.array(shape, dtype=np.uint64),
          "missing": None}


@h5_mutation
def shape_attribute(f, kind, target, change: str) -> Verdict:
    """The `shape` attribute of a compressed entry changed: valid as long as the indices fit the new shape."""
    group = f[target]
    shape = tuple(int(size) for size in group.attrs["shape"])
    if change == "missing":
        del group.attrs["shape"]
        return BREAKS
    new = SHAPES[change](shape)
    group.attrs["shape"] = np.asarray(new, dtype=np.int64) if isinstance(new, list) else new
    if change in ("one row", "swapped", "extra dim", "first dim 1", "unsigned"):
        fits = int(group["indices"][()].max()) < math.prod(new)
        return SAME if change == "unsigned" else Verdict(fits, False)
    return BREAKS


INDEX_CHANGES = ("duplicate", "negative", "out of range", "unsorted", "one fewer", "huge unsigned", "moved")


@h5_mutation
def indices(f, kind, target, change: str) -> Verdict:
    """The indices of a compressed entry changed: another free position (valid), or broken."""
    positions = f[target]["indices"][()]
    size = math.prod(tuple(f[target].attrs["shape"]))
    if change == "moved":
        free = np.setdiff1d(np.arange(size), positions)
        positions = np.sort(np.concatenate([positions[1:], free[:1]])).astype(positions.dtype)
    elif change == "huge unsigned":
        positions = positions.astype(np.uint64)
        positions[-1] = 2 ** 63 + 5
    elif change == "one fewer":
        positions = positions[:-1]
    else:
        positions = positions.copy()
        if change == "duplicate":
            positions[1] = positions[0]
        elif change == "negative":
            positions[0] = -1
        elif change == "out of range":
            positions[-1] = size
        else:  # unsorted
            positions[[0, 1]] = positions[[1, 0]]
    _replace(f, f[target]["indices"].name, positions)
    return KEEPS if change == "moved" else BREAKS


@h5_mutation
def format_mark(f, kind, target, change: str) -> Verdict:
    """The root's `format` attribute removed, set to another file kind, to a number, an array or bytes."""
    own = f.attrs.get("format", "gsm-mask-v1")
    other = "gsm-sparse-v1" if own == "gsm-mask-v1" else "gsm-mask-v1"
    if change == "missing":
        if "format" in f.attrs:
            del f.attrs["format"]
        return SAME if kind == "weights" else BREAKS
    f.attrs["format"] = {"other kind": other, "number": np.int64(1), "bytes": np.bytes_(own.encode()),
                         "array": np.array([own], dtype=h5py.string_dtype())}[change]
    return SAME if kind != "weights" and change == "bytes" else BREAKS


def bool_byte(path: Path, kind: str, target: str, value: int) -> Verdict:
    """A mask value's stored byte set to something other than 0 or 1 (hdf5 hands it over unchanged)."""
    with h5py.File(path, "r") as f:
        offset = f[target].id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))
    return BREAKS


def truncate(path: Path, kind: str, target: None, removed: int) -> Verdict:
    """The last `removed` bytes of the file cut off (at least one, at most the whole file)."""
    data = path.read_bytes()
    path.write_bytes(data[:max(0, len(data) - removed)])
    return BREAKS


def flip(path: Path, kind: str, target: None, bits: Sequence[Tuple[int, int]]) -> Verdict:
    """Bits flipped anywhere in the file, as (byte position modulo the size, bit): anything may follow."""
    data = bytearray(path.read_bytes())
    for position, bit in bits:
        data[position % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))
    return EITHER


class Mutation(NamedTuple):
    """A catalogue entry: the function, the file kinds it applies to, what it acts on ('data': a dataset path,
    'entry': a compressed entry's group path, 'key': a dense or compressed entry of an export, None: the file),
    and the choices of each of its parameters."""
    apply: Callable[..., Verdict]
    kinds: Tuple[str, ...]
    target: Optional[str]
    choices: Dict[str, Sequence]


ALL, PLAIN, EXPORT = KINDS, ("weights", "mask"), ("sparse",)
CATALOGUE = {
    "new values": Mutation(new_values, ALL, "data", {"seed": range(1000)}),
    "restore": Mutation(restore, ALL, "data", {"layout": list(LAYOUTS)}),
    "retype": Mutation(retype, ALL, "data", {"dtype": ["f8", "f2", "i4", "u1", "i8", "bool", "c8", "S3",
                                                       np.dtype(np.longdouble).str], "nan": [False, True]}),
    "reshape": Mutation(reshape, ALL, "data", {"how": list(RESHAPES)}),
    "unstored": Mutation(unstored, ALL, "data", {"how": ["never written", "partly written", "huge",
                                                         "huge with fill value", "huge compressed"]}),
    "replace": Mutation(replace, ALL, "data", {"what": ["group", "soft link", "dangling soft link", "external link",
                                                        "named datatype", "external storage", "virtual",
                                                        "null dataspace", "strings", "records"]}),
    "drop": Mutation(drop, PLAIN, "data", {}),
    "add": Mutation(add, PLAIN, "data", {"link": [False, True]}),
    "drop key": Mutation(drop_key, EXPORT, "key", {"where": ["group", "keys", "both"]}),
    "add key": Mutation(add_key, EXPORT, "key", {"where": ["group", "keys", "other group"]}),
    "keys attribute": Mutation(keys_attribute, EXPORT, None, {"change": list(KEYS_CHANGES)}),
    "members": Mutation(members, EXPORT, "entry", {"change": ["root member", "entry member", "entry as dataset",
                                                              "no values", "dense as dataset"]}),
    "shape attribute": Mutation(shape_attribute, EXPORT, "entry", {"change": list(SHAPES)}),
    "indices": Mutation(indices, EXPORT, "entry", {"change": INDEX_CHANGES}),
    "format attribute": Mutation(format_mark, ALL, None, {"change": ["missing", "other kind", "number", "array",
                                                                      "bytes"]}),
    "bool byte": Mutation(bool_byte, ("mask",), "data", {"value": [2, 3, 128, 255]}),
    "truncate": Mutation(truncate, ALL, None, {"removed": range(1, 20000)}),
}
FLIP = Mutation(flip, ALL, None, {})


def targets(mutation: Mutation, path: Path) -> list:
    """What `mutation` can act on in the file at `path`."""
    if mutation.target == "data":
        return dataset_names(path)
    if mutation.target == "entry":
        return [f"sparse/{name}" for name in sparse_names(path)]
    if mutation.target == "key":
        with h5py.File(path, "r") as f:
            return [f"{group}/{name}" for group in ("dense", "sparse") for name in f[group]]
    return [None]


def damaged(folder: Path, kind: str, name: str, target: Optional[str] = None, **params) -> Tuple[Path, Verdict]:
    """A valid file of `kind` in `folder` (beside an intact copy, SOURCE) damaged by CATALOGUE[name]."""
    folder.mkdir(parents=True, exist_ok=True)
    write_valid(kind, folder / SOURCE)
    path = folder / f"{kind}.hdf5"
    shutil.copyfile(folder / SOURCE, path)
    mutation = {**CATALOGUE, "flip": FLIP}[name]
    if target is None and mutation.target is not None:
        target = targets(mutation, path)[0]
    return path, mutation.apply(path, kind, target, **params)


# The check.

def load(kind: str, path: Path, model: Optional[nn.Module]) -> Optional[Dict[str, np.ndarray]]:
    """What the reader of `kind` returns for `path` (loading into `model` when given) as numpy arrays; None for
    load_hdf5, which returns the model."""
    if kind == "weights" and model is None:
        return gsm.read_hdf5(path)
    if kind == "weights":
        assert gsm.load_hdf5(path, model) is model
        return None
    if kind == "mask":
        return {k: v.numpy() for k, v in gsm.load_mask(path).items()}
    return {k: v.numpy() for k, v in gsm.load_sparse(path, model).items()}


def reference(kind: str, path: Path) -> Dict[str, np.ndarray]:
    """The arrays the file holds, read with plain h5py as the format defines them (no checks)."""
    with h5py.File(path, "r") as f:
        if kind != "sparse":
            return {key_name(name): np.asarray(f[name][()]) for name in f}
        arrays = {}
        for stored in _keys(f):
            if stored in f["dense"]:
                arrays[key_name(stored)] = np.asarray(f["dense"][stored][()])
                continue
            group = f["sparse"][stored]
            shape = tuple(int(size) for size in group.attrs["shape"])
            dense = np.zeros(math.prod(shape), dtype=group["values"].dtype)
            dense[group["indices"][()]] = group["values"][()]
            arrays[key_name(stored)] = dense.reshape(shape)
        return arrays


def native(array: np.ndarray) -> np.ndarray:
    """`array` in native byte order (what torch.from_numpy takes)."""
    return array.astype(array.dtype.newbyteorder("="))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype (byte order aside), shape and bits (NaN equal to itself, -0.0 not to 0.0)."""
    a, b = native(np.asarray(a)), native(np.asarray(b))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_arrays(got: Dict[str, np.ndarray], expected: Dict[str, np.ndarray], ordered: bool = True) -> None:
    assert (list(got) if ordered else sorted(got)) == (list(expected) if ordered else sorted(expected))
    for key, value in expected.items():
        assert same_bits(got[key], value), (key, got[key], value)


def check_outcome(kind: str, path: Path, verdict: Verdict, intact: Optional[Dict[str, np.ndarray]] = None) -> str:
    """Load `path` with each reader of `kind` (without a model, and into tiny_model(1) for weights and exports):
    each must return exactly what `reference` reads, or raise WeightsFileError in one line naming `path` and
    leave the model as it was, as `verdict` requires; with verdict.same, what it loads is `intact`. Returns what
    happened ('loaded', 'refused', or both, without and with a model)."""
    outcomes = []
    for model in ([None] if kind == "mask" else [None, tiny_model(seed=1)]):
        must = verdict.file_ok if model is None else verdict.model_ok
        before = {} if model is None else {k: v.clone() for k, v in model.state_dict().items()}
        try:
            got = load(kind, path, model)
        except WeightsFileError as exc:
            message = str(exc)
            assert must is not True, f"refused a valid file: {message}"
            assert len(message.splitlines()) == 1 and str(path) in message, message
            assert model is None or all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            outcomes.append("refused")
            continue
        assert must is not False, f"loaded a file it should refuse ({'with' if model else 'without'} a model)"
        expected = reference(kind, path)
        if got is not None:
            assert_same_arrays(got, expected)
        if model is not None:  # the model's tensors keep their shapes and dtypes and take the file's values
            got = {k: v.numpy() for k, v in model.state_dict().items()}
            assert_same_arrays(got, {k: torch.from_numpy(native(expected[k])).to(v.dtype).numpy()
                                     for k, v in MODEL_STATE.items()}, ordered=False)
        if verdict.same and intact is not None:
            assert_same_arrays(got, intact, ordered=False)
        outcomes.append("loaded")
    return "/".join(outcomes)


def serve() -> None:
    """Answer check_outcome(kind, path, EITHER) for each JSON line {"kind", "path"} on stdin with one JSON line
    {"outcome"} or {"error"}; a file on which libhdf5 hangs ends the process by SIGALRM after 5 seconds."""
    for line in sys.stdin:
        request = json.loads(line)
        signal.alarm(5)
        try:
            answer = {"outcome": check_outcome(request["kind"], Path(request["path"]), EITHER)}
        except AssertionError as exc:
            answer = {"error": f"{exc.__class__.__name__}: {exc}"}
        except Exception as exc:  # reported to the parent, which fails the test
            answer = {"error": f"{exc.__class__.__name__} escaped: {exc}"}
        signal.alarm(0)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
