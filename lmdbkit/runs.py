"""Small items packed in runs (format 2): several encoded items in one LMDB value.

LMDB stores a value of up to ~2 KiB inside a 4 KiB leaf page beside its key and node header, and a larger
one in whole pages of its own. So a 1 KiB item fills only three quarters of a page (three fit), and an
item a little over 4 KiB takes two pages. Packed, consecutive items share a value, a *run*, closed when its
pages are nearly full: 15 items of 1 KiB fill four pages to 99%.

Each item in a run is a whole format-1 item (``codec``: its own header and checksum), so everything that
decodes, verifies or batches items works on the slices of a run as on values of their own. The items
table's key of a run is the 8-byte big-endian index of its *last* item: a cursor's ``set_range`` on an
item's index lands on its run in one lookup. Layout of a run (little-endian)::

    0   magic  b"LR"
    2   u8     run format version (2)
    3   u8     flags (reserved, 0)
    4   u32    n, the items in the run
    8   u64    xxh3-64 checksum of the table of starts
    16  u32    starts[n + 1]: where item j starts, from the run's start (and where the last one ends)
    ..  zero bytes up to a multiple of 64 (item 0 starts there; a large item keeps its payload's alignment)
    ..  the items, one after another
"""

from __future__ import annotations

import struct
from typing import Callable

import xxhash

from . import codec
from .errors import CorruptItemError
from .speedups import C as _C

MAGIC = b"LR"
VERSION = 2
_HEAD = struct.Struct("<2sBBIQ")
HEAD_SIZE = _HEAD.size  # 16
_SPAN = struct.Struct("<II")  # where item j starts and where it ends (item j + 1 starts)
PAGE, PAGE_HEADER = 4096, 16  # LMDB's page, and the header before a large value in its first page
PACK_MAX = 16 << 10  # Writer(pack=None) packs a database whose first item encodes to at most this
RUN_MAX = 64 << 10   # a run takes no item that would grow it past this (a bigger item has a run of its own)
FULL = 1 - 1 / 32    # a run is closed once its pages are this full


