"""GSM's selection: the metric |w * g|, its exact global Q-th largest value, and the active mask."""
from collections import deque
from typing import Deque, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor


def keep_count(num_prunable: int, nonzero_ratio: float) -> int:
    """Q = int(nonzero_ratio * N), the number of elements that receive loss gradients (DESIGN 1)."""
    return int(nonzero_ratio * num_prunable)


def on_host(t: Tensor) -> bool:
    """Whether `t` is in host memory. The selection has two paths: on the host, numpy and a threshold search
    bounded by the previous threshold (fast on a CPU); elsewhere, a few multi-tensor kernels and no host
    synchronisation (fast on a GPU, where a small kernel costs mostly its launch)."""
    return t.device.type == "cpu"


def _numpy_view(values: Tensor) -> Optional[np.ndarray]:
    """A zero-copy numpy view of a contiguous float32 host tensor, else None. numpy's vectorised comparisons
    and boolean selection run several times faster than torch's on arrays of this size (10^5 to 10^6)."""
    if on_host(values) and values.dtype == torch.float32 and values.is_contiguous():
        return values.detach().numpy()
    return None


def at_least(values: Tensor, threshold) -> Tensor:
    """The bool tensor `values >= threshold`."""
    array = _numpy_view(values)
    if array is not None:
        return torch.from_numpy(array >= float(threshold))
    return values >= threshold


def elements_at_least(values: Tensor, threshold) -> Tensor:
    """The elements of `values` that are >= threshold, in order, as a 1-D tensor."""
    array = _numpy_view(values)
    if array is not None:
        return torch.from_numpy(np.compress(array >= float(threshold), array))
    return values[values >= threshold]


def masked(grad: Tensor, mask: Tensor) -> Tensor:
    """mask * grad as a new tensor (the masked loss gradient of DESIGN 1)."""
    grad_array, mask_array = _numpy_view(grad), (mask.numpy() if mask.device.type == "cpu" else None)
    if grad_array is not None and mask_array is not None:
        return torch.from_numpy(grad_array * mask_array)
    return grad * mask


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
        candidates = elements_at_least(values, lower_bound)
        count = candidates.numel()
        if count >= k:
            return _kth_largest_full(candidates, k), count
    return _kth_largest_full(values, k), n


def _kth_largest_full(values: Tensor, k: int) -> Tensor:
    n = values.numel()
    array = _numpy_view(values)
    if array is not None and n <= 65536:
        # A small candidate set: numpy's single-threaded introselect beats waking torch's thread pool.
        partitioned = np.partition(array, n - k)
        return torch.from_numpy(partitioned[n - k:n - k + 1]).reshape(())  # a 0-d view, no copy
    # topk is the faster selection for a small k; kthvalue (quickselect) for a large one.
    if not on_host(values) or 32 * k <= n:
        return values.topk(k, sorted=False).values.min()
    return values.kthvalue(n - k + 1).values


class ThresholdFinder:
    """Finds the exact k-th largest metric each iteration, using the previous threshold as a search hint.

    On the CPU only the elements >= `previous threshold * safety * r` are searched, r being the second
    smallest ratio of consecutive thresholds in the last `history` iterations: the bound follows how far the
    threshold has actually fallen from one iteration to the next (one outlier does not widen it for long),
    so the candidate set stays small and a hint that proves too high (fewer than k candidates, about 2% of
    iterations in GSM training of LeNet-300-100) is rare; it then falls back to the full search. The result
    never depends on the hint. On accelerators the full `topk` runs instead, without a host synchronisation.
    """

    def __init__(self, history: int = 64, safety: float = 0.9) -> None:
        self.safety = safety
        self._previous: Optional[float] = None
        self._ratios: Deque[float] = deque(maxlen=history)

    def __call__(self, values: Tensor, k: int) -> Tensor:
        if not on_host(values):
            return _kth_largest_full(values, k)
        hint = None
        if self._previous:  # None or 0 (a zero threshold bounds nothing)
            ratios = sorted(self._ratios) or [0.5]
            hint = self._previous * self.safety * ratios[min(1, len(ratios) - 1)]
        threshold, _ = kth_largest(values, k, hint)
        current = float(threshold)
        if self._previous:
            self._ratios.append(min(1.0, current / self._previous))
        self._previous = current
        return threshold


def _is_dense(t: Tensor) -> bool:
    """Whether the elements of `t` fill one block of memory without gaps or overlaps, in some order of its
    dimensions (contiguous, channels_last, ...)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _in_memory_order(p: Tensor, g: Tensor) -> bool:
    """Whether the flat metric holds the elements of `p` in memory order rather than in logical (row-major)
    order: when `p` and its gradient `g` are dense with the same strides (e.g. both channels_last), so that
    flattening them and unflattening the mask are views, with no copies. For contiguous tensors the two
    orders are the same."""
    return p.stride() == g.stride() and _is_dense(p)


def _flatten(t: Tensor, memory_order: bool) -> Tensor:
    return t.as_strided((t.numel(),), (1,)) if memory_order else t.reshape(-1)


def flat_metric(params: Sequence[Tensor], grads: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """|w * g| of every element of `params`, concatenated into one float32 vector (written into `out`).

    Each parameter's elements come in memory order or logical order (see `_in_memory_order`); `split_flat`
    with the same params and grads undoes the layout. On an accelerator the products are one multi-tensor
    multiply and one concatenation, not a kernel per parameter."""
    total = sum(p.numel() for p in params)
    if out is None or out.numel() != total or out.device != params[0].device:
        out = torch.empty(total, dtype=torch.float32, device=params[0].device)
    flat_params, flat_grads = [], []
    for p, g in zip(params, grads):
        memory_order = _in_memory_order(p, g)
        flat_params.append(_flatten(p.detach(), memory_order))
        flat_grads.append(_flatten(g, memory_order))
    if on_host(out):
        offset = 0
        for p, g in zip(flat_params, flat_grads):
            torch.mul(p, g, out=out[offset:offset + p.numel()])
            offset += p.numel()
    else:
        torch.cat(torch._foreach_mul(flat_params, flat_grads), out=out)
    return out.abs_()


def split_flat(flat: Tensor, like: Sequence[Tensor], grads: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
    """Views of `flat` shaped like each tensor of `like`, in order: the inverse of `flat_metric(like, grads)`'s
    layout (logical order for every tensor when `grads` is None)."""
    views, offset = [], 0
    for i, t in enumerate(like):
        part = flat[offset:offset + t.numel()]
        if grads is not None and _in_memory_order(t, grads[i]):
            views.append(part.as_strided(t.shape, t.stride()))
        else:
            views.append(part.view(t.shape))
        offset += t.numel()
    return views


def masked_gradients(params: Sequence[Tensor], grads: Sequence[Tensor], flat_mask: Tensor) -> List[Tensor]:
    """mask * g for every gradient, as new tensors, with `flat_mask` laid out as `flat_metric(params, grads)`.
    On an accelerator: one conversion of the mask to the gradients' dtype and one multi-tensor multiply."""
    if on_host(flat_mask):
        return [masked(g, m) for g, m in zip(grads, split_flat(flat_mask, params, grads))]
    dtype = grads[0].dtype
    if all(g.dtype == dtype for g in grads):
        return list(torch._foreach_mul(list(grads), split_flat(flat_mask.to(dtype), params, grads)))
    return [g * m for g, m in zip(grads, split_flat(flat_mask, params, grads))]


@torch.no_grad()
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
    return split_flat(at_least(metric, threshold), params, grads)

