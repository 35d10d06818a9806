"""Integrity: decode every item, check checksums, the count, keys and secondary indexes; report bad keys."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from . import codec, store
from .errors import CorruptItemError
from .reader import Reader
from .writer import index_value

MAX_LISTED = 100


@dataclass
class Report:
    path: str
    count: int = 0
    items_checked: int = 0
    complete: bool = False
    problems: list[dict] = field(default_factory=list)   # {"key", "index", "problem"}
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str, *, key=None, index=None) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append({"key": key, "index": index, "problem": problem})
        else:
            self.truncated = True

    def to_dict(self) -> dict:
        return dict(asdict(self), ok=self.ok)

    def __str__(self) -> str:
        head = (f"{self.path}: {'OK' if self.ok else 'DAMAGED'} — {self.items_checked} of {self.count} items "
                f"checked{'' if self.complete else ' (database not marked complete)'}")
        lines = [head] + [f"  item {p['index']} key {p['key']!r}: {p['problem']}" for p in self.problems]
        if self.truncated:
            lines.append(f"  ... more problems (only the first {MAX_LISTED} are listed)")
        return "\n".join(lines)


def verify(path: str | os.PathLike, *, progress: bool = True) -> Report:
    """Check a whole database: every item decodes and matches its checksum, the count in the format record
    matches the items table, every key maps to the item that holds it, and every index entry agrees with
    its item. Never raises for damage: the report names each damaged item."""
    r = Reader(path, decode_to="numpy")
    rep = Report(str(path), count=len(r), complete=bool(r.meta.get("complete")))
    if r.legacy:
        rep.add("legacy pickle-in-LMDB database: no checksums to verify; convert it (lmdbkit convert legacy)")
        r.close()
        return rep
    h = r._handle()
    index_fields = r.index_fields
    expected_index: dict[str, dict[bytes, set[int]]] = {f: {} for f in index_fields}
    keys_of: dict[int, str] = {}
    bad: set[int] = set()
    with h.begin(buffers=True) as txn:
        seen = 0
        for kb, buf in tqdm(txn.cursor(db=h.db(store.ITEMS)), total=rep.count, disable=not progress, desc="verify"):
            i = store.unpack_index(kb)
            seen += 1
            key = None
            try:
                parsed = codec.parse(buf)
                key = parsed[2]  # known before the checksum, so a damaged payload is reported by key
                key, sample = codec.decode(buf, decode_to="numpy", verify=True, parsed=parsed)
            except CorruptItemError as exc:
                rep.add(exc.reason, key=key, index=i)
                bad.add(i)
                continue
            rep.items_checked += 1
            if i >= rep.count:
                rep.add(f"item beyond the recorded count {rep.count}", key=key, index=i)
            if key is not None:
                keys_of[i] = key
            for f in index_fields:
                try:
                    v = index_value(sample.get(f), field=f, key=key)
                except Exception as exc:
                    rep.add(f"indexed field {f!r}: {exc}", key=key, index=i)
                    continue
                expected_index[f].setdefault(v, set()).add(i)
        if seen != rep.count:
            rep.add(f"the format record says {rep.count} items, the items table holds {seen}")
        n_keys = 0
        for kb, vb in txn.cursor(db=h.db(store.KEYS)):
            n_keys += 1
            k, i = bytes(kb).decode(errors="replace"), store.unpack_index(vb)
            if keys_of.get(i, k) != k:
                rep.add(f"the keys table maps {k!r} here, but the item says its key is {keys_of.get(i)!r}", key=k, index=i)
            elif i >= rep.count:
                rep.add("the keys table points past the last item", key=k, index=i)
        if n_keys != rep.count:
            rep.add(f"the keys table holds {n_keys} keys for {rep.count} items")
        for f in index_fields:
            found: dict[bytes, set[int]] = {}
            for vb, ib in txn.cursor(db=h.db(store.index_db_name(f))):
                found.setdefault(bytes(vb), set()).add(store.unpack_index(ib))
            for v in set(found) | set(expected_index[f]):
                extra, missing = found.get(v, set()) - expected_index[f].get(v, set()), \
                    expected_index[f].get(v, set()) - found.get(v, set())
                for i in sorted((extra | missing) - bad)[:MAX_LISTED]:
                    what = "lists" if i in extra else "misses"
                    rep.add(f"index on {f!r} {what} this item under {json.loads(v)!r}", key=keys_of.get(i), index=i)
    r.close()
    return rep
