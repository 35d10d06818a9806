"""Opening LMDB environments, their sub-databases and the format record.

py-lmdb refuses a second ``lmdb.open`` of one path in one process, and a forked child inherits the
parent's open environments together with that refusal. So every environment lmdbkit opens lives in a
per-process registry keyed by real path: all readers (and the writer) of one path in one process share
one environment, and a forked child forgets what it inherited before it opens its own.
"""

from __future__ import annotations

import glob as _glob
import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import lmdb

from .errors import (DatabaseBusyError, DatabaseNotFoundError, FormatVersionError, LmdbkitError,
                     NotADatabaseError)

FORMAT_NAME = "lmdbkit"
FORMAT_VERSION = 1
META_KEY = b"format"
METADATA_JSON = "metadata.json"
SUFFIX = ".lmdb"

ITEMS, KEYS, META, SOURCES = b"items", b"keys", b"meta", b"sources"
INDEX_PREFIX = "index:"
MAX_DBS = 64

_INDEX = struct.Struct(">Q")


def pack_index(i: int) -> bytes:
    """An item index as its 8-byte big-endian key (so LMDB's key order is index order)."""
    return _INDEX.pack(i)


def unpack_index(b) -> int:
    return _INDEX.unpack(b)[0]


def index_db_name(field: str) -> bytes:
    return (INDEX_PREFIX + field).encode()


@dataclass
class Handle:
    """One open environment and its sub-database handles, shared within one process."""

    path: str
    env: lmdb.Environment
    writable: bool
    locked: bool
    pid: int = field(default_factory=os.getpid)
    users: int = 0
    dbs: dict = field(default_factory=dict)

    def db(self, name: bytes, *, create: bool = False, **flags):
        """A sub-database handle, or None if it does not exist and create is False.

        LMDB makes a handle usable only in transactions begun after it was opened, so readers open every
        existing sub-database once, when the environment opens (``open_all``), before any transaction.
        """
        d = self.dbs.get(name)
        if d is None and create:
            d = self.dbs[name] = self.env.open_db(name, create=True, **flags)
        return d

    def begin(self, **kw):
        """A transaction; if another process's writer grew the map, adopt the new size and retry."""
        try:
            return self.env.begin(**kw)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(**kw)

    def open_all(self) -> None:
        """Open every named sub-database the environment holds (their names are the main database's keys)."""
        with self.begin() as txn:
            names = [bytes(k) for k in txn.cursor().iternext(values=False)]
        for name in names:
            if name in self.dbs or name.isdigit():
                continue
            try:
                self.dbs[name] = self.env.open_db(name, create=False)
            except lmdb.Error:  # a plain key of a legacy database, not a sub-database
                pass


_lock = threading.RLock()
_registry: dict[str, Handle] = {}


def _forget_inherited() -> None:
    """In a forked child: close the environments inherited from the parent, so this process may open its own.

    Our readers hold no transaction across calls, so closing here touches none of the parent's reader
    slots; the parent's own handles are untouched (they live in the parent's memory).
    """
    global _lock
    _lock = threading.RLock()
    for h in list(_registry.values()):
        try:
            h.env.close()
        except Exception:
            pass
    _registry.clear()


os.register_at_fork(after_in_child=_forget_inherited)


def real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def acquire(path: str | os.PathLike, *, writable: bool = False, lock: bool = True, map_size: int | None = None,
            max_readers: int = 126, sync: bool = True) -> Handle:
    """Open (or share) the environment at ``path`` in this process."""
    rp = real(path)
    with _lock:
        h = _registry.get(rp)
        if h is not None and h.pid != os.getpid():  # fork without our hook (should not happen)
            _registry.pop(rp)
            h = None
        if h is not None:
            if writable and not h.writable:
                raise DatabaseBusyError(
                    f"{path} is open for reading in this process (a Reader or LMDBDataset); close it "
                    "(reader.close()) before writing to this database")
            if writable and h.users:
                raise DatabaseBusyError(f"{path} already has a writer in this process; one writer per database")
            h.users += 1
            return h
        if writable:
            env = lmdb.open(rp, map_size=map_size or 1 << 26, max_dbs=MAX_DBS, subdir=True, sync=sync,
                            metasync=sync, readahead=False, meminit=False, max_readers=max_readers, lock=True)
        else:
            env = lmdb.open(rp, readonly=True, lock=lock, readahead=False, meminit=False, max_dbs=MAX_DBS,
                            subdir=True, max_readers=max_readers, create=False)
        h = Handle(rp, env, writable=writable, locked=lock or writable, users=1)
        if not writable:
            h.open_all()
        _registry[rp] = h
        return h


