"""GSM's compiled host kernels (gsm/_host_kernels.c), called through ctypes on float32 tensors in host memory.

`candidates` collects the metric |w * g| of the elements at or above a bound in one pass, so that the Q-th
largest metric is searched among a few candidates; `update` applies the masked momentum-SGD update in one
pass, recomputing the mask |w * g| >= tau element by element instead of storing it. Together they make a GSM
step on the CPU cost about what an SGD step costs. On large tensors both split their work over the threads of
torch's own OpenMP pool (torch.get_num_threads() of them, flushing subnormals as `gsm.flush_denormals` set
them), with the same results as on one thread.

The kernels are built with the package (`pip install -e .` compiles them; a C compiler is needed). Without
them `available()` is False, `status()` says why, and GSM's CPU steps take the generic path of
`gsm.selection` (a few whole-tensor operations: slower, same results up to float rounding).
"""
import ctypes
import importlib
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from gsm.denormals import openmp_runtime

_POINTERS = ctypes.POINTER(ctypes.c_void_p)
_SIZES = ctypes.POINTER(ctypes.c_int64)
_FLOATS = ctypes.POINTER(ctypes.c_float)


def _load():
    """(the library, '', whether it runs on torch's thread pool) or (None, why it is unavailable, False)."""
    try:
        extension = importlib.import_module("gsm._host_kernels")
    except ImportError as error:
        return None, (f"the compiled extension gsm._host_kernels is not built ({error}); reinstall the package "
                      f"with a C compiler at hand (pip install -e .)"), False
    try:
        lib = ctypes.CDLL(extension.__file__)
    except OSError as error:
        return None, f"gsm._host_kernels could not be loaded by ctypes ({error})", False
    lib.gsm_init.argtypes, lib.gsm_init.restype = [], None
    lib.gsm_candidates.argtypes = [ctypes.c_int64, _POINTERS, _POINTERS, _SIZES, ctypes.c_float, ctypes.c_void_p,
                                   ctypes.c_int]
    lib.gsm_candidates.restype = ctypes.c_int64
    lib.gsm_update.argtypes = [ctypes.c_int64, _POINTERS, _POINTERS, _POINTERS, _SIZES, _FLOATS, ctypes.c_float,
                               ctypes.c_float, ctypes.c_float, ctypes.c_int, _SIZES, ctypes.c_int]
    lib.gsm_update.restype = None
    lib.gsm_use_openmp.argtypes, lib.gsm_use_openmp.restype = [ctypes.c_void_p] * 3, None
    lib.gsm_last_threads.argtypes, lib.gsm_last_threads.restype = [], ctypes.c_int
    lib.gsm_kth_largest.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.gsm_kth_largest.restype = ctypes.c_float
    lib.gsm_init()
    return lib, "", _use_torch_threads(lib)


def _use_torch_threads(lib) -> bool:
    """Hand the kernels the entry points of the OpenMP runtime torch computes with, so that they run on its
    thread pool; without one (another threading backend, not Linux), they run on the calling thread. Returns
    whether they run on the pool."""
    runtime = openmp_runtime()
    names = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
    threaded = runtime is not None and all(hasattr(runtime, name) for name in names)
    lib.gsm_use_openmp(*[ctypes.cast(getattr(runtime, name), ctypes.c_void_p) if threaded else None
                         for name in names])
    return threaded


_lib, _why_not, _threaded = _load()


def available() -> bool:
    """Whether the compiled kernels are loaded."""
    return _lib is not None


def status() -> str:
    """Where the kernels come from and where they run, or why they are unavailable."""
    if not available():
        return _why_not
    threads = "the threads of torch's OpenMP pool" if _threaded else "the calling thread"
    return f"loaded from {_lib._name}, running on {threads}"


def last_threads() -> int:
    """The number of threads that ran the last kernel call."""
    return _lib.gsm_last_threads()


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
    return p.shape == g.shape and p.stride() == g.stride() and is_dense(p)


def _addresses(tensors: Sequence[Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _sizes(tensors: Sequence[Tensor]):
    return (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])


def candidates(weights: Sequence[Tensor], grads: Sequence[Tensor], bound: float, out: np.ndarray) -> int:
    """Writes |w * g| of every element of `weights` (with `grads`) that is >= `bound` (NaN is not) to the front
    of `out`, in order, and returns how many there are. Every pair must `fit`; `out` is a float32 array with
    room for all their elements plus 8."""
    total = sum(w.numel() for w in weights)
    if out.dtype != np.float32 or out.size < total + 8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 array of at least {total + 8} elements")
    return _lib.gsm_candidates(len(weights), _addresses(weights), _addresses(grads), _sizes(weights), bound,
                               out.ctypes.data, torch.get_num_threads())


def kth_largest(values: np.ndarray, count: int, k: int) -> np.float32:
    """The k-th largest of the first `count` elements of the float32 array `values` (1 <= k <= count), which
    must be non-negative numbers (no NaN), as `candidates` writes them; reorders them. A radix select: exact,
    in a few passes over them."""
    if not 1 <= k <= count <= values.size or values.dtype != np.float32 or not values.flags.c_contiguous:
        raise ValueError(f"need 1 <= k <= count <= values.size of a contiguous float32 array, got k={k}, "
                         f"count={count}, {values.size} {values.dtype} elements")
    return np.float32(_lib.gsm_kth_largest(values.ctypes.data, count, k))


def update(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Optional[Sequence[Tensor]],
           thresholds: Sequence[float], lr: float, momentum: float, weight_decay: float,
           nesterov: bool) -> List[int]:
    """One momentum-SGD step of `params` in place, in torch.optim.SGD's order of operations:
        d = M * g + weight_decay * w;  b = momentum * b + d;  w -= lr * b   (Nesterov: w -= lr * (d + momentum * b))
    with M = [|w * g| >= thresholds[i]] for params[i] (-inf: every element, NaN included). `buffers` are the
    momentum buffers, updated in place (None when momentum == 0; a zero buffer makes the first step's buffer
    d, as SGD's does). Every param must `fit` with its gradient and with its buffer. Returns, per param, the
    number of elements that took their gradient."""
    count = len(params)
    active = (ctypes.c_int64 * count)()
    _lib.gsm_update(count, _addresses(params), _addresses(grads),
                    None if buffers is None else _addresses(buffers), _sizes(params),
                    (ctypes.c_float * count)(*thresholds), lr, momentum, weight_decay, int(nesterov), active,
                    torch.get_num_threads())
    return list(active)