def header_size(n: int) -> int:
    """Bytes before a run's first item: the head, the table of starts and the pad to a multiple of 64."""
    return -(-(_table_end(n)) // 64) * 64


def _table_end(n: int) -> int:
    return HEAD_SIZE + 4 * (n + 1)


def pack(items: list) -> bytes:
    """One run of encoded items (at least one)."""
    n, h = len(items), header_size(len(items))
    starts = [h]
    for x in items:
        starts.append(starts[-1] + len(x))
    table = struct.pack(f"<{n + 1}I", *starts)
    head = _HEAD.pack(MAGIC, VERSION, 0, n, xxhash.xxh3_64_intdigest(table))
    return b"".join([head, table, bytes(h - HEAD_SIZE - len(table)), *items])


def closed(n: int, payload: int) -> bool:
    """Whether a run of n items of ``payload`` bytes in all is full enough to close (its pages FULL full, or
    RUN_MAX reached)."""
    size = PAGE_HEADER + header_size(n) + payload
    pages = -(-size // PAGE)
    return size >= FULL * pages * PAGE or size >= RUN_MAX


def still_open(items: list) -> bool:
    """Whether a run of these items is not yet ``closed`` (a writer extends it at its next commit)."""
    return not closed(len(items), sum(map(len, items)))


def fits(n: int, payload: int, item: int) -> bool:
    """Whether an item of ``item`` bytes may join a run of n items of ``payload`` bytes."""
    return n == 0 or PAGE_HEADER + header_size(n + 1) + payload + item <= RUN_MAX


def split(sizes: list[int]) -> list[int]:
    """How many items each run takes, for consecutive items of these sizes from a run's start. The last run
    may be left open (not ``closed``): the writer extends it at its next commit."""
    counts, n, payload = [], 0, 0
    for s in sizes:
        if not fits(n, payload, s):
            counts.append(n)
            n, payload = 0, 0
        n, payload = n + 1, payload + s
        if closed(n, payload):
            counts.append(n)
            n, payload = 0, 0
    if n:
        counts.append(n)
    return counts


def _corrupt(reason: str) -> CorruptItemError:
    return CorruptItemError(f"run of packed items: {reason}")


def count(run) -> int:
    """The items in a run, after checking its head."""
    try:
        n = codec.unpack_head(run, _HEAD, MAGIC, VERSION, "head")[3]
    except CorruptItemError as exc:
        raise _corrupt(exc.reason) from None
    if n == 0 or header_size(n) > len(run):
        raise _corrupt(f"{n} items do not fit its {len(run)} bytes")
    return n


def table_ok(run) -> bool:
    """Whether the table of starts matches its checksum."""
    n = count(run)
    return xxhash.xxh3_64_intdigest(memoryview(run)[HEAD_SIZE:_table_end(n)]) == _HEAD.unpack_from(run, 0)[4]


def item(run, last: int, i: int, verify: bool = False) -> memoryview:
    """Item ``i``'s bytes in the run whose last item is ``last``: a slice of ``run`` (no copy). This runs for
    every item read: the common case in as few steps as possible, ``_explain`` for the error."""
    try:
        magic, version, _flags, n, checksum = _HEAD.unpack_from(run, 0)
        j = i - last + n - 1
        if magic == MAGIC and version == VERSION and 0 <= j < n:
            start, end = _SPAN.unpack_from(run, HEAD_SIZE + 4 * j)
            if HEAD_SIZE + 4 * (n + 1) <= start <= end <= len(run) and (
                    not verify or xxhash.xxh3_64_intdigest(run[HEAD_SIZE:HEAD_SIZE + 4 * (n + 1)]) == checksum):
                return (run if type(run) is memoryview else memoryview(run))[start:end]
    except struct.error:
        pass
    _explain(run, last, i, verify)


def _explain(run, last: int, i: int, verify: bool) -> None:
    """Raise the precise CorruptItemError for an item that ``item`` could not take from its run."""
    n = count(run)
    j = i - (last - n + 1)
    if not 0 <= j < n:
        raise _corrupt(f"item {i} is not among its {n} items (the last is {last})")
    if verify and not table_ok(run):
        raise _corrupt("checksum mismatch in its table of item starts")
    start, end = _SPAN.unpack_from(run, HEAD_SIZE + 4 * j)
    raise _corrupt(f"item {i} spans bytes {start}..{end} of {len(run)}")


def in_found(found: tuple, i: int, verify: bool = False) -> memoryview:
    """``item`` for the (8-byte big-endian key, run) that a lookup found for index ``i``."""
    if _C is not None:
        try:
            view = _C.item_in_run(found, i)
            if not verify or _table_ok(found[1]):
                return view
        except ValueError:
            pass  # not the common case: ``item`` names what is wrong
    return item(found[1], int.from_bytes(found[0], "big"), i, verify)


def slices(found: list, indices: list[int], verify: bool = False) -> list:
    """``item`` for each (8-byte big-endian key, run) that a lookup found for each index (None stays None)."""
    if _C is not None:
        try:
            views = _C.items_in_runs(found, indices if type(indices) is list else list(indices))
            if not verify or all(f is None or _table_ok(f[1]) for f in found):
                return views
        except ValueError:
            pass  # one is not the common case: ``item`` names what is wrong
    return [None if f is None else item(f[1], int.from_bytes(f[0], "big"), i, verify)
            for f, i in zip(found, indices)]


class InRuns:
    """A batch's items in the (key, run)s that a ranged lookup found for them (none missing), sliced out only
    when Python asks for them: ``speedups.C.gather`` takes a whole batch straight from its runs. ``take(found,
    indices)`` slices them (``slices``, naming a damaged run's item)."""

    __slots__ = ("found", "indices", "_take", "_items")

    def __init__(self, found: list, indices: list[int], take: Callable[[list, list], list]):
        self.found, self.indices, self._take, self._items = found, list(indices), take, None

    def items(self) -> list[memoryview]:
        if self._items is None:
            self._items = self._take(self.found, self.indices)
        return self._items

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, b: int) -> memoryview:
        if self._items is not None:
            return self._items[b]
        return self._take([self.found[b]], [self.indices[b]])[0]

    def __iter__(self):
        return iter(self.items())


def _table_ok(run) -> bool:
    """``table_ok`` for a run whose head and table ``speedups.C`` has already taken."""
    head = _HEAD.unpack_from(run, 0)
    return xxhash.xxh3_64_intdigest(memoryview(run)[HEAD_SIZE:_table_end(head[3])]) == head[4]


def items(run, *, verify: bool = False) -> list[memoryview]:
    """Every item's bytes in a run, in order; CorruptItemError if its table is inconsistent."""
    n = count(run)
    if verify and not table_ok(run):
        raise _corrupt("checksum mismatch in its table of item starts")
    starts = struct.unpack_from(f"<{n + 1}I", run, HEAD_SIZE)
    if not (_table_end(n) <= starts[0] and all(a <= b for a, b in zip(starts, starts[1:])) and starts[-1] <= len(run)):
        raise _corrupt(f"its table of item starts {list(starts)[:8]} does not fit its {len(run)} bytes")
    view = memoryview(run)
    return [view[a:b] for a, b in zip(starts, starts[1:])]
