"""Tests of dataset.py on small MNIST / CIFAR-10 files generated in the real on-disk formats."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pathlib
import pickle
import struct
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataset
from crafted import MakesFolder

MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------------------------------------------------
# Writers of the real formats


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """IDX encoding: big-endian magic, big-endian uint32 sizes, then the uint8 payload."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_file(path: pathlib.Path, payload: bytes, gz: bool) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_mnist(folder: pathlib.Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0) -> dict:
    """Write the four MNIST IDX files with random content into `folder`; return the arrays by file name."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        magic = dataset.IDX_IMAGES_MAGIC if array.ndim == 3 else dataset.IDX_LABELS_MAGIC
        write_file(folder / name, idx_bytes(magic, array), gz)
    return arrays


def cifar_pickle(data: np.ndarray, labels, str_keys: bool = False) -> bytes:
    """A CIFAR-10 batch as the authors' files hold it: a protocol-2 pickle of a dict with byte-string keys."""
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    batch = {key("batch_label"): b"fake batch", key("labels"): list(labels), key("data"): data,
             key("filenames"): [b"img%d.png" % i for i in range(len(labels))]}
    return pickle.dumps(batch, protocol=2)


def make_cifar(folder: pathlib.Path, n_per_batch: int = 4, seed: int = 0, str_keys: bool = False) -> dict:
    """Write data_batch_1..5 and test_batch into `folder`; return {name: (data [N, 3072], labels [N])}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch)
        (folder / name).write_bytes(cifar_pickle(data, labels.tolist(), str_keys))
        batches[name] = (data, labels)
    return batches


def md5_of(path: pathlib.Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_names(exc_info, path, env_var: str) -> None:
    """The error message is one line naming the file and the environment variable."""
    message = str(exc_info.value)
    assert str(path) in message
    assert env_var in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# Roots and environment


def test_default_root_reads_env_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_PATH", str(tmp_path / "m"))
    monkeypatch.setenv("CIFAR10_PATH", str(tmp_path / "c"))
    assert dataset.default_root("mnist") == str(tmp_path / "m")
    assert dataset.default_root("cifar10") == str(tmp_path / "c")
    monkeypatch.delenv("MNIST_PATH")
    monkeypatch.chdir(tmp_path)
    assert dataset.default_root("mnist") == os.path.join(str(tmp_path), "data")
    with pytest.raises(ValueError, match="mnist, cifar10"):
        dataset.default_root("imagenet")


def test_load_mnist_uses_env_when_root_is_none(monkeypatch, tmp_path):
    arrays = make_mnist(tmp_path / "MNIST" / "raw")
    monkeypatch.setenv("MNIST_PATH", str(tmp_path))
    images, labels = dataset.load_mnist(False, download=False)
    assert np.array_equal(images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])


# ---------------------------------------------------------------------------------------------------------
# MNIST reader


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_exact_contents(tmp_path, gz):
    arrays = make_mnist(tmp_path / "MNIST" / "raw", n_train=12, n_test=5, gz=gz)
    for train, prefix, count in ((True, "train", 12), (False, "t10k", 5)):
        images, labels = dataset.load_mnist(train, root=str(tmp_path), download=False)
        assert images.shape == (count, 1, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (count,) and labels.dtype == torch.int64
        assert np.array_equal(images[:, 0].numpy(), arrays[f"{prefix}-images-idx3-ubyte"])
        assert np.array_equal(labels.numpy(), arrays[f"{prefix}-labels-idx1-ubyte"])


def test_mnist_accepts_root_mnist_and_raw_folders(tmp_path):
    arrays = make_mnist(tmp_path / "MNIST" / "raw")
    expected = arrays["train-images-idx3-ubyte"]
    for root in (tmp_path, tmp_path / "MNIST", tmp_path / "MNIST" / "raw"):
        images, _ = dataset.load_mnist(True, root=str(root), download=False)
        assert np.array_equal(images[:, 0].numpy(), expected)


def test_mnist_accepts_files_directly_in_mnist_folder(tmp_path):
    # The layout without raw/ (files in <root>/MNIST/) is found from the root too.
    arrays = make_mnist(tmp_path / "MNIST")
    images, labels = dataset.load_mnist(True, root=str(tmp_path), download=False)
    assert np.array_equal(labels.numpy(), arrays["train-labels-idx1-ubyte"])


def test_mnist_missing_without_download(tmp_path):
    with pytest.raises(dataset.DatasetError, match="download=False") as exc_info:
        dataset.load_mnist(True, root=str(tmp_path), download=False)
    assert_names(exc_info, tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", "MNIST_PATH")


def _corrupt(kind: str, folder: pathlib.Path) -> pathlib.Path:
    """Rewrite one file of a valid fake MNIST in `folder` to be broken in the way `kind` names."""
    images = np.zeros((6, 28, 28), np.uint8)
    labels = np.arange(6, dtype=np.uint8)
    image_file = folder / "train-images-idx3-ubyte"
    label_file = folder / "train-labels-idx1-ubyte"
    good_images = idx_bytes(dataset.IDX_IMAGES_MAGIC, images)
    if kind == "truncated":
        image_file.write_bytes(good_images[:-10])
        return image_file
    if kind == "header_only_truncated":
        image_file.write_bytes(good_images[:9])
        return image_file
    if kind == "trailing":
        image_file.write_bytes(good_images + b"\0")
        return image_file
    if kind == "bad_magic":
        image_file.write_bytes(idx_bytes(dataset.IDX_LABELS_MAGIC | 0x0200, images))
        return image_file
    if kind == "labels_magic_in_images":
        image_file.write_bytes(idx_bytes(dataset.IDX_LABELS_MAGIC, labels))
        return image_file
    if kind == "wrong_size":
        image_file.write_bytes(idx_bytes(dataset.IDX_IMAGES_MAGIC, np.zeros((6, 27, 28), np.uint8)))
        return image_file
    if kind == "count_mismatch":
        label_file.write_bytes(idx_bytes(dataset.IDX_LABELS_MAGIC, labels[:5]))
        return image_file
    if kind == "label_range":
        label_file.write_bytes(idx_bytes(dataset.IDX_LABELS_MAGIC, np.array([0, 1, 2, 3, 4, 12], np.uint8)))
        return label_file
    if kind == "corrupt_gz":
        image_file.unlink()
        gz = folder / "train-images-idx3-ubyte.gz"
        gz.write_bytes(b"\x1f\x8b\x08\x00" + b"not deflate data at all" * 4)
        return gz
    if kind == "not_gz":
        image_file.unlink()
        gz = folder / "train-images-idx3-ubyte.gz"
        gz.write_bytes(good_images)
        return gz
    if kind == "truncated_gz":
        image_file.unlink()
        gz = folder / "train-images-idx3-ubyte.gz"
        gz.write_bytes(gzip.compress(good_images)[:-20])
        return gz
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, cause", [
    ("truncated", "truncated"),
    ("header_only_truncated", "truncated"),
    ("trailing", "trailing bytes"),
    ("bad_magic", "bad magic 0x00000a01"),
    ("labels_magic_in_images", "bad magic 0x00000801, expected 0x00000803"),
    ("wrong_size", r"wrong image shape \(27, 28\)"),
    ("count_mismatch", "6 images but 5 labels"),
    ("label_range", "label 12 out of range"),
    ("corrupt_gz", "corrupt gzip"),
    ("not_gz", "corrupt gzip"),
    ("truncated_gz", "corrupt gzip"),
])
def test_mnist_broken_files_raise_dataset_error(tmp_path, kind, cause):
    folder = tmp_path / "MNIST" / "raw"
    make_mnist(folder, n_train=6, gz=False)
    broken = _corrupt(kind, folder)
    with pytest.raises(dataset.DatasetError, match=cause) as exc_info:
        dataset.load_mnist(True, root=str(tmp_path), download=False)
    assert_names(exc_info, broken, "MNIST_PATH")
    # The other split is untouched and still loads.
    assert dataset.load_mnist(False, root=str(tmp_path), download=False)[0].shape[0] == 5


# ---------------------------------------------------------------------------------------------------------
# Downloads (file:// URLs and a monkeypatched urlopen: no network)


def _serve_mnist(tmp_path: pathlib.Path, monkeypatch, names) -> dict:
    """Put fake `.gz` archives of `names` in a mirror folder, point MNIST_MIRRORS at it (after a mirror that
    does not exist, to exercise the fallback) and MNIST_MD5 at their checksums; return the arrays."""
    mirror = tmp_path / "mirror"
    arrays = make_mnist(mirror, n_train=7, n_test=3, gz=True, seed=5)
    for name in MNIST_NAMES:
        if name not in names:
            (mirror / (name + ".gz")).unlink()
    monkeypatch.setattr(dataset, "MNIST_MIRRORS", ((tmp_path / "absent").as_uri() + "/", mirror.as_uri() + "/"))
    md5s = {name: md5_of(mirror / (name + ".gz")) if name in names else "0" * 32 for name in MNIST_NAMES}
    monkeypatch.setattr(dataset, "MNIST_MD5", md5s)
    return arrays


def test_mnist_download_fetches_only_missing_files(tmp_path, monkeypatch):
    root = tmp_path / "data"
    local = make_mnist(root / "MNIST" / "raw", n_train=7, seed=1)
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").unlink()
    served = _serve_mnist(tmp_path, monkeypatch, ["train-images-idx3-ubyte"])
    images, labels = dataset.load_mnist(True, root=str(root), download=True)
    assert np.array_equal(images[:, 0].numpy(), served["train-images-idx3-ubyte"])
    assert np.array_equal(labels.numpy(), local["train-labels-idx1-ubyte"])  # kept, not re-downloaded
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(n + ".gz" for n in MNIST_NAMES)


def test_mnist_download_into_empty_root(tmp_path, monkeypatch):
    served = _serve_mnist(tmp_path, monkeypatch, MNIST_NAMES)
    images, labels = dataset.load_mnist(False, root=str(tmp_path / "new"), download=True)
    assert np.array_equal(labels.numpy(), served["t10k-labels-idx1-ubyte"])
    assert sorted(p.name for p in (tmp_path / "new" / "MNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_mnist_download_bad_checksum(tmp_path, monkeypatch):
    _serve_mnist(tmp_path, monkeypatch, MNIST_NAMES)
    monkeypatch.setitem(dataset.MNIST_MD5, "train-images-idx3-ubyte", "f" * 32)
    root = tmp_path / "data"
    with pytest.raises(dataset.DatasetError, match="expected f{32}") as exc_info:
        dataset.load_mnist(True, root=str(root), download=True)
    dest = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    assert_names(exc_info, dest, "MNIST_PATH")
    assert list((root / "MNIST" / "raw").iterdir()) == []  # neither the bad file nor a temporary remains


def test_mnist_download_without_network(tmp_path, monkeypatch):
    calls = []

    def offline(request, timeout=None):
        calls.append((request.full_url, timeout))
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(dataset.DatasetError, match="URLError") as exc_info:
        dataset.load_mnist(True, root=str(tmp_path), download=True)
    assert_names(exc_info, tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz", "MNIST_PATH")
    # Both canonical mirrors were tried, with a timeout, and nothing was left behind.
    assert [url for url, _ in calls] == [m + "train-images-idx3-ubyte.gz" for m in dataset.MNIST_MIRRORS]
    assert all(timeout == dataset.DOWNLOAD_TIMEOUT_S for _, timeout in calls)
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []


def test_download_file_checks_md5(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload" * 1000)
    dest = tmp_path / "out" / "copy.bin"
    dataset.download_file(source.as_uri(), str(dest), md5_of(source), env_var="MNIST_PATH")
    assert dest.read_bytes() == source.read_bytes()
    with pytest.raises(dataset.DatasetError, match="md5") as exc_info:
        dataset.download_file(source.as_uri(), str(tmp_path / "out" / "bad.bin"), "0" * 32, env_var="CIFAR10_PATH")
    assert_names(exc_info, tmp_path / "out" / "bad.bin", "CIFAR10_PATH")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.bin"]


def test_dataset_error_pickles():
    error = dataset.DatasetError("/x/y", "MNIST_PATH", "truncated")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.env_var, copy.cause, str(copy)) == ("/x/y", "MNIST_PATH", "truncated", str(error))


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 reader


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar_reads_exact_contents(tmp_path, str_keys):
    batches = make_cifar(tmp_path / "cifar-10-batches-py", n_per_batch=4, str_keys=str_keys)
    images, labels = dataset.load_cifar10(True, root=str(tmp_path), download=False)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (20,) and labels.dtype == torch.int64
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    expected_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    # Row layout: 1024 red values, then 1024 green, then 1024 blue, each row-major 32x32.
    for channel in range(3):
        assert np.array_equal(images[:, channel].numpy().reshape(20, 1024), data[:, channel * 1024:(channel + 1) * 1024])
    assert np.array_equal(labels.numpy(), expected_labels)
    test_images, test_labels = dataset.load_cifar10(False, root=str(tmp_path), download=False)
    assert test_images.shape == (4, 3, 32, 32)
    assert np.array_equal(test_labels.numpy(), batches["test_batch"][1])


def test_cifar_pixel_layout_is_chw(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder, n_per_batch=1)
    row = np.zeros((1, 3072), np.uint8)
    row[0, 0] = 10              # red, (0, 0)
    row[0, 1024 + 33] = 20      # green, (1, 1)
    row[0, 2048 + 1023] = 30    # blue, (31, 31)
    (folder / "test_batch").write_bytes(cifar_pickle(row, [3]))
    images, labels = dataset.load_cifar10(False, root=str(folder), download=False)
    assert images[0, 0, 0, 0] == 10 and images[0, 1, 1, 1] == 20 and images[0, 2, 31, 31] == 30
    assert int(images.sum()) == 60 and labels.tolist() == [3]


def test_cifar_accepts_root_and_folder(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-py")
    a, _ = dataset.load_cifar10(False, root=str(tmp_path), download=False)
    b, _ = dataset.load_cifar10(False, root=str(tmp_path / "cifar-10-batches-py"), download=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("payload, cause", [
    (b"this is not a pickle", "corrupt pickle"),
    (cifar_pickle(np.zeros((2, 3072), np.uint8), [1, 2])[:-30], "corrupt pickle"),
    (pickle.dumps([1, 2, 3]), "expected a dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "missing key 'labels'"),
    (cifar_pickle(np.zeros((2, 3071), np.uint8), [1, 2]), "expected uint8 \\[N, 3072\\]"),
    (cifar_pickle(np.zeros((2, 3072), np.float32), [1, 2]), "expected uint8 \\[N, 3072\\]"),
    (cifar_pickle(np.zeros((2, 3072), np.uint8), [1, 2, 3]), "2 data rows but 3 labels"),
    (cifar_pickle(np.zeros((2, 3072), np.uint8), [1, 10]), "expected 0..9"),
])
def test_cifar_broken_files_raise_dataset_error(tmp_path, payload, cause):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    (folder / "data_batch_3").write_bytes(payload)
    with pytest.raises(dataset.DatasetError, match=cause) as exc_info:
        dataset.load_cifar10(True, root=str(tmp_path), download=False)
    assert_names(exc_info, folder / "data_batch_3", "CIFAR10_PATH")


def test_cifar_missing_without_download(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").unlink()
    with pytest.raises(dataset.DatasetError, match="download=False") as exc_info:
        dataset.load_cifar10(True, root=str(tmp_path), download=False)
    assert_names(exc_info, tmp_path / "cifar-10-batches-py" / "data_batch_2", "CIFAR10_PATH")


def _cifar_archive(tmp_path: pathlib.Path, monkeypatch, extra_member: tarfile.TarInfo | None = None) -> dict:
    """A fake cifar-10-python.tar.gz served by file://, with dataset.CIFAR10_URL / CIFAR10_MD5 pointing at it."""
    batches = make_cifar(tmp_path / "src" / "cifar-10-batches-py", n_per_batch=3, seed=9)
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if extra_member is not None:
            tar.addfile(extra_member, io.BytesIO(b"x" * extra_member.size))
    monkeypatch.setattr(dataset, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(dataset, "CIFAR10_MD5", md5_of(archive))
    return batches


def test_cifar_download_extracts_missing_files(tmp_path, monkeypatch):
    served = _cifar_archive(tmp_path, monkeypatch)
    root = tmp_path / "data"
    local = make_cifar(root / "cifar-10-batches-py", n_per_batch=2, seed=1)
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    images, labels = dataset.load_cifar10(True, root=str(root), download=True)
    assert images.shape == (2 + 2 + 2 + 3 + 2, 3, 32, 32)
    assert np.array_equal(labels.numpy()[6:9], served["data_batch_4"][1])
    assert np.array_equal(labels.numpy()[:2], local["data_batch_1"][1])  # present files are kept
    # The archive and temporaries are gone; only the six batch files remain.
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])


