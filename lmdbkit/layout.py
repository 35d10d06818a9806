"""Batches of one layout, decoded together: every item's arrays copied straight from its buffer into its row of
one destination array per field (a batch tensor), the items' headers checked against the first's.

Items of one schema have the same fields and array descriptors, so a batch checks each item's header against
its first item's (``Layout``) instead of checking each descriptor again, and items whose header repeats but
for the key (a label, a category) share what was made of it. With ``speedups.C`` the items of a header met
before are checked (bounds, and checksums when verified) and copied in C, all together in one pass
(``_in_c``), straight from the runs of a packed database (``runs.InRuns``). ``lmdbkit.batch`` builds its
blocks on this; the item format itself is ``codec``'s.
"""

from __future__ import annotations

import os
from typing import Callable

import msgpack
import numpy as np
import xxhash

from .codec import (_MEMO, PREFIX_SIZE, DecodeTo, _Ctx, _checked, _complex32, _corrupt, _head, _header, _shift,
                    _torch, _walk, moved)
from .runs import InRuns
from .speedups import C as _C


class Layout:
    """The layout of a batch's first item, which decode_layout checks every other item against: items of one
    schema have the same fields and the same array descriptors (fields, kinds, dtypes, shapes, offsets; no
    compression). ``arrays`` holds the first's checked descriptors (see ``parse``), ``stored`` them as stored,
    ``first`` its fields (top-level arrays as None), ``order`` their names, ``need`` the payload bytes the
    arrays reach."""

    __slots__ = ("arrays", "stored", "first", "order", "need")

    def __init__(self, arrays: list, stored: list, first: dict):
        self.arrays, self.stored, self.first, self.order = arrays, stored, first, list(first)
        self.need = max((d[4] + d[5] for d in arrays), default=0)


def batch_layout(bufs: list) -> Layout | None:
    """The Layout of the first buffer, or None when one of its arrays is compressed. Raises CorruptItemError
    (without naming the item) for a malformed one: decode it alone to name it."""
    start, _, _, fields, stored = _header(bufs[0])
    arrays = _checked(stored, len(bufs[0]) - start)
    if any(d[3] for d in arrays):
        return None
    return Layout(arrays, stored, fields)


BATCH_LOOKS = 16  # items of a batch decode_layout looks up among the headers it met before it gives up
PWRITE_MIN = 64 << 10  # arrays from this size on go to a ``file`` destination by pwrite


def decode_layout(bufs: list, layout: Layout, dests: dict[str, np.ndarray], *, verify: bool | list[bool],
                  complex32: str = "complex64", decode_to: DecodeTo = "numpy",
                  file: tuple[int, dict[str, int]] | None = None) -> list[dict] | None:
    """Copy every item's arrays into row b of ``dests[field]`` (C-contiguous numpy arrays [n, ...] of the
    decoded dtype, see ``decoded_dtype``): one copy each, straight from the buffers. Returns each item's fields
    in their stored order, the top-level arrays as None (their values are in ``dests``), metadata decoded as
    ``decode`` does (arrays nested in it too); None as soon as an item's fields or array descriptors differ
    from the layout's (rows before it are filled: decode the batch item by item then). ``verify``: per item, or
    for all. Raises CorruptItemError (without naming the item) for a malformed one.

    Each item's header is unpacked once, here, and compared with the first's at C level: one pass per item;
    an item whose header (but for its key) an item before had is not unpacked at all.

    ``file``: (fd, {field: byte offset}) when ``dests`` are mappings of that file (shared memory): arrays of
    at least PWRITE_MIN bytes are then written with ``os.pwrite`` at their row's offset, so the kernel fills
    the file's pages without a page fault per 4 KiB in this process (and a full file system is an OSError,
    not a SIGBUS)."""
    names = {d[0] for d in layout.arrays}
    plain, written = [], []
    for d in layout.arrays:
        if d[2] == "complex32":
            continue
        if file is not None and d[5] >= PWRITE_MIN:
            written.append((file[1][d[0]], d[4], d[5]))
        else:
            plain.append((memoryview(dests[d[0]].reshape(-1).view(np.uint8)), d[4], d[5]))
    wide = [d for d in layout.arrays if d[2] == "complex32"]
    torch = _torch() if decode_to != "numpy" else None
    checks = verify if isinstance(verify, list) else [verify] * len(bufs)
    hash64, head_of = xxhash.xxh3_64_intdigest, _C.head if _C is not None else _head
    stored0, keys0, need = layout.stored, layout.first.keys(), layout.need
    low = min((d[4] for d in layout.arrays), default=0)
    meta_keys = [k for k in layout.order if k not in names]
    nested = (list, dict, msgpack.ExtType)
    metas: list = [None] * len(bufs)
    seen: dict[bytes, tuple[dict, int]] = {}  # the rest of a flat header after its key: (its fields, shift)
    hits = 0  # (a batch whose first items share no header likely shares none: it stops looking)

    def one(b: int, look: bool = False) -> bool:
        """Decode item b into metas[b] and its rows; False when its fields or descriptors differ. ``look``:
        look its header up among those met before, however the batch went so far."""
        nonlocal hits
        buf = bufs[b]
        if type(buf) is not memoryview:
            buf = memoryview(buf)
        size = len(buf)
        head = head_of(buf) if look or hits or b < BATCH_LOOKS else None
        hit = None if head is None else seen.get(head[3])
        if hit is not None:  # the same header as an item before, but for its key: the same fields and shift
            start, stored = head[0], head[1]
            fields, shift = hit
            hits += 1
        else:
            start, stored, _key, fields, arrays = _header(buf)  # (a malformed one raises its precise error)
            if fields.keys() != keys0:
                return False
            # C-level comparison; items of 64 KiB+ may differ in their offsets' alignment pad
            shift = 0 if arrays == stored0 else _shift(arrays, stored0)
            if shift is None:
                return False
            if head is not None and not any(type(fields[k]) in nested for k in meta_keys):
                seen[head[3]] = fields, shift  # flat: its items share this dict, which nothing changes
        at = start + shift  # where the first item's offsets point in this one
        if at + low < start or at + need > size:
            raise _corrupt(f"arrays run past the {size - start}-byte payload")
        if checks[b] and hash64(buf[PREFIX_SIZE:]) != stored:
            raise _corrupt("checksum mismatch")
        for dest, off, n in plain:
            dest[b * n:(b + 1) * n] = buf[at + off:at + off + n]  # the one copy
        for base, off, n in written:
            _pwrite_all(file[0], buf[at + off:at + off + n], base + b * n)  # the one copy, by the kernel
        for d in wide:
            _complex32(buf[at + d[4]:at + d[4] + d[5]], d[6], d[1], "numpy", None, dests[d[0]][b, ...], complex32)
        for k in meta_keys:
            v = fields[k]
            if type(v) in nested:  # metadata lists and dicts, and arrays nested in them
                fields[k] = _walk(v, _Ctx(buf, start, stored, checks[b], decode_to, torch, complex32), 0)
        metas[b] = fields
        return True

    if _C is not None and not written and not wide:
        shared = _in_c(bufs, checks, plain, layout, one, seen)
        if shared is not None:
            return shared or None
    if type(bufs) is InRuns:
        bufs = bufs.items()  # (``one`` reads them from here on)
    for b in range(len(bufs)):
        if metas[b] is None and not one(b):
            return None
    return metas


