"""The fast GPU path on a CUDA device (skipped without one): no host synchronisation inside a training
iteration, the device-resident loader, and the ResNet script with every speed option."""
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import dataset
from base_model import build_model
from gsm.experiments.configs import RC_GSM, gsm_config
from gsm.optimizer import GSM
from gsm.pruning import num_pruned_to, prunable_parameters
from gsm.experiments.trainer import build_optimizer, train_epoch
from test_rc56 import write_fake_cifar10

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextmanager
def host_syncs_are_errors():
    """Every operation that makes the host wait for the device raises inside this block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class FirstBatchUnchecked:
    """A loader whose epochs run under `host_syncs_are_errors` from the second batch on: the first batch
    also draws the epoch's permutation and augmentation, once per epoch and outside the iterations."""

    def __init__(self, loader: dataset.DeviceLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        batches = iter(self.loader)
        first = next(batches)
        with host_syncs_are_errors():
            yield first
            yield from batches


def cifar_like_loader(count: int, batch: int) -> dataset.DeviceLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return dataset.DeviceLoader(images, labels, batch, train=True, normalize=dataset.CIFAR10_NORMALIZE,
                                augment=True, device="cuda", channels_last=True)


def test_gsm_step_never_waits_for_the_device():
    torch.manual_seed(0)
    model = build_model("rc20").cuda().to(memory_format=torch.channels_last)
    optimizer = GSM(model.parameters(), lr=0.01, momentum=0.98, weight_decay=1e-4, nonzero_ratio=0.1)
    x = torch.randn(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device="cuda")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with host_syncs_are_errors():
            optimizer.step()
    # Outside the checked region: the selection did its job.
    assert optimizer.keep_count <= optimizer.num_active < optimizer.num_prunable
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_training_iterations_never_wait_for_the_device(amp):
    torch.manual_seed(0)
    model = build_model("rc20").cuda().to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, gsm_config(RC_GSM, 10))
    loader = FirstBatchUnchecked(cifar_like_loader(8 * 32, 32))
    losses = train_epoch(model, optimizer, loader, 0, lambda iteration: 0.01, amp=amp)
    assert losses.shape == (8,) and bool(torch.isfinite(losses).all())
    assert optimizer.num_active >= optimizer.keep_count


def test_loader_on_cuda_serves_the_cpu_loaders_batches():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(300) % 10
    common = dict(normalize=dataset.CIFAR10_NORMALIZE, augment=False, train=False)
    on_cpu = dataset.DeviceLoader(images, labels, 128, device="cpu", **common)
    on_gpu = dataset.DeviceLoader(images, labels, 128, device="cuda", channels_last=True, **common)
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(on_cpu, on_gpu):
        assert x_gpu.is_cuda and x_gpu.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x_gpu.cpu(), x_cpu) and torch.equal(y_gpu.cpu(), y_cpu)
    train = cifar_like_loader(300, 64)
    batches = list(train.epoch_batches(3))
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == (64, 3, 32, 32) and x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
        # Pad-crop-flip keeps pixels in the normalised range, padding included (-1 = a 0 pixel).
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    # The same seed and epoch give the same batches; another epoch another order.
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, train.epoch_batches(3)))
    assert not torch.equal(batches[0][1], next(iter(train.epoch_batches(4)))[1])


def test_resnet_script_with_amp_and_cuda_graphs(tmp_path):
    data = write_fake_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "gsm" / "gsm_rc56.py"), "--arch", "rc20", "--scale", "0.002", "--device",
         "cuda", "--amp", "--compile", "reduce-overhead", "--data-root", str(data), "--out-root", str(out),
         "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    num_prunable = sum(p.numel() for p in prunable_parameters(build_model("rc20")).values())
    kept = num_prunable - num_pruned_to(num_prunable, 0.1)
    log = (out / "gsm_exps" / "rc20_gsm" / "log.txt").read_text()
    assert f"hard-pruned model: kept {kept} of {num_prunable}" in log
