"""DistributedDataParallel on CPU (gloo, 2 processes): every rank selects the same GSM mask, ranks end with
identical weights, and those equal a single process running the same global batches."""
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dataset
from base_model import CifarResNet, build_model, init_weights
from conftest import free_port
from gsm.experiments.configs import TrainConfig
from gsm.experiments.multi_gpu import ProcessContext, wrap_model
from gsm.experiments.trainer import train_stage
from gsm.weights_io import read_hdf5

CONFIG = TrainConfig(epochs=2, batch_size=32, lr=0.05, lr_drop_epochs=(1,), momentum=0.9, weight_decay=5e-4,
                     nesterov=True, optimizer="gsm", nonzero_ratio=0.05)


def _data():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (128,), generator=generator)
    images = torch.randint(0, 60, (128, 1, 28, 28), generator=generator, dtype=torch.uint8)
    images[torch.arange(128), 0, labels * 2, :] = 255  # a learnable, label-dependent stripe
    return images, labels


def _loaders(net: str, rank: int, world_size: int, batch_size: int):
    """Train and test loaders on generated data for LeNet-300-100 (a learnable stripe) or a CIFAR ResNet."""
    if net == "lenet300":
        images, labels = _data()
        common = dict(normalize=dataset.MNIST_NORMALIZE, device="cpu", seed=3)
        augment, test_count = False, 64
    else:
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 10, (64,), generator=generator)
        images = torch.randint(0, 256, (64, 3, 32, 32), generator=generator, dtype=torch.uint8)
        common = dict(normalize=dataset.CIFAR10_NORMALIZE, device="cpu", seed=5)
        augment, test_count = True, 32
    train_loader = dataset.DeviceLoader(images, labels, batch_size, train=True, augment=augment, rank=rank,
                                        world_size=world_size, **common)
    test_loader = dataset.DeviceLoader(images[:test_count], labels[:test_count], test_count, train=False,
                                       augment=False, **common)
    return train_loader, test_loader


def _small_resnet() -> torch.nn.Module:
    """The CIFAR ResNet of depth 8 (one basic block per stage, BatchNorm throughout), initialised as the
    registered ones are: all of what the compiled test needs, at a fraction of rc20's compile time."""
    model = CifarResNet(8)
    init_weights(model)
    return model


def _train(folder: Path, rank: int, world_size: int, net: str = "lenet300", config: TrainConfig = CONFIG,
           compile_mode=None) -> torch.nn.Module:
    train_loader, test_loader = _loaders(net, rank, world_size, config.batch_size)
    torch.manual_seed(0)
    context = ProcessContext(rank=rank, world_size=world_size)
    model = wrap_model(_small_resnet() if net == "resnet8" else build_model(net), context, compile_mode)
    train_stage(model, folder, config, train_loader, test_loader, stage_config={"test": "ddp", "net": net},
                writer=context.is_writer, progress=False)
    return model


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = _train(Path(out_dir) / "ddp", rank, world_size)
        torch.save(model.module.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_each_other_and_a_single_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    single = _train(tmp_path / "single", 0, 1).state_dict()
    for key in single:
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-5, atol=1e-6)

    # Only rank 0 wrote: one folder with the stage's files, a log with its evaluations.
    written = read_hdf5(tmp_path / "ddp" / "finish.hdf5")
    for key in single:
        assert torch.equal(torch.from_numpy(written[key]), rank0[key]), key
    log = (tmp_path / "ddp" / "log.txt").read_text().splitlines()
    assert sum("validate at epoch" in line for line in log) == 2  # epoch 0 and after the last epoch


# ---------------------------------------------------------------------------------------------------------
# A BatchNorm ResNet under torch.compile, and the order in which the training form is built

RESNET_CONFIG = TrainConfig(epochs=1, batch_size=16, lr=0.05, lr_drop_epochs=(), momentum=0.9, weight_decay=1e-4,
                            optimizer="gsm", nonzero_ratio=0.1)


def _compiled_resnet_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = _train(Path(out_dir) / "resnet8", rank, world_size, "resnet8", RESNET_CONFIG, compile_mode="default")
        torch.save(dict(model.module._orig_mod.named_parameters()), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_compiled_batchnorm_resnet_ranks_stay_identical(tmp_path):
    """A CIFAR ResNet (BatchNorm) compiled inside DistributedDataParallel on two gloo ranks: every parameter
    ends bitwise equal on both ranks (the BatchNorm statistics are per rank on the CPU, where SyncBatchNorm is
    not available), and the training moved them."""
    mp.spawn(_compiled_resnet_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(0)
    start = dict(_small_resnet().named_parameters())
    assert rank0.keys() == rank1.keys() == start.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert not torch.equal(rank0["linear.weight"], start["linear.weight"])


def test_training_form_syncs_batchnorm_before_compiling_and_wraps_ddp_last(monkeypatch):
    """On CUDA with several processes: SyncBatchNorm first, so that the compiled graph holds the synchronised
    layers, then torch.compile, then DistributedDataParallel (stood in for here: no process group)."""
    wrapped = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda module, device_ids=None: wrapped.append((module, device_ids)) or module)
    context = ProcessContext(rank=1, world_size=2, device=torch.device("cuda", 1))
    model = wrap_model(build_model("rc20"), context, compile_mode="reduce-overhead")
    (inner, device_ids), = wrapped
    assert inner is model and device_ids == [1]
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    norms = [m for m in model._orig_mod.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    # One process, or the CPU: plain BatchNorm, and no DDP.
    eager = wrap_model(build_model("rc20"), ProcessContext())
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in eager.modules()) and len(wrapped) == 1
