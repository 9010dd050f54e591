"""GSM's compiled host kernels (the extension gsm._host_kernels) and the one place that checks what reaches them.

`candidates` counts the metrics |w * g| at or above a bound by the high 16 bits of their bit patterns in one
pass and keeps them up to a capacity, so that the Q-th largest metric is searched among a few of them
(`kth_in_bucket`), or, when they overflow the capacity, found from one more pass that counts one bucket's
metrics by their low 16 bits (`bucket_lows`); `update` applies the masked momentum-SGD update in one pass,
recomputing the mask |w * g| >= tau element by element instead of storing it. Together they make a GSM step
on the CPU cost about what an SGD step costs, with memory for about Q candidates. On large tensors they split
their work over the threads of torch's own OpenMP pool (torch.get_num_threads() of them, flushing subnormals as
`gsm.flush_denormals` set them), with the same results as on one thread.

The kernels take raw addresses, so every tensor is checked here, on every call, against what the kernel will
touch: dtype, device, shape, strides, density, the extent of its storage, and overlap with the other tensors
of the call. A tensor that does not pass raises RuntimeError before anything is written. The numpy arrays that
the kernels write (candidates, histograms) are checked on the C side (type, size, contiguity, writability,
overlap with every tensor of the call), which raises TypeError or ValueError.

The kernels are built with the package (`pip install -e .` compiles them; a C compiler is needed). Without
them `available()` is False, `status()` says why, and GSM's CPU steps take the generic path of
`gsm.selection` (a few whole-tensor operations: slower, same results up to float rounding).
"""
import importlib
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from gsm.denormals import openmp_runtime_path

_FLOAT_BYTES = 4


def _load():
    """(the extension module, '', whether it runs on torch's thread pool) or (None, why it is unavailable,
    False)."""
    try:
        kernels = importlib.import_module("gsm._host_kernels")
    except ImportError as error:
        return None, (f"the compiled extension gsm._host_kernels is not built ({error}); reinstall the package "
                      f"with a C compiler at hand (pip install -e .)"), False
    return kernels, "", kernels.use_openmp(openmp_runtime_path())


_kernels, _why_not, _threaded = _load()


def available() -> bool:
    """Whether the compiled kernels are loaded."""
    return _kernels is not None


def status() -> str:
    """Where the kernels come from and where they run, or why they are unavailable."""
    if not available():
        return _why_not
    threads = "the threads of torch's OpenMP pool" if _threaded else "the calling thread"
    return f"loaded from {_kernels.__file__}, running on {threads}"


def is_dense(t: Tensor) -> bool:
    """Whether the elements of `t` fill one block of memory without gaps or overlaps, in some order of its
    dimensions (contiguous, channels_last, transposed, ...)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def fits(p: Tensor, g: Tensor) -> bool:
    """Whether the kernels take the tensor `p` with gradient `g`: both float32 in host memory, dense and with
    the same strides, so that both are flat arrays with their elements in the same (memory) order."""
    if not (p.dtype is torch.float32 and g.dtype is torch.float32 and p.is_cpu and g.is_cpu):
        return False
    if p.is_contiguous() and g.is_contiguous():  # the common case, quickly (a step checks every parameter)
        return p.shape == g.shape
    return _stored_alike(p, g) and is_dense(p)


def _stored_alike(a: Tensor, b: Tensor) -> bool:
    """Same shape, and the same strides wherever a dimension has more than one element (the stride of a size-1
    dimension moves nowhere: torch leaves it arbitrary)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, size in zip(a.stride(), b.stride(), a.shape) if size != 1)


def _unfit(role: str, index: int, t, like: Optional[Tensor] = None) -> RuntimeError:
    """The error for a tensor that the kernels cannot take, saying what it is (and what its parameter is)."""
    if not isinstance(t, Tensor):
        return RuntimeError(f"GSM host kernels: {role} {index} is a {type(t).__name__}, not a tensor")
    what = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}, strides " \
           f"{tuple(t.stride()) if t.layout is torch.strided else t.layout}"
    if like is None:
        return RuntimeError(f"GSM host kernels: {role} {index} is {what}; they take dense float32 CPU tensors")
    return RuntimeError(f"GSM host kernels: {role} {index} is {what}, its parameter {tuple(like.shape)} with strides "
                        f"{tuple(like.stride())}; they must be float32 CPU tensors of the same shape and strides")


def _inside_storage(t: Tensor) -> bool:
    """Whether the elements of the dense tensor `t` lie inside its storage (a storage can be resized under a
    tensor that views it)."""
    return (t.storage_offset() + t.numel()) * _FLOAT_BYTES <= t.untyped_storage().nbytes()


def _checked(params: Sequence[Tensor], grads: Sequence[Tensor],
             buffers: Optional[Sequence[Optional[Tensor]]] = None) -> Tuple[List[int], List[int], List[Optional[int]],
                                                                           List[int]]:
    """The boundary: check every tensor of a call against what the kernels will touch (float32, in host memory,
    dense, gradients and buffers stored exactly like their parameters, every element inside its storage) and
    return their addresses and sizes; the C side then refuses any overlap between them. Raises RuntimeError
    before any kernel runs."""
    count = len(params)
    if len(grads) != count or (buffers is not None and len(buffers) != count):
        raise ValueError(f"GSM host kernels: {count} parameters, {len(grads)} gradients and "
                         f"{'no' if buffers is None else len(buffers)} buffers")
    f32 = torch.float32
    weights, gradients, momenta, sizes = [], [], [], []
    for i in range(count):
        p, g = params[i], grads[i]
        b = None if buffers is None else buffers[i]
        if not isinstance(p, Tensor) or p.dtype is not f32 or not p.is_cpu or p.is_sparse \
                or not (p.is_contiguous() or is_dense(p)) or not _inside_storage(p):
            raise _unfit("parameter", i, p)
        contiguous = p.is_contiguous()
        for role, t in (("gradient", g), ("momentum buffer", b)):
            if t is None and role != "gradient":
                continue
            if not isinstance(t, Tensor) or t.dtype is not f32 or not t.is_cpu or t.is_sparse \
                    or not ((contiguous and t.is_contiguous() and t.shape == p.shape) or _stored_alike(t, p)) \
                    or not _inside_storage(t):
                raise _unfit(role, i, t, p)
        weights.append(p.data_ptr())
        gradients.append(g.data_ptr())
        momenta.append(None if b is None else b.data_ptr())
        sizes.append(p.numel())
    return weights, gradients, momenta, sizes


