"""GSM's compiled host kernels (the extension gsm._host_kernels) and the one place that checks what reaches them.

`candidates` collects the metric |w * g| of the elements at or above a bound in one pass, so that the Q-th
largest metric is searched among a few candidates (`kth_largest`); `update` applies the masked momentum-SGD
update in one pass, recomputing the mask |w * g| >= tau element by element instead of storing it. Together
they make a GSM step on the CPU cost about what an SGD step costs. On large tensors both split their work over
the threads of torch's own OpenMP pool (torch.get_num_threads() of them, flushing subnormals as
`gsm.flush_denormals` set them), with the same results as on one thread.

The kernels take raw addresses, so every tensor is checked here, on every call, against what the kernel will
touch: dtype, device, shape, strides, density, the extent of its storage, and overlap with the other tensors
of the call. A tensor that does not pass raises RuntimeError before anything is written.

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


def last_threads() -> int:
    """The number of threads that ran the last kernel call."""
    return _kernels.last_threads()


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


def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device} with strides {tuple(t.stride())}"


def _check_array(t: Tensor, role: str, index: int, like: Optional[Tensor]) -> Tuple[int, int]:
    """Check that `t` is a dense float32 host tensor inside its storage, shaped and strided like `like` (the
    parameter it belongs to); returns its memory span (start, end) in bytes."""
    if not isinstance(t, Tensor):
        raise RuntimeError(f"GSM host kernels: {role} {index} is a {type(t).__name__}, not a tensor")
    if t.dtype is not torch.float32 or not t.is_cpu or t.is_sparse:
        raise RuntimeError(f"GSM host kernels: {role} {index} is {_describe(t)}; they take dense float32 CPU tensors")
    if like is not None and not _stored_alike(t, like):
        raise RuntimeError(f"GSM host kernels: {role} {index} is {_describe(t)}, its parameter {_describe(like)}; "
                           f"they must have the same shape and strides")
    if like is None and not is_dense(t):
        raise RuntimeError(f"GSM host kernels: {role} {index} is {_describe(t)}, not dense")
    size = t.numel() * _FLOAT_BYTES
    if (t.storage_offset() * _FLOAT_BYTES + size) > t.untyped_storage().nbytes():
        raise RuntimeError(f"GSM host kernels: {role} {index} ({tuple(t.shape)}) extends past the end of its storage "
                           f"({t.untyped_storage().nbytes()} bytes)")
    start = t.data_ptr()
    return start, start + size


def _checked(params: Sequence[Tensor], grads: Sequence[Tensor],
             buffers: Optional[Sequence[Optional[Tensor]]] = None) -> Tuple[List[int], List[int], List[Optional[int]],
                                                                           List[int]]:
    """The boundary: check every tensor of a call (see `_check_array`) and that none overlaps another in memory
    (the kernels write the parameters and buffers while reading the gradients, on several threads), and return
    their addresses and sizes. Raises RuntimeError, before any kernel runs."""
    if len(grads) != len(params) or (buffers is not None and len(buffers) != len(params)):
        raise ValueError(f"GSM host kernels: {len(params)} parameters, {len(grads)} gradients and "
                         f"{'no' if buffers is None else len(buffers)} buffers")
    spans = []
    for i, p in enumerate(params):
        spans.append((*_check_array(p, "parameter", i, None), "parameter", i))
        spans.append((*_check_array(grads[i], "gradient", i, p), "gradient", i))
        if buffers is not None and buffers[i] is not None:
            spans.append((*_check_array(buffers[i], "momentum buffer", i, p), "momentum buffer", i))
    ordered = sorted(span for span in spans if span[1] > span[0])
    for before, after in zip(ordered, ordered[1:]):
        if after[0] < before[1]:
            raise RuntimeError(f"GSM host kernels: {before[2]} {before[3]} and {after[2]} {after[3]} overlap in "
                               f"memory; every parameter, gradient and momentum buffer must have memory of its own")
    addresses = [t.data_ptr() for t in params], [g.data_ptr() for g in grads]
    buffer_addresses = [None if buffers is None or buffers[i] is None else buffers[i].data_ptr()
                        for i in range(len(params))]
    return addresses[0], addresses[1], buffer_addresses, [p.numel() for p in params]


def candidates(weights: Sequence[Tensor], grads: Sequence[Tensor], bound: float, out: np.ndarray) -> int:
    """Writes |w * g| of every element of `weights` (with `grads`) that is >= `bound` or NaN to the front of
    `out`, in order, and returns how many there are. `out` is a contiguous float32 array with room for all their
    elements plus 8."""
    w, g, _, sizes = _checked(weights, grads)
    return _kernels.candidates(w, g, sizes, bound, out, torch.get_num_threads())


def kth_largest(values: np.ndarray, count: int, k: int) -> np.float32:
    """The k-th largest of the first `count` elements of the float32 array `values` (1 <= k <= count), which
    must be non-negative numbers or NaN (a NaN ranks above every number), as `candidates` writes them;
    reorders them. A radix select: exact, in a few passes over them."""
    return np.float32(_kernels.kth_largest(values, count, k))


Setting = Union[float, Sequence[float]]


def _per_array(value: Setting, count: int) -> Sequence[float]:
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
    w, g, b, sizes = _checked(params, grads, buffers)
    count = len(params)
    return _kernels.update(w, g, b, sizes, list(thresholds), _per_array(lr, count), _per_array(momentum, count),
                           _per_array(weight_decay, count), _per_array(nesterov, count), torch.get_num_threads())
