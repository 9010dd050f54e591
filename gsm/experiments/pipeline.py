"""Stages shared by the experiments: GSM training followed by the hard prune, and ticket retraining."""
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from torch import Tensor, nn

from gsm.wrappers import unwrap_model
from gsm.experiments import layout
from gsm.experiments.configs import TrainConfig
from gsm.pruning import apply_mask_to_weights, global_magnitude_mask, mask_count, prunable_parameters
from gsm.selection import keep_count
from gsm.experiments.train_log import PruneResult, StageEvents, StageLog
from gsm.pruned_io import save_mask
from gsm.experiments.trainer import evaluate, train_stage
from gsm.weights_io import save_hdf5

HARD_PRUNE_MARKER = "hard-pruned model:"
# Magnitude above which a weight counts as clearly alive after GSM (reported against Q).
ALIVE_MAGNITUDE = 0.01


def gsm_stage(model: nn.Module, folder: Path, config: TrainConfig, train_loader, test_loader, *,
              stage_config: Dict[str, Any], writer: bool = True, progress: bool = True,
              amp: bool = False, eval_pruned_every: Optional[int] = None) -> Dict[str, Tensor]:
    """GSM-train `model` from its current weights, then hard-prune it by global magnitude to
    `finish_pruned.hdf5`, evaluate the pruned model, and record the result (`finish_pruned.json`, and a log line
    for people). Leaves the pruned weights in `model` and returns the hard mask {name: bool}. Each part is
    skipped when already done: the stage is done when both files exist. `eval_pruned_every`: see train_stage."""
    train_stage(model, folder, config, train_loader, test_loader, stage_config=stage_config, writer=writer,
                progress=progress, amp=amp, eval_pruned_every=eval_pruned_every)
    plain = unwrap_model(model)
    mask = global_magnitude_mask(plain, config.nonzero_ratio)
    prunable = prunable_parameters(plain).values()
    num_prunable = sum(p.numel() for p in prunable)
    alive = sum(int((p.detach().abs() > ALIVE_MAGNITUDE).sum()) for p in prunable)
    apply_mask_to_weights(plain, mask)
    folder = Path(folder)
    pruned_path, result_path = folder / layout.PRUNED_WEIGHTS, folder / layout.PRUNED_RESULT
    if not writer or (pruned_path.exists() and PruneResult.load(result_path) is not None):
        return mask
    if not pruned_path.exists():  # (written again when it was deleted: the prune is deterministic)
        save_hdf5(plain, pruned_path)
    top1, top5, loss = evaluate(model, test_loader)
    result = PruneResult(top1=top1, top5=top5, loss=loss, kept=mask_count(mask), prunable=num_prunable,
                         keep_count=keep_count(num_prunable, config.nonzero_ratio), alive=alive,
                         alive_magnitude=ALIVE_MAGNITUDE)
    result.save(result_path)
    # For people: one line, so that an interruption can never leave half of it logged.
    StageLog(folder / layout.LOG).info(
        f"{HARD_PRUNE_MARKER} kept {result.kept} of {num_prunable} prunable weights "
        f"(Q = {result.keep_count}, compression {result.compression:.2f}x); before pruning {alive} weights "
        f"had |w| > {ALIVE_MAGNITUDE} ({alive / max(result.keep_count, 1):.3f} x Q); "
        f"top1={top1:.5f}, top5={top5:.5f}, loss={loss:.6f}")
    events = StageEvents(folder)
    events.scalars(config.num_epochs, pruned__top1=top1, pruned__top5=top5, pruned__loss=loss,
                   pruned__kept=result.kept)
    events.close()
    return mask


def retrain_stage(model: nn.Module, folder: Path, config: TrainConfig, train_loader, test_loader,
                  init_weights: Mapping[str, Tensor], mask: Mapping[str, Tensor], *,
                  stage_config: Dict[str, Any], writer: bool = True, progress: bool = True) -> None:
    """Retrain the ticket `init_weights * mask` with gradients multiplied by `mask` every step; the mask is
    kept in the folder (`mask.hdf5`, see gsm.load_mask), so that the ticket can be rebuilt and reused."""
    plain = unwrap_model(model)
    plain.load_state_dict(init_weights)
    apply_mask_to_weights(plain, mask)
    train_stage(model, folder, config, train_loader, test_loader, stage_config=stage_config, grad_mask=mask,
                writer=writer, progress=progress)
    mask_path = Path(folder) / layout.MASK
    if writer and not mask_path.exists():  # also written for a folder trained before masks were kept
        save_mask(mask, mask_path)


