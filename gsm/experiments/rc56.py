"""The CIFAR-10 ResNet experiment: base training, GSM training at compression R, and the hard prune."""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

import dataset
from base_model import MODEL_DATASETS, build_model, trains_channels_last
from gsm.experiments import layout
from gsm.experiments.configs import RC_BASE, RC_GSM, RunOptions, gsm_config, stage_config
from gsm.experiments.folder_lock import FolderBusy, lock_or_fail, shared_folder
from gsm.experiments.multi_gpu import barrier, init_process, rank0_flag, shutdown, wrap_model
from gsm.experiments.pipeline import gsm_stage
from gsm.experiments.trainer import train_stage


@dataclass(frozen=True)
class ResNetConfig:
    """One CIFAR ResNet run: depth name, compression ratio, and the speed options (results unchanged up to
    bf16 rounding with `amp`): `compile` is torch.compile's mode ("default", "reduce-overhead", ...), None
    for eager execution."""
    arch: str = "rc56"
    ratio: float = 10.0
    amp: bool = False
    compile: Optional[str] = None
    options: RunOptions = RunOptions()


def run_resnet(config: ResNetConfig) -> Dict[str, str]:
    """Base training (skipped when its finish.hdf5 exists), GSM training from it, and the hard prune to
    finish_pruned.hdf5; under torchrun, the global batch is split over the ranks and rank 0 writes."""
    opts = config.options
    context = init_process(opts.device)
    try:
        return _run(config, context)
    finally:
        shutdown()


def _run(config: ResNetConfig, context) -> Dict[str, str]:
    opts = config.options
    device = context.device
    channels_last = trains_channels_last(config.arch, device)
    base_config = RC_BASE.scaled(opts.scale)
    gsm_train_config = gsm_config(RC_GSM, config.ratio).scaled(opts.scale)
    train_loader, test_loader = dataset.build_loaders(
        MODEL_DATASETS[config.arch], base_config.batch_size, device, seed=opts.seed,
        root=opts.data_root or None, rank=context.rank, world_size=context.world_size, channels_last=channels_last)
    folders = {"base": layout.rc_base_dir(opts.out_root, config.arch),
               "gsm": layout.rc_gsm_dir(opts.out_root, config.arch, config.ratio)}

    # One run per folder: the GSM folder is this run's alone, the base is shared by every ratio (waited for).
    # Only rank 0 locks; the other ranks learn whether it could.
    own_lock, busy = None, None
    if context.is_writer:
        try:
            own_lock = lock_or_fail(folders["gsm"])
        except FolderBusy as exc:
            busy = exc
    if not rank0_flag(busy is None, device):
        raise busy or FolderBusy(f"rank 0 could not lock {folders['gsm']}: another run uses it")

    try:
        torch.manual_seed(opts.seed)
        plain = build_model(config.arch).to(device)
        if channels_last:
            plain = plain.to(memory_format=torch.channels_last)
        model = wrap_model(plain, context, config.compile)
        stage_options = dict(writer=context.is_writer, progress=opts.progress, amp=config.amp)
        with shared_folder(folders["base"], enabled=context.is_writer):
            barrier()  # the other ranks wait here while rank 0 waits for the lock
            train_stage(model, folders["base"], base_config, train_loader, test_loader,
                        stage_config=stage_config("base", config.arch, opts.seed, base_config), **stage_options)
        gsm_stage(model, folders["gsm"], gsm_train_config, train_loader, test_loader,
                  stage_config=stage_config("gsm", config.arch, opts.seed, gsm_train_config, base=base_config),
                  eval_pruned_every=opts.eval_pruned_every, **stage_options)
    finally:
        if own_lock is not None:
            own_lock.release()
    return {name: str(path) for name, path in folders.items()}
