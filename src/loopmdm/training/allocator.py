"""CPU memory allocator tuning for training.

glibc's malloc serves large blocks (activations, gradients) with fresh mmap'd pages and
returns freed memory to the OS. A training step allocates and frees the same large
tensors every step, so every step pays page faults for all of them; the deeper the
unrolled loop, the larger the footprint and the larger that cost. Measured with
benchmarks/loop_overhead.py (docs/RESULTS.md): without tuning, S = 12 ran 20% slower than
its FLOPs predict; with it, within 2%, and every step got faster. Keeping freed memory in
the heap (as PyTorch's CUDA caching allocator does on the GPU) removes the faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def tune_glibc_malloc() -> bool:
    """Keep freed memory for reuse instead of returning it to the OS. Returns True when
    applied (Linux with glibc), False elsewhere; never raises."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or an unusual libc: leave the defaults
        return False
    ok = mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum: blocks up to 32 MiB from the heap
    ok &= mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # never trim the heap top back to the OS
    ok &= mallopt(M_TOP_PAD, 256 * 1024 * 1024)  # grow the heap in large steps
    return bool(ok)
