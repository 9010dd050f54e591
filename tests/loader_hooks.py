"""A train-loader wrapper for tests that act at one batch: interrupt the run there, kill it, or poison it."""
from typing import Callable, Optional

import torch


class BatchHookLoader:
    """Wraps a train loader and passes batch `iteration` of epoch `epoch` (of every epoch when None) through
    `hook(images, labels)`, yielding what it returns; the hook may also raise or end the process."""

    def __init__(self, loader, iteration: int, hook: Callable, epoch: Optional[int] = None) -> None:
        self.loader, self.iteration, self.hook, self.at_epoch = loader, iteration, hook, epoch
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.iteration and self.at_epoch in (None, self.epoch):
                batch = self.hook(*batch)
            yield batch


def nan_images(images: torch.Tensor, labels: torch.Tensor):
    """A batch whose images are all NaN, so that its loss is not finite."""
    return torch.full_like(images, float("nan")), labels


def keyboard_interrupt(images: torch.Tensor, labels: torch.Tensor):
    raise KeyboardInterrupt
