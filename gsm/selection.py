"""GSM's selection: the metric |w * g|, its exact global Q-th largest value, and which elements reach it."""
import math
import numbers
import sys
from collections import deque
from typing import Callable, Deque, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from gsm import host_kernels
from gsm.host_kernels import HIGH_BUCKETS, LOW_BUCKETS

# Sums a tensor of counts in place over the ranks that hold the other elements (sharded parameters).
Reduce = Callable[[Tensor], None]


def check_nonzero_ratio(nonzero_ratio: float) -> None:
    """ValueError unless 0 < nonzero_ratio <= 1 (1 / the compression ratio)."""
    if isinstance(nonzero_ratio, bool) or not isinstance(nonzero_ratio, numbers.Real) \
            or not 0.0 < nonzero_ratio <= 1.0:
        raise ValueError(f"Invalid nonzero_ratio: {nonzero_ratio!r} (must be in (0, 1])")


def keep_count(num_prunable: int, nonzero_ratio: float) -> int:
    """Q = int(nonzero_ratio * N), the number of elements that receive loss gradients."""
    return int(nonzero_ratio * num_prunable)


class Candidates(Protocol):
    """Where `kth_largest` finds the k-th largest metric: `collect(bound)` gathers the metrics that are >= bound
    or NaN and returns their exact number; `select(count, k)` is the k-th largest of the `count` gathered by the
    last collect (1 <= k <= count)."""

    def collect(self, bound: float) -> int: ...

    def select(self, count: int, k: int) -> np.float32: ...


def kth_largest(candidates: Candidates, k: int, bounds: Sequence[float]) -> Tuple[np.float32, int]:
    """The exact k-th largest metric tau (k >= 1; a NaN ranks above every number, as in torch.topk) of
    `candidates`. Returns (tau, the number of candidates it was searched among).

    Each of `bounds` is tried in turn: when at least k metrics pass it, tau lies among them, so only they are
    searched and the answer is that of a full search, only cheaper. When no bound admits k, every metric is
    searched (bound 0); should there be fewer than k metrics, tau is 0 and every one is active.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for bound in list(bounds) + [0.0]:
        count = candidates.collect(bound)
        if count >= k:
            return candidates.select(count, k), count
    return np.float32(0.0), count


class ThresholdSearch:
    """`kth_largest` step after step, bounded by the previous thresholds (the host path).

    The bound is `previous threshold * safety * r`, r being the second smallest ratio of consecutive thresholds
    in the last `history` steps: it follows how far the threshold has actually fallen from one step to the next
    (one outlier does not widen it for long), so that the candidates stay few. When the threshold falls
    further, fewer than k elements pass the bound and the search is retried from a bound `retry` times lower
    before it searches everything. The result never depends on the bound; `last_searched` is the candidate
    count of the last search.
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

    def __call__(self, candidates: Candidates, k: int) -> np.float32:
        """tau, the k-th largest metric (see `kth_largest`)."""
        bound = self.bound()
        bounds = () if bound is None else (bound, bound * self.retry)
        tau, self.last_searched = kth_largest(candidates, k, bounds)
        current = float(tau)
        if not math.isfinite(current):  # a non-finite gradient: no bound from it (the next search is whole)
            self._previous = None
            return tau
        if self._previous:
            self._ratios.append(min(1.0, current / self._previous))
        self._previous = current
        return tau


def rank_in_histogram(counts: np.ndarray, k: int) -> Tuple[int, int]:
    """(the bucket that holds the k-th largest of the elements that `counts` counts, bucket b holding larger
    elements than bucket b - 1, and that element's rank from the top inside its bucket, from 1); ValueError
    when they are fewer than k. The host's twin of `_rank_in`, in numpy and in two levels (rows of 256
    buckets, then the buckets of one row), which touches each count once: on the CPU it takes far less time
    than `_rank_in`'s torch operations, and it runs on every counted search."""
    rows = counts.reshape(-1, 256) if counts.size % 256 == 0 else counts.reshape(1, -1)
    row_from_top = np.cumsum(rows.sum(axis=1)[::-1])
    row_position = int(np.searchsorted(row_from_top, k))
    if k < 1 or row_position == row_from_top.size:
        raise ValueError(f"the k-th largest of {int(row_from_top[-1])} elements, k = {k}")
    row = rows.shape[0] - 1 - row_position
    above_row = int(row_from_top[row_position]) - int(rows[row].sum())
    in_row_from_top = np.cumsum(rows[row][::-1])
    position = int(np.searchsorted(in_row_from_top, k - above_row))
    bucket = row * rows.shape[1] + rows.shape[1] - 1 - position
    return bucket, k - above_row - int(in_row_from_top[position] - counts[bucket])


