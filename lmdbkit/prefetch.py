"""Large values read from disk as one request each, and a batch's requests in flight together.

Why it is needed: LMDB hands out values as pointers into its memory map, and py-lmdb touches every 4 KiB
page of a value before it returns it (its ``preload``, so that page faults happen without the GIL). With
the map opened ``readahead=False`` (MADV_RANDOM, right for small items) each touched page that is not in
the page cache is its own synchronous 4 KiB read: a ~256 KiB spectrogram costs ~64 reads one after
another, ~0.1x what the disk gives. With readahead on, each fault reads ``read_ahead_kb`` around it
instead (8 MiB on a typical disk), which wastes the disk on bytes nobody asked for.

What this does: a value is looked up with a cursor, which reads only the leaf page and the value's first
page. LMDB keeps a large value contiguous in overflow pages and the leaf node holds their page number, so
where the value lies in the map is known before its pages are touched. If the lookup had to wait for the
disk, the kernel is asked for the value's whole range at once (``madvise(MADV_WILLNEED)``: asynchronous,
one large request). py-lmdb's preload then waits for that one read, and decoding copies
from the map as before (still one copy). A batch asks for every value's range before it copies the
first, so all of its reads are in flight together and the disk works at depth.

The hints never change what is read: the bytes still come through LMDB's own pointer, and this module
never dereferences an address it computed. A wrong, missing or unsupported hint (another platform,
another LMDB page layout, a damaged page) costs speed, never correctness.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter_ns

import lmdb
import numpy as np

NODE_HEADER = struct.Struct("=HHHH")  # LMDB's MDB_node: data size (lo, hi), flags, key size; the key follows
PAGE_HEADER = struct.Struct("=QHH")   # MDB_page: page number, pad, flags
PGNO = struct.Struct("=Q")            # a big value's node holds the page number of its overflow pages
F_BIGDATA, P_LEAF = 0x01, 0x02
PAGE_HEADER_SIZE = 16                 # bytes of MDB_page before a big value in its first overflow page
OS_PAGE = mmap.PAGESIZE
MADV_WILLNEED = 3
COLD_NS = 10_000  # a lookup slower than this read the value's first page from the disk (a cached page: ~1 us)


def _libc_madvise():
    """madvise from the C library, or None where it is not there to call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).madvise  # ctypes lets other threads run during the call
    except (OSError, AttributeError):
        return None


_MADVISE = _libc_madvise()


def address(view: memoryview) -> int:
    """Where a buffer's bytes are in this process's memory (numpy reads it without touching the bytes)."""
    return np.frombuffer(view, np.uint8).__array_interface__["data"][0]


HINT_THREADS = 16  # a batch's lookups run in this many threads: each waits on its values' first pages


