"""Flush-to-zero for subnormal floats on every CPU thread torch computes on.

GSM's passive weights only decay: by the end of a LeNet GSM stage most of them lie between 1e-25 and 1e-35,
and their products with gradients and activations fall below float32's smallest normal number (1.2e-38).
x86 processors compute such subnormal results through slow microcode, several times slower on Intel Xeons (the
README's Speed section has the figures). Flushing them to zero
(the FTZ and DAZ modes) changes only values below 1.2e-38, far under anything a weight or a gradient
contributes, and keeps training deterministic.

The mode is a per-thread flag. Threads inherit it from the thread that creates them, so it must be on
before torch's intra-op thread pool (OpenMP) starts, or the pool must start again: `torch.set_flush_denormal`
alone, called once the pool runs, flushes only on the calling thread (half the elements of a large product
on 2 threads). `flush_denormals()` handles both cases and checks the result on every thread.
"""
import ctypes
import os
import warnings
from typing import List, Optional

import torch

# Elements per thread of the probe: ATen splits elementwise work in chunks of at least 32768 elements
# (at::internal::GRAIN_SIZE), so a product this large gives every thread of the pool a share.
_PROBE_ELEMENTS_PER_THREAD = 4 * 32768
# 1e-30 * 1e-10 = 1e-40 is a subnormal float32; with flush-to-zero the product is exactly 0.
_PROBE_FACTORS = (1e-30, 1e-10)


def subnormal_products_flushed(num_threads: Optional[int] = None) -> Optional[bool]:
    """Whether a float32 product whose result would be subnormal comes out as zero on the threads of torch's
    CPU pool: True on every one, False on none, None on some only. The probe is an elementwise multiply large
    enough to be split over all `num_threads` (default: torch's intra-op thread count) threads."""
    threads = num_threads or torch.get_num_threads()
    small = torch.full((threads * _PROBE_ELEMENTS_PER_THREAD,), _PROBE_FACTORS[0], dtype=torch.float32)
    zeros = int((torch.mul(small, _PROBE_FACTORS[1]) == 0).sum())
    return True if zeros == small.numel() else False if zeros == 0 else None


def _loaded_openmp_runtimes() -> List[str]:
    """The paths of the OpenMP runtimes (libgomp, libomp, libiomp) loaded in this process, from its memory map."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:  # not Linux
        return []
    return sorted(path for path in paths if os.path.basename(path).startswith(("libgomp", "libomp", "libiomp")))


def openmp_runtime_path() -> Optional[str]:
    """The path of the OpenMP runtime torch computes with, or None (no OpenMP runtime, not Linux).

    Several runtimes can be loaded at once (another extension may bring its own), and only torch's runs the
    threads that `torch.set_num_threads` sizes and `flush_denormals` sets. So it is found by what it does:
    the one whose `omp_get_max_threads()` follows `torch.set_num_threads` to two probe values in turn (torch's
    setting is restored)."""
    runtimes = {}
    for path in _loaded_openmp_runtimes():
        try:
            runtimes[path] = ctypes.CDLL(path).omp_get_max_threads
        except (OSError, AttributeError):
            continue
    previous = torch.get_num_threads()
    try:
        for probe in (previous + 1, previous + 2):
            torch.set_num_threads(probe)
            runtimes = {path: query for path, query in runtimes.items() if query() == probe}
    finally:
        torch.set_num_threads(previous)
    return next(iter(runtimes)) if len(runtimes) == 1 else None


def openmp_runtime() -> Optional[ctypes.CDLL]:
    """The OpenMP runtime torch computes with (see `openmp_runtime_path`), or None."""
    path = openmp_runtime_path()
    return None if path is None else ctypes.CDLL(path)


def _restart_thread_pool() -> bool:
    """Free the OpenMP thread pool (OpenMP 5.0 `omp_pause_resource_all(omp_pause_soft)`), so that the next
    parallel region starts new threads, created by this thread and so inheriting its floating-point mode."""
    runtime = openmp_runtime()
    if runtime is None or not hasattr(runtime, "omp_pause_resource_all"):
        return False
    omp_pause_soft = 1
    return runtime.omp_pause_resource_all(omp_pause_soft) == 0


def set_flush_denormals(enabled: bool) -> bool:
    """Turn flush-to-zero of subnormal floats (x86 FTZ and DAZ) on or off on every CPU thread of torch, and
    check it. Returns whether every thread now has the mode requested; False also when the processor has no
    such mode (turning it off then trivially succeeds)."""
    if not torch.set_flush_denormal(enabled):
        return not enabled
    if subnormal_products_flushed() is enabled or (_restart_thread_pool() and subnormal_products_flushed() is enabled):
        return True
    if enabled:
        warnings.warn("subnormal floats are flushed to zero on this thread but not on every thread of torch's CPU "
                      "pool, so late GSM training may run several times slower on x86; call "
                      "gsm.flush_denormals() before any other torch computation", RuntimeWarning, stacklevel=3)
    return False


def flush_denormals() -> bool:
    """Make every CPU thread of torch flush subnormal floats to zero (x86 FTZ and DAZ), and check it.

    Call it once, from the thread that trains, best before any other torch work; called later, it restarts
    torch's OpenMP thread pool so that its threads take the mode too. Returns True when a subnormal product
    comes out zero on every thread, False when the processor has no such mode. When the mode exists but some
    thread of the pool keeps it off (an OpenMP runtime that cannot be restarted), it warns and returns False:
    then call it before any other torch computation. The experiment scripts call it at start-up, and `GSM`
    when it optimises CPU parameters.
    """
    return set_flush_denormals(True)
