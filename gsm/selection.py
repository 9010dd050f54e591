"""GSM's selection: the metric |w * g|, its exact global Q-th largest value, and which elements reach it."""
from collections import deque
from typing import Deque, List, NamedTuple, Optional, Sequence, Tuple, Union

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


def top_positions(values: np.ndarray, k: int, bounds: Sequence[float] = ()) -> Tuple[np.float32, np.ndarray, int]:
    """The exact k-th largest element tau of the 1-D float32 array `values` (1 <= k <= size) and the sorted
    positions of every element >= tau (ties at tau included, so k or more).

    Each of `bounds` is tried in turn: when at least k elements are >= it, tau lies among them and every element
    >= tau is one of them, so only they are searched and the answer is that of a full search, only cheaper (a
    vectorised comparison over `values`, then work on the candidates alone). When no bound admits k elements,
    everything is searched. Returns (tau, positions, the number of candidates searched: size for everything).
    """
    n = values.size
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    for bound in bounds:
        positions = np.flatnonzero(values >= bound)
        if positions.size >= k:
            candidates = values[positions]
            tau = np.partition(candidates, positions.size - k)[positions.size - k]
            return tau, positions[candidates >= tau], positions.size
    tau = np.partition(values, n - k)[n - k]
    return tau, np.flatnonzero(values >= tau), n


class ThresholdSearch:
    """`top_positions` step after step, bounded by the previous thresholds (the host path).

    The bound is `previous threshold * safety * r`, r being the second smallest ratio of consecutive thresholds
    in the last `history` steps: it follows how far the threshold has actually fallen from one step to the next
    (one outlier does not widen it for long), so the candidates stay few (1.1 to 2.4 Q in GSM training of
    LeNet-300-100). When the threshold falls further (about 3% of steps), fewer than k elements pass the bound
    and the search is retried from a bound `retry` times lower before it searches everything. The result never
    depends on the bound; `last_searched` is the candidate count of the last successful search (for tests).
    """

    def __init__(self, history: int = 64, safety: float = 0.9, retry: float = 0.25) -> None:
        self.safety = safety
        self.retry = retry
        self.last_searched = 0
        self._previous: Optional[float] = None
        self._ratios: Deque[float] = deque(maxlen=history)

    def bound(self) -> Optional[float]:
        """The lower bound for the next search (None before the first one and after a zero threshold)."""
        if not self._previous:
            return None
        ratios = sorted(self._ratios) or [0.5]
        return self._previous * self.safety * ratios[min(1, len(ratios) - 1)]

    def __call__(self, values: np.ndarray, k: int) -> Tuple[np.float32, np.ndarray]:
        """(tau, sorted positions of the elements >= tau) of the float32 array `values`."""
        bound = self.bound()
        tau, positions, searched = top_positions(values, k, () if bound is None else (bound, bound * self.retry))
        current = float(tau)
        if self._previous:
            self._ratios.append(min(1.0, current / self._previous))
        self._previous = current
        self.last_searched = searched
        return tau, positions


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
    """w * g of every tensor into its segment of the flat metric (the segments must cover it)."""
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


class Selection(NamedTuple):
    """One step's selection. `threshold`: tau, a 0-d tensor (None when k == 0). Host path: `positions`, per
    tensor the sorted positions of its active elements in its memory order (numpy int64), and `active` their
    count. Generic path: `masked_grads`, mask * g per tensor (new tensors, which the update may change in place),
    and `active` the flat bool mask, counted only when asked (counting waits for the device)."""
    threshold: Optional[Tensor]
    active: Union[int, Tensor]
    positions: Optional[List[np.ndarray]] = None
    masked_grads: Optional[List[Tensor]] = None

    @property
    def num_active(self) -> int:
        return self.active if isinstance(self.active, int) else int(self.active.sum())


def flat_array(t: Tensor) -> np.ndarray:
    """The elements of a dense float32 CPU tensor as a 1-D numpy view, in memory order (writes go to `t`)."""
    return t.detach().numpy().ravel(order="K")


