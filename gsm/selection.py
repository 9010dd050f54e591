"""GSM's selection: the metric |w * g|, its exact global Q-th largest value, and the active mask."""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def keep_count(num_prunable: int, nonzero_ratio: float) -> int:
    """Q = int(nonzero_ratio * N), the number of elements that receive loss gradients (DESIGN 1)."""
    return int(nonzero_ratio * num_prunable)


def kth_largest(values: Tensor, k: int, lower_bound: Optional[float] = None) -> Tuple[Tensor, int]:
    """The exact k-th largest element of the 1-D tensor `values` (1 <= k <= numel), as a 0-d tensor.

    With a `lower_bound`, only the elements >= lower_bound are searched when there are at least k of them:
    then the k-th largest of all lies among them, so the answer is the same as a full search, only cheaper.
    Returns the value and the number of candidates searched (numel for a full search).
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if lower_bound is not None:
        candidates = values[values >= lower_bound]
        count = candidates.numel()
        if count >= k:
            return _kth_largest_full(candidates, k), count
    return _kth_largest_full(values, k), n


def _kth_largest_full(values: Tensor, k: int) -> Tensor:
    n = values.numel()
    # topk is the faster selection for a small k; kthvalue (quickselect) for a large one.
    if values.device.type != "cpu" or 32 * k <= n:
        return values.topk(k, sorted=False).values.min()
    return values.kthvalue(n - k + 1).values


class ThresholdFinder:
    """Finds the exact k-th largest metric each iteration, using the previous threshold as a search hint.

    Consecutive iterations have similar thresholds, so on the CPU only the elements above
    `margin * previous threshold` are searched; the margin adapts so that the candidate set stays a little
    larger than k, and a hint that proves too high falls back to the full search. The result never depends
    on the hint. On accelerators the full `topk` runs without a host synchronisation instead.
    """

    def __init__(self, margin: float = 0.9) -> None:
        self.margin = margin
        self._previous: Optional[float] = None

    def __call__(self, values: Tensor, k: int) -> Tensor:
        if values.device.type != "cpu":
            return _kth_largest_full(values, k)
        hint = None if self._previous is None else self._previous * self.margin
        threshold, searched = kth_largest(values, k, hint)
        if hint is not None:
            if searched == values.numel():  # the hint was above the k-th largest: widen the margin
                self.margin *= 0.8
            elif searched > 1.5 * k:
                self.margin = min(0.99, self.margin * 1.02)
        self._previous = float(threshold)
        return threshold


def flat_metric(params: Sequence[Tensor], grads: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """|w * g| of every element of `params`, concatenated into one float32 vector (written into `out`)."""
    total = sum(p.numel() for p in params)
    if out is None or out.numel() != total:
        out = torch.empty(total, dtype=torch.float32, device=params[0].device)
    offset = 0
    for p, g in zip(params, grads):
        n = p.numel()
        torch.mul(p.reshape(-1), g.reshape(-1), out=out[offset:offset + n])
        offset += n
    return out.abs_()


def split_flat(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """Views of `flat` shaped like each tensor of `like`, in order."""
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


def active_masks(params: Sequence[Tensor], grads: Sequence[Tensor], nonzero_ratio: float) -> List[Tensor]:
    """The reference selection of DESIGN 1 as a pure function: boolean masks of the elements whose metric
    |w * g| is >= the Q-th largest metric over all of `params` (ties at the threshold are all kept)."""
    metric = flat_metric(params, grads)
    q = keep_count(metric.numel(), nonzero_ratio)
    if q >= metric.numel():
        return [torch.ones_like(p, dtype=torch.bool) for p in params]
    if q == 0:
        return [torch.zeros_like(p, dtype=torch.bool) for p in params]
    threshold, _ = kth_largest(metric, q)
    return split_flat(metric >= threshold, params)

