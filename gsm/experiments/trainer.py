"""One training stage: the lr schedule, parameter groups, evaluation, logging, checkpoints and resume."""
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from gsm.atomic_write import write_text_atomic
from gsm.experiments import layout
from gsm.experiments.checkpoint import CheckpointError, load_checkpoint, remove_stale_temp_files, save_checkpoint
from gsm.experiments.configs import TrainConfig
from gsm.experiments.lr_schedule import learning_rate
from gsm.experiments.multi_gpu import all_reduce_mean, barrier
from gsm.experiments.train_log import StageEvents, StageLog, format_evaluation, format_pruned_copy, format_readiness
from gsm.optimizer import GSM
from gsm.pruning import apply_mask_to_weights, mask_count, prune_readiness
from gsm.param_groups import param_groups as public_param_groups
from gsm.weights_io import WeightsFileError, load_hdf5, save_hdf5
from gsm.wrappers import unwrap_model


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite; the last good checkpoint is kept."""


class StageConfigMismatch(RuntimeError):
    """A folder holds a stage trained (or being trained) with another configuration."""


def param_groups(model: nn.Module, config: TrainConfig) -> List[Dict[str, Any]]:
    """`gsm.param_groups` with the stage's weight decay and bias lr factor: each group's `lr_factor`
    multiplies the scheduled lr."""
    return public_param_groups(model, config.weight_decay, config.bias_lr_factor)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    if config.optimizer == "gsm":
        return GSM(groups, lr=config.lr, momentum=config.momentum, nonzero_ratio=config.nonzero_ratio,
                   nesterov=config.nesterov)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; valid: sgd, gsm")


def autocast(device: torch.device, amp: bool):
    """bf16 autocast for the forward pass when `amp` (no loss scaling is needed with bf16)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> Tuple[float, float, float]:
    """Top-1 and top-5 accuracy in percent and the mean cross-entropy over the whole loader, computed in
    float32 by the plain module (eager: inside a DistributedDataParallel or torch.compile wrapper, the
    evaluation neither compiles a graph of its own nor makes the training graph recompile for eval mode)."""
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = None
    count = 0
    for images, labels in loader:
        logits = model(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5.eq(labels[:, None])
        batch = (hits[:, 0].sum(), hits.any(dim=1).sum(), F.cross_entropy(logits, labels, reduction="sum"))
        if correct1 is None:
            correct1, correct5, loss_sum = batch
        else:
            correct1, correct5, loss_sum = correct1 + batch[0], correct5 + batch[1], loss_sum + batch[2]
        count += labels.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation loader is empty")
    return 100.0 * float(correct1) / count, 100.0 * float(correct5) / count, float(loss_sum) / count


def _mask_list(model: nn.Module, grad_mask: Optional[Mapping[str, Tensor]]):
    """(params, float masks) for multiplying gradients by a {name: bool} mask with one foreach op."""
    if not grad_mask:
        return [], []
    named = dict(unwrap_model(model).named_parameters())
    params = [named[name] for name in grad_mask]
    masks = [grad_mask[name].to(device=named[name].device, dtype=named[name].dtype) for name in grad_mask]
    return params, masks


def load_stage_weights(model: nn.Module, folder: Path, file_name: str) -> None:
    """Load `folder/file_name` (a stage's init.hdf5 or finish.hdf5) into `model`; a file that cannot be read
    or does not fit is reported in one line that says how to recover."""
    try:
        load_hdf5(Path(folder) / file_name, model)
    except WeightsFileError as exc:
        raise WeightsFileError(f"{exc}; restore that file, or delete {folder} to train this stage again") from exc


def _check_config(folder: Path, stage_config: Dict[str, Any], what: str) -> None:
    path = folder / layout.STAGE_CONFIG
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            saved = exc
        if not isinstance(saved, dict):
            reason = f"{type(saved).__name__}: {saved}" if isinstance(saved, Exception) else "not a JSON object"
            raise StageConfigMismatch(
                f"{path}: unreadable stage configuration ({' '.join(reason.split())}); restore it, or delete "
                f"{folder} to train this stage again")
        if saved != stage_config:
            diff = sorted(k for k in set(saved) | set(stage_config) if saved.get(k) != stage_config.get(k))
            raise StageConfigMismatch(
                f"{folder} holds a {what} with another configuration (differs in: {', '.join(diff)}); "
                f"use another --out-root, or delete that folder to train it again")


def _restore(checkpoint: Dict[str, Any], path: Path, model: nn.Module,
             optimizer: torch.optim.Optimizer) -> Tuple[int, int]:
    """Put the model, the optimizer and torch's RNG in the state of `checkpoint` (read from `path`); returns
    (the next epoch, the log's size then). Whatever in it does not fit is refused in one line (CheckpointError),
    before training starts: a resume never runs on a state that is not the run's."""
    try:
        next_epoch, log_size = checkpoint["next_epoch"], checkpoint["log_size"]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (next_epoch, log_size)):
            raise ValueError(f"next_epoch {next_epoch!r} and log_size {log_size!r} must be counts")
        unwrap_model(model).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["torch_rng"].cpu())
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        reason = " ".join(f"{exc.__class__.__name__}: {exc}".split())
        raise CheckpointError(f"{path}: does not fit this stage ({reason[:300]}); delete it to restart this stage "
                              f"from its beginning (the folder's other files are kept)") from exc
    return next_epoch, log_size


