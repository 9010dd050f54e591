"""The tests' one reference of GSM's selection (docs/design.md, section 1), by sorting every metric: independent
of gsm.selection, and what the brute-force optimizer and the property-based tests compare against."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def reference_metric(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """|w * g| in float32 as GSM defines it: the float32 product of float32, float16 or bfloat16 values (exact
    for the latter two), the float64 product of float64 values rounded once to float32."""
    p, g = p.detach(), g.detach()
    if p.dtype is torch.float64:
        return (p * g).abs().float()
    return (p.float() * g.float()).abs()


@torch.no_grad()
def reference_selection(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], nonzero_ratio: float,
                        num_prunable: Optional[int] = None) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """(bool masks shaped like `params`, tau or None): the elements whose metric is >= the Q-th largest of all
    of them, with Q = int(nonzero_ratio * num_prunable) (default: the elements of `params`); a NaN metric ranks
    above every number (all of them active, and only they when tau is NaN). With Q >= the elements ranked every
    one is active; with Q = 0 none is; tau is None in both cases."""
    metrics = [reference_metric(p, g) for p, g in zip(params, grads)]
    total = sum(m.numel() for m in metrics)
    q = int(nonzero_ratio * (total if num_prunable is None else num_prunable))
    if q >= total:
        return [torch.ones_like(m, dtype=torch.bool) for m in metrics], None
    if q == 0:
        return [torch.zeros_like(m, dtype=torch.bool) for m in metrics], None
    tau = torch.sort(torch.cat([m.reshape(-1) for m in metrics]), descending=True).values[q - 1]  # NaN first
    if tau.isnan():
        return [m.isnan() for m in metrics], tau
    return [(m >= tau) | m.isnan() for m in metrics], tau
