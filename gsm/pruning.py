"""Pruning masks as plain {parameter name: bool tensor} dicts: the global magnitude mask, applying masks,
and sparsity reports."""
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from gsm.selection import check_nonzero_ratio
from gsm.sharded import full_tensors, local, local_part
from gsm.wrappers import unwrap_model

Mask = Dict[str, Tensor]


def is_prunable_shape(shape) -> bool:
    """Prunable tensors are those of dim > 1: conv kernels and linear weights."""
    return len(shape) > 1


def prunable_parameters(model: nn.Module, names: Optional[Iterable[str]] = None) -> Dict[str, nn.Parameter]:
    """The model's prunable parameters by plain state-dict name (inside DDP or torch.compile wrappers), in
    registration order: those in `names` (e.g. `GSM.prunable_names(model)`, the optimizer's own choice), by
    default every parameter of dim > 1."""
    named = dict(unwrap_model(model).named_parameters())
    if names is None:
        return {name: p for name, p in named.items() if is_prunable_shape(p.shape)}
    chosen = set(names)
    unknown = chosen - set(named)
    if unknown:
        raise KeyError(f"not parameters of the model: {', '.join(sorted(unknown))}")
    return {name: p for name, p in named.items() if name in chosen}


def num_pruned_to(num_prunable: int, nonzero_ratio: float) -> int:
    """How many elements the hard prune zeroes: int(N * (1 - nonzero_ratio))."""
    return int(num_prunable * (1.0 - nonzero_ratio))


def global_magnitude_mask(model: Union[nn.Module, Mapping[str, Tensor]], nonzero_ratio: float,
                          names: Optional[Iterable[str]] = None) -> Mask:
    """The hard prune's mask (docs/design.md, section 1) over all prunable parameters of `model` (a module, possibly wrapped, or a dict
    of tensors): those in `names`, by default those of dim > 1. With num_zero = int(N * (1 - nonzero_ratio))
    and the threshold the num_zero-th smallest |w| (0-based, ascending), keep |w| >= threshold. Without ties
    this keeps N - num_zero elements. Pass `names=optimizer.prunable_names(model)` (or use
    `GSM.hard_mask(model)`) so that the prune keeps what GSM trained for when param groups set `prunable`.
    DTensor parameters (FSDP2) are gathered: every rank must call it, and gets the whole mask."""
    check_nonzero_ratio(nonzero_ratio)
    named = _chosen(model, names)
    if not named:
        raise ValueError("the model has no prunable parameters (none of dim > 1)")
    with torch.no_grad():
        named = full_tensors(named)  # a sharded model's DTensors gathered, on every rank
        magnitudes = torch.cat([t.detach().reshape(-1).abs().float() for t in named.values()])
        num_zero = num_pruned_to(magnitudes.numel(), nonzero_ratio)
        # kthvalue is 1-based: the (num_zero + 1)-th smallest is the num_zero-th of a 0-based ascending sort.
        threshold = magnitudes.kthvalue(num_zero + 1).values
        return {name: t.detach().abs().float() >= threshold for name, t in named.items()}


def mask_count(mask: Mapping[str, Tensor]) -> int:
    """Number of kept (True) elements of a mask."""
    return int(sum(int(m.sum()) for m in mask.values()))


def _chosen(tensors: Union[nn.Module, Mapping[str, Tensor]], names: Optional[Iterable[str]]) -> Dict[str, Tensor]:
    """The prunable tensors of a module (see prunable_parameters) or of a {name: tensor} dict."""
    if isinstance(tensors, nn.Module):
        return prunable_parameters(tensors, names)
    if names is None:
        return {k: v for k, v in tensors.items() if is_prunable_shape(v.shape)}
    chosen = set(names)
    return {k: v for k, v in tensors.items() if k in chosen}


def apply_mask_to_weights(model: nn.Module, mask: Mapping[str, Tensor]) -> None:
    """Zero the pruned weights of `model` (possibly wrapped; plain names) in place. A DTensor parameter (FSDP2)
    takes its own part of a whole mask: every rank must call it."""
    params = dict(unwrap_model(model).named_parameters())
    with torch.no_grad():
        for name, m in mask.items():
            p = params[name]
            local(p).mul_(local_part(m, p).to(p.device))