def release(h: Handle) -> None:
    """Drop one user of a handle; the environment closes with its last user."""
    with _lock:
        if h.pid != os.getpid():
            return
        h.users -= 1
        if h.users <= 0 and _registry.get(h.path) is h:
            del _registry[h.path]
            h.env.close()


def is_open(path: str | os.PathLike) -> bool:
    """Whether this process holds the environment at ``path`` open."""
    h = _registry.get(real(path))
    return h is not None and h.pid == os.getpid()


def open_count() -> int:
    """How many environments this process holds open (for tests and diagnostics)."""
    return len(_registry)


# -- recognising databases --------------------------------------------------------------------------

def check_exists(path: str | os.PathLike) -> Path:
    """The path as a Path, or a clear error if it is missing or holds no LMDB environment. Creates nothing."""
    p = Path(path)
    if not p.exists():
        raise DatabaseNotFoundError(f"{p}: no such database. Check the path, or write one first with "
                                    "lmdbkit.Writer or notebooks/precompute.ipynb")
    if not p.is_dir() or not (p / "data.mdb").is_file():
        what = "a directory without data.mdb" if p.is_dir() else "a file"
        raise NotADatabaseError(f"{p} is {what}, not an LMDB database directory (expected {p}/data.mdb). "
                                "Point at a <name>.lmdb directory, a folder of them, or a glob")
    return p


def read_meta(h: Handle, txn=None) -> dict | None:
    """The format record, or None if the environment has no lmdbkit `meta` sub-database."""
    d = h.db(META)
    if d is None:
        return None
    own = txn is None
    txn = txn or h.begin()
    try:
        raw = txn.get(META_KEY, db=d)
    finally:
        if own:
            txn.abort()
    if raw is None:
        return None
    meta = json.loads(bytes(raw))
    if meta.get("format") != FORMAT_NAME:
        raise NotADatabaseError(f"{h.path}: its meta record names format {meta.get('format')!r}, not {FORMAT_NAME!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise FormatVersionError(f"{h.path} is lmdbkit format version {meta.get('version')}; this lmdbkit reads "
                                 f"version {FORMAT_VERSION}. Upgrade lmdbkit (pip install -U lmdbkit)")
    return meta


def looks_legacy(h: Handle) -> bool:
    """Whether the main database holds `str(idx)` keys, as older pickle-in-LMDB scripts wrote."""
    with h.begin() as txn:
        cur = txn.cursor()
        for n, k in enumerate(cur.iternext(values=False)):
            if bytes(k).isdigit():
                return True
            if n > 64:
                break
    return False


def metadata_json_complete(path: str | os.PathLike) -> bool:
    """Whether the human-readable mirror says the database was closed cleanly (so readers need no lock)."""
    try:
        with open(os.path.join(path, METADATA_JSON)) as f:
            return bool(json.load(f).get("complete"))
    except (OSError, ValueError):
        return False


def write_metadata_json(path: str | os.PathLike, meta: dict) -> None:
    tmp = os.path.join(path, METADATA_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, os.path.join(path, METADATA_JSON))


# -- many databases: a path, a list, a directory of *.lmdb, or a glob --------------------------------

def resolve_paths(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The database directories a spec names, in a stable order. Creates nothing."""
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if any(ch in s for ch in "*?["):
            found = sorted(Path(p) for p in _glob.glob(s))
            if not found:
                raise DatabaseNotFoundError(f"the glob {s!r} matches no database")
            return [check_exists(p) for p in found]
        p = Path(s)
        if p.is_dir() and not (p / "data.mdb").exists():
            found = sorted(q for q in p.iterdir() if q.is_dir() and (q / "data.mdb").is_file())
            if found:
                return found
        return [check_exists(p)]
    paths = [q for item in spec for q in resolve_paths(item)]
    if not paths:
        raise LmdbkitError("an empty list of databases was given; pass at least one path")
    return paths


def disk_usage(path: str | os.PathLike) -> int:
    """Bytes on disk (allocated blocks, so sparse files count what they hold) of a file or a directory tree."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


def split_name(path: str | os.PathLike) -> str:
    """The split a database belongs to: `train` for .../train.lmdb and .../train-0-of-2.lmdb."""
    return Path(path).name.removesuffix(SUFFIX).split("-", 1)[0]


def group_by_split(spec) -> dict[str, list[str]]:
    """{split: [database paths]} for a database, a split folder, a shard folder, a glob or a list;
    train, val and test first."""
    groups: dict[str, list[str]] = {}
    for p in resolve_paths(spec):
        groups.setdefault(split_name(p), []).append(str(p))
    order = {"train": 0, "val": 1, "test": 2}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])))