def test_cifar_download_into_empty_root(tmp_path, monkeypatch):
    served = _cifar_archive(tmp_path, monkeypatch)
    images, labels = dataset.load_cifar10(False, root=str(tmp_path / "new"), download=True)
    assert np.array_equal(labels.numpy(), served["test_batch"][1])
    assert images.shape == (3, 3, 32, 32)


def test_cifar_download_rejects_escaping_member(tmp_path, monkeypatch):
    evil = tarfile.TarInfo("cifar-10-batches-py/../../evil.txt")
    evil.size = 4
    _cifar_archive(tmp_path, monkeypatch, extra_member=evil)
    root = tmp_path / "data"
    with pytest.raises(dataset.DatasetError, match="unsafe archive member") as exc_info:
        dataset.load_cifar10(False, root=str(root), download=True)
    assert "CIFAR10_PATH" in str(exc_info.value)
    assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert list((root / "cifar-10-batches-py").iterdir()) == []


def test_cifar_download_rejects_symlink_member(tmp_path, monkeypatch):
    link = tarfile.TarInfo("cifar-10-batches-py/test_batch_link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    _cifar_archive(tmp_path, monkeypatch, extra_member=link)
    with pytest.raises(dataset.DatasetError, match="unsafe archive member"):
        dataset.load_cifar10(False, root=str(tmp_path / "data"), download=True)


def test_cifar_download_bad_checksum_and_no_network(tmp_path, monkeypatch):
    _cifar_archive(tmp_path, monkeypatch)
    monkeypatch.setattr(dataset, "CIFAR10_MD5", "0" * 32)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    with pytest.raises(dataset.DatasetError, match="expected 0{32}") as exc_info:
        dataset.load_cifar10(True, root=str(tmp_path / "data"), download=True)
    assert_names(exc_info, folder / "cifar-10-python.tar.gz", "CIFAR10_PATH")
    assert list(folder.iterdir()) == []

    def offline(request, timeout=None):
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(dataset.DatasetError, match="Network is unreachable") as exc_info:
        dataset.load_cifar10(True, root=str(tmp_path / "data"), download=True)
    assert_names(exc_info, folder / "cifar-10-python.tar.gz", "CIFAR10_PATH")


# ---------------------------------------------------------------------------------------------------------
# DeviceLoader


def indexed_mnist(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose first two pixels encode the sample index (i // 256, i % 256); labels = index."""
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    index = torch.arange(n)
    images[:, 0, 0, 0] = (index // 256).to(torch.uint8)
    images[:, 0, 0, 1] = (index % 256).to(torch.uint8)
    return images, index


def decode_index(batch: torch.Tensor) -> torch.Tensor:
    """Invert MNIST normalisation on the two index pixels of `indexed_mnist` images."""
    mean, std = dataset.MNIST_NORMALIZE[0][0], dataset.MNIST_NORMALIZE[1][0]
    raw = torch.round((batch[:, 0, 0, :2].double() * std + mean) * 255).long()
    return raw[:, 0] * 256 + raw[:, 1]


def mnist_loader(images, labels, batch_size, train=True, **kwargs) -> dataset.DeviceLoader:
    return dataset.DeviceLoader(images, labels, batch_size, train=train, normalize=dataset.MNIST_NORMALIZE,
                                augment=False, device="cpu", **kwargs)


def test_train_epoch_is_a_permutation_with_drop_last():
    images, labels = indexed_mnist(1000)
    loader = mnist_loader(images, labels, 64, seed=3)
    assert len(loader) == 15 and loader.num_examples == 1000
    batches = list(loader.epoch_batches(0))
    assert len(batches) == 15
    for x, y in batches:
        assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (64,) and y.dtype == torch.int64
        assert torch.equal(decode_index(x), y)  # images and labels stay paired
    seen = torch.cat([y for _, y in batches])
    assert seen.unique().numel() == 15 * 64  # no duplicates within an epoch
    assert not torch.equal(seen, torch.arange(960))  # shuffled


def test_epochs_differ_and_same_seed_epoch_reproduces():
    images, labels = indexed_mnist(500)
    first = mnist_loader(images, labels, 50, seed=7)
    second = mnist_loader(images, labels, 50, seed=7)
    epoch0 = torch.cat([y for _, y in first])  # plain iteration: epoch 0, then epoch 1
    epoch1 = torch.cat([y for _, y in first])
    assert not torch.equal(epoch0, epoch1)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(500))
    # A fresh loader resumed at epoch 1 reproduces epoch 1 exactly, images included.
    second.set_epoch(1)
    resumed = list(second)
    assert torch.equal(torch.cat([y for _, y in resumed]), epoch1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, first.epoch_batches(1)))
    other_seed = torch.cat([y for _, y in mnist_loader(images, labels, 50, seed=8).epoch_batches(1)])
    assert not torch.equal(other_seed, epoch1)
    assert dataset.epoch_seed(7, 1) == dataset.epoch_seed(7, 1) != dataset.epoch_seed(8, 0)


def test_eval_mode_keeps_every_sample_in_order():
    images, labels = indexed_mnist(1003)
    loader = mnist_loader(images, labels, 100, train=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 11
    assert [y.shape[0] for _, y in batches] == [100] * 10 + [3]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(1003))
    assert torch.equal(torch.cat([decode_index(x) for x, _ in batches]), torch.arange(1003))
    assert torch.equal(torch.cat([y for _, y in loader]), torch.arange(1003))  # same every pass


def test_normalisation_values():
    # Every pixel value 0..255 once per image, MNIST statistics and CIFAR-10 per-channel statistics.
    values = torch.arange(256, dtype=torch.uint8)
    mnist = torch.cat([values, values.flip(0), values, values[:16]]).view(1, 1, 28, 28).repeat(2, 1, 1, 1)
    loader = mnist_loader(mnist, torch.tensor([0, 1]), 2, train=False)
    x, _ = next(iter(loader))
    expected = (mnist.double() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x.double(), expected, rtol=0, atol=1e-6)
    assert abs(float(x[0, 0, 0, 0]) - (-0.1307 / 0.3081)) < 1e-6
    assert abs(float(x.flatten(1)[0, 255]) - (1 - 0.1307) / 0.3081) < 1e-6

    cifar = values.repeat(12).view(1, 3, 32, 32).repeat(4, 1, 1, 1)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = dataset.DeviceLoader(cifar, torch.arange(4), 4, train=True, normalize=(mean, std), augment=False,
                                  device="cpu")
    x, _ = next(iter(loader))
    expected = (cifar.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(std).double().view(1, 3, 1, 1)
    assert torch.allclose(x.double(), expected, rtol=0, atol=1e-6)


def coordinate_cifar(n: int) -> torch.Tensor:
    """Images whose red channel is row + 1 (1..32), green is column + 1, blue is the sample index % 256,
    so an output pixel tells where it came from; 0 marks padding."""
    rows = torch.arange(1, 33, dtype=torch.uint8).view(32, 1).expand(32, 32)
    cols = torch.arange(1, 33, dtype=torch.uint8).view(1, 32).expand(32, 32)
    images = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0] = rows
    images[:, 1] = cols
    images[:, 2] = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1)
    return images


def cifar_loader(images, batch_size, augment=True, **kwargs) -> dataset.DeviceLoader:
    labels = torch.arange(images.shape[0])
    return dataset.DeviceLoader(images, labels, batch_size, train=True, normalize=dataset.CIFAR10_NORMALIZE,
                                augment=augment, device="cpu", **kwargs)


def unnormalise_cifar(x: torch.Tensor) -> torch.Tensor:
    return torch.round((x.double() * 0.5 + 0.5) * 255).long()


def test_augmentation_matches_pad_crop_flip_reference():
    images = coordinate_cifar(256)
    loader = cifar_loader(images, 128, seed=1)
    x, y = next(iter(loader))
    raw = unnormalise_cifar(x)
    padded = F.pad(images.long(), (4, 4, 4, 4))
    for b in range(x.shape[0]):
        red = raw[b, 0]
        inside = red[:, 16] > 0  # column 16 of any crop lies inside the image
        i = int(torch.nonzero(inside)[0])
        top = int(red[i, 16]) - 1 - i + 4
        green_row = raw[b, 1, i]
        j = int(torch.nonzero(green_row)[0])
        flipped = j + 1 < 32 and green_row[j + 1] > 0 and green_row[j + 1] < green_row[j]
        left = (int(green_row[j]) - 1 + 4 - (31 - j)) if flipped else (int(green_row[j]) - 1 + 4 - j)
        crop = padded[int(y[b]), :, top:top + 32, left:left + 32]
        if flipped:
            crop = crop.flip(-1)
        assert torch.equal(raw[b], crop), b


def test_augmentation_statistics():
    images = coordinate_cifar(512)
    loader = cifar_loader(images, 128, seed=0)
    counts = torch.zeros(9, 9)
    flips = total = 0
    for epoch in range(8):
        for x, _ in loader.epoch_batches(epoch):
            raw = unnormalise_cifar(x)
            red = raw[:, 0, :, 16]  # rows of the crop's middle column
            green = raw[:, 1, 16, :]  # columns of the crop's middle row
            # The first row inside the image reveals the vertical offset: red = row + 1, row = top - 4 + i.
            first_row = (red > 0).long().argmax(1)
            top = red.gather(1, first_row[:, None]).squeeze(1) - 1 - first_row + 4
            # Column 16 of the crop is always inside the image; its neighbour tells the direction.
            flipped = green[:, 16] > green[:, 17]
            left = torch.where(flipped, green[:, 16] - 1 + 4 - 15, green[:, 16] - 1 + 4 - 16)
            counts.index_put_((top, left), torch.ones(x.shape[0]), accumulate=True)
            flips += int(flipped.sum())
            total += x.shape[0]
            # Padding is the 0 pixel, so it normalises to exactly -1 in every channel.
            pad_mask = (raw[:, 0] == 0) | (raw[:, 1] == 0)
            assert torch.all(x.permute(1, 0, 2, 3)[:, pad_mask] == -1.0)
            assert torch.all(raw[:, 0][pad_mask] == 0) and torch.all(raw[:, 1][pad_mask] == 0)
    assert total == 8 * 512
    assert abs(flips / total - 0.5) < 0.04  # binomial std 0.008
    assert bool((counts > 0).all())  # all 81 offsets occur
    expected = total / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 125  # 99.9% quantile of chi-square with 80 degrees of freedom is 124.8
    assert counts[0].sum() > 0 and counts[8].sum() > 0 and counts[:, 0].sum() > 0 and counts[:, 8].sum() > 0


def test_augment_off_is_plain_normalisation():
    images = coordinate_cifar(64)
    loader = cifar_loader(images, 16, augment=False, seed=2)
    for x, y in loader:
        expected = (images[y].double() / 255 - 0.5) / 0.5
        assert torch.allclose(x.double(), expected, rtol=0, atol=1e-6)


def test_rank_slices_union_is_the_global_batch():
    images = coordinate_cifar(300)
    single = list(cifar_loader(images, 64, seed=4).epoch_batches(2))
    ranks = [list(cifar_loader(images, 64, seed=4, rank=r, world_size=4).epoch_batches(2)) for r in range(4)]
    assert all(len(r) == len(single) == 4 for r in ranks)
    for j, (x, y) in enumerate(single):
        assert all(ranks[r][j][0].shape == (16, 3, 32, 32) for r in range(4))
        assert torch.equal(torch.cat([ranks[r][j][0] for r in range(4)]), x)  # augmentation included
        assert torch.equal(torch.cat([ranks[r][j][1] for r in range(4)]), y)
    with pytest.raises(ValueError, match="not divisible"):
        cifar_loader(images, 64, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        cifar_loader(images, 64, rank=4, world_size=4)


def test_eval_rank_slices_cover_the_split():
    images, labels = indexed_mnist(103)
    per_rank = [list(mnist_loader(images, labels, 20, train=False, rank=r, world_size=3)) for r in range(3)]
    assert all(len(batches) == 6 for batches in per_rank)  # every rank runs the same number of batches
    order = torch.cat([torch.cat([per_rank[r][j][1] for r in range(3)]) for j in range(6)])
    assert torch.equal(order, torch.arange(103))


def test_channels_last_output():
    images = coordinate_cifar(32)
    plain = next(iter(cifar_loader(images, 16, seed=5)))[0]
    fast = next(iter(cifar_loader(images, 16, seed=5, channels_last=True)))[0]
    assert fast.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast, plain)


def test_loader_argument_checks():
    images, labels = indexed_mnist(10)
    with pytest.raises(ValueError, match="batch_size"):
        mnist_loader(images, labels, 0)
    with pytest.raises(ValueError, match="exceeds"):
        mnist_loader(images, labels, 11)
    with pytest.raises(ValueError, match="uint8"):
        mnist_loader(images.float(), labels, 2)
    with pytest.raises(ValueError, match="normalize"):
        dataset.DeviceLoader(images, labels, 2, train=True, normalize=((0.5, 0.5), (0.5, 0.5)), augment=False,
                             device="cpu")
    with pytest.raises(ValueError, match="augment requires train"):
        dataset.DeviceLoader(images, labels, 2, train=False, normalize=dataset.MNIST_NORMALIZE, augment=True,
                             device="cpu")
    assert len(mnist_loader(images, labels, 10)) == 1 and len(mnist_loader(images, labels, 3, train=False)) == 4


# ---------------------------------------------------------------------------------------------------------
# build_loaders


def test_build_loaders_mnist_and_cifar(tmp_path):
    make_mnist(tmp_path / "MNIST" / "raw", n_train=40, n_test=9)
    make_cifar(tmp_path / "cifar-10-batches-py", n_per_batch=6)
    train, test = dataset.build_loaders("mnist", 16, "cpu", root=str(tmp_path), eval_batch_size=4, download=False)
    assert (len(train), len(test), train.num_examples, test.num_examples) == (2, 3, 40, 9)
    assert not train.augment and train.train and not test.train
    x, y = next(iter(train))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.int64
    train, test = dataset.build_loaders("cifar10", 8, torch.device("cpu"), root=str(tmp_path), eval_batch_size=5,
                                        download=False)
    assert (len(train), len(test), train.num_examples) == (3, 2, 30)
    assert train.augment and not test.augment
    assert next(iter(train))[0].shape == (8, 3, 32, 32)
    with pytest.raises(ValueError, match="mnist, cifar10"):
        dataset.build_loaders("svhn", 8, "cpu", root=str(tmp_path))


def test_build_loaders_reports_missing_data(tmp_path):
    with pytest.raises(dataset.DatasetError, match="CIFAR10_PATH"):
        dataset.build_loaders("cifar10", 8, "cpu", root=str(tmp_path), download=False)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 pickles from elsewhere: only the dataset's own types are built


def _short_string(value: bytes) -> bytes:
    """SHORT_BINSTRING: a Python 2 `str`, which unpickles as bytes under encoding="bytes"."""
    return b"U" + bytes([len(value)]) + value


def _small_int(value: int) -> bytes:
    return b"K" + bytes([value]) if 0 <= value < 256 else b"M" + struct.pack("<H", value)


def canonical_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch byte for byte in the form of the dataset's own files, assembled opcode by opcode: written by
    Python 2 at protocol 2 with numpy 1, so the array names numpy.core.multiarray._reconstruct, numpy.ndarray
    and numpy.dtype, and strings are Python 2 byte strings (the dict's keys among them)."""
    rows, width = data.shape
    dtype = (b"cnumpy\ndtype\n" + _short_string(b"u1") + _small_int(0) + _small_int(1) + b"\x87R"
             + b"(" + _small_int(3) + _short_string(b"|") + b"NNN" + b"J" + struct.pack("<i", -1)
             + b"J" + struct.pack("<i", -1) + _small_int(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _small_int(0) + b"\x85"
             + _short_string(b"b") + b"\x87R"
             + b"(" + _small_int(1) + _small_int(rows) + _small_int(width) + b"\x86" + dtype + b"\x89"
             + b"T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb")
    label_list = b"](" + b"".join(_small_int(v) for v in labels) + b"e"
    names = b"](" + b"".join(_short_string(b"img%d.png" % i) for i in range(rows)) + b"e"
    return (b"\x80\x02}(" + _short_string(b"batch_label") + _short_string(b"training batch 1 of 5")
            + _short_string(b"labels") + label_list + _short_string(b"data") + array
            + _short_string(b"filenames") + names + b"u.")


def test_canonical_cifar_batch_is_read(tmp_path):
    rng = np.random.default_rng(4)
    data, labels = rng.integers(0, 256, (3, 3072), dtype=np.uint8), [7, 0, 9]
    raw = canonical_cifar_pickle(data, labels)
    plain = pickle.loads(raw, encoding="bytes")  # the assembly is a valid pickle of the dataset's form
    assert np.array_equal(plain[b"data"], data) and plain[b"labels"] == labels
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    images, read_labels = dataset.read_cifar_batch(str(path))
    assert np.array_equal(images, data.reshape(3, 3, 32, 32)) and read_labels.tolist() == labels


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_batch_resaved_by_numpy_2_is_read(tmp_path, protocol):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"labels": [1, 2], b"data": data, b"batch_label": b"x"}, protocol=protocol))
    images, labels = dataset.read_cifar_batch(str(path))
    assert np.array_equal(images.reshape(2, 3072), data) and labels.tolist() == [1, 2]


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    crafted = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"payload": MakesFolder(str(marker))}
    (folder / "data_batch_1").write_bytes(pickle.dumps(crafted, protocol=2))
    with pytest.raises(dataset.DatasetError) as caught:
        dataset.load_cifar10(True, root=str(tmp_path), download=False)
    message = str(caught.value)
    assert "data_batch_1" in message and "CIFAR10_PATH" in message and "refused os.makedirs" in message
    assert "\n" not in message and not marker.exists()
    # The same payload inside an array of objects: refused too.
    objects = np.array([MakesFolder(str(marker))], dtype=object)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": objects, b"labels": [0]}, protocol=2))
    with pytest.raises(dataset.DatasetError, match="refused"):
        dataset.load_cifar10(True, root=str(tmp_path), download=False)
    assert not marker.exists()
