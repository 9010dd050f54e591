"""MNIST and CIFAR-10: read torchvision's disk layouts, download with checksums, serve batches from the device."""
from __future__ import annotations

import codecs
import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from http.client import HTTPException
from types import MappingProxyType
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

try:  # numpy 2
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
    from numpy._core.multiarray import scalar as _numpy_scalar
    from numpy._core.numeric import _frombuffer as _numpy_frombuffer
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct
    from numpy.core.multiarray import scalar as _numpy_scalar
    from numpy.core.numeric import _frombuffer as _numpy_frombuffer

# Default dataset roots, read once at import for display (e.g. in --help). `./data` means the folder `data`
# under the current working directory at import time. Loading functions resolve the environment again at call
# time through `default_root`, so a changed environment (or a test's monkeypatch) takes effect.
MNIST_PATH: str = os.environ.get("MNIST_PATH", os.path.join(os.getcwd(), "data"))
CIFAR10_PATH: str = os.environ.get("CIFAR10_PATH", os.path.join(os.getcwd(), "data"))

# Dataset name -> environment variable that points at its root.
ENV_VARS = MappingProxyType({"mnist": "MNIST_PATH", "cifar10": "CIFAR10_PATH"})

DATASET_NAMES: Tuple[str, ...] = ("mnist", "cifar10")

# Canonical MNIST archives and the md5 of each `.gz` as published. The md5 is checked only on a fresh
# download: an existing file is checked by its structure instead, because a re-compressed archive with
# identical content has a different archive md5.
MNIST_MIRRORS: Tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_MD5 = MappingProxyType({
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
})
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"

DOWNLOAD_TIMEOUT_S = 60.0

# IDX magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
MNIST_SIDE = 28
CIFAR10_SIDE = 32
CIFAR10_ROW_BYTES = 3 * CIFAR10_SIDE * CIFAR10_SIDE  # 3072: R plane, then G plane, then B plane
NUM_CLASSES = 10

# Per-channel (mean, std) applied after scaling pixels to [0, 1] (docs/design.md, section 2).
MNIST_NORMALIZE: Tuple[Tuple[float, ...], Tuple[float, ...]] = ((0.1307,), (0.3081,))
CIFAR10_NORMALIZE: Tuple[Tuple[float, ...], Tuple[float, ...]] = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Zero padding on each side before the random crop (torchvision RandomCrop(32, padding=4)).
AUGMENT_PAD = 4


class DatasetError(RuntimeError):
    """A dataset could not be found, downloaded or parsed. The message is one line naming the path, the
    environment variable that chooses the root, and the cause, so a script can print it as is."""

    def __init__(self, path: str, env_var: str, cause: str) -> None:
        self.path = path
        self.env_var = env_var
        self.cause = cause
        super().__init__(
            f"{path}: {cause}; point {env_var} (or the data root argument) at the folder holding the dataset"
        )

    def __reduce__(self):
        # The default reduction would call __init__ with the formatted message only.
        return (type(self), (self.path, self.env_var, self.cause))


def default_root(name: str) -> str:
    """The data root for dataset `name` ("mnist" or "cifar10"): the environment variable MNIST_PATH or
    CIFAR10_PATH when set, else `data/` under the current working directory. Read at call time."""
    if name not in ENV_VARS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return os.environ.get(ENV_VARS[name]) or os.path.join(os.getcwd(), "data")


# ----------------------------------------------------------------------------------------------------------
# Downloads


