"""Keep freed CPU memory in the process instead of handing it back to the OS at once (glibc).

glibc serves large allocations with fresh mmaps (above M_MMAP_THRESHOLD: adaptive, 128 KiB to
32 MiB) and trims the heap top above M_TRIM_THRESHOLD, so a torch op on a few MiB often touches
memory the kernel must fault in again. On VMs where a page fault is expensive (Firecracker, as on
qcompile's CI: ~20 us a 4 KiB page, measured) elementwise ops run 50-100x slower than the arithmetic:
HQQ on one 1536x576 layer took 17 s instead of 0.14 s, and SmolLM2-135M's default quantization
(compile time of `backend=qcompile`) 437 s instead of 13 s. Raising both thresholds makes glibc
reuse freed memory, as PyTorch's CUDA caching allocator, jemalloc or tcmalloc do; the process keeps
its peak footprint instead of shrinking. The cost: a loop that frees a large tensor each iteration
but keeps a small one can fragment the heap (the small one lands in the large one's hole, so the
next large one no longer fits and the heap grows); allocate such outputs up front, as
`qcompile.qat.distill.teacher_targets` does. qcompile does this at import; set
QCOMPILE_KEEP_FREED_MEMORY=0 to leave glibc's defaults alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_THRESHOLD = 1 << 30
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB (once); False where there is no glibc or
    QCOMPILE_KEEP_FREED_MEMORY=0."""
    global _done
    if _done:
        return True
    if os.environ.get("QCOMPILE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: nothing to tune
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    return _done
