"""Prune a model of your own with GSM: a small CNN (not one of this project's networks) on generated images.

    python examples/prune_your_model.py              # under a minute on a 2-core CPU
    python examples/prune_your_model.py --quick      # a few seconds (the tests run this)

The steps any model goes through:
 1. train it as usual (here plain SGD): GSM starts from a trained model;
 2. GSM with its own param groups: the first conv stays dense (prunable=False), so the other layers share
    the whole budget Q = N / 20, N counting the prunable layers only;
 3. the hard prune with the optimizer's own prunable set (`optimizer.hard_mask(model)`), so that it keeps what
    GSM trained for;
 4. save the mask and a compressed copy of the pruned model, load the copy into a fresh model, evaluate it.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
from torch import nn

import gsm


class SmallCNN(nn.Module):
    """conv 1->8 (3x3), ReLU, maxpool, conv 8->16 (3x3), ReLU, maxpool, fc 784->10."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.stem(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.body(x)), 2)
        return self.head(x.flatten(1))


def generated_images(count: int, generator: torch.Generator):
    """28x28 images of 10 classes: a bright square at a class-specific place, a class-specific bar, noise."""
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.rand(count, 1, 28, 28, generator=generator)
    shifts = torch.randint(-2, 3, (count, 2), generator=generator)
    for label in range(10):
        row, col = divmod(label, 4)
        for i in torch.nonzero(labels == label).flatten().tolist():
            top, left = 2 + 8 * row + int(shifts[i, 0]), 3 + 6 * col + int(shifts[i, 1])
            images[i, 0, max(top, 0):top + 6, max(left, 0):left + 6] += 0.25
            images[i, 0, 1 + 2 * label, 21:27] += 0.25
    return (images - 0.55) / 0.3, labels


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).float().mean().item()
    model.train()
    return 100.0 * correct


def train(model: nn.Module, optimizer: torch.optim.Optimizer, images, labels, epochs: int, batch: int,
          generator: torch.Generator) -> None:
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels) - batch + 1, batch):
            index = order[start:start + batch]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=20.0, help="compression ratio of the prunable layers")
    parser.add_argument("--quick", action="store_true", help="a small setting that runs in seconds")
    parser.add_argument("--out", default="", help="folder for the mask and the compressed model (default: a temporary one)")
    args = parser.parse_args(argv)
    if not args.ratio > 1:
        parser.error(f"--ratio must be > 1, got {args.ratio}")
    count, epochs, gsm_epochs = (1024, 2, 3) if args.quick else (4096, 4, 8)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    train_images, train_labels = generated_images(count, generator)
    test_images, test_labels = generated_images(2048, generator)
    torch.manual_seed(0)
    model = SmallCNN()

    # 1. Dense training.
    dense = torch.optim.SGD(gsm.param_groups(model, weight_decay=5e-4), lr=0.05, momentum=0.9)
    train(model, dense, train_images, train_labels, epochs, 64, generator)
    print(f"dense model: top-1 {accuracy(model, test_images, test_labels):.2f}%")

    # 2. GSM: the usual groups (no decay on biases), and the first conv kept dense.
    groups = gsm.param_groups(model, weight_decay=5e-4)
    stem = [model.stem.weight]
    groups = [{**g, "params": [p for p in g["params"] if all(p is not s for s in stem)]} for g in groups]
    groups.append({"params": stem, "weight_decay": 5e-4, "prunable": False})
    optimizer = gsm.GSM(groups, lr=0.01, momentum=0.99, nesterov=True, nonzero_ratio=1 / args.ratio)
    train(model, optimizer, train_images, train_labels, gsm_epochs, 64, generator)
    names = optimizer.prunable_names(model)
    print(f"GSM ({', '.join(names)} prunable, Q = {optimizer.keep_count} of {optimizer.num_prunable}): "
          f"top-1 {accuracy(model, test_images, test_labels):.2f}% before the hard prune")

    # 3. The hard prune over the optimizer's prunable set.
    mask = optimizer.hard_mask(model)
    gsm.apply_mask_to_weights(model, mask)
    report = gsm.sparsity_report(model, names=names)
    print(f"hard-pruned: top-1 {accuracy(model, test_images, test_labels):.2f}%, {report.nonzeros} of "
          f"{report.elements} prunable weights kept ({report.compression_ratio:.1f}x)")

    # 4. Files: the mask, and the pruned model compressed; then a fresh model from the compressed file.
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        os.makedirs(out, exist_ok=True)
        mask_path, sparse_path, dense_path = (os.path.join(out, name) for name in
                                              ("mask.hdf5", "pruned_sparse.hdf5", "pruned_dense.hdf5"))
        gsm.save_mask(mask, mask_path)
        gsm.save_sparse(model, sparse_path, names=names)
        gsm.save_hdf5(model, dense_path)
        reloaded = SmallCNN()
        gsm.load_sparse(sparse_path, reloaded)
        same = all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
        reloaded_mask = gsm.load_mask(mask_path)
        print(f"files: mask {os.path.getsize(mask_path)} bytes, compressed model {os.path.getsize(sparse_path)} "
              f"bytes, dense model {os.path.getsize(dense_path)} bytes")
        print(f"reloaded: equal to the pruned model: {same}; top-1 {accuracy(reloaded, test_images, test_labels):.2f}%;"
              f" mask of {gsm.mask_count(reloaded_mask)} kept weights")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