def download_file(url: str, dest: str, md5: str, *, env_var: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download `url` to the file `dest`, verifying the md5 of the downloaded bytes.

    The bytes go to a temporary file in `dest`'s folder, which replaces `dest` only once the checksum
    matches, so an interrupted or corrupt download never leaves a file that looks complete.
    Raises DatasetError (naming `dest`, `env_var` and the cause) on any network or checksum failure.
    """
    folder = os.path.dirname(os.path.abspath(dest))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise DatasetError(folder, env_var, f"cannot create folder ({exc})") from exc
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(dest) + ".", suffix=".part", dir=folder)
    try:
        digest = hashlib.md5()
        try:
            # Some mirrors refuse urllib's default user agent.
            request = urllib.request.Request(url, headers={"User-Agent": "gsm-sgd-dataset/1.0"})
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as exc:
            raise DatasetError(dest, env_var, f"download of {url} failed ({type(exc).__name__}: {exc})") from exc
        if digest.hexdigest() != md5:
            raise DatasetError(
                dest, env_var, f"download of {url} has md5 {digest.hexdigest()}, expected {md5} (corrupt download)"
            )
        os.replace(tmp_path, dest)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# MNIST


def _mnist_file_names(train: bool) -> Tuple[str, str]:
    split = "train" if train else "t10k"
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def _find_mnist_folder(root: str) -> str:
    """The folder holding the IDX files: the first of root/MNIST/raw, root/MNIST, root/raw and root that
    holds any of them; if none does, where torchvision would put them (for a download)."""
    root = os.path.abspath(os.path.expanduser(root))
    candidates = [os.path.join(root, "MNIST", "raw"), os.path.join(root, "MNIST"), os.path.join(root, "raw"), root]
    for folder in candidates:
        if os.path.isdir(folder) and any(
            os.path.isfile(os.path.join(folder, name + ext)) for name in MNIST_MD5 for ext in ("", ".gz")
        ):
            return folder
    base = os.path.basename(root)
    if base == "raw":
        return root
    if base == "MNIST":
        return os.path.join(root, "raw")
    return os.path.join(root, "MNIST", "raw")


def _existing_idx(folder: str, name: str) -> Optional[str]:
    """Path of the IDX file `name` in `folder`, uncompressed preferred over `.gz`; None if neither exists."""
    for ext in ("", ".gz"):
        path = os.path.join(folder, name + ext)
        if os.path.isfile(path):
            return path
    return None


def _read_bytes(path: str, env_var: str) -> bytes:
    """The file's content, decompressed when it ends in `.gz`."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetError(path, env_var, f"corrupt gzip archive ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise DatasetError(path, env_var, f"cannot read ({exc})") from exc


def read_idx(path: str, magic: int, *, env_var: str = "MNIST_PATH") -> np.ndarray:
    """Parse an IDX file of unsigned bytes (raw or `.gz`) into a uint8 array of the shape its header gives.

    Layout: big-endian uint32 magic (0x00000800 | ndim), ndim big-endian uint32 sizes, then prod(sizes) bytes.
    The file length must equal the header-implied length exactly; anything else raises DatasetError.
    """
    data = _read_bytes(path, env_var)
    if len(data) < 4:
        raise DatasetError(path, env_var, f"truncated: {len(data)} bytes, shorter than the IDX magic")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise DatasetError(path, env_var, f"bad magic 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(path, env_var, f"truncated: {len(data)} bytes, header needs {header_len}")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    expected_len = header_len + math.prod(shape)
    if len(data) != expected_len:
        what = "truncated" if len(data) < expected_len else "trailing bytes"
        raise DatasetError(
            path, env_var, f"{what}: {len(data)} bytes, header shape {tuple(shape)} implies {expected_len}"
        )
    # Copy out of the immutable bytes so the tensor built on it is writable.
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def load_mnist(train: bool, root: Optional[str] = None, download: bool = True) -> Tuple[Tensor, Tensor]:
    """Load the MNIST training (60000) or test (10000) split.

    `root` (default `default_root("mnist")`) is the folder holding `MNIST/`, or `MNIST/` itself, or
    `MNIST/raw/` itself; the files are `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, each raw or `.gz`.
    Missing files are downloaded (md5-checked) when `download` is true.
    Returns images uint8 [N, 1, 28, 28] (pixel values 0..255) and labels int64 [N] in 0..9.
    Raises DatasetError on missing, corrupt or inconsistent files.
    """
    env_var = ENV_VARS["mnist"]
    folder = _find_mnist_folder(default_root("mnist") if root is None else root)
    names = _mnist_file_names(train)
    for name in names:
        if _existing_idx(folder, name) is not None:
            continue
        if not download:
            raise DatasetError(os.path.join(folder, name + "[.gz]"), env_var, "missing and download=False")
        _download_mnist_file(folder, name)
    image_path, label_path = (_existing_idx(folder, name) for name in names)
    images = read_idx(image_path, IDX_IMAGES_MAGIC, env_var=env_var)
    labels = read_idx(label_path, IDX_LABELS_MAGIC, env_var=env_var)
    if images.shape[1:] != (MNIST_SIDE, MNIST_SIDE):
        raise DatasetError(image_path, env_var, f"wrong image shape {images.shape[1:]}, expected (28, 28)")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            image_path, env_var, f"{images.shape[0]} images but {labels.shape[0]} labels in {label_path}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DatasetError(label_path, env_var, f"label {int(labels.max())} out of range 0..9")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _download_mnist_file(folder: str, name: str) -> None:
    """Fetch `name.gz` into `folder`, trying each mirror in turn."""
    dest = os.path.join(folder, name + ".gz")
    causes = []
    for mirror in MNIST_MIRRORS:
        try:
            download_file(mirror + name + ".gz", dest, MNIST_MD5[name], env_var=ENV_VARS["mnist"])
            return
        except DatasetError as exc:
            causes.append(exc.cause)
    raise DatasetError(dest, ENV_VARS["mnist"], "missing and every download failed: " + "; ".join(causes))


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10


def _cifar_file_names(train: bool) -> Tuple[str, ...]:
    return tuple(f"data_batch_{i}" for i in range(1, 6)) if train else ("test_batch",)


def _find_cifar_folder(root: str) -> str:
    """`root/cifar-10-batches-py` if it exists, else `root` when it is that folder or holds the batch
    files, else `root/cifar-10-batches-py` (where a download puts them)."""
    root = os.path.abspath(os.path.expanduser(root))
    nested = os.path.join(root, CIFAR10_FOLDER)
    if os.path.isdir(nested):
        return nested
    all_names = _cifar_file_names(True) + _cifar_file_names(False)
    if os.path.basename(root) == CIFAR10_FOLDER or any(os.path.isfile(os.path.join(root, n)) for n in all_names):
        return root
    return nested


def _dict_get(batch: dict, key: str):
    """Value of `key` in a CIFAR batch dict, whose keys are bytes when unpickled with encoding="bytes"."""
    if key.encode() in batch:
        return batch[key.encode()]
    return batch[key]


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as pickles written by Python 3 with protocol 2 call it for bytes, latin-1 only."""
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin-1", errors)


# Everything a CIFAR-10 python batch may ask the unpickler for: the canonical files (Python 2, numpy 1) name
# numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype; a copy re-saved with numpy 2 names
# numpy._core.* and, at protocol 2, _codecs.encode for bytes; at protocol 5, numpy's _frombuffer; labels
# re-saved as numpy integers name numpy's scalar.
_CIFAR_PICKLE_GLOBALS = MappingProxyType({
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
})


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, tuples, bytes, strings, numbers and numpy arrays: any other
    global a pickle names (a function to call, a class to build) is refused before it is imported, so a crafted
    file cannot run code."""

    def find_class(self, module: str, name: str):
        allowed = _CIFAR_PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR-10 batch holds only arrays, lists, "
                                         f"bytes and numbers, so this file is not one (it may try to run code)")
        return allowed


def read_cifar_batch(path: str, *, env_var: str = "CIFAR10_PATH") -> Tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR-10 python batch: a pickled dict with `data`, uint8 [N, 3072] (rows are R, G, B planes
    of 32x32), and `labels`, N ints in 0..9. Returns uint8 [N, 3, 32, 32] and int64 [N].

    The file is a pickle, as distributed by the dataset's authors. It is read by an unpickler that builds only
    the plain containers and numpy arrays such a file holds and refuses anything else, so a file from elsewhere
    cannot run code.
    """
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DatasetError(path, env_var, f"cannot read ({exc})") from exc
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused"):
            raise DatasetError(path, env_var, str(exc)) from exc
        raise DatasetError(path, env_var, f"corrupt pickle ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # unpickling garbage can raise almost any exception type
        raise DatasetError(path, env_var, f"corrupt pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DatasetError(path, env_var, f"pickle holds a {type(batch).__name__}, expected a dict")
    try:
        data, labels = _dict_get(batch, "data"), _dict_get(batch, "labels")
    except KeyError as exc:
        raise DatasetError(path, env_var, f"missing key {exc.args[0]!r}") from exc
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR10_ROW_BYTES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DatasetError(path, env_var, f"data has shape {shape} dtype {dtype}, expected uint8 [N, 3072]")
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DatasetError(path, env_var, f"labels have shape {labels.shape} dtype {labels.dtype}, expected N ints")
    if labels.shape[0] != data.shape[0]:
        raise DatasetError(path, env_var, f"{data.shape[0]} data rows but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DatasetError(path, env_var, f"labels span {labels.min()}..{labels.max()}, expected 0..9")
    side = CIFAR10_SIDE
    return data.reshape(-1, 3, side, side), labels.astype(np.int64)


def load_cifar10(train: bool, root: Optional[str] = None, download: bool = True) -> Tuple[Tensor, Tensor]:
    """Load the CIFAR-10 training (5 x 10000) or test (10000) split.

    `root` (default `default_root("cifar10")`) is the folder holding `cifar-10-batches-py/` or that folder
    itself. Missing batch files are extracted from the md5-checked archive when `download` is true.
    Returns images uint8 [N, 3, 32, 32] (CHW, values 0..255) and labels int64 [N] in 0..9.
    Raises DatasetError on missing or corrupt files.
    """
    env_var = ENV_VARS["cifar10"]
    folder = _find_cifar_folder(default_root("cifar10") if root is None else root)
    names = _cifar_file_names(train)
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        if not download:
            raise DatasetError(os.path.join(folder, missing[0]), env_var, "missing and download=False")
        _download_cifar10(folder, missing)
    parts = [read_cifar_batch(os.path.join(folder, n), env_var=env_var) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _download_cifar10(folder: str, names: Sequence[str]) -> None:
    """Download the CIFAR-10 archive into `folder` and extract the batch files `names` from it."""
    env_var = ENV_VARS["cifar10"]
    archive = os.path.join(folder, os.path.basename(CIFAR10_URL))
    download_file(CIFAR10_URL, archive, CIFAR10_MD5, env_var=env_var)
    try:
        _extract_cifar_members(archive, folder, names)
    finally:
        os.remove(archive)


def _extract_cifar_members(archive: str, folder: str, names: Sequence[str]) -> None:
    """Extract `cifar-10-batches-py/<name>` for each of `names` into `folder`.

    Every member is checked first: an absolute path, a `..` component, a link or a device file makes the
    whole archive rejected, since a tar file can otherwise write anywhere. Each file goes to a temporary
    name and is moved into place once complete.
    """
    env_var = ENV_VARS["cifar10"]
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                parts = member.name.replace("\\", "/").split("/")
                if member.name.startswith(("/", "\\")) or ".." in parts or not (member.isfile() or member.isdir()):
                    raise DatasetError(archive, env_var, f"unsafe archive member {member.name!r} rejected")
            by_name = {m.name[2:] if m.name.startswith("./") else m.name: m for m in members if m.isfile()}
            for name in names:
                member = by_name.get(f"{CIFAR10_FOLDER}/{name}")
                if member is None:
                    raise DatasetError(archive, env_var, f"archive has no member {CIFAR10_FOLDER}/{name}")
                source = tar.extractfile(member)
                fd, tmp_path = tempfile.mkstemp(prefix="." + name + ".", suffix=".part", dir=folder)
                try:
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(source, out)
                    os.replace(tmp_path, os.path.join(folder, name))
                finally:
                    if os.path.exists(tmp_path):
                        os.remove(tmp_path)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(archive, env_var, f"cannot extract ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------------------------------------
# Loader


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed for one epoch: a pure function of (seed, epoch), so any epoch's batches can be
    rebuilt without saved RNG state. A hash rather than e.g. seed + epoch keeps (s, e+1) and (s+1, e) apart."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _row_word_view(images: Tensor) -> Tensor:
    """View [N, ...] uint8 as [N, W] of the widest integer type that divides a row's bytes.

    Gathering rows as 8-byte words instead of single bytes is much faster in index_select, and the bytes,
    hence the images, are unchanged.
    """
    row_bytes = math.prod(images.shape[1:])
    flat = images.reshape(images.shape[0], row_bytes)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if row_bytes % size == 0:
            try:
                return flat.view(dtype)
            except RuntimeError:  # storage offset not aligned to `size`: try a narrower word
                continue
    return flat


class DeviceLoader:
    """Batches from a whole split held as one uint8 tensor on the training device.

    Train mode: each epoch draws a permutation from a generator seeded with `epoch_seed(seed, epoch)` and
    yields floor(N / batch_size) batches (the last partial batch is dropped). Iterating uses the epoch set by
    `set_epoch` and then advances it by one, so calling `set_epoch(e)` before each epoch (as a resumed run
    does) reproduces exactly the batches of an uninterrupted run. Eval mode: all samples in order, the last
    partial batch kept; no randomness.

    Each batch is normalised as x_norm = (x / 255 - mean[c]) / std[c] (torchvision's ToTensor + Normalize),
    computed as x * scale[c] + shift[c], equal up to float32 rounding. With `augment`, each image is
    zero-padded by 4 pixels (a 0 pixel, i.e. -mean/std after normalisation, as torchvision pads before
    normalising), cropped at a uniform random offset in {0..8}^2 to its original size and flipped left-right
    with probability 1/2; one gather per batch does all three. Augmentation randomness comes from the same
    per-epoch generator, on the data's device.

    Distributed: the global batch of `batch_size` comes from the permutation shared by every rank, and rank
    r gets its contiguous slice of `batch_size // world_size` (train) or its proportional share (eval; the
    last batch may not divide evenly). Every rank yields the same number of batches.
    Yields (images float32 [B, C, H, W], labels int64 [B]) on `device`.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        normalize: Tuple[Sequence[float], Sequence[float]],
        augment: bool,
        device: Union[str, torch.device],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be [N] with N = {images.shape[0]}, got {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank {rank} for world_size {world_size}")
        if train and batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if train and batch_size > images.shape[0]:
            raise ValueError(f"batch_size {batch_size} exceeds the {images.shape[0]} examples: no full batch")
        if augment and not train:
            raise ValueError("augment requires train=True")
        mean, std = (tuple(float(v) for v in seq) for seq in normalize)
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"normalize needs {channels} means and {channels} positive stds, got {normalize}")

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.num_examples = images.shape[0]
        self.image_shape = tuple(images.shape[1:])
        self._epoch = 0

        images = images.to(self.device)
        if augment:
            # Pad the whole split once so each batch is a single gather; padding is the 0 pixel.
            pad = AUGMENT_PAD
            n, c, h, w = images.shape
            padded = images.new_zeros((n, c, h + 2 * pad, w + 2 * pad))
            padded[:, :, pad:pad + h, pad:pad + w] = images
            images = padded
            self._rows = torch.arange(h, device=self.device)
            self._cols = torch.arange(w, device=self.device)
            self._channels = torch.arange(c, device=self.device)
        self._images = images.contiguous()
        # Unaugmented training gathers whole rows: do it on a word view of the same memory.
        self._image_words = None if augment else _row_word_view(self._images)
        self._labels = labels.to(self.device, torch.int64)
        # (x / 255 - mean) / std rearranged as x * scale + shift: two passes over the batch instead of three,
        # and multiplications instead of divisions. Computed in float64 so the
        # constants are the correctly rounded float32 values; results agree with the division form to
        # float32 rounding (a few 1e-7), and a 0 pixel maps to exactly -mean/std.
        mean64 = torch.tensor(mean, dtype=torch.float64)
        std64 = torch.tensor(std, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std64)).to(self.device, torch.float32).view(1, -1, 1, 1)
        self._shift = (-mean64 / std64).to(self.device, torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        """Batches per epoch: floor(N / batch_size) in train mode, ceil(N / batch_size) in eval mode."""
        if self.train:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield the batches of `epoch` (train mode; eval mode has no randomness)."""
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        """The batches of the current epoch; the next iteration moves on to the following epoch."""
        epoch = self._epoch
        self._epoch += 1
        return self.epoch_batches(epoch)

    def epoch_batches(self, epoch: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """This rank's batches of `epoch`, a pure function of (seed, epoch, rank, world_size)."""
        if not self.train:
            return self._eval_batches()
        return self._train_batches(epoch)

    def _train_batches(self, epoch: int) -> Iterator[Tuple[Tensor, Tensor]]:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(self.num_examples, generator=generator, device=self.device)
        num_used = len(self) * self.batch_size
        if self.augment:
            # Draw the whole epoch's offsets and flips at once; every rank draws the same values.
            offsets = torch.randint(
                0, 2 * AUGMENT_PAD + 1, (2, num_used), generator=generator, device=self.device
            )
            flips = torch.randint(0, 2, (num_used,), generator=generator, device=self.device).bool()
        # One gather for the whole epoch's labels: a batch's labels are then a view, not a gather.
        epoch_labels = self._labels.index_select(0, order[:num_used])
        local = self.batch_size // self.world_size
        for start in range(0, num_used, self.batch_size):
            lo = start + self.rank * local
            index = order[lo:lo + local]
            if self.augment:
                x = self._crop_flip(index, offsets[0, lo:lo + local], offsets[1, lo:lo + local], flips[lo:lo + local])
            else:
                x = self._image_words.index_select(0, index).view(torch.uint8).view(-1, *self.image_shape)
            yield self._normalize(x), epoch_labels[lo:lo + local]

    def _eval_batches(self) -> Iterator[Tuple[Tensor, Tensor]]:
        for start in range(0, self.num_examples, self.batch_size):
            size = min(self.batch_size, self.num_examples - start)
            lo = start + self.rank * size // self.world_size
            hi = start + (self.rank + 1) * size // self.world_size
            yield self._normalize(self._images[lo:hi]), self._labels[lo:hi]

    def _crop_flip(self, index: Tensor, top: Tensor, left: Tensor, flip: Tensor) -> Tensor:
        """Gather crops from the padded split: out[b, c, i, j] = padded[index[b], c, top[b] + i, left[b] + j'],
        j' = W - 1 - j where flip[b] (crop, then mirror the crop) and j' = j otherwise."""
        width = self._cols.shape[0]
        rows = top[:, None] + self._rows  # [B, H]
        cols = torch.where(flip[:, None], left[:, None] + (width - 1) - self._cols, left[:, None] + self._cols)
        return self._images[
            index[:, None, None, None], self._channels[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]
        ]

    def _normalize(self, x: Tensor) -> Tensor:
        """uint8 [B, C, H, W] -> float32 x * (1 / (255 std[c])) - mean[c] / std[c] = (x / 255 - mean) / std."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # on uint8, before the 4x wider float copy
        return x.to(torch.float32).mul_(self._scale).add_(self._shift)


def build_loaders(
    name: str,
    batch_size: int,
    device: Union[str, torch.device],
    seed: int = 0,
    root: Optional[str] = None,
    eval_batch_size: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    download: bool = True,
) -> Tuple[DeviceLoader, DeviceLoader]:
    """Train and test loaders for "mnist" or "cifar10" with the released code's preprocessing (docs/design.md, section 2).

    The train loader shuffles with `seed` (and augments for cifar10) and gives rank `rank` of `world_size`
    its slice of each global batch; the test loader runs in eval mode with `eval_batch_size` over the whole
    test set (every rank evaluates all of it, so evaluation needs no collective calls). Raises ValueError
    for an unknown name and DatasetError for unusable data.
    """
    if name == "mnist":
        load, normalize, augment = load_mnist, MNIST_NORMALIZE, False
    elif name == "cifar10":
        load, normalize, augment = load_cifar10, CIFAR10_NORMALIZE, True
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    common = dict(normalize=normalize, device=device, seed=seed, channels_last=channels_last)
    train_images, train_labels = load(True, root=root, download=download)
    test_images, test_labels = load(False, root=root, download=download)
    # A split cut short (but well-formed) would otherwise fail later, inside the loader or the evaluation.
    if train_images.shape[0] < batch_size or test_images.shape[0] == 0:
        find_folder = _find_mnist_folder if name == "mnist" else _find_cifar_folder
        folder = find_folder(default_root(name) if root is None else root)
        cause = (f"the training split has {train_images.shape[0]} examples, fewer than one batch of {batch_size}"
                 if train_images.shape[0] < batch_size else "the test split has no examples")
        raise DatasetError(folder, ENV_VARS[name], cause)
    train_loader = DeviceLoader(train_images, train_labels, batch_size, train=True, augment=augment, rank=rank,
                                world_size=world_size, **common)
    test_loader = DeviceLoader(test_images, test_labels, eval_batch_size, train=False, augment=False, **common)
    return train_loader, test_loader