def train_stage(model: nn.Module, folder: Path, config: TrainConfig, train_loader, test_loader, *,
                stage_config: Dict[str, Any], grad_mask: Optional[Mapping[str, Tensor]] = None,
                writer: bool = True, progress: bool = True, amp: bool = False,
                eval_pruned_every: Optional[int] = None) -> str:
    """Train `model` in place for one stage, from its current weights, writing into `folder`.

    A finished stage (finish.hdf5 present) is loaded and skipped; an interrupted one resumes from its last
    epoch checkpoint with the log cut back to that point. `stage_config` (JSON-able) identifies the run: a
    folder written with another one is refused. `grad_mask` ({name: bool}) multiplies the gradients every
    step so that pruned weights stay zero. Only a `writer` (rank 0) writes files; under torchrun every
    rank calls this with the DDP-wrapped model. `amp` runs forward passes under bf16 autocast. Inside an
    iteration nothing waits for the device except the progress bar's loss readout every 25 iterations.
    A GSM stage also logs its prune readiness at each evaluation (gsm.prune_readiness), and evaluates a
    hard-pruned copy of the model (never trained) every `eval_pruned_every` epochs (0: never), by default at
    the lr drops, and at the end.
    Returns 'skipped', 'resumed' or 'trained'.
    """
    folder = Path(folder)
    if (folder / layout.FINISH_WEIGHTS).exists():
        return _skip_finished(model, folder, stage_config, writer)
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(folder)  # left by a run killed while writing a checkpoint or weights
    if len(train_loader) == 0:
        raise ValueError(f"the training set is smaller than one batch of {config.batch_size}")
    stage = _Stage(model, build_optimizer(model, config), folder, config, stage_config, writer, len(train_loader),
                   StageLog(folder / layout.LOG if writer else None, echo=writer))
    stage.pruned_epochs = pruned_copy_epochs(config, eval_pruned_every)
    start_epoch, outcome = _start_or_resume(stage)
    stage.events = StageEvents(folder if writer else None, purge_step=start_epoch)
    mask_pairs = _mask_list(model, grad_mask)
    for epoch in range(start_epoch, config.num_epochs):
        if epoch % 2 == 0:
            stage.evaluate(epoch, test_loader)
        if epoch in stage.pruned_epochs:
            stage.evaluate_pruned_copy(epoch, test_loader)
        started = time.perf_counter()
        with tqdm(total=stage.iters_per_epoch, desc=f"{folder.name} {epoch + 1}/{config.num_epochs}", leave=False,
                  disable=not (progress and writer) or None, dynamic_ncols=True) as bar:
            losses = train_epoch(model, stage.optimizer, train_loader, epoch, stage.lr_at, amp=amp,
                                 grad_mask=mask_pairs, bar=bar)
        _end_epoch(stage, epoch, losses, time.perf_counter() - started)
    stage.evaluate(config.num_epochs, test_loader)
    if config.num_epochs in stage.pruned_epochs:
        stage.evaluate_pruned_copy(config.num_epochs, test_loader)
    stage.events.close()
    if writer:
        save_hdf5(model, folder / layout.FINISH_WEIGHTS)
        stage.checkpoint_path.unlink(missing_ok=True)
    barrier()
    return outcome


