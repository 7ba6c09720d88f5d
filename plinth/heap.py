"""Keep freed memory in the process while training, instead of handing it back to the OS (glibc).

glibc returns large freed blocks to the operating system: blocks over its mmap threshold are
unmapped on free, and free space at the top of the heap over its trim threshold is trimmed. A
training step frees its activations and gradients and allocates the same sizes again in the next
step, so the kernel maps, faults in and zeroes every 4 KiB page anew, every step: for a small
model a large share of each step's time goes to the kernel (docs/benchmarks.md). Inside
`freed_memory_kept()` every block comes from the heap and the heap is never trimmed, so from the
second step on the same memory is reused: no page faults.

The cost is memory. The process keeps its peak until the block ends, and more than the peak: a
freed block can be reused only by requests that fit it at their alignment, so resident memory
grows by what does not fit (a training run's resident memory stays flat, but one large tensor
freed and allocated again over and over can take up to twice its size). When the block ends the
memory is handed back and glibc's default settings come back (as fixed thresholds: setting them
turns off glibc's adaptive mmap threshold for the rest of the process).

Nothing changes on other C libraries (macOS, musl), or where the user tunes glibc's allocator
(MALLOC_*_ variables, GLIBC_TUNABLES): their settings win.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from contextlib import contextmanager

# mallopt() parameters and glibc's defaults for them (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 128 * 1024, 65536
NEVER_TRIM = -1  # glibc reads it as the largest size_t: "disables trimming completely" (mallopt(3))


@functools.cache
def _glibc():
    """The C library if it is glibc (whose mallopt takes the parameters above), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def _tuned_by_user() -> bool:
    return "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ)


def freed_memory_returned():
    """For a long-running server, the opposite of `freed_memory_kept`: large blocks always mapped
    on their own, so freeing one hands its memory back. By default glibc raises its mmap threshold
    to the size of each large block freed (up to 32 MiB on 64-bit), and blocks under it then come
    from the heap, where freed memory stays with the process: a server whose passes vary in size
    (prefill pieces, batches that grow and shrink) would keep the peak of them all. A fixed
    threshold, glibc's starting one, ends that adjustment."""
    libc = _glibc()
    if libc is not None and not _tuned_by_user():
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)


_depth = 0  # open freed_memory_kept() blocks: only the outermost one restores glibc's settings


@contextmanager
def freed_memory_kept():
    global _depth
    libc = _glibc()
    if libc is None or _tuned_by_user():
        yield
        return
    if _depth == 0:
        libc.mallopt(M_MMAP_MAX, 0)  # every block from the heap, which free() does not unmap
        libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)  # hand back what the block kept
