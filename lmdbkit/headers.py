"""Headers seen before: what the decoder made of an item's header, kept for the next item with the same one.

An item's header (``codec``) is msgpack ``[key, fields, array descriptors]``. Items of one schema whose
metadata repeats (a label, a category) have the same header but for its key, so the decoder keys a memo by
the header's bytes after the key (``after_key``) and reads the key itself (``key``): such an item skips
msgpack and the descriptors' checks.
"""

from __future__ import annotations

from typing import Callable

_NIL, _FIXARRAY3, _STR8, _STR16 = 0xC0, 0x93, 0xD9, 0xDA


class Memo:
    """``seen`` maps a header's bytes after its key to what the decoder made of it: (fields, checked array
    descriptors, payload bytes they reach, and ``plain(descriptors)``: how a single read copies its arrays out
    when all of them are the common case, else None; see ``codec.decode_seen``).

    Only flat, uncompressed headers are kept (a metadata list, dict or nested array is decoded each time; a
    compressed array's length is the data's). At SEEN_MAX headers the memo starts again. Items whose
    metadata never repeats (an utterance id, a duration), or that it does not keep, would only pay for the
    lookups: after MISSES_MAX misses in a row it rests for the next REST parses, then starts again."""

    SEEN_MAX, MISSES_MAX, REST = 1024, 256, 1 << 16
    __slots__ = ("seen", "misses", "resting", "plain")

    def __init__(self, plain: Callable[[list], tuple | None] = lambda checked: None):
        self.seen: dict[bytes, tuple[dict, list, int, tuple | None]] = {}
        self.misses = self.resting = 0
        self.plain = plain

    def remember(self, rest: bytes | None, fields: dict, checked: list, flat: bool) -> None:
        """Count a miss, and keep the header (``rest``: its bytes after the key) if it may be kept: flat and
        uncompressed."""
        self.misses += 1
        if self.misses > self.MISSES_MAX:
            self.seen.clear()
            self.misses, self.resting = 0, self.REST
            return
        if rest and flat and not any(d[3] for d in checked):
            self.keep(rest, fields, checked)

    def keep(self, rest: bytes, fields: dict, checked: list) -> None:
        """Keep a flat, uncompressed header (a batch's, which knows its headers repeat: no miss counted)."""
        if len(self.seen) >= self.SEEN_MAX:
            self.seen.clear()
        self.seen[rest] = (dict(fields), checked, max((d[4] + d[5] for d in checked), default=0), self.plain(checked))


def after_key(buf, begin: int, end: int) -> int:
    """Where the key ends in the header ``buf[begin:end]``, or 0 when the header is not laid out as lmdbkit
    writes it (then it is unpacked in full, which names what is wrong)."""
    if end < begin + 2 or buf[begin] != _FIXARRAY3:
        return 0
    b = buf[begin + 1]
    if b == _NIL:
        at = begin + 2
    elif 0xA0 <= b <= 0xBF:  # a str of up to 31 bytes
        at = begin + 2 + b - 0xA0
    elif b == _STR8 and end > begin + 2:
        at = begin + 3 + buf[begin + 2]
    elif b == _STR16 and end > begin + 3:
        at = begin + 4 + (buf[begin + 2] << 8 | buf[begin + 3])
    else:
        return 0
    return at if at < end else 0


def key(buf, begin: int, at: int) -> str | None:
    """The key of the header at ``begin`` that ends at ``at`` (``after_key``); UnicodeDecodeError for bytes that
    are not UTF-8."""
    b = buf[begin + 1]
    if b == _NIL:
        return None
    skip = 2 if b <= 0xBF else 3 if b == _STR8 else 4
    return bytes(buf[begin + skip:at]).decode()