@dataclass
class _Stage:
    """What the parts of one stage's training share."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    folder: Path
    config: TrainConfig
    stage_config: Dict[str, Any]
    writer: bool
    iters_per_epoch: int
    log: StageLog
    events: Optional[StageEvents] = None
    pruned_epochs: FrozenSet[int] = frozenset()

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / layout.CHECKPOINT

    def lr_at(self, iteration: int) -> float:
        """The scheduled lr of a global iteration (before each group's `lr_factor`)."""
        return learning_rate(iteration, self.config.lr, self.config.warmup_iters(self.iters_per_epoch),
                             self.config.drop_iters(self.iters_per_epoch))

    def evaluate(self, epoch: int, test_loader) -> None:
        """Evaluate the model; in a GSM stage, also log how ready it is for the hard prune."""
        top1, top5, loss = evaluate(self.model, test_loader)
        self.log.info(format_evaluation(epoch, top1, top5, loss))
        self.events.scalars(epoch, test__top1=top1, test__top5=top5, test__loss=loss)
        if isinstance(self.optimizer, GSM) and self.writer:
            readiness = prune_readiness(self.model, self.optimizer)
            self.log.info(format_readiness(epoch, readiness))
            self.events.scalars(epoch, readiness__removed_above_1e_2=readiness.outside_above_1e_2,
                                readiness__share_above_1e_2=readiness.share_above_1e_2,
                                readiness__share_above_1e_3=readiness.share_above_1e_3,
                                readiness__removed_kept_norm=readiness.norm_ratio)

    def evaluate_pruned_copy(self, epoch: int, test_loader) -> None:
        """In a GSM stage, evaluate a copy of the model hard-pruned now (the model itself is untouched)."""
        if not (isinstance(self.optimizer, GSM) and self.writer):
            return
        plain = unwrap_model(self.model)
        mask = self.optimizer.hard_mask(plain)
        pruned = copy.deepcopy(plain)
        apply_mask_to_weights(pruned, mask)
        top1, top5, loss = evaluate(pruned, test_loader)
        del pruned
        self.log.info(format_pruned_copy(epoch, mask_count(mask), self.optimizer.num_prunable, top1, top5, loss))
        self.events.scalars(epoch, pruned_copy__top1=top1, pruned_copy__top5=top5, pruned_copy__loss=loss)


def pruned_copy_epochs(config: TrainConfig, every: Optional[int]) -> FrozenSet[int]:
    """The epochs (0-based, before the epoch trains; num_epochs is the end) at which a GSM stage evaluates a
    hard-pruned copy: every `every` epochs, or by default at each lr drop, and at the end; none when `every` is
    0."""
    end = config.num_epochs
    if every is None:
        epochs = {round(e * config.scale) for e in config.lr_drop_epochs}
    elif every < 0:
        raise ValueError(f"eval_pruned_every must be >= 0, got {every}")
    else:
        epochs = set(range(every, end, every)) if every else set()
    return frozenset({e for e in epochs if 0 < e < end} | ({end} if every != 0 else set()))


def _skip_finished(model: nn.Module, folder: Path, stage_config: Dict[str, Any], writer: bool) -> str:
    """A finished stage: check that it is this run's, load its finish.hdf5, tidy the folder."""
    _check_config(folder, stage_config, "finished stage")
    load_stage_weights(model, folder, layout.FINISH_WEIGHTS)
    if writer:
        # A run killed between writing finish.hdf5 and removing the checkpoint left both.
        (folder / layout.CHECKPOINT).unlink(missing_ok=True)
        remove_stale_temp_files(folder)
    return "skipped"


def _start_or_resume(stage: _Stage) -> Tuple[int, str]:
    """Resume from the folder's checkpoint (the log cut back to it), or start the stage (its configuration and
    init.hdf5 written); returns (the first epoch to train, 'resumed' or 'trained')."""
    checkpoint = load_checkpoint(stage.checkpoint_path, map_location=next(stage.model.parameters()).device)
    if checkpoint is not None:
        if not isinstance(checkpoint, dict) or checkpoint.get("stage_config") != stage.stage_config:
            raise StageConfigMismatch(
                f"{stage.checkpoint_path} belongs to a run with another configuration; rerun with the same "
                f"options, use another --out-root, or delete {stage.folder} to start this stage again")
        start_epoch, log_size = _restore(checkpoint, stage.checkpoint_path, stage.model, stage.optimizer)
        stage.log.truncate(log_size)
        stage.log.info(f"resumed from {layout.CHECKPOINT} at epoch {start_epoch}")
        return start_epoch, "resumed"
    if stage.writer:
        write_text_atomic(stage.folder / layout.STAGE_CONFIG,
                          json.dumps(stage.stage_config, indent=1, sort_keys=True))
        save_hdf5(stage.model, stage.folder / layout.INIT_WEIGHTS)
    # A run stopped before its first checkpoint starts over: drop its lines, as a resume drops those after its
    # checkpoint, so that no evaluation is logged twice.
    stage.log.truncate(0)
    stage.log.info(f"start training: {json.dumps(stage.stage_config, sort_keys=True)}")
    return 0, "trained"


def _end_epoch(stage: _Stage, epoch: int, losses: Tensor, seconds: float) -> None:
    """After an epoch: stop on non-finite losses or weights, log and record the epoch, save the checkpoint."""
    losses = all_reduce_mean(losses)  # every rank sees the same losses, so all stop together
    _check_finite(stage.model, losses, epoch, stage.iters_per_epoch, stage.checkpoint_path)
    lr = stage.lr_at((epoch + 1) * stage.iters_per_epoch - 1)
    mean_loss = float(losses.mean())
    images_seen = stage.iters_per_epoch * stage.config.batch_size
    stage.log.info(f"epoch {epoch} done: mean loss {mean_loss:.6f}, lr {lr:.6g}, "
                   f"{seconds:.2f} s, {images_seen / seconds:.0f} images/s")
    stage.events.scalars(epoch, train__loss=mean_loss, train__lr=lr, train__seconds=seconds)
    if not stage.writer:
        return
    if isinstance(stage.optimizer, GSM):  # the epoch's last step; one readout per epoch
        threshold = stage.optimizer.last_threshold
        stage.events.scalars(epoch, gsm__active=stage.optimizer.num_active,
                             gsm__threshold=float(threshold) if threshold is not None else 0.0)
    save_checkpoint({"model": unwrap_model(stage.model).state_dict(), "optimizer": stage.optimizer.state_dict(),
                     "next_epoch": epoch + 1, "log_size": stage.log.size(), "stage_config": stage.stage_config,
                     "torch_rng": torch.get_rng_state()}, stage.checkpoint_path)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader, epoch: int,
                lr_at: Callable[[int], float], *, amp: bool = False,
                grad_mask: Tuple[List[Tensor], List[Tensor]] = ([], []), bar: Optional[tqdm] = None) -> Tensor:
    """One epoch of forward, cross-entropy, backward, optional gradient mask and optimizer step, with the lr
    of global iteration `epoch * len(loader) + i` times each group's `lr_factor`. Returns the per-iteration
    losses as a device tensor (no host synchronisation except the progress bar's readout)."""
    iters_per_epoch = len(loader)
    device = next(model.parameters()).device
    mask_params, mask_values = grad_mask
    on_cuda = device.type == "cuda"
    losses = torch.zeros(iters_per_epoch, device=device)
    model.train()
    loader.set_epoch(epoch)
    for i, (images, labels) in enumerate(loader):
        lr = lr_at(epoch * iters_per_epoch + i)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_factor", 1.0)
        if on_cuda:
            # For torch.compile's CUDA graphs (mode reduce-overhead): a new step begins, so the memory of the last
            # step's graph outputs may be reused (they are all consumed by now). Without CUDA graphs a no-op,
            # and not called on the CPU: its first call imports inductor's CUDA-graph module (seconds).
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, amp):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if mask_params:
            torch._foreach_mul_([p.grad for p in mask_params], mask_values)
        optimizer.step()
        losses[i] = loss.detach()
        if bar is not None and not bar.disable and (i % 25 == 0 or i == iters_per_epoch - 1):
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{lr:.3g}", refresh=False)
            bar.update(i + 1 - bar.n)
    return losses