def apply_mask_to_grads(model: nn.Module, mask: Mapping[str, Tensor]) -> None:
    """Zero the gradients of pruned weights in place, so that they stay exactly zero under SGD."""
    params = dict(unwrap_model(model).named_parameters())
    for name, m in mask.items():
        grad = params[name].grad
        if grad is not None:
            local(grad).mul_(local_part(m, grad).to(grad.device))


@dataclass
class LayerDensity:
    name: str
    elements: int
    nonzeros: int

    @property
    def density(self) -> float:
        return self.nonzeros / self.elements if self.elements else 0.0


@dataclass
class SparsityReport:
    """Per-layer and overall non-zero counts of the prunable tensors of a model or weights file."""
    layers: List[LayerDensity] = field(default_factory=list)

    @property
    def elements(self) -> int:
        return sum(layer.elements for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of prunable elements that are zero."""
        return 1.0 - self.nonzeros / self.elements if self.elements else 0.0

    @property
    def compression_ratio(self) -> float:
        """Prunable elements / non-zeros (inf for an all-zero model)."""
        return self.elements / self.nonzeros if self.nonzeros else float("inf")

    def format(self) -> str:
        """A human-readable summary and per-layer density table."""
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [
            f"prunable parameters: {self.elements}",
            f"non-zeros: {self.nonzeros}",
            f"sparsity: {self.sparsity:.6f}",
            f"compression ratio: {self.compression_ratio:.3f}",
            "",
            f"{'layer':<{width}}  {'elements':>10}  {'non-zeros':>10}  {'density':>8}",
        ]
        for layer in self.layers:
            lines.append(f"{layer.name:<{width}}  {layer.elements:>10}  {layer.nonzeros:>10}  "
                         f"{layer.density:>8.4f}")
        return "\n".join(lines)


def sparsity_report(tensors: Union[nn.Module, Mapping[str, Union[Tensor, np.ndarray]]],
                    names: Optional[Iterable[str]] = None) -> SparsityReport:
    """Count elements and non-zeros of every prunable tensor of a model or a name->array dict: those in `names`,
    by default those of dim > 1."""
    named = _chosen(tensors, names)
    report = SparsityReport()
    for name, t in named.items():
        nonzeros = int(torch.count_nonzero(t)) if isinstance(t, Tensor) else int(np.count_nonzero(t))
        report.layers.append(LayerDensity(name, int(np.prod(t.shape)), nonzeros))
    return report


@dataclass
class PruneReadiness:
    """How close a model is to losing nothing in the hard prune, measured against the prune's own kept set (the
    Q largest magnitudes of the prunable weights): how many of the weights it would remove are still above
    0.01 and above 1e-3 (GSM drives them towards zero), and the L2 norm of those weights against that of the
    kept ones."""
    prunable: int
    kept: int
    outside_above_1e_2: int
    outside_above_1e_3: int
    removed_norm: float
    kept_norm: float

    @property
    def removed(self) -> int:
        return self.prunable - self.kept

    @property
    def share_above_1e_2(self) -> float:
        """The share of the weights the prune removes that are above 0.01."""
        return self.outside_above_1e_2 / self.removed if self.removed else 0.0

    @property
    def share_above_1e_3(self) -> float:
        return self.outside_above_1e_3 / self.removed if self.removed else 0.0

    @property
    def norm_ratio(self) -> float:
        """||removed weights|| / ||kept weights||: near 0 when the prune would change little."""
        return self.removed_norm / self.kept_norm if self.kept_norm else float("inf")


@torch.no_grad()
def prune_readiness(model: nn.Module, optimizer) -> PruneReadiness:
    """The readiness of `model` for the hard prune of a GSM `optimizer` (its prunable weights and its
    nonzero_ratio): see PruneReadiness. Reads the weights only; call it at evaluations, not every step."""
    mask = optimizer.hard_mask(model)
    params = prunable_parameters(model, mask.keys())
    outside = [p.detach()[~mask[name].to(p.device)].float().abs() for name, p in params.items()]
    inside = [p.detach()[mask[name].to(p.device)].float() for name, p in params.items()]
    def norm(tensors):
        return float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tensors]))) if tensors else 0.0
    return PruneReadiness(prunable=sum(p.numel() for p in params.values()), kept=mask_count(mask),
                          outside_above_1e_2=int(sum(int((t > 1e-2).sum()) for t in outside)),
                          outside_above_1e_3=int(sum(int((t > 1e-3).sum()) for t in outside)),
                          removed_norm=norm(outside), kept_norm=norm(inside))
