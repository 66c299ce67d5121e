"""Process settings that make CPU training lean: malloc memory reuse, denormal floats flushed.

(The fast path of Lightning's step dispatch lives in :mod:`mlplab.lightning_ext.fastpath`.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from typing import Iterator

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_malloc_tuned: bool | None = None


def reuse_freed_memory() -> bool:
    """Let glibc's malloc reuse freed memory for large tensors instead of asking the OS.

    glibc serves an allocation above a (dynamic) threshold with a fresh ``mmap`` and gives
    it back on free, and trims the heap's free top back to the OS: a fused training block
    or a large minibatch was then new memory at every step, each page faulted in and zeroed
    by the kernel. With allocations up to 32 MiB (glibc's largest threshold) kept on the
    heap and 256 MiB of free heap kept, the same pages serve every step, for a slightly
    higher peak memory (benchmarks/RESULTS.md has the figures). Process-wide and
    idempotent; returns whether it applied (False off glibc: macOS, Windows, musl).
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
                )
            except (OSError, AttributeError):
                pass
    return _malloc_tuned


# -- denormal floats ------------------------------------------------------------------------

#: Elements per thread below which torch's CPU kernels do not split work (at::internal::GRAIN_SIZE).
_GRAIN_SIZE = 32768


def flush_denormals() -> bool | None:
    """Flush denormal floats to zero on the CPU (FTZ/DAZ), in every thread torch computes on.

    As a classifier grows confident, softmax probabilities and their gradients underflow
    into denormals (below 1.2e-38 in float32); x86 CPUs compute with those through slow
    microcode assists, which can double an epoch's time (benchmarks/RESULTS.md). Flushing
    changes only values below 1.2e-38, which round away against anything else in a step.

    The flag lives in each thread's MXCSR register, and a thread inherits it only when it is
    created: set before torch starts its worker threads (the first large computation of the
    process), it holds for all of them; set later, only for the calling thread. Returns True
    where every intra-op thread flushes (checked with a computation split over all threads),
    False where only this one does, None where the CPU cannot (``torch.set_flush_denormal``).
    """
    if not torch.set_flush_denormal(True):
        return None
    return _flushed(2 * _GRAIN_SIZE * torch.get_num_threads())


def _flushes_here() -> bool:
    """Whether this thread already flushes denormals (one element: no worker thread computes it)."""
    return _flushed(1)


def _flushed(n: int) -> bool:
    """Whether ``n`` products 1e-30 * 1e-10 (a float32 denormal) all came out as zero."""
    return bool((torch.full((n,), 1e-30).mul_(1e-10) == 0).all())


@contextlib.contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[bool | None]:
    """:func:`flush_denormals` for the duration of the block (yields its result; None also
    when not ``enabled``). Afterwards this thread computes as before: the flag is part of
    the process's state, and other code run later in it (numpy, hypothesis, a notebook's
    next cell) must not find it changed. Worker threads that torch started inside the
    block keep flushing (no API reaches their registers); that changes values below
    1.2e-38 only."""
    if not enabled:
        yield None
        return
    was_flushing = _flushes_here()
    try:
        yield flush_denormals()
    finally:
        if not was_flushing:
            torch.set_flush_denormal(False)
