"""Keep freed batch memory in the process instead of returning it to the OS after every batch.

A batch of 64 spectrograms is ~16 MiB of new arrays. glibc's malloc, by default, gives memory at the top
of its heap back to the OS once more than ``2 x mmap threshold`` (~0.5 MiB after warm-up) is free there,
and maps arrays over its mmap threshold afresh: either way the next batch's arrays are new pages, each
faulted in and zeroed by the kernel (~60 faults per 256 KiB item, measured ~6x slower batch reads).
Raising both thresholds once per process makes the next batch reuse the last one's memory. Writing is the
same story: each item is encoded into a new buffer and LMDB copies it into new pages of its own, all freed
at the commit; untuned, every commit faulted them in again (~2.5x slower writes of 256 KiB items, measured).
Readers and writers call it.

Only glibc is tuned (other C libraries are left alone); ``LMDBKIT_KEEP_HEAP=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20   # arrays below this come from the heap (glibc's own ceiling for its dynamic threshold)
TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top kept for reuse, up to this much

_tuned: bool | None = None  # a forked child inherits the settings with the heap


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds in this process (once). Returns whether they are raised."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if os.environ.get("LMDBKIT_KEEP_HEAP", "1") != "0" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
                _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):
                pass
    return _tuned