def _bits_of(value: float) -> int:
    """The bit pattern of `value` as a float32, as a (signed) int32."""
    return int(np.array(value, dtype=np.float32).view(np.int32))


def _float_of(bits: int) -> np.float32:
    """The float32 whose bit pattern is `bits` (a non-negative int below 2^31)."""
    return np.array(bits, dtype=np.int32).view(np.float32)[()]


# The high 16 bits of the first quiet NaN (0x7fc00000): a product that is NaN is a quiet NaN.
_QUIET_NANS = 0x7FC0


# From this many candidates on, the host search counts them as it collects them (see HostCandidates.collect).
MANY_CANDIDATES = 1 << 17


def spare_capacity(numel: int, k: int) -> int:
    """How many candidates the host search keeps: 2 k + 4096, at most numel. The bound lets through a little
    more than k in a steady run, so twice k holds them but for jumps of the threshold, which the route without
    kept candidates covers at the cost of a second pass over the data; the 4096 floats cover small k, whose
    candidates outnumber k most."""
    return min(numel, 2 * k + 4096)


class TensorCandidates:
    """The generic path's `Candidates` on the CPU, where a host synchronisation costs nothing: the metrics' bit
    patterns (`_ONE_NAN` for every NaN) at or above a bound, copied out over a comparison written into `scratch`
    (a bool array of the metrics' size), and the k-th largest of them by numpy's `partition` (an introselect,
    in place in that copy, which takes a fraction of the time of a radix select's counts on the CPU); `count`
    is the number of metrics at or above it. The copy is numpy's `compress` where torch runs on one or two
    threads, torch's boolean indexing on more: numpy's runs on one thread and is the faster on up to two;
    torch's writes an int64 index per candidate first, but spreads over every thread.

    With `reduce` (sharded parameters, see `kth_largest_bits`) the metrics are this rank's part of all ranks':
    the candidate counts are summed over the ranks (one more all-reduce, of one number) and tau is the radix
    select's among every rank's candidates. The ranks agree on each bound, drawn from the thresholds they found
    together, so they take the same turns."""

    overflowed = False  # every candidate is kept

    def __init__(self, bits: Tensor, scratch: np.ndarray, reduce: Optional[Reduce] = None) -> None:
        self.numel = bits.numel()
        self.count: Optional[Tensor] = None
        self._bits = bits
        self._array = bits.numpy()
        self._scratch = scratch
        self._reduce = reduce
        self._chosen = self._array

    def collect(self, bound: float) -> int:
        if bound <= 0.0:
            self._chosen = self._array
        elif torch.get_num_threads() > 2:
            passed = torch.ge(self._bits, _bits_of(bound), out=torch.from_numpy(self._scratch))
            self._chosen = self._bits[passed].numpy()
        else:
            passed = np.greater_equal(self._array, _bits_of(bound), out=self._scratch)
            self._chosen = np.compress(passed, self._array)
        if self._reduce is None:
            return self._chosen.size
        total = torch.tensor([self._chosen.size], dtype=torch.int64)
        self._reduce(total)
        return int(total)

    def select(self, count: int, k: int) -> np.float32:
        if self._reduce is not None:  # the radix select, its counts summed over the ranks
            tau_bits, self.count = kth_largest_bits(torch.from_numpy(self._chosen), k, self._reduce)
            return _float_of(int(tau_bits))
        # The metrics themselves are never reordered: all of them (bound 0) are selected in a copy.
        tau, count = _partition_kth(self._chosen.copy() if self._chosen is self._array else self._chosen, k)
        self.count = torch.tensor(count)
        return _float_of(tau)


