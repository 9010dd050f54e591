"""The lottery-ticket experiment: a base run, GSM and magnitude masks, and the two ticket retrains."""
import copy
from dataclasses import dataclass
from typing import Dict

import torch

import dataset
from base_model import MODEL_DATASETS, build_model, trains_channels_last
from gsm import exp_layout
from gsm.experiment_config import DEFAULT_RECIPE, LENET_BASE, LENET_GSM, RunOptions, gsm_config
from gsm.pipeline import gsm_stage, retrain_stage
from gsm.pruning import global_magnitude_mask
from gsm.trainer import load_stage_weights, train_stage


@dataclass(frozen=True)
class LotteryConfig:
    """One lottery experiment: network, compression ratio R and GSM recipe (DESIGN 1 and 2)."""
    net: str
    ratio: float
    recipe: str = DEFAULT_RECIPE
    options: RunOptions = RunOptions()


def run_lottery(config: LotteryConfig) -> Dict[str, str]:
    """Run (or resume, or skip the finished parts of) the whole pipeline; returns the stage folders."""
    opts = config.options
    device = torch.device(opts.device)
    base_config = LENET_BASE.scaled(opts.scale)
    gsm_train_config = gsm_config(LENET_GSM[config.recipe], config.ratio).scaled(opts.scale)
    channels_last = trains_channels_last(config.net, device)
    train_loader, test_loader = dataset.build_loaders(
        MODEL_DATASETS[config.net], base_config.batch_size, device, seed=opts.seed,
        root=opts.data_root or None, channels_last=channels_last)
    loaders = (train_loader, test_loader)
    common = {"model": config.net, "seed": opts.seed}
    folders = {
        "base": exp_layout.lottery_base_dir(opts.out_root, config.net),
        **{kind: exp_layout.lottery_dir(opts.out_root, config.net, config.ratio, kind, config.recipe)
           for kind in ("gsm", "gsm_retrain", "magnitude_retrain")},
    }

    # 1. Base: Xavier init (seeded), trained once per network and shared by every ratio.
    torch.manual_seed(opts.seed)
    model = build_model(config.net).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_stage(model, folders["base"], base_config, *loaders, progress=opts.progress,
                stage_config={"stage": "base", **common, "train": base_config.to_dict()})
    # Checked against the model now, so that a damaged init.hdf5 stops the run before the GSM stage trains.
    init_model = copy.deepcopy(model)
    load_stage_weights(init_model, folders["base"], exp_layout.INIT_WEIGHTS)
    base_init = {k: v.detach() for k, v in init_model.state_dict().items()}

    # 2. Masks: magnitude from the base result; GSM from GSM training that starts at the base result.
    magnitude_mask = global_magnitude_mask(model, 1.0 / config.ratio)
    gsm_mask = gsm_stage(model, folders["gsm"], gsm_train_config, *loaders, progress=opts.progress,
                         stage_config={"stage": "gsm", **common, "recipe": config.recipe,
                                       "base": base_config.to_dict(), "train": gsm_train_config.to_dict()})

    # 3-4. Tickets: the base init times each mask, retrained with the base schedule under the mask.
    for kind, mask in (("gsm_retrain", gsm_mask), ("magnitude_retrain", magnitude_mask)):
        stage_config = {"stage": kind, **common, "ratio": config.ratio, "base": base_config.to_dict(),
                        "train": base_config.to_dict()}
        if kind == "gsm_retrain":
            stage_config.update(recipe=config.recipe, gsm=gsm_train_config.to_dict())
        retrain_stage(model, folders[kind], base_config, *loaders, base_init, mask, progress=opts.progress,
                      stage_config=stage_config)
    return {name: str(path) for name, path in folders.items()}
