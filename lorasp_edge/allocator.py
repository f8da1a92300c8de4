"""How this process's host memory is allocated: glibc's heap, or one mapping per large allocation.

glibc malloc serves an allocation below its mmap threshold from the heap, and raises that
threshold to the largest block freed so far (up to 32 MiB). A heap keeps what it once held: the
temporaries a training step frees between the tensors it saves for backward stay resident as
holes, which is fast (no page is faulted twice) but makes the peak larger than the live tensors by
an amount that depends on the shapes (lorasp_edge/plan/memory.py, `heap_slack_bytes`). With the
threshold fixed at MMAP_THRESHOLD, every allocation of that size or more gets its own mapping and
is returned to the system when freed, so the peak is the live tensors; each such allocation then
faults its pages in anew. A plan says which (`host_allocator`); the streamed export always maps.
Other C libraries (musl, macOS, Windows) keep their own behaviour: these calls do nothing there.
"""

from __future__ import annotations

import ctypes
import functools

HEAP, MMAP = "heap", "mmap"
HOST_ALLOCATORS = (HEAP, MMAP)
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # malloc.h


@functools.cache
def _libc():
    """The C library's symbols, through the process's own (dlopen of NULL): ctypes.util.find_library
    would fork a helper, and a child forked from a large process reports its parent's resident set
    as its own peak, which the export's peak (children included) would then count."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows has no dlopen(NULL)
        return None


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more with its own mapping, returned to the
    system when freed (fixing the threshold also turns glibc's dynamic raise off). False where the
    C library has no mallopt."""
    global _mapped
    libc = _libc()
    try:
        done = bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except AttributeError:
        done = False
    _mapped = _mapped or done
    return done


def mapped() -> bool:
    """Whether this process maps its large allocations (map_large_allocations succeeded)."""
    return _mapped


_mapped = False


def use(host_allocator: str) -> bool:
    """Apply a plan's `host_allocator`; the heap is the C library's default, so only MMAP acts."""
    return map_large_allocations() if host_allocator == MMAP else False


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc malloc_trim; elsewhere nothing)."""
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass
