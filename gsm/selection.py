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
    grad_array, mask_array = _numpy_view(grad), (mask.numpy() if on_host(mask) else None)
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
    """Whether a flat vector holds the elements of `p` in memory order rather than in logical (row-major)
    order: when `p` and its gradient `g` are dense with the same strides (e.g. both channels_last), so that
    the elementwise work between them and the flat vector runs on matching layouts. For contiguous tensors
    the two orders are the same."""
    return p.stride() == g.stride() and _is_dense(p)


def _row_major_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class FlatLayout:
    """Where the elements of each tensor of a list lie in one flat vector (the metric, the mask): one segment
    per tensor, in order, holding its elements in memory order when the tensor and its gradient share a
    dense layout, else in logical order. `views(flat)` are the segments shaped like the tensors."""

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        self.segments: List[Tuple[Tuple[int, ...], Tuple[int, ...], int]] = []  # (shape, strides, offset)
        offset = 0
        for p, g in zip(params, grads):
            strides = tuple(p.stride()) if _in_memory_order(p, g) else _row_major_strides(p.shape)
            self.segments.append((tuple(p.shape), strides, offset))
            offset += p.numel()
        self.numel = offset

    def views(self, flat: Tensor) -> List[Tensor]:
        """The segments of the 1-D tensor `flat` (of `numel` elements), each shaped like its tensor."""
        base = flat.storage_offset()
        return [flat.as_strided(shape, strides, base + offset) for shape, strides, offset in self.segments]


def _without_autograd(tensors: Sequence[Tensor]) -> List[Tensor]:
    return [t.detach() for t in tensors] if torch.is_grad_enabled() else list(tensors)


def _write_metric(params: Sequence[Tensor], grads: Sequence[Tensor], segments: Sequence[Tensor]) -> None:
    """|w * g| of every tensor into its segment of the flat metric (the segments must cover it)."""
    params = _without_autograd(params)
    if on_host(segments[0]):
        for p, g, segment in zip(params, grads, segments):
            torch.mul(p, g, out=segment)
    else:  # one multi-tensor multiply and one multi-tensor copy, not a kernel per tensor
        torch._foreach_copy_(list(segments), torch._foreach_mul(params, list(grads)))


def flat_metric(params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """|w * g| of every element of `params`, as one float32 vector laid out by `FlatLayout(params, grads)`."""
    return GlobalSelection().metric(params, grads)


def split_flat(flat: Tensor, like: Sequence[Tensor], grads: Sequence[Tensor]) -> List[Tensor]:
    """Views of `flat` shaped like each tensor of `like`, laid out as `flat_metric(like, grads)` lays them out."""
    return FlatLayout(like, grads).views(flat)


class GlobalSelection:
    """DESIGN 1's selection, step after step, for a list of prunable tensors and their loss gradients:
    the metric |w * g| in one flat vector, its exact k-th largest value tau (see ThresholdFinder), the mask
    metric >= tau, and the masked gradients mask * g.

    The flat buffers and their per-tensor views are kept while the tensors keep their shapes, strides and
    dtypes, so that off the host a step is a handful of multi-tensor kernels and little Python work."""

    def __init__(self) -> None:
        self.threshold_finder = ThresholdFinder()
        self._key: Optional[tuple] = None
        self._layout: Optional[FlatLayout] = None
        self._metric: Optional[Tensor] = None
        self._metric_views: List[Tensor] = []
        self._float_mask: Optional[Tensor] = None
        self._float_mask_views: List[Tensor] = []

    def _prepare(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        key = (params[0].device,) + tuple((p.shape, p.stride(), g.stride(), g.dtype) for p, g in zip(params, grads))
        if key == self._key:
            return
        self._key = key
        self._layout = FlatLayout(params, grads)
        device = params[0].device
        self._metric = torch.empty(self._layout.numel, dtype=torch.float32, device=device)
        self._metric_views = self._layout.views(self._metric)
        self._float_mask, self._float_mask_views = None, []

    def _mask_views_off_host(self, grads: Sequence[Tensor]) -> Optional[List[Tensor]]:
        """Views of a float mask buffer in the gradients' dtype, laid out like the metric, when the tensors are
        off the host and share one dtype (else None: the mask is applied tensor by tensor)."""
        if on_host(self._metric):
            return None
        if self._float_mask is None:
            dtypes = {g.dtype for g in grads}
            if len(dtypes) != 1:
                return None
            self._float_mask = torch.empty(self._layout.numel, dtype=dtypes.pop(), device=self._metric.device)
            self._float_mask_views = self._layout.views(self._float_mask)
        return self._float_mask_views

    def metric(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
        """The flat metric |w * g| (a buffer that the next call overwrites)."""
        self._prepare(params, grads)
        _write_metric(params, grads, self._metric_views)
        return self._metric.abs_()

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor],
                 k: int) -> Tuple[Optional[Tensor], Tensor, List[Tensor]]:
        """(tau, or None when k == 0; the flat bool mask; the masked gradients as new tensors)."""
        metric = self.metric(params, grads)
        if k == 0:
            threshold, mask = None, torch.zeros_like(metric, dtype=torch.bool)
        else:
            threshold = self.threshold_finder(metric, k)
            mask = at_least(metric, threshold)
        mask_views = self._mask_views_off_host(grads)
        if mask_views is not None:  # one conversion and one multi-tensor multiply
            self._float_mask.copy_(mask)
            return threshold, mask, list(torch._foreach_mul(list(grads), mask_views))
        return threshold, mask, [masked(g, m) for g, m in zip(grads, self._layout.views(mask))]


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

