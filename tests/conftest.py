"""Shared fixtures: small fake MNIST written in the real IDX on-disk layout (`<root>/MNIST/raw/*-ubyte`).

Each class is a distinct pattern (a bright square at its own place on a 4 x 3 grid, plus a class-specific
bar) with pixel noise and a small random shift, so a LeNet learns it in a few iterations and accuracies
are meaningful rather than chance.
"""
from __future__ import annotations

import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset

NUM_FAKE_TRAIN = 512
NUM_FAKE_TEST = 256


def free_port() -> int:
    """A TCP port of this machine that no process listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """An IDX file: big-endian uint32 magic, one big-endian uint32 per dimension, then the uint8 bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.tobytes())


def class_template(label: int) -> np.ndarray:
    """A 28 x 28 float image in [0, 1] that identifies `label`: a 6 x 6 square at grid cell `label` of a
    4 x 3 grid and a horizontal bar whose row also depends on the label."""
    image = np.zeros((28, 28), dtype=np.float32)
    row, col = divmod(label, 3)
    top, left = 2 + 6 * row, 3 + 8 * col
    image[top:top + 6, left:left + 6] = 1.0
    bar_row = 2 + 2 * label + (1 if label > 4 else 0)
    image[bar_row, 22:27] = 0.8
    return image


def fake_mnist_split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` uint8 images [count, 28, 28] and uint8 labels, classes balanced and shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
    images = np.empty((count, 28, 28), dtype=np.float32)
    for i, label in enumerate(labels):
        shift = rng.integers(-1, 2, size=2)
        image = np.roll(class_template(int(label)), tuple(shift), axis=(0, 1))
        images[i] = image * rng.uniform(0.7, 1.0) + rng.uniform(0.0, 0.35, size=(28, 28))
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8), labels


def write_fake_mnist(root: Path, num_train: int = NUM_FAKE_TRAIN, num_test: int = NUM_FAKE_TEST,
                     seed: int = 0) -> Path:
    """Write the four IDX files under `root/MNIST/raw/` and return `root`."""
    raw = Path(root) / "MNIST" / "raw"
    for split, count, split_seed in (("train", num_train, seed), ("t10k", num_test, seed + 1)):
        images, labels = fake_mnist_split(count, split_seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", images, dataset.IDX_IMAGES_MAGIC)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels, dataset.IDX_LABELS_MAGIC)
    return Path(root)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A read-only-by-convention fake MNIST root shared by every test of the session (512 train, 256 test)."""
    return write_fake_mnist(tmp_path_factory.mktemp("fake_mnist"))


@pytest.fixture(scope="session")
def mnist_tensors(mnist_root):
    """(train images, train labels, test images, test labels) as loaded by dataset.load_mnist."""
    train = dataset.load_mnist(True, root=str(mnist_root), download=False)
    test = dataset.load_mnist(False, root=str(mnist_root), download=False)
    return (*train, *test)


@pytest.fixture
def mnist_loaders(mnist_tensors):
    """Fresh (train, test) DeviceLoaders on the fake MNIST: batch 64 (8 iterations per epoch), seed 0."""
    train_images, train_labels, test_images, test_labels = mnist_tensors
    common = dict(normalize=dataset.MNIST_NORMALIZE, augment=False, device="cpu", seed=0)
    train = dataset.DeviceLoader(train_images, train_labels, 64, train=True, **common)
    test = dataset.DeviceLoader(test_images, test_labels, 1000, train=False, **common)
    return train, test


@pytest.fixture
def single_thread():
    """Tiny models run fastest single-threaded, also on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
