"""Integrity: decode every item, check checksums, the count, keys and secondary indexes; report damage.

``verify(path)`` runs the check in a child process: damaged B-tree pages can make LMDB abort the process
that reads them (``Assertion 'IS_LEAF(mp)' failed``), and the check must outlive that to report it. The
child streams what it finds as JSON lines; if it dies, the report says where and how, and is still a
report: ``verify`` never raises for damage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import lmdb
from .progress import tqdm

from . import codec, runs, store
from .errors import CorruptItemError, LmdbkitError
from .reader import Reader
from .writer import field_value, index_value

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
        lines = [head]
        for p in self.problems:
            where = f"  item {p['index']} key {p['key']!r}: " if p["index"] is not None or p["key"] is not None else "  "
            lines.append(where + p["problem"])
        if self.truncated:
            lines.append(f"  ... more problems (only the first {MAX_LISTED} are listed)")
        return "\n".join(lines)


def verify(path: str | os.PathLike, *, progress: bool = True, isolate: bool = True) -> Report:
    """Check a whole database: every item decodes and matches its checksum, the count in the format record
    matches the items table, every key maps to the item that holds it, and every index entry agrees with
    its item. Never raises for damage (a missing path or a folder that is no database raises): the report
    names each damaged item, a file cut short, or the place where LMDB gave up.

    isolate: run the check in a child process (default), so that damage which makes LMDB abort is reported
    instead of ending this process.
    """
    path = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    store.check_exists(path)  # usage errors (no such path, not a database folder) raise here
    if not isolate:
        return _check(path, _Events(progress=progress))
    return _check_in_child(path, progress)


class _Events:
    """Where the check reports: straight into a Report (in process), or as JSON lines to a parent."""

    def __init__(self, *, progress: bool = False, stream=None):
        self.stream, self.progress, self.bar = stream, progress, None
        self.report: Report | None = None

    def start(self, rep: Report) -> None:
        self.report = rep
        if self.stream is not None:
            self._send(start={"count": rep.count, "complete": rep.complete})
        else:
            self.bar = tqdm(total=rep.count, disable=not self.progress, desc="verify")

    def problem(self, problem: str, *, key=None, index=None) -> None:
        self.report.add(problem, key=key, index=index)
        if self.stream is not None:
            self._send(problem={"problem": problem, "key": key, "index": index})

    def checked(self, n: int) -> None:
        if self.stream is not None:
            self._send(checked=n)
        elif self.bar is not None:
            self.bar.n = n
            self.bar.refresh()

    def done(self) -> None:
        if self.stream is not None:
            self._send(done={"items_checked": self.report.items_checked})
        elif self.bar is not None:
            self.bar.close()

    def _send(self, **event) -> None:
        self.stream.write(json.dumps(event) + "\n")
        self.stream.flush()


def _check(path: str, ev: _Events) -> Report:
    rep = Report(str(path))
    try:
        r = Reader(path, decode_to="numpy")
    except LmdbkitError as exc:  # a file cut short, a broken meta page: damage, reported
        ev.start(rep)
        ev.problem(str(exc))
        ev.done()
        return rep
    try:
        rep.count, rep.complete = len(r), bool(r.meta.get("complete"))
        ev.start(rep)
        if r.legacy:
            ev.problem("legacy pickle-in-LMDB database: no checksums to verify; convert it (lmdbkit convert legacy)")
        else:
            _check_tables(r, rep, ev)
    finally:
        r.close()
    ev.done()
    return rep


def _check_tables(r: Reader, rep: Report, ev: _Events) -> None:
    h = r._handle()
    index_fields = r.index_fields
    expected_index: dict[str, dict[bytes, set[int]]] = {f: {} for f in index_fields}
    keys_of: dict[int, str] = {}
    bad: set[int] = set()
    step = max(1, rep.count // 200)
    packed = store.packed(r.meta)
    with h.begin(buffers=True) as txn:
        seen, last = 0, -1
        try:
            for kb, value in txn.cursor(db=h.db(store.ITEMS)):
                if len(kb) != 8:
                    ev.problem(f"an items-table key of {len(kb)} bytes (expected 8): the table is damaged")
                    continue
                i = store.unpack_index(kb)
                if i <= last:  # a damaged tree can loop; never walk it forever
                    ev.problem(f"items table out of order (item {i} after item {last}): the B-tree is damaged; "
                               "stopped walking it", index=i)
                    break
                if not packed:
                    items = [(i, value)]
                else:
                    try:
                        parts = runs.items(value, verify=True)
                    except CorruptItemError as exc:
                        ev.problem(f"{exc.reason}: the items {last + 1}..{i} are unreadable", index=i)
                        bad.update(range(last + 1, i + 1))
                        seen += i - last
                        last = i
                        continue
                    if i - len(parts) != last:
                        ev.problem(f"the run of items {i - len(parts) + 1}..{i} follows item {last}: the items "
                                   "table is damaged", index=i)
                    items = list(enumerate(parts, start=i - len(parts) + 1))
                last = i
                for j, buf in items:
                    seen += 1
                    if seen % step == 0:
                        ev.checked(seen)
                    _check_item(j, buf, rep, ev, index_fields, expected_index, keys_of, bad)
        except lmdb.Error as exc:
            ev.problem(f"LMDB reports damage in the items table after item {last} ({exc}); the items after it "
                       "could not be read", index=last + 1)
            seen = None
        ev.checked(rep.items_checked)
        if seen is not None and seen != rep.count:
            ev.problem(f"the format record says {rep.count} items, the items table holds {seen}")
        _check_keys(txn, h, rep, ev, keys_of, packed)
        for f in index_fields:
            _check_index(txn, h, f, expected_index[f], keys_of, bad, ev)


def _check_item(i: int, buf, rep: Report, ev: _Events, index_fields, expected_index, keys_of, bad: set[int]) -> None:
    key = None
    try:
        parsed = codec.parse(buf)
        key = parsed[2]  # known before the checksum, so a damaged payload is reported by key
        key, sample = codec.decode(buf, decode_to="numpy", verify=True, parsed=parsed)
    except CorruptItemError as exc:
        ev.problem(exc.reason, key=key, index=i)
        bad.add(i)
        return
    rep.items_checked += 1
    if i >= rep.count:
        ev.problem(f"item beyond the recorded count {rep.count}", key=key, index=i)
    if key is not None:
        keys_of[i] = key
    for f in index_fields:
        try:
            v = index_value(field_value(sample, f), field=f, key=key)
        except LmdbkitError as exc:
            ev.problem(f"indexed field {f!r}: {exc}", key=key, index=i)
            continue
        expected_index[f].setdefault(v, set()).add(i)


def _check_keys(txn, h, rep: Report, ev: _Events, keys_of: dict[int, str], packed: bool) -> None:
    n_keys = 0
    try:
        for kb, vb in txn.cursor(db=h.db(store.KEYS)):
            n_keys += 1
            k = bytes(kb).decode(errors="replace")
            if len(vb) != 8:
                ev.problem(f"the keys table maps {k!r} to {len(vb)} bytes (expected an 8-byte index)", key=k)
                continue
            i = store.unpack_index(vb)
            if keys_of.get(i, k) != k:
                ev.problem(f"the keys table maps {k!r} here, but the item says its key is {keys_of.get(i)!r}",
                           key=k, index=i)
            elif i >= rep.count:
                ev.problem("the keys table points past the last item", key=k, index=i)
    except lmdb.Error as exc:
        ev.problem(f"LMDB reports damage in the keys table after {n_keys} keys ({exc})")
        return
    # a packed database lists only the keys that are not their item's default (its index as text)
    implicit = sum(1 for i, k in keys_of.items() if k == str(i)) if packed else 0
    if n_keys + implicit != rep.count:
        listed = f"{n_keys} keys" + (f" (and {implicit} items under their default key)" if packed else "")
        ev.problem(f"the keys table holds {listed} for {rep.count} items")


def _check_index(txn, h, f: str, expected: dict[bytes, set[int]], keys_of, bad: set[int], ev: _Events) -> None:
    found: dict[bytes, set[int]] = {}
    try:
        for vb, ib in txn.cursor(db=h.db(store.index_db_name(f))):
            if len(ib) == 8:
                found.setdefault(bytes(vb), set()).add(store.unpack_index(ib))
            else:
                ev.problem(f"index on {f!r}: an entry of {len(ib)} bytes (expected 8)")
    except lmdb.Error as exc:
        ev.problem(f"LMDB reports damage in the index on {f!r} ({exc})")
        return
    for v in set(found) | set(expected):
        extra, missing = found.get(v, set()) - expected.get(v, set()), expected.get(v, set()) - found.get(v, set())
        for i in sorted((extra | missing) - bad)[:MAX_LISTED]:
            what = "lists" if i in extra else "misses"
            try:
                shown = json.loads(v)
            except ValueError:
                shown = bytes(v)
            ev.problem(f"index on {f!r} {what} this item under {shown!r}", key=keys_of.get(i), index=i)


# -- the child process ------------------------------------------------------------------------------

def _check_in_child(path: str, progress: bool) -> Report:
    proc = subprocess.Popen([sys.executable, "-m", "lmdbkit.integrity", path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONFAULTHANDLER="0"))
    rep = Report(str(path))
    bar = None
    finished = False
    try:
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if "start" in ev:
                rep.count, rep.complete = ev["start"]["count"], ev["start"]["complete"]
                bar = tqdm(total=rep.count, disable=not progress, desc="verify")
            elif "problem" in ev:
                p = ev["problem"]
                rep.add(p["problem"], key=p["key"], index=p["index"])
            elif "checked" in ev and bar is not None:
                bar.n = ev["checked"]
                bar.refresh()
            elif "done" in ev:
                rep.items_checked = ev["done"]["items_checked"]
                finished = True
        err = proc.stderr.read()
        proc.wait()
    finally:
        if bar is not None:
            bar.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not finished or proc.returncode != 0:
        rep.add(_crash_description(proc.returncode, err, bar.n if bar is not None else 0))
    return rep


def _crash_description(rc: int, stderr: str, reached: int) -> str:
    if rc is not None and rc < 0:
        try:
            how = signal.Signals(-rc).name
        except ValueError:
            how = f"signal {-rc}"
    else:
        how = f"exit status {rc}"
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    said = next((ln for ln in reversed(lines) if "Assertion" in ln or "mdb" in ln.lower()), lines[-1] if lines else "")
    return (f"reading the database crashed the checking process ({how}) after about {reached} items"
            + (f": {said}" if said else "") + ". LMDB met a damaged page it cannot survive; the items past that "
            "point could not be checked. Restore the database from a good copy")


def _child_main(argv: list[str]) -> int:
    (path,) = argv
    _check(path, _Events(stream=sys.stdout))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
