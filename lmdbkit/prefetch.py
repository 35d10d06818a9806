"""Large values read from disk as one request each, and a batch's requests in flight together.

Why it is needed: LMDB hands out values as pointers into its memory map, and py-lmdb touches every 4 KiB
page of a value before it returns it (its ``preload``, so that page faults happen without the GIL). With
the map opened ``readahead=False`` (MADV_RANDOM, right for small items) each touched page that is not in
the page cache is its own synchronous 4 KiB read: a ~256 KiB spectrogram costs ~64 reads one after
another, ~0.1x what the disk gives. With readahead on, each fault reads ``read_ahead_kb`` around it
instead (8 MiB on a typical disk), which wastes the disk on bytes nobody asked for.

What this does: a value is looked up with a cursor, which reads only the leaf page and the value's first
page. LMDB keeps a large value contiguous in overflow pages and the leaf node holds their page number, so
where the value lies in the map is known before its other pages are touched. If the lookup had to wait for
the disk, the kernel is asked for the value's whole range at once (``madvise(MADV_WILLNEED)``:
asynchronous, one large request). py-lmdb's preload then waits for that one read, and decoding copies from
the map as before (still one copy). In a finished database the leaf pages met this way are remembered, so
while reads keep going to the disk, each next value is asked for (first page too) before LMDB looks it up:
one request per value instead of two in a row. A batch's lookups run in a pool of threads, so all of its
reads are in flight together and the disk works at depth.

A packed table (format 2, ``runs``) is looked up by range (its keys are each run's last index), and its few
leaf pages stay cached; so there the disk is told cold by a lookup or take of a run that was slow and met a
major page fault, and each cold run is then asked for whole, with the rest of its batch, the same way.

The hints never change what is read: the bytes still come through LMDB's own pointer. This module reads
only bytes of leaf pages inside those pages, at addresses LMDB gave (a key's) in a map that does not move
(remembered leaves are only kept for finished databases read without a lock, and dropped if the map is
ever remapped). A wrong, missing or unsupported hint (another platform, another LMDB page layout, a
damaged page) costs speed, never correctness.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from time import perf_counter_ns

import lmdb
import numpy as np

from .speedups import C as _C

NODE_HEADER = struct.Struct("=HHHH")  # LMDB's MDB_node: data size (lo, hi), flags, key size; the key follows
PAGE_HEADER = struct.Struct("=QHHHH")  # MDB_page: page number, pad, flags, lower and upper bounds of free space
PGNO = struct.Struct("=Q")            # a big value's node holds the page number of its overflow pages
F_BIGDATA, P_LEAF = 0x01, 0x02
PAGE_HEADER_SIZE = 16                 # bytes of MDB_page before a big value in its first overflow page
OS_PAGE = mmap.PAGESIZE
MADV_WILLNEED = 3
COLD_NS = 10_000  # a lookup slower than this read the value's first page from the disk (a cached page: ~1 us)
WARM_AFTER = 8  # fast reads in a row that turn a packed table's reads warm again (see Prefetcher._saw)


def timed_lookups(find, take, keys: list, cold_ns: int) -> tuple[list, int, int]:
    """``take()`` if ``find(key)`` else None for each key (a cursor's set_range and item), each lookup and take
    timed together; it stops after the first that took more than ``cold_ns``: (values, that one's position,
    its ns), or (values, -1, 0). ``speedups.C.timed_lookups`` is the same in C."""
    out, now = [], perf_counter_ns
    for n, k in enumerate(keys):
        t0 = now()
        out.append(take() if find(k) else None)
        waited = now() - t0
        if waited > cold_ns:
            return out, n, waited
    return out, -1, 0


def _lookups():
    return _C.timed_lookups if _C is not None else timed_lookups


def major_faults() -> tuple[int, int]:
    """(pid, page faults this process waited on the disk for so far): (pid, 0) where that is not counted."""
    try:
        import resource
        return os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    except (ImportError, OSError):
        return os.getpid(), 0


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


class Leaves:
    """Where the leaf pages of the items table are, in a map that never moves (a finished database read
    without a lock): learned from the lookups that went to the disk. Knowing a key's leaf, the whole range
    of a value (first page included) is asked for before LMDB's lookup reads its first page: one disk
    request for a cold value instead of two in a row.
    """

    def __init__(self):
        self._pages: list[tuple[bytes, bytes, int, int]] = []  # (first key, last key, address, page number)
        self._known: set[int] = set()
        self._lock = threading.Lock()  # the pool's threads learn too

    def learn(self, page: int) -> None:
        """Remember the leaf page at this address (its first and last keys)."""
        if page in self._known:
            return
        n = _keys_in_leaf(page)
        first, last = (_leaf_node(page, 0), _leaf_node(page, n - 1)) if n else (None, None)
        if first is not None and last is not None:
            number = PAGE_HEADER.unpack(ctypes.string_at(page, PAGE_HEADER.size))[0]
            with self._lock:
                if page not in self._known:
                    self._known.add(page)
                    bisect.insort(self._pages, (first[0], last[0], page, number))

    def span(self, key: bytes, ranged: bool = False) -> tuple[int, int] | None:
        """(address, length) of the overflow pages of the value under ``key`` (``ranged``: under the first key
        at or after it), if its leaf is known."""
        i = bisect.bisect_right(self._pages, key, key=itemgetter(0)) - 1
        if i < 0 or len(key) != KEY_SIZE:
            return None
        first, last, page, number = self._pages[i]
        if not first <= key <= last:
            return None
        if ranged:  # a packed table's keys are its runs' last indices: the first node at or after the key
            node = _first_at_or_after(page, key)
        else:  # the items table's keys are consecutive integers, so a key's node is at its distance from the first
            node = _leaf_node(page, int.from_bytes(key, "big") - int.from_bytes(first, "big"))
        if node is None or (node[0] != key and not ranged) or node[1] is None:
            return None
        _, first_page, size = node
        return page + (first_page - number) * OS_PAGE, PAGE_HEADER_SIZE + size


KEY_SIZE = 8  # the items table's keys: 8-byte big-endian indices
NODE = struct.Struct("=HHHH8sQ")  # a node with an 8-byte key and a big value: sizes, flags, key, page


def _keys_in_leaf(page: int) -> int:
    """How many nodes the leaf page at this address holds (0 if it does not look like a leaf)."""
    _, _, flags, lower, upper = PAGE_HEADER.unpack(ctypes.string_at(page, PAGE_HEADER.size))
    if not flags & P_LEAF or not PAGE_HEADER_SIZE <= lower <= upper <= OS_PAGE:
        return 0
    return (lower - PAGE_HEADER_SIZE) // 2


def _leaf_node(page: int, j: int) -> tuple[bytes, int | None, int] | None:
    """(key, first overflow page or None for a small value, value length) of node j of a leaf page whose keys
    are KEY_SIZE bytes; None if there is no such node. Reads only bytes inside the page."""
    if not 0 <= j < _keys_in_leaf(page):
        return None
    ptr = struct.unpack("=H", ctypes.string_at(page + PAGE_HEADER_SIZE + 2 * j, 2))[0]
    if not PAGE_HEADER_SIZE <= ptr <= OS_PAGE - NODE.size:
        return None
    lo, hi, flags, ksize, key, pgno = NODE.unpack(ctypes.string_at(page + ptr, NODE.size))
    if ksize != KEY_SIZE:
        return None
    return key, pgno if flags & F_BIGDATA else None, lo | hi << 16


def _first_at_or_after(page: int, key: bytes) -> tuple[bytes, int | None, int] | None:
    """``_leaf_node`` of the first node of a leaf page whose key is at or after ``key`` (binary search)."""
    lo, hi = 0, _keys_in_leaf(page)
    while lo < hi:
        mid = (lo + hi) // 2
        node = _leaf_node(page, mid)
        if node is None:
            return None
        if node[0] < key:
            lo = mid + 1
        else:
            hi = mid
    return _leaf_node(page, lo)


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

    def __init__(self, begin, page_size: int, *, finished: bool = False):
        # the map starts on an OS page boundary, so a page's address gives its number only when LMDB's pages
        # are OS pages (always, unless the database was made on a machine with other pages)
        self.enabled = _MADVISE is not None and page_size == OS_PAGE
        self._begin = begin
        self._large, self._until_look = False, 0
        # a finished database read without a lock: its map never moves (leaf addresses stay good), and the
        # pool's read transactions take none of the reader slots that an unfinished database's readers share
        self.finished = finished
        self.leaves = Leaves() if finished and self.enabled else None
        self._cold = False  # whether the last lookup went to the disk (so the next one likely will)
        self._faults = major_faults()  # for packed runs: see _value
        self._waited = 0  # ns the last lookup took
        self._fast = 0  # fast reads in a row while cold

    def large(self, txn, db) -> bool:
        """Whether the table (the items table: one per environment) holds values in overflow pages; looked at
        again every RECHECK calls, as a database still being written may gain some."""
        self._until_look -= 1
        if self._until_look < 0:
            self._large = self.enabled and txn.stat(db)["overflow_pages"] > 0
            self._until_look = self.RECHECK
        return self._large

    def get(self, txn, db, key: bytes, cursor=None):
        """The value under ``key`` (a memoryview into the map when ``txn`` has buffers=True), or None; ``cursor``:
        one of ``txn`` on ``db`` to use (else a new one)."""
        if not self.large(txn, db):
            return txn.get(key, db=db)
        cursor = txn.cursor(db=db) if cursor is None else cursor
        if not self._cold:  # _lookup's warm case, inline, as get_run's (a single read's every call counts)
            t0 = perf_counter_ns()
            if not cursor.set_key(key):
                return None
            if perf_counter_ns() - t0 > COLD_NS:  # it read the value's first page from the disk: ask for the rest
                self._cold = True
                self.hint(cursor)
            return cursor.value()
        return cursor.value() if self._lookup(cursor, key) else None

    def get_run(self, txn, db, key: bytes, cursor=None):
        """(key, value) of the first key at or after ``key`` (a packed table's run, see ``runs``), or None;
        ``cursor``: one of ``txn`` on ``db`` to use (else a new one)."""
        cursor = txn.cursor(db=db) if cursor is None else cursor
        if not self._cold:  # timed_lookups for one key, inline: through it a warm single read took 0.3-0.5 us more
            t0 = perf_counter_ns()
            found = cursor.item() if cursor.set_range(key) else None
            waited = perf_counter_ns() - t0
            if waited > COLD_NS:  # (a fast read leaves warm as it is)
                self._saw(waited)
            return found
        self.large(txn, db)  # whether hints can help
        if not self._lookup(cursor, key, ranged=True):
            return None
        return cursor.key(), self._value(cursor)

    def get_many(self, txn, db, keys: list[bytes], *, ranged: bool = False) -> list:
        """The values under ``keys`` (None where absent), every large value's read requested before the first
        is taken from the map in ``txn``; ``ranged``: (key, value) of the first key at or after each (runs).

        Values are looked up (and warm ones taken) in order until one is not in the page cache; the rest of the
        batch is then looked up before any of it is taken, in a finished database by a pool of threads, since
        each lookup of a cold value may wait for the disk: so a cold batch's reads are in flight together, and
        a warm batch costs no thread and one lookup a value.
        """
        if not self.large(txn, db) and not ranged:
            return [txn.get(k, db=db) for k in keys]
        if ranged:
            return self._cold_runs(txn, db, keys) if self._cold and keys else self._runs(txn, db, keys)
        cursor = txn.cursor(db=db)
        out = []
        for n, k in enumerate(keys):
            if not self._lookup(cursor, k):
                out.append(None)
                continue
            if self._cold:  # the rest likely waits for the disk too: ask for all of it before taking any
                self._ask(cursor, db, keys[n + 1:], False)
                return out + [cursor.value() if cursor.set_key(k) else None for k in keys[n:]]
            out.append(cursor.value())  # a warm value: taken where the lookup left the cursor
        return out

    def _ask(self, cursor, db, keys: list[bytes], ranged: bool) -> None:
        """Look up (so ask the disk for) the values of ``keys``: in a finished database in a pool of threads,
        each then waiting for its values, so that the reads are in flight together."""
        if self.finished and keys:
            threads = min(HINT_THREADS, len(keys))
            list(_pool().map(self._hint_keys, [(db, keys[i::threads], ranged) for i in range(threads)]))
        else:
            for k in keys:
                self._lookup(cursor, k, ranged)

    def _cold_runs(self, txn, db, keys: list[bytes]) -> list:
        """get_many(ranged=True) while the disk seems cold: the first run is read (asked for whole) and timed;
        if it still waited, the rest of the batch is asked for before any is taken, else read as warm. The
        takes after the asking do not count as warm (the asking made them fast): the next batch starts cold."""
        cursor = txn.cursor(db=db)
        first = (cursor.key(), self._value(cursor)) if self._lookup(cursor, keys[0], True) else None
        rest = keys[1:]
        if not self._cold:
            return [first] + self._runs(txn, db, rest)
        self._ask(cursor, db, rest, True)
        self._cold = True
        return [first] + [cursor.item() if cursor.set_range(k) else None for k in rest]

    def _runs(self, txn, db, keys: list[bytes]) -> list:
        """get_many(ranged=True) while the disk seems warm, in as few steps a key as possible: each lookup and
        take timed together, until one is slow and met a major page fault (then get_many goes on, cold)."""
        cursor = txn.cursor(db=db)
        find, take, lookups, out = cursor.set_range, cursor.item, _lookups(), []
        while True:  # up to a slow read, which _saw judges
            got, slow, waited = lookups(find, take, keys, COLD_NS)
            out += got
            if slow < 0:
                return out
            self._saw(waited)
            keys = keys[slow + 1:]
            if self._cold:
                return out + self.get_many(txn, db, keys, ranged=True)

    def _lookup(self, cursor, key: bytes, ranged: bool = False) -> bool:
        """Put the cursor on ``key`` (False if absent), first asking the disk for the value's pages when the
        last lookup went to the disk and the key's leaf is known, else after a lookup that went to the disk.

        ``ranged``: on the first key at or after ``key`` (a packed table's run). py-lmdb touches a run's pages in
        the lookup or in taking the value; either counts as cold only when it was slow and the process met a major
        page fault (``_value``), and then the next runs are asked for as well."""
        asked = False
        if self._cold and self.leaves is not None:
            found = self.leaves.span(key, ranged)
            if found is not None:
                asked = self._advise(*found)
        t0 = perf_counter_ns()
        if not (cursor.set_range(key) if ranged else cursor.set_key(key)):
            return False
        self._waited = perf_counter_ns() - t0  # the lookup's own time, not the hint's
        slow = self._waited > COLD_NS and (not ranged or self._faulted())
        self._cold = slow or (ranged and self._cold)
        if self._cold and not asked and (not ranged or self._large):
            self.hint(cursor)
        return True

    def _value(self, cursor):
        """The value the last ``_lookup`` put the cursor on, noting (``_saw``) how long reading it took: that
        lookup's own time, not its hint's, and the take (py-lmdb touches each of the value's pages)."""
        t0 = perf_counter_ns()
        value = cursor.value()
        self._saw(self._waited + perf_counter_ns() - t0)
        return value

    def _saw(self, waited: int) -> None:
        """Note how long a read of a packed run took (ns): warm turns cold on a slow read whose process met a
        major page fault since the last look (a slow read alone does not tell: the first touch of a cached page
        in a process is a minor fault, ~1 us a page, and a scheduler pause looks the same); cold stays cold
        while reads wait (a page that a hint is reading in is waited for as a minor fault) and turns warm after
        WARM_AFTER fast reads in a row (one run read before, amid cold ones, says little)."""
        if waited > COLD_NS and (self._cold or self._faulted()):
            self._cold, self._fast = True, 0
        elif self._cold:
            self._fast += 1
            self._cold = self._fast < WARM_AFTER

    def _faulted(self) -> bool:
        """Whether this process met a major page fault since the last time this was asked."""
        before, self._faults = self._faults, major_faults()
        return before[0] == self._faults[0] and self._faults[1] > before[1]

    def _hint_keys(self, job: tuple) -> None:
        """In a pool thread: ask for the values of some keys, then wait until they are in (py-lmdb's preload)."""
        db, keys, ranged = job
        try:
            with self._begin(buffers=True) as txn:
                cursor = txn.cursor(db=db)
                found = [k for k in keys if self._lookup(cursor, k, ranged)]
                for k in found:  # wait for them here, in parallel with the other threads
                    cursor.set_range(k) if ranged else cursor.set_key(k)
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
        leaf, _, page_flags, _, _ = PAGE_HEADER.unpack(ctypes.string_at(page, PAGE_HEADER.size))
        if not page_flags & P_LEAF:
            return None
        return page, leaf, PGNO.unpack(ctypes.string_at(at + ksize, PGNO.size))[0], lo | hi << 16

    def hint(self, cursor) -> bool:
        """Ask for all the pages of the cursor's value at once if it spans several. Returns whether it asked."""
        node = self._node(cursor)
        if node is None:
            return False
        page, leaf, first, size = node
        if self.leaves is not None:
            self.leaves.learn(page)
        return self._advise(page + (first - leaf) * OS_PAGE, PAGE_HEADER_SIZE + size)

    @staticmethod
    def _advise(start: int, length: int) -> bool:
        if length <= OS_PAGE:
            return False  # one page: LMDB's lookup reads it anyway
        _MADVISE(ctypes.c_void_p(start), length, MADV_WILLNEED)
        return True