class _Differs(Exception):
    """An item's layout differs from the batch's (raised through ``C.gather``)."""


def _in_c(bufs: list, checks: list[bool], plain: list, layout: Layout, one: Callable[[int, bool], bool],
          seen: dict) -> list | bool | None:
    """decode_layout's items in C (``speedups``) when most share a flat header but for their key. A header the
    decoder's memo (``headers``) holds with the layout's descriptors (or with their offsets moved alike: another
    alignment pad) costs nothing more; the first item of each other header is decoded by ``one`` (which keeps it
    in ``seen``; the memo keeps it too). Every other item is then checked against its buffer's length (and its
    checksum where ``checks`` asks) and copied into its rows, in one pass over the batch in C (``C.gather``).
    Returns their fields, False when an item's layout differs, or None to go on item by item (headers that do
    not repeat, or nested ones, a checksum that does not match, which Python then names; the items ``one``
    decoded are done)."""
    memo, keys0, arrays0, done = _MEMO, layout.first.keys(), layout.arrays, []

    def resolve(b: int, r: bytes) -> tuple[dict, int] | None:
        """(fields, shift) of the header whose bytes after the key are ``r``, first met at item b."""
        hit = memo.seen.get(r)
        if hit is not None and hit[0].keys() == keys0:  # (items of 64 KiB+ differ in their arrays' alignment pad)
            shift = 0 if hit[1] == arrays0 else moved(hit[1], arrays0)
            if shift is not None:
                seen[r] = got = dict(hit[0]), shift  # (its items share this dict, which nothing changes)
                return got
        if 4 * (len(done) + 1) > len(bufs):
            return None  # few items share a header: item by item
        if not one(b, True):
            raise _Differs
        done.append(b)
        got = seen.get(r)
        if got is not None:
            memo.keep(r, got[0], [(*d[:4], d[4] + got[1], *d[5:]) for d in arrays0])
        return got

    if True in checks and False in checks:
        return None  # (items of databases verified and not: item by item)
    try:  # (a batch left in its runs is taken from them)
        items, indices = (bufs.found, bufs.indices) if type(bufs) is InRuns else (list(bufs), None)
        return _C.gather(items, indices, plain, layout.need, resolve, True in checks)
    except _Differs:
        return False
    except ValueError as exc:  # item b's arrays would run outside its payload
        b = exc.args[0]
        if type(b) is not int:
            raise
        raise _corrupt(f"arrays run past the {len(bufs[b]) - _C.head(bufs[b])[0]}-byte payload") from None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done