def _pool() -> ThreadPoolExecutor:
    """This process's threads for a batch's lookups (made again in a forked child, which has none)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(HINT_THREADS, thread_name_prefix="lmdbkit-prefetch"))
    return _POOL[1]


_POOL: tuple[int, ThreadPoolExecutor] | None = None


class Prefetcher:
    """Lookups of one environment's values that ask the disk for each large value in one request.

    ``begin`` starts a read transaction of the environment (a batch looks its values up in other threads,
    each in its own transaction).

    Whether a value is in the page cache is told by its lookup: LMDB's lookup reads the value's first page,
    so a lookup that took longer than ``COLD_NS`` waited for the disk, and only then are the value's pages
    asked for (a warm read costs nothing more than LMDB's own). A table without overflow pages (small items
    only) is read with plain ``txn.get``.
    """

    RECHECK = 4096  # gets between two looks at whether the table has overflow pages (it may still be written)

    def __init__(self, begin, page_size: int):
        # the map starts on an OS page boundary, so a page's address gives its number only when LMDB's pages
        # are OS pages (always, unless the database was made on a machine with other pages)
        self.enabled = _MADVISE is not None and page_size == OS_PAGE
        self._begin = begin
        self._large, self._until_look = False, 0

    def large(self, txn, db) -> bool:
        """Whether the table (the items table: one per environment) holds values in overflow pages; looked at
        again every RECHECK calls, as a database still being written may gain some."""
        self._until_look -= 1
        if self._until_look < 0:
            self._large = self.enabled and txn.stat(db)["overflow_pages"] > 0
            self._until_look = self.RECHECK
        return self._large

    def get(self, txn, db, key: bytes):
        """The value under ``key`` (a memoryview into the map when ``txn`` has buffers=True), or None."""
        if not self.large(txn, db):
            return txn.get(key, db=db)
        cursor = txn.cursor(db=db)
        t0 = perf_counter_ns()
        if not cursor.set_key(key):
            return None
        if perf_counter_ns() - t0 > COLD_NS:
            self.hint(cursor)
        return cursor.value()

    def get_many(self, txn, db, keys: list[bytes]) -> list:
        """The values under ``keys`` (None where absent), every large value's read requested before the first
        is taken from the map in ``txn``.

        Values are looked up in order until one is not in the page cache; the rest of the batch is then looked
        up by a pool of threads, since each lookup of a cold value waits for its first page: so a cold batch's
        reads are in flight together, and a warm batch costs no thread at all.
        """
        if not self.large(txn, db):
            return [txn.get(k, db=db) for k in keys]
        cursor = txn.cursor(db=db)
        for n, k in enumerate(keys):
            t0 = perf_counter_ns()
            if cursor.set_key(k) and perf_counter_ns() - t0 > COLD_NS:
                self.hint(cursor)
                rest = keys[n + 1:]
                if rest:
                    threads = min(HINT_THREADS, len(rest))
                    list(_pool().map(self._hint_keys, [(db, rest[i::threads]) for i in range(threads)]))
                break
        return [cursor.value() if cursor.set_key(k) else None for k in keys]

    def _hint_keys(self, job: tuple) -> None:
        """In a pool thread: ask for the values of some keys, then wait until they are in (py-lmdb's preload)."""
        db, keys = job
        try:
            with self._begin(buffers=True) as txn:
                cursor = txn.cursor(db=db)
                found = []
                for k in keys:
                    t0 = perf_counter_ns()
                    if cursor.set_key(k):
                        if perf_counter_ns() - t0 > COLD_NS:
                            self.hint(cursor)
                        found.append(k)
                for k in found:  # wait for them here, in parallel with the other threads
                    cursor.set_key(k)
                    cursor.value()
        except lmdb.Error:
            pass  # e.g. no free reader slot: the values are still read, one page at a time

    def span(self, cursor) -> tuple[int, int] | None:
        """(address in the map, length) of the overflow pages holding the cursor's value, or None for a value
        kept in its leaf page (a small one) or a node this reading of LMDB's layout does not recognise."""
        node = self._node(cursor)
        if node is None:
            return None
        page, leaf, first, size = node
        return page + (first - leaf) * OS_PAGE, PAGE_HEADER_SIZE + size

    def file_range(self, cursor) -> tuple[int, int] | None:
        """(offset in data.mdb, length) of the cursor's value's bytes, or None as for ``span``."""
        node = self._node(cursor)
        return None if node is None else (node[2] * OS_PAGE + PAGE_HEADER_SIZE, node[3])

    def _node(self, cursor) -> tuple[int, int, int, int] | None:
        """(address of the leaf page, its page number, first overflow page of the value, value length)."""
        key = cursor.key()
        at, ksize = address(key), len(key)
        page = at - at % OS_PAGE
        if at - NODE_HEADER.size < page + PAGE_HEADER_SIZE or at + ksize + PGNO.size > page + OS_PAGE:
            return None  # read only bytes of the leaf page that holds the key (mapped, and just read by LMDB)
        lo, hi, flags, node_ksize = NODE_HEADER.unpack(ctypes.string_at(at - NODE_HEADER.size, NODE_HEADER.size))
        if not flags & F_BIGDATA or node_ksize != ksize:
            return None
        leaf, _, page_flags = PAGE_HEADER.unpack(ctypes.string_at(page, PAGE_HEADER.size))
        if not page_flags & P_LEAF:
            return None
        return page, leaf, PGNO.unpack(ctypes.string_at(at + ksize, PGNO.size))[0], lo | hi << 16

    def hint(self, cursor) -> bool:
        """Ask for all the pages of the cursor's value at once if it spans several. Returns whether it asked."""
        found = self.span(cursor)
        if found is None or found[1] <= OS_PAGE:
            return False  # kept in its leaf page, or one page: LMDB's lookup has read it already
        start, length = found
        _MADVISE(ctypes.c_void_p(start), length, MADV_WILLNEED)
        return True