def _check_finite(model: nn.Module, losses: Tensor, epoch: int, iters_per_epoch: int,
                  checkpoint_path: Path) -> None:
    """Stop with a message naming the first non-finite loss of the epoch, or the non-finite weights after
    its last iteration (the losses are those before each step, so a last step that breaks the weights shows
    only there)."""
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0])
        raise TrainingDiverged(
            f"non-finite loss at epoch {epoch}, iteration {first} (global iteration "
            f"{epoch * iters_per_epoch + first}); {_recovery(checkpoint_path)}")
    norms = torch._foreach_norm([p.detach() for p in model.parameters()])
    if not math.isfinite(float(torch.stack(norms).sum())):
        last = iters_per_epoch - 1
        broken = [name for name, p in unwrap_model(model).named_parameters() if not bool(torch.isfinite(p).all())]
        raise TrainingDiverged(
            f"non-finite weights after epoch {epoch}, iteration {last} (global iteration "
            f"{epoch * iters_per_epoch + last}; every loss of the epoch was finite) in "
            f"{', '.join(broken) or 'no single tensor (their norm overflows float32)'}; {_recovery(checkpoint_path)}")


def _recovery(checkpoint_path: Path) -> str:
    if checkpoint_path.exists():
        return (f"the last good checkpoint {checkpoint_path} is kept: lower the learning rate or check the data, "
                f"then rerun to resume from it")
    return ("no epoch of this stage had finished, so there is no checkpoint: lower the learning rate or check the "
            "data, then rerun to start the stage again")