def on_fast_host_path(params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
    """Whether the host path applies: float32 tensors in host memory, each dense and stored like its gradient
    (contiguous, channels_last, ...), so that each tensor is one flat array in memory order."""
    return all(on_host(p) and p.dtype == g.dtype == torch.float32 and p.stride() == g.stride() and _is_dense(p)
               for p, g in zip(params, grads))


class GlobalSelection:
    """DESIGN 1's selection, step after step, for a list of prunable tensors and their loss gradients: the
    metric |w * g| over all elements in one flat float32 vector, its exact k-th largest value tau, and which
    elements are >= tau. The flat buffers and per-tensor views are kept while the tensors keep their shapes,
    strides and dtypes.

    Host path (float32 CPU tensors, `on_fast_host_path`): `ThresholdSearch` finds tau and the positions of the
    active elements among a few candidates, and the result is those positions, so that no pass over all
    elements builds or applies a mask (the optimizer touches the active elements alone). Generic path (GPUs,
    other dtypes and layouts): `topk` for tau and a handful of multi-tensor kernels (metric, mask, conversion,
    multiply) whatever the number of tensors, without a host synchronisation; the result is the masked
    gradients.
    """

    def __init__(self) -> None:
        self.search = ThresholdSearch()
        self._key: Optional[tuple] = None
        self._layout: Optional[FlatLayout] = None
        self._metric: Optional[Tensor] = None
        self._metric_views: List[Tensor] = []
        self._offsets = np.zeros(1, dtype=np.int64)
        self._host_path = False
        self._float_mask: Optional[Tensor] = None
        self._float_mask_views: List[Tensor] = []

    def _prepare(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        key = (params[0].device,) + tuple((p.shape, p.stride(), g.stride(), p.dtype, g.dtype)
                                          for p, g in zip(params, grads))
        if key == self._key:
            return
        self._key = key
        self._host_path = on_fast_host_path(params, grads)
        self._layout = FlatLayout(params, grads)
        device = params[0].device
        self._metric = torch.empty(self._layout.numel, dtype=torch.float32, device=device)
        self._metric_views = self._layout.views(self._metric)
        self._offsets = np.array([offset for *_, offset in self._layout.segments] + [self._layout.numel])
        self._float_mask, self._float_mask_views = None, []

    def metric(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
        """The flat metric |w * g|, laid out by `FlatLayout` (a buffer that the next call overwrites)."""
        self._prepare(params, grads)
        _write_metric(params, grads, self._metric_views)
        return self._metric.abs_()

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor], k: int) -> Selection:
        """Select the elements of `params` with the k largest |w * g| (and any tied with the k-th)."""
        metric = self.metric(params, grads)
        if self._host_path:
            if k == 0:
                return Selection(None, 0, [np.empty(0, dtype=np.int64) for _ in params])
            tau, positions = self.search(metric.numpy(), k)
            cuts = np.searchsorted(positions, self._offsets)
            per_tensor = [positions[lo:hi] - offset for offset, lo, hi in zip(self._offsets, cuts[:-1], cuts[1:])]
            return Selection(torch.from_numpy(np.asarray(tau)), int(positions.size), per_tensor)
        if k == 0:
            threshold, mask = None, torch.zeros_like(metric, dtype=torch.bool)
        else:
            threshold = metric.topk(k, sorted=False).values.min()
            mask = metric >= threshold
        if len({g.dtype for g in grads}) > 1:  # mixed dtypes: the mask tensor by tensor
            return Selection(threshold, mask, masked_grads=[g * m for g, m in zip(grads, self._layout.views(mask))])
        if self._float_mask is None:
            self._float_mask = torch.empty(self._layout.numel, dtype=grads[0].dtype, device=metric.device)
            self._float_mask_views = self._layout.views(self._float_mask)
        self._float_mask.copy_(mask)  # one conversion and one multi-tensor multiply
        return Selection(threshold, mask, masked_grads=list(torch._foreach_mul(list(grads), self._float_mask_views)))


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
    threshold = torch.sort(metric, descending=True).values[q - 1]
    return split_flat(metric >= threshold, params, grads)