def _partition_kth(chosen: np.ndarray, k: int) -> Tuple[int, int]:
    """(the k-th largest of the 1-D integer array `chosen` (1 <= k <= its size), how many are at least as large),
    by numpy's introselect, which reorders `chosen`."""
    position = chosen.size - k
    chosen.partition(position)  # chosen[position] is the k-th largest, those after it are at least as large
    tau = int(chosen[position])
    return tau, k + int(np.count_nonzero(chosen[:position] == tau))


def _kth_largest_on_host(bits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """`kth_largest_bits(bits, k)` for a traced step on the CPU: numpy's introselect on a copy of every metric,
    run by torch.compile as one opaque operation (registered below), because the radix select's scatter-adds
    compile to far slower code on the CPU than they run eagerly."""
    tau, count = _partition_kth(bits.numpy().copy(), k)
    return torch.tensor(tau, dtype=torch.int32), torch.tensor(count, dtype=torch.int64)


if hasattr(torch.library, "custom_op"):  # torch >= 2.4; an older compiler traces the radix select instead
    _kth_largest_on_host = torch.library.custom_op("gsm::kth_largest_on_host", mutates_args=())(_kth_largest_on_host)

    @_kth_largest_on_host.register_fake
    def _(bits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        return bits.new_empty((), dtype=torch.int32), bits.new_empty((), dtype=torch.int64)


class HostCandidates:
    """The host path's `Candidates` over the first `count` arrays of a checked `host_kernels.Batch` (attached
    for one step), with memory for `spare_capacity` candidates and one histogram (made by the first `attach`),
    kept while k and numel stay.

    `collect` runs the candidates kernel: it keeps up to the capacity of the candidates and, when many are
    expected (MANY_CANDIDATES at the last search) or they overflow the capacity, counts all of them by their
    high 16 bits, so that the bucket of the k-th largest and its rank inside are known. `select` then finds the
    k-th largest among the kept candidates of that bucket, or, when they overflowed the capacity (a bound of 0,
    or one far below the threshold), counts that bucket's metrics by their low 16 bits in one more pass over
    the data, which gives tau's last 16 bits; few candidates, all kept and not counted, take a radix select
    among them. Exact every way: tau is the k-th largest bit pattern, and bit patterns order the non-negative
    metrics as numbers (NaN above +inf). `overflowed` says whether the last select took the second pass.
    """

    def __init__(self) -> None:
        self.found = np.empty(0, dtype=np.float32)
        self.histogram = np.empty(0, dtype=np.int64)  # LOW_BUCKETS counts from the first search on
        self.numel = 0
        self.overflowed = False
        self._batch: Optional["host_kernels.Batch"] = None
        self._count = 0
        self._expect_many = True
        self._counted = False

    def attach(self, batch: "host_kernels.Batch", count: int, k: int) -> None:
        """Search the first `count` arrays of `batch` for the k-th largest metric."""
        self._batch, self._count = batch, count
        self.numel = sum(batch.sizes[:count])
        capacity = spare_capacity(self.numel, k)
        if self.found.size != capacity:
            self.found = np.empty(capacity, dtype=np.float32)
        if self.histogram.size != LOW_BUCKETS:  # the high-bit counts use its first HIGH_BUCKETS
            self.histogram = np.empty(LOW_BUCKETS, dtype=np.int64)

    def detach(self) -> None:
        """Let go of the batch (valid for one step only)."""
        self._batch = None

    def collect(self, bound: float) -> int:
        self.overflowed = False
        # Few candidates expected (the last search's were): collected without counts, which cost a fixed time
        # (the threads' tables) that a radix select of few candidates does not need; counted after all when
        # they overflow.
        self._counted = self._expect_many
        count = self._batch.candidates(self._count, bound, self.found,
                                       self.histogram[:HIGH_BUCKETS] if self._counted else None)
        if count > self.found.size and not self._counted:
            self._counted = True
            count = self._batch.candidates(self._count, bound, self.found, self.histogram[:HIGH_BUCKETS])
        return count

    def select(self, count: int, k: int) -> np.float32:
        self._expect_many = count >= MANY_CANDIDATES
        if not self._counted:  # all of them kept (an overflow is counted): a radix select among them
            return host_kernels.kth_largest(self.found, count, k)
        bucket, rank = rank_in_histogram(self.histogram[:HIGH_BUCKETS], k)
        self.overflowed = count > self.found.size
        if not self.overflowed:
            return host_kernels.kth_in_bucket(self.found, count, bucket, rank)
        # Every metric of the bucket, also those below the bound (which rank below every candidate of it): the
        # rank from the top is the same.
        if self._batch.bucket_lows(self._count, bucket, self.histogram) < rank:
            # Only NaNs can differ between the passes (the payload of a product of two NaNs is the first
            # operand's, which the kernels fix on x86 alone), and any NaN threshold selects the same elements.
            if bucket < _QUIET_NANS:
                raise RuntimeError(f"GSM host search: the metrics of bucket {bucket} changed between two passes")
            return _float_of(bucket << 16)
        low, _ = rank_in_histogram(self.histogram, rank)
        return _float_of(bucket << 16 | low)


def _in_memory_order(p: Tensor, g: Tensor) -> bool:
    """Whether a flat vector holds the elements of `p` in memory order rather than in logical (row-major)
    order: when `p` and its gradient `g` are dense with the same strides (e.g. both channels_last), so that
    the elementwise work between them and the flat vector runs on matching layouts. For contiguous tensors
    the two orders are the same."""
    return p.stride() == g.stride() and host_kernels.is_dense(p)


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


def _write_metric(params: Sequence[Tensor], grads: Sequence[Tensor], segments: Sequence[Tensor],
                  flat: Tensor) -> None:
    """|w * g| of every tensor into its float32 segment of the flat metric `flat` (the segments must cover it),
    computed in float32 whatever the parameters' dtype (a float16 product of small weights and gradients would
    underflow to ties at zero, whereas the float32 product of two float16 or bfloat16 numbers is exact, short
    of float32's own underflow), its bit patterns made rankable: every NaN one value, `_ONE_NAN`, so that
    the NaNs tie as topk's do. On the CPU each segment is finished while it is in the cache."""
    params = _without_autograd(params)
    if flat.device.type == "cpu":
        for p, g, segment in zip(params, grads, segments):
            if p.dtype in (torch.float16, torch.bfloat16):
                segment.copy_(p).mul_(g)  # the product of float32 by float16 is computed in float32
            else:
                torch.mul(p, g, out=segment)
            segment.abs_().view(torch.int32).clamp_(max=_ONE_NAN)
        return
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in params):
        torch._foreach_copy_(list(segments), params)
        torch._foreach_mul_(list(segments), list(grads))
    else:  # one multi-tensor multiply and one multi-tensor copy, not a kernel per tensor
        torch._foreach_copy_(list(segments), torch._foreach_mul(params, list(grads)))
    flat.abs_().view(torch.int32).clamp_(max=_ONE_NAN)


# The bit pattern of a NaN float32 one above +inf's (0x7f800000): the one value of every NaN metric.
_ONE_NAN = 0x7F800001


def _halves(bits: Tensor) -> Tuple[Tensor, Tensor]:
    """The high and low 16 bits of each int32 of the 1-D `bits`, as int16 views (no copy): non-negative highs,
    lows whose sign bit is their top bit."""
    pairs = bits.view(torch.int16).view(-1, 2)
    return (pairs[:, 1], pairs[:, 0]) if sys.byteorder == "little" else (pairs[:, 0], pairs[:, 1])


def _count(index: Tensor, size: int, weights: Optional[Tensor] = None) -> Tensor:
    """How many times each value in [0, size) occurs in the integer tensor `index` (int64 counts; with the bool
    `weights`, only where they are True): bincount on the CPU, a scatter-add elsewhere and when compiled
    (bincount sizes its result from the data, which would wait for the device). The scatter-add counts in
    int32 where no count can overflow it, so that its addends take 4 bytes an element."""
    if index.is_cpu and weights is None and not torch.compiler.is_compiling():
        return torch.bincount(index, minlength=size)
    dtype = torch.int32 if index.numel() < 2 ** 31 else torch.int64
    addends = (torch.ones((), dtype=dtype, device=index.device).expand(index.shape) if weights is None
               else weights.to(dtype))
    counts = torch.zeros(size, dtype=dtype, device=index.device)
    return counts.index_add_(0, index.to(torch.int32), addends).to(torch.int64)


def _rank_in(counts: Tensor, k: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """For the k-th largest element of a histogram: its bucket, its rank inside the bucket, and how many elements
    lie in the buckets above it and in it or above; 0-d tensors, found without leaving the device."""
    flipped = counts.flip(0)
    from_top = flipped.cumsum(0)
    position = torch.searchsorted(from_top, k.view(1)).clamp_(max=counts.numel() - 1)
    through = from_top[position].view(())
    above = through - flipped[position].view(())
    return (counts.numel() - 1 - position).view(()), k - above, above, through


def kth_largest_bits(bits: Tensor, k: int, reduce: Optional[Reduce] = None) -> Tuple[Tensor, Tensor]:
    """The exact k-th largest (k >= 1) of the 1-D int32 tensor `bits`, the bit patterns of non-negative float32
    metrics (NaNs made `_ONE_NAN`), and how many elements are at least that large (ties with it included): 0-d
    int32 and int64 tensors on its device. A radix select in two rounds, each counting the elements by 16 of
    their bits (the high half, then the low half of those in the chosen bucket). No host synchronisation on a
    device, fixed shapes (torch.compile traces it whole) and no copy of the elements beyond an index per
    element. `reduce(counts)`, if given, sums a round's counts over the ranks that hold the other elements (an
    all-reduce, of a size independent of theirs), so that k ranks them all and the count is theirs too."""
    high, low = _halves(bits)
    target = torch.full((), k, dtype=torch.int64, device=bits.device)
    counts = _count(high, HIGH_BUCKETS)
    if reduce is not None:
        reduce(counts)
    bucket, rank, above, _ = _rank_in(counts, target)
    in_bucket = high == bucket
    if bits.is_cpu and not torch.compiler.is_compiling():  # the few elements of the bucket, then their lows
        lows = _count(low[in_bucket].to(torch.int32) & 0xFFFF, LOW_BUCKETS)
    else:  # every element by its low bits, adding 1 in the bucket and 0 outside: no one counter takes them all
        lows = _count(low.to(torch.int32) & 0xFFFF, LOW_BUCKETS, weights=in_bucket)
    if reduce is not None:
        reduce(lows)
    low_bucket, _, _, low_through = _rank_in(lows, rank)
    return (bucket.to(torch.int32) << 16) | low_bucket.to(torch.int32), above + low_through


class Selection(NamedTuple):
    """One step's selection: `threshold`, tau as a 0-d tensor (None when k == 0). Generic path: `masked_grads`,
    mask * g per tensor (the selection's buffers, valid until its next step, which the update may change in
    place), and `count`, the number of active elements over every rank (a 0-d tensor, read only when asked:
    reading waits for the device). Host path: neither; the update applies the mask |w * g| >= tau itself
    (`gsm.host_kernels.update`) and counts the active elements."""
    threshold: Optional[Tensor]
    masked_grads: Optional[List[Tensor]] = None
    count: Optional[Tensor] = None

    @property
    def num_active(self) -> int:
        """The number of active elements (generic path)."""
        return 0 if self.count is None else int(self.count)


def _traced_masked(params: Sequence[Tensor], grads: Sequence[Tensor], k: int, reduce: Optional[Reduce]) -> Selection:
    """`GlobalSelection.masked` as torch.compile traces it: the same selection, written without the buffers that
    the eager path keeps from step to step (the compiler plans the memory of its own graph)."""
    if k == 0:
        return Selection(None, [torch.zeros_like(g) for g in grads], torch.zeros((), dtype=torch.int64))
    flats = [(p.float() * g.float() if p.dtype in (torch.float16, torch.bfloat16) else p * g).reshape(-1)
             for p, g in zip(params, grads)]
    bits = torch.cat(flats).abs().view(torch.int32).clamp(max=_ONE_NAN)
    if bits.is_cpu and reduce is None and hasattr(torch.library, "custom_op"):
        threshold_bits, count = _kth_largest_on_host(bits, k)
    else:
        threshold_bits, count = kth_largest_bits(bits, k, reduce)
    mask = bits >= threshold_bits
    masks = mask.split([p.numel() for p in params])
    return Selection(threshold_bits.view(torch.float32), [g * m.view(g.shape) for g, m in zip(grads, masks)], count)


def _mask_into_metric(metric: Tensor, views: Sequence[Tensor], grads: Sequence[Tensor], threshold_bits: Tensor,
                      per_tensor: bool) -> None:
    """Overwrite the flat float32 metric `metric` (bit patterns made rankable; `views`, its segments shaped like
    `grads`) with the masked gradients [metric >= tau] * g, tau given by its bits: the mask compared from the
    bits into the buffer itself as 1 and 0, then multiplied in place. `per_tensor`: segment by segment, each
    product while its mask is in the cache (the CPU); else one compare and one multi-tensor multiply (a device,
    where each operation is a kernel launch)."""
    if per_tensor:
        for view, g in zip(views, grads):
            torch.ge(view.view(torch.int32), threshold_bits, out=view).mul_(g)
    else:
        torch.ge(metric.view(torch.int32), threshold_bits, out=metric)
        torch._foreach_mul_(list(views), list(grads))


def _fits_host_path(params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
    """Whether the compiled kernels are loaded and every tensor fits them (float32 in host memory, dense and
    stored like its gradient)."""
    return host_kernels.available() and all(host_kernels.fits(p, g) for p, g in zip(params, grads))


class GlobalSelection:
    """GSM's selection (docs/design.md, section 1), step after step, for a list of prunable tensors and their
    loss gradients: the metric |w * g| over all elements, its exact k-th largest value tau, and which elements
    are >= tau (docs/design.md, section 4, for the two paths).

    Host path (`threshold`, on a checked `host_kernels.Batch`): one pass of the candidates kernel collects the
    metrics at or above a bound that `ThresholdSearch` sets from the previous thresholds and counts them by their
    high bits, and tau is searched among those few (`HostCandidates`: memory for about 2 Q of them, a second
    pass over the data when more pass the bound); the result is tau alone, because the update recomputes the
    mask element by element.
    Generic path (`masked`: GPUs, other dtypes and layouts, no compiled kernels, DTensor shards, traced steps):
    the metric in one flat float32 vector (buffers and per-tensor views kept while the tensors keep their
    shapes, strides and dtypes); tau by the radix select `kth_largest_bits` on a device (no host
    synchronisation; its counts summed over ranks by `reduce` for sharded parameters), or on the CPU among the
    metrics above the bound of `ThresholdSearch` (`TensorCandidates`); then the mask, compared into the
    metric's buffer as 1 and 0, multiplied in place by the gradients. The result is the masked gradients.
    """

    def __init__(self) -> None:
        self.search = ThresholdSearch()
        self._generic_search = ThresholdSearch()
        self._key: Optional[tuple] = None
        self._layout: Optional[FlatLayout] = None
        self._metric: Optional[Tensor] = None
        self._metric_views: List[Tensor] = []
        self._host_path = False
        self._candidates = HostCandidates()
        self._float_mask: Optional[Tensor] = None
        self._float_mask_views: List[Tensor] = []
        self._scratch = np.empty(0, dtype=np.bool_)

    @property
    def on_host_path(self) -> bool:
        """Whether the last selection took the host path."""
        return self._host_path

    def _prepare(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        key = (params[0].device,) + tuple((p.shape, g.shape, p.stride(), g.stride(), p.dtype, g.dtype, g.device)
                                          for p, g in zip(params, grads))
        if key == self._key:
            return
        self._key = key
        self._layout = FlatLayout(params, grads)
        self._metric, self._metric_views = None, []
        self._float_mask, self._float_mask_views = None, []

    def metric(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
        """The flat metric |w * g|, laid out by `FlatLayout`, every NaN made `_ONE_NAN` (a buffer that the next
        call overwrites)."""
        self._prepare(params, grads)
        if self._metric is None:
            self._metric = torch.empty(self._layout.numel, dtype=torch.float32, device=params[0].device)
            self._metric_views = self._layout.views(self._metric)
        _write_metric(params, grads, self._metric_views, self._metric)
        return self._metric

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor], k: int,
                 fused: Optional[bool] = None) -> Selection:
        """Select the elements of `params` with the k largest |w * g| (and any tied with the k-th; a NaN ranks
        above every number, as in torch.topk): on the host path when `fused` is not False and the tensors fit
        the kernels, else on the generic path."""
        if fused is not False and k > 0 and _fits_host_path(params, grads):
            return Selection(self.threshold(host_kernels.Batch(_without_autograd(params), grads), len(params), k))
        return self.masked(params, grads, k)

    def threshold(self, batch: "host_kernels.Batch", count: int, k: int) -> Tensor:
        """The host path: tau (a 0-d tensor), the k-th largest metric (k >= 1) of the first `count` arrays of a
        checked batch."""
        self._host_path = True
        self._candidates.attach(batch, count, k)
        try:
            tau = self.search(self._candidates, k)
        finally:
            self._candidates.detach()
        return torch.from_numpy(np.asarray(tau, dtype=np.float32))

    def masked(self, params: Sequence[Tensor], grads: Sequence[Tensor], k: int,
               reduce: Optional[Reduce] = None) -> Selection:
        """The generic path: the threshold, the masked gradients and the count of the k largest metrics; with
        `reduce` (see `kth_largest_bits`), of the k largest over these tensors and those of the other ranks."""
        self._host_path = False
        if torch.compiler.is_compiling():
            return _traced_masked(params, grads, k, reduce)
        self._prepare(params, grads)
        if k == 0:  # no element takes its gradient (zeros, not g * 0, which is NaN where g is infinite)
            return Selection(None, [torch.zeros_like(g) for g in grads],
                             torch.zeros((), dtype=torch.int64, device=params[0].device))
        metric = self.metric(params, grads)
        # Ranked by bit pattern, which orders non-negative floats as numbers and puts every NaN above +inf.
        bits = metric.view(torch.int32)
        if bits.is_cpu:  # on the host, among the metrics above the last thresholds' bound
            if self._scratch.size != bits.numel():
                self._scratch = np.empty(bits.numel(), dtype=np.bool_)
            candidates = TensorCandidates(bits, self._scratch, reduce)
            tau = self._generic_search(candidates, k)
            threshold_bits = torch.tensor(_bits_of(tau), dtype=torch.int32)
            count = candidates.count
        else:
            threshold_bits, count = kth_largest_bits(bits, k, reduce)
        threshold = threshold_bits.view(torch.float32)
        dtypes = {g.dtype for g in grads}
        if len(dtypes) > 1:  # mixed dtypes: the bool mask, multiplied tensor by tensor
            mask = bits >= threshold_bits
            return Selection(threshold, list(torch._foreach_mul(list(grads), self._layout.views(mask))), count)
        # The mask as 1 and 0 in the gradients' dtype, compared from the metric's bits straight into a buffer the
        # step holds (the metric's own, element by element, for float32 gradients), then multiplied in place by
        # the gradients: no bool mask and no N new floats (fresh memory costs more than the multiply).
        if dtypes != {torch.float32}:
            if self._float_mask is None:
                self._float_mask = torch.empty(self._layout.numel, dtype=grads[0].dtype, device=metric.device)
                self._float_mask_views = self._layout.views(self._float_mask)
            torch.ge(bits, threshold_bits, out=self._float_mask)
            torch._foreach_mul_(self._float_mask_views, list(grads))
            return Selection(threshold, list(self._float_mask_views), count)
        _mask_into_metric(metric, self._metric_views, grads, threshold_bits, per_tensor=metric.is_cpu)
        return Selection(threshold, list(self._metric_views), count)