class Batch:
    """The tensors of one step, checked for the kernels (see `_checked`) once: their addresses and sizes, for the
    candidates of the first few arrays (the prunable ones) and the update of all of them. Valid while the
    tensors are left as they are: built, used and dropped within one step."""

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor],
                 buffers: Optional[Sequence[Optional[Tensor]]] = None) -> None:
        self.weights, self.grads, self.buffers, self.sizes = _checked(params, grads, buffers)

    def candidates(self, count: int, bound: float, out: np.ndarray, histogram: Optional[np.ndarray]) -> int:
        """Counts |w * g| of every element of the first `count` arrays that is >= `bound` or NaN, writes as many
        of them as the float32 array `out` holds (its capacity) to it, in no fixed order, counts them all by
        their high 16 bits into the int64 array `histogram` (HIGH_BUCKETS counts, overwritten; None: not
        counted, which saves the threads' count tables when the candidates are few), and returns their exact
        number, which may exceed the capacity."""
        return _kernels.candidates(self.weights[:count], self.grads[:count], self.sizes[:count], bound, out,
                                   histogram, torch.get_num_threads())

    def bucket_lows(self, count: int, high: int, histogram: np.ndarray) -> int:
        """Counts |w * g| of the elements of the first `count` arrays whose bit patterns have the high 16 bits
        `high` by their low 16 bits into the int64 array `histogram` (LOW_BUCKETS counts, overwritten); returns
        how many there are."""
        return _kernels.bucket_lows(self.weights[:count], self.grads[:count], self.sizes[:count], high, histogram,
                                    torch.get_num_threads())

    def update(self, thresholds: Sequence[float], lr: "Setting", momentum: "Setting", weight_decay: "Setting",
               nesterov: Union[bool, Sequence[bool]]) -> List[int]:
        """One momentum-SGD step of every array, in place (see `update`); returns the active counts."""
        count = len(self.weights)
        return _kernels.update(self.weights, self.grads, self.buffers, self.sizes, list(thresholds),
                               _per_array(lr, count), _per_array(momentum, count), _per_array(weight_decay, count),
                               _per_array(nesterov, count), torch.get_num_threads())


HIGH_BUCKETS, LOW_BUCKETS = 1 << 15, 1 << 16  # the sign bit of a metric is 0: its high half is below 2^15


def candidates(weights: Sequence[Tensor], grads: Sequence[Tensor], bound: float, out: np.ndarray,
               histogram: Optional[np.ndarray] = None) -> int:
    """`Batch.candidates` of `weights` (with `grads`): writes up to out.size of the metrics >= `bound` or NaN to
    `out`, counts them by their high 16 bits into `histogram` (when given) and returns their exact number."""
    return Batch(weights, grads).candidates(len(weights), bound, out, histogram)


def bucket_lows(weights: Sequence[Tensor], grads: Sequence[Tensor], high: int, histogram: np.ndarray) -> int:
    """`Batch.bucket_lows` of `weights` (with `grads`)."""
    return Batch(weights, grads).bucket_lows(len(weights), high, histogram)


def kth_in_bucket(values: np.ndarray, count: int, high: int, rank: int) -> np.float32:
    """The rank-th largest (1-based) of those of the first `count` elements of the float32 array `values` whose
    bit patterns have the high 16 bits `high`, ranked by bit pattern (a NaN above every number), as
    `candidates` writes them; ValueError when fewer than `rank` have them. Reorders them."""
    return np.float32(_kernels.kth_in_bucket(values, count, high, rank, torch.get_num_threads()))


def kth_largest(values: np.ndarray, count: int, k: int) -> np.float32:
    """The k-th largest of the first `count` elements of the float32 array `values` (1 <= k <= count), which
    must be non-negative numbers or NaN (a NaN ranks above every number), as `candidates` writes them;
    reorders them. A radix select: exact, in a few passes over them."""
    return np.float32(_kernels.kth_largest(values, count, k))


Setting = Union[float, Sequence[float]]


def _per_array(value, count: int) -> Sequence:
    return value if isinstance(value, (list, tuple)) else [value] * count


def update(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Optional[Sequence[Optional[Tensor]]],
           thresholds: Sequence[float], lr: Setting, momentum: Setting, weight_decay: Setting,
           nesterov: Union[bool, Sequence[bool]]) -> List[int]:
    """One momentum-SGD step of `params` in place, in torch.optim.SGD's order of operations:
        d = M * g + weight_decay * w;  b = momentum * b + d;  w -= lr * b   (Nesterov: w -= lr * (d + momentum * b))
    with M = [|w * g| >= thresholds[i] or NaN] for params[i] (-inf: every element). `buffers` are the momentum
    buffers, updated in place (None, or a None entry: no momentum; a zero buffer makes the first step's buffer
    d, as SGD's does). The hyperparameters are one value for all, or one per parameter. Returns, per param, the
    number of elements that took their gradient."""
    return Batch(params, grads, buffers).update(thresholds, lr, momentum, weight_decay, nesterov)
