"""The lottery-ticket experiment: a base run, GSM and magnitude masks, and the two ticket retrains."""
import copy
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import torch

import dataset
from base_model import MODEL_DATASETS, build_model, trains_channels_last
from gsm.experiments import layout
from gsm.experiments.folder_lock import lock_or_fail, shared_folder
from gsm.experiments.configs import (DEFAULT_RECIPE, LENET_BASE, LENET_GSM, RunOptions, TrainConfig, gsm_config,
                                     stage_config)
from gsm.experiments.pipeline import gsm_stage, retrain_stage
from gsm.pruning import global_magnitude_mask
from gsm.experiments.trainer import load_stage_weights, train_stage


@dataclass(frozen=True)
class LotteryConfig:
    """One lottery experiment: network, compression ratios R (one base serves them all) and GSM recipe
    (docs/design.md, sections 1 and 2)."""
    net: str
    ratios: Tuple[float, ...]
    recipe: str = DEFAULT_RECIPE
    options: RunOptions = RunOptions()


def run_lottery(config: LotteryConfig) -> Dict[float, Dict[str, str]]:
    """Run (or resume, or skip the finished parts of) the whole pipeline for every ratio in turn, on one base;
    returns {ratio: the stage folders}."""
    opts = config.options
    device = torch.device(opts.device)
    base_config = LENET_BASE.scaled(opts.scale)
    train_loader, test_loader = dataset.build_loaders(
        MODEL_DATASETS[config.net], base_config.batch_size, device, seed=opts.seed,
        root=opts.data_root or None, channels_last=trains_channels_last(config.net, device))
    loaders = (train_loader, test_loader)
    base_folder = layout.lottery_base_dir(opts.out_root, config.net)
    folders = {ratio: {kind: layout.lottery_dir(opts.out_root, config.net, ratio, kind, config.recipe)
                       for kind in ("gsm", "gsm_retrain", "magnitude_retrain")} for ratio in config.ratios}

    # One run per folder: the ratios' GSM folders are this run's alone; the base and the magnitude retrains,
    # which other runs (other ratios, the other recipe) share, are waited for.
    with ExitStack() as held:  # released however the run ends (a process that dies releases them anyway)
        for stage_folders in folders.values():
            for kind in ("gsm", "gsm_retrain"):
                held.enter_context(lock_or_fail(stage_folders[kind]))
        _run_ratios(config, model_for(config, device), base_folder, folders, loaders, base_config)
    return {ratio: {"base": str(base_folder), **{k: str(v) for k, v in stage_folders.items()}}
            for ratio, stage_folders in folders.items()}


def model_for(config: LotteryConfig, device: torch.device) -> torch.nn.Module:
    """The network, Xavier-initialised with the run's seed, in its training memory layout."""
    torch.manual_seed(config.options.seed)
    model = build_model(config.net).to(device)
    if trains_channels_last(config.net, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def _run_ratios(config: LotteryConfig, model: torch.nn.Module, base_folder: Path,
                folders: Dict[float, Dict[str, Path]], loaders, base_config: TrainConfig) -> None:
    """The base (step 1), then steps 2 to 4 for each ratio."""
    opts = config.options

    # 1. Base: Xavier init (seeded), trained once per network and shared by every ratio.
    with shared_folder(base_folder):
        train_stage(model, base_folder, base_config, *loaders, progress=opts.progress,
                    stage_config=stage_config("base", config.net, opts.seed, base_config))
    # Checked against the model now, so that a damaged init.hdf5 stops the run before the GSM stage trains.
    init_model = copy.deepcopy(model)
    load_stage_weights(init_model, base_folder, layout.INIT_WEIGHTS)
    base_init = {k: v.detach().clone() for k, v in init_model.state_dict().items()}
    base_result = {k: v.detach().clone() for k, v in model.state_dict().items()}

    for ratio in config.ratios:
        model.load_state_dict(base_result)
        _run_ratio(model, ratio, folders[ratio], config, base_config, base_init, loaders)


def _run_ratio(model: torch.nn.Module, ratio: float, folders: Dict[str, Path], config: LotteryConfig,
               base_config: TrainConfig, base_init: Dict[str, torch.Tensor], loaders) -> None:
    """Steps 2 to 4 for one ratio, from the base result in `model`."""
    opts = config.options
    gsm_train_config = gsm_config(LENET_GSM[config.recipe], ratio).scaled(opts.scale)

    # 2. Masks: magnitude from the base result; GSM from GSM training that starts at the base result.
    magnitude_mask = global_magnitude_mask(model, 1.0 / ratio)
    gsm_mask = gsm_stage(model, folders["gsm"], gsm_train_config, *loaders, progress=opts.progress,
                         eval_pruned_every=opts.eval_pruned_every,
                         stage_config=stage_config("gsm", config.net, opts.seed, gsm_train_config, base=base_config,
                                                   recipe=config.recipe))

    # 3-4. Tickets: the base init times each mask, retrained with the base schedule under the mask.
    for kind, mask in (("gsm_retrain", gsm_mask), ("magnitude_retrain", magnitude_mask)):
        found_by = dict(recipe=config.recipe, gsm=gsm_train_config) if kind == "gsm_retrain" else {}
        with shared_folder(folders[kind], enabled=kind == "magnitude_retrain"):
            retrain_stage(model, folders[kind], base_config, *loaders, base_init, mask, progress=opts.progress,
                          stage_config=stage_config(kind, config.net, opts.seed, base_config, base=base_config,
                                                    ratio=ratio, **found_by))
