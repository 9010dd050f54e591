"""Every folder and file name an experiment writes, in one place (docs/design.md, section 3)."""
import os
from pathlib import Path

GSM_EXPS = "gsm_exps"
LOTTERY_EXPS = "gsm_lottery_ticket_exps"

INIT_WEIGHTS = "init.hdf5"  # the weights a training stage started from (for a retrain: the ticket)
FINISH_WEIGHTS = "finish.hdf5"  # the weights at the end of training
PRUNED_WEIGHTS = "finish_pruned.hdf5"  # a GSM stage's hard-pruned model
PRUNED_RESULT = "finish_pruned.json"  # its evaluation and counts (gsm.experiments.train_log.PruneResult)
MASK = "mask.hdf5"  # a retrain's ticket mask, {parameter name: bool} (gsm.save_mask)
LOG = "log.txt"
CHECKPOINT = "checkpoint.pt"  # resume state, removed once the stage has finished
STAGE_CONFIG = "config.json"  # the stage's configuration, checked before a finished stage is reused


def format_ratio(ratio: float) -> str:
    """60.0 -> '60', 12.5 -> '12.5'."""
    return str(int(ratio)) if float(ratio).is_integer() else repr(float(ratio))


def rc_base_dir(out_root: os.PathLike, arch: str = "rc56") -> Path:
    return Path(out_root) / GSM_EXPS / f"{arch}_base_train"


def rc_gsm_dir(out_root: os.PathLike, arch: str = "rc56", ratio: float = 10) -> Path:
    suffix = "" if float(ratio) == 10 else f"_compress{format_ratio(ratio)}"
    return Path(out_root) / GSM_EXPS / f"{arch}_gsm{suffix}"


def lottery_base_dir(out_root: os.PathLike, net: str) -> Path:
    return Path(out_root) / LOTTERY_EXPS / f"lottery_{net}_base"


def lottery_dir(out_root: os.PathLike, net: str, ratio: float, kind: str, recipe: str = "paper") -> Path:
    """kind: 'gsm', 'gsm_retrain' or 'magnitude_retrain'. The GSM recipe is part of the GSM folders' names
    when it is not the default, so runs of both recipes sit side by side."""
    if kind not in ("gsm", "gsm_retrain", "magnitude_retrain"):
        raise ValueError(f"unknown lottery folder kind {kind!r}")
    recipe_part = f"_{recipe}" if recipe != "paper" and kind.startswith("gsm") else ""
    return Path(out_root) / LOTTERY_EXPS / f"lottery_{net}_compress{format_ratio(ratio)}{recipe_part}_{kind}"
