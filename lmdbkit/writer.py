"""The writer: samples in, one LMDB database out, with a map that grows by itself.

Appended items are buffered and committed every ``commit_items`` items or ``commit_bytes`` bytes, in one
transaction that also updates the format record (count, schema), so the database is consistent after
every commit: a killed process leaves every committed item readable. When LMDB reports the map full,
the writer aborts that transaction, doubles the map (logging it) and replays the batch; only a user-set
``max_size_gb`` stops it, with all committed items intact.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Literal

import lmdb
import numpy as np

from . import codec, store
from .errors import (ConfigMismatchError, DatabaseBusyError, DatabaseExistsError, DuplicateKeyError, LmdbkitError,
                     MapSizeLimitError, NotADatabaseError, SchemaError, UnsafeFormatError)

log = logging.getLogger(__name__)

GiB = 1 << 30
DEFAULT_MAP_SIZE = 64 << 20
INDEXABLE = (bool, int, str)
Mode = Literal["create", "append", "overwrite"]
MODES = ("create", "append", "overwrite")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def index_value(value: Any, *, field: str, key: object = None) -> bytes:
    """The canonical UTF-8 form of an indexed value: its JSON text, so 1, "1" and true stay distinct."""
    if isinstance(value, (np.integer, np.bool_, np.str_)):
        value = value.item()
    if not isinstance(value, INDEXABLE):
        raise SchemaError(f"indexed field {field!r} of item {key!r} is {type(value).__name__} {value!r}; "
                          "indexes hold int, str or bool values")
    return json.dumps(value, ensure_ascii=False).encode()


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested settings as one level of dotted names, for side-by-side comparison."""
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _version() -> str:
    from . import __version__
    return __version__


class Writer:
    """Write samples into ``<path>`` (a directory, conventionally named ``<name>.lmdb``).

    Use it as a context manager; ``close()`` marks the database complete and writes ``metadata.json``.
    An exception inside ``with`` leaves a readable database of what was committed, marked incomplete.

    Options (keyword-only):
      mode:          "create" (refuse an existing database), "append" (continue it) or "overwrite".
      map_size_gb:   initial map reservation; without it the map starts small and doubles when full.
      max_size_gb:   hard cap; reaching it raises MapSizeLimitError with every committed item intact.
      commit_items, commit_bytes: commit after this many buffered items or bytes, whichever comes first.
      durable:       True (default) fsyncs every commit: an OS crash loses nothing committed. False skips
                     the fsync, as older scripts did: a killed process still loses nothing committed, but
                     an OS crash or power cut can lose the commits since the last sync (LMDB stays
                     consistent on filesystems that keep write order).
      index_fields:  fields with a secondary index (int/str/bool values), for Reader.query.
      metadata:      user metadata (JSON) stored in the format record, e.g. an STFT config. On append,
                     every key given must equal the stored value, else ConfigMismatchError (stored and
                     requested values side by side); keys not given are kept.
      compression:   None (default) or one of codec.COMPRESSORS.
    """

    def __init__(self, path: str | os.PathLike, *, mode: Mode = "create", map_size_gb: float | None = None,
                 max_size_gb: float | None = None, commit_items: int = 1000, commit_bytes: int = 64 << 20,
                 durable: bool = True, index_fields: Iterable[str] = (), metadata: dict | None = None,
                 compression: str | None = None, max_readers: int = 126):
        self.path = Path(path)
        if mode not in MODES:
            raise LmdbkitError(f"mode={mode!r} is unsupported. Supported modes are {list(MODES)}")
        for name, v in (("commit_items", commit_items), ("commit_bytes", commit_bytes)):
            if not isinstance(v, int) or v < 1:
                raise LmdbkitError(f"{name}={v!r}: give a positive integer")
        for name, v in (("map_size_gb", map_size_gb), ("max_size_gb", max_size_gb)):
            if v is not None and not v > 0:
                raise LmdbkitError(f"{name}={v!r}: give a positive size in GiB, or None")
        codec.check_compression(compression)
        self.max_size = int(max_size_gb * GiB) if max_size_gb else None
        map_size = int(map_size_gb * GiB) if map_size_gb else DEFAULT_MAP_SIZE
        if self.max_size is not None:
            if map_size_gb and map_size > self.max_size:
                raise LmdbkitError(f"map_size_gb={map_size_gb} is above max_size_gb={max_size_gb}; "
                                   "raise max_size_gb or lower map_size_gb")
            map_size = min(map_size, self.max_size)
        self.commit_items, self.commit_bytes = commit_items, commit_bytes
        self.compression = compression
        self.index_fields = tuple(index_fields)
        self.mode = mode

        self._prepare(mode)
        self._h = store.acquire(self.path, writable=True, map_size=map_size, max_readers=max_readers, sync=durable)
        self.durable = durable
        self.closed = False
        try:
            if mode == "append":  # before anything is written: refuse environments that are not ours
                if store.looks_legacy(self._h):
                    raise UnsafeFormatError(f"{self.path} is a legacy pickle-in-LMDB database; append to it is "
                                            "refused. Convert it first: lmdbkit convert legacy")
                if self._foreign_keys():
                    raise NotADatabaseError(f"{self.path} is an LMDB environment with other data, not an lmdbkit "
                                            "database; refusing to write into it. Choose another path")
            self._open_dbs()
            stored = store.read_meta(self._h)
            if mode == "append" and stored is not None:
                self._resume(stored, metadata)
                # from here on the database is unfinished: new readers must use locking
                store.write_metadata_json(self.path, dict(self.meta, complete=False))
            else:
                self.count = 0
                self.schema: dict = {}
                self.meta = {"format": store.FORMAT_NAME, "version": store.FORMAT_VERSION, "count": 0,
                             "schema": {}, "index_fields": list(self.index_fields), "metadata": metadata or {},
                             "complete": False, "writer_version": _version(), "created": _now(),
                             "updated": _now(), "compression": compression}
            # index sub-databases only once the fields are settled (a refused append must write nothing)
            self._index = {f: self._h.db(store.index_db_name(f), create=True, dupsort=True, dupfixed=True)
                           for f in self.index_fields}
            if map_size > self._h.env.info()["map_size"]:
                self._h.env.set_mapsize(map_size)
            self._pending: list[tuple[bytes, bytes, bytes]] = []   # (index key, sample key, encoded)
            self._pending_keys: set[bytes] = set()
            self._pending_sources: list[tuple[bytes, bytes]] = []
            self._pending_index: list[tuple[bytes, bytes, bytes]] = []
            self._pending_bytes = 0
            self._in_source = False       # inside append_source: no commit may split the source
            self._sig: tuple | None = None
            self._rtxn = self._h.env.begin()
            self._commit(mark_complete=False)  # an (empty) consistent database from the start
        except BaseException:
            store.release(self._h)
            raise

    # -- setup ---------------------------------------------------------------------------------------

    def _prepare(self, mode: str) -> None:
        p = self.path
        exists = p.exists() and (not p.is_dir() or any(p.iterdir()))
        if not exists:
            p.mkdir(parents=True, exist_ok=True)
            return
        if not p.is_dir() or not (p / "data.mdb").exists():
            raise NotADatabaseError(f"{p} exists and is not an LMDB database; refusing to write into it. "
                                    "Choose another path or remove it yourself")
        if mode == "create":
            raise DatabaseExistsError(f"{p} already exists. Pass mode='append' to continue it or "
                                      "mode='overwrite' to replace it")
        if mode == "overwrite":
            if store.is_open(p):
                raise DatabaseBusyError(f"{p} is open in this process; close its readers before overwriting it")
            shutil.rmtree(p)
            p.mkdir(parents=True)

    def _foreign_keys(self) -> list[bytes]:
        """Keys of the main database that are not lmdbkit's sub-databases (another program's data)."""
        ours = {store.ITEMS, store.KEYS, store.META, store.SOURCES}
        with self._h.begin() as txn:
            keys = [bytes(k) for k in txn.cursor().iternext(values=False)]
        return [k for k in keys if k not in ours and not k.startswith(store.INDEX_PREFIX.encode())]

    def _open_dbs(self) -> None:
        h = self._h
        self._items = h.db(store.ITEMS, create=True)
        self._keys = h.db(store.KEYS, create=True)
        self._meta = h.db(store.META, create=True)
        self._sources = h.db(store.SOURCES, create=True)

    def _resume(self, stored: dict, metadata: dict | None) -> None:
        stored_md = stored.get("metadata", {})
        if metadata is not None:
            requested = flatten(json.loads(json.dumps(metadata)))
            before = flatten({k: stored_md.get(k) for k in metadata})
            if requested != before:
                raise ConfigMismatchError(str(self.path), before, requested,
                                          "Continue with the stored settings, or pass mode='overwrite' to start over")
            stored = dict(stored, metadata=dict(stored_md, **metadata))
        if self.index_fields and list(self.index_fields) != stored.get("index_fields", []):
            raise ConfigMismatchError(str(self.path), {"index_fields": stored.get("index_fields")},
                                      {"index_fields": list(self.index_fields)},
                                      "Append with the same index_fields, or pass mode='overwrite'")
        self.index_fields = tuple(stored.get("index_fields", ()))
        if stored.get("compression") != self.compression and self.compression is not None:
            raise ConfigMismatchError(str(self.path), {"compression": stored.get("compression")},
                                      {"compression": self.compression}, "Append with the stored compression")
        self.compression = stored.get("compression")
        self.meta = dict(stored, complete=False, updated=_now())
        self.count = stored["count"]
        self.schema = stored.get("schema", {})

    # -- writing -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Items appended so far (committed or buffered)."""
        return self.count + len(self._pending)

    def _check_open(self) -> None:
        if self.closed:
            raise LmdbkitError(f"the writer of {self.path} is closed; open a new Writer(mode='append')")

    def __contains__(self, key: str) -> bool:
        kb = key.encode()
        return kb in self._pending_keys or self._rtxn.get(kb, db=self._keys) is not None

    def append(self, sample: dict, *, key: str | None = None) -> int:
        """Add one sample; returns its index. ``key`` (default: the index as text) must be unique."""
        self._check_open()
        i = len(self)
        key = str(i) if key is None else key
        if not isinstance(key, str) or not key:
            raise LmdbkitError(f"key={key!r}: sample keys are non-empty strings")
        kb = key.encode()
        if key in self:
            raise DuplicateKeyError(f"{self.path}: key {key!r} is already in the database; sample keys must be unique")
        data, sig = codec.encode_with_schema(sample, key, compression=self.compression)
        if sig != self._sig:
            self._check_schema(sample, sig, key)
        index_entries = [(f, index_value(sample.get(f), field=f, key=key)) for f in self.index_fields]
        ik = store.pack_index(i)
        self._pending.append((ik, kb, data))
        self._pending_keys.add(kb)
        for f, v in index_entries:
            self._pending_index.append((f.encode(), v, ik))
        self._pending_bytes += len(data)
        if not self._in_source and (len(self._pending) >= self.commit_items or self._pending_bytes >= self.commit_bytes):
            self.commit()
        return i

    def append_source(self, source: str, samples: Iterable[tuple[str, dict]], info: dict | None = None) -> list[int]:
        """Add all samples of one source (e.g. an audio file) and record the source, atomically.

        A commit never splits a source, so after a crash a source is either fully present (and listed in
        ``sources()``) or absent: resuming redoes exactly the missing ones.
        """
        self._check_open()
        mark = (len(self._pending), len(self._pending_index), self._pending_bytes)
        self._in_source = True
        try:
            idx = [self.append(s, key=k) for k, s in samples]
        except BaseException:
            for _, kb, _ in self._pending[mark[0]:]:
                self._pending_keys.discard(kb)
            del self._pending[mark[0]:], self._pending_index[mark[1]:]
            self._pending_bytes = mark[2]
            raise
        finally:
            self._in_source = False
        rec = dict(info or {}, items=idx)
        self._pending_sources.append((source.encode(), json.dumps(rec).encode()))
        if len(self._pending) >= self.commit_items or self._pending_bytes >= self.commit_bytes:
            self.commit()
        return idx

    def has_source(self, source: str) -> bool:
        sb = source.encode()
        return any(s == sb for s, _ in self._pending_sources) or self._rtxn.get(sb, db=self._sources) is not None

    def sources(self) -> dict[str, dict]:
        """Committed sources and what was written for each."""
        return {bytes(k).decode(): json.loads(bytes(v)) for k, v in self._rtxn.cursor(db=self._sources)}

    def _check_schema(self, sample: dict, sig: tuple, key: str) -> None:
        """Every sample needs the fields of the first, with the same array dtypes (shapes may vary)."""
        desc = {f: ({"kind": kind, "dtype": dtype, "ndim": rest[0]} if kind != "meta"
                    else {"kind": "meta", "type": type(sample[f]).__name__}) for f, kind, dtype, *rest in sig}
        if not self.schema:
            self.schema = desc
            self._sig = sig
            return
        if set(desc) != set(self.schema):
            raise SchemaError(f"{self.path}: sample {key!r} has fields {sorted(desc)}, the database has "
                              f"{sorted(self.schema)}; every sample needs the same fields")
        for f, d in desc.items():
            s = self.schema[f]
            if (s["kind"] == "meta") != (d["kind"] == "meta"):
                raise SchemaError(f"{self.path}: sample {key!r} field {f!r} is {d['kind']}, the database "
                                  f"stores {s['kind']}")
            if s["kind"] != "meta" and s.get("dtype") != d.get("dtype"):
                raise SchemaError(f"{self.path}: sample {key!r} field {f!r} is {d['dtype']}, the database "
                                  f"stores {s['dtype']}; convert it before writing")
        self._sig = sig

    def add_index(self, field: str, *, progress: bool = False) -> int:
        """Build a secondary index on ``field`` over every committed item (used by lmdbkit.build_index).

        Reads each item's header only (arrays are not decoded) and writes the entries in batches; the field
        joins ``index_fields`` and later appends keep the index current. Returns the number of entries.
        """
        self._check_open()
        if field in self.index_fields:
            return 0
        self.commit()
        d = self._h.db(store.index_db_name(field), create=True, dupsort=True, dupfixed=True)
        from tqdm.auto import tqdm
        entries: list[tuple[bytes, bytes]] = []
        written = 0

        def flush():
            nonlocal written
            while True:
                try:
                    with self._h.env.begin(write=True) as txn:
                        for v, ik in entries:
                            txn.put(v, ik, db=d, dupdata=True)
                    break
                except lmdb.MapFullError:
                    self._grow()
            written += len(entries)
            entries.clear()

        with self._h.begin(buffers=True) as txn:
            for ik, buf in tqdm(txn.cursor(db=self._items), total=self.count, disable=not progress,
                                desc=f"index {field}"):
                try:
                    _, _, key, fields, _ = codec.parse(buf)  # header only: no array is copied
                except codec.CorruptItemError as exc:
                    raise exc.at(str(self.path), store.unpack_index(ik)) from exc
                if field not in fields:
                    raise SchemaError(f"{self.path}: item {key!r} has no field {field!r}; fields are {sorted(fields)}")
                entries.append((index_value(fields[field], field=field, key=key), bytes(ik)))
                if len(entries) >= 100_000:
                    flush()
        flush()
        self._index[field] = d
        self.index_fields = (*self.index_fields, field)
        self.meta["index_fields"] = list(self.index_fields)
        self.commit()
        return written

    def set_metadata(self, **values: Any) -> None:
        """Merge user metadata into the format record (written at the next commit)."""
        self.meta["metadata"] = dict(self.meta.get("metadata", {}), **values)

    def commit(self) -> None:
        """Commit the buffered items now."""
        self._check_open()
        self._commit(mark_complete=False)

    def _commit(self, *, mark_complete: bool) -> None:
        n = len(self._pending)
        meta = dict(self.meta, count=self.count + n, schema=self.schema, complete=mark_complete, updated=_now())
        blob = json.dumps(meta).encode()
        self._rtxn.abort()
        try:
            self._write(blob)
        finally:
            self._rtxn = self._h.env.begin()
        self.count += n
        self.meta = meta
        self._pending.clear()
        self._pending_keys.clear()
        self._pending_index.clear()
        self._pending_sources.clear()
        self._pending_bytes = 0

    def _write(self, blob: bytes) -> None:
        while True:
            try:
                with self._h.env.begin(write=True) as txn:
                    for ik, kb, data in self._pending:
                        txn.put(ik, data, db=self._items, append=True)
                        if not txn.put(kb, ik, db=self._keys, overwrite=False):
                            raise DuplicateKeyError(f"{self.path}: key {kb.decode()!r} is already in the database")
                    for f, v, ik in self._pending_index:
                        txn.put(v, ik, db=self._index[f.decode()], dupdata=True)
                    for s, rec in self._pending_sources:
                        txn.put(s, rec, db=self._sources)
                    txn.put(store.META_KEY, blob, db=self._meta)
                break
            except lmdb.MapFullError:
                self._grow()

    def _grow(self) -> None:
        env = self._h.env
        old = env.info()["map_size"]
        new = old * 2
        if self.max_size is not None:
            if old >= self.max_size:
                raise MapSizeLimitError(
                    f"{self.path} reached max_size_gb={self.max_size / GiB:g} with {self.count} items committed "
                    f"(intact); {len(self._pending)} buffered items were not written. Raise max_size_gb, or "
                    "continue with Writer(..., mode='append', max_size_gb=<larger>)")
            new = min(new, self.max_size)
        log.info("%s: map full at %.2f GiB, growing to %.2f GiB", self.path, old / GiB, new / GiB)
        env.set_mapsize(new)

    # -- closing -------------------------------------------------------------------------------------

    def close(self, *, complete: bool = True) -> None:
        """Commit what is buffered, mark the database complete (unless complete=False) and write metadata.json."""
        if self.closed:
            return
        try:
            self._commit(mark_complete=complete)
            if not self.durable:
                self._h.env.sync(True)
            store.write_metadata_json(self.path, self.meta)
        finally:
            self.closed = True
            self._rtxn.abort()
            store.release(self._h)

    def abort(self) -> None:
        """Close without committing the buffered items; the database keeps what was committed, incomplete."""
        if self.closed:
            return
        self._pending.clear()
        self._pending_keys.clear()
        self._pending_index.clear()
        self._pending_sources.clear()
        self._pending_bytes = 0
        self.close(complete=False)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # keep every whole item appended before the exception (a half-added source was rolled back),
        # marked incomplete; if even that fails, keep what was committed
        try:
            self.close(complete=False)
        except Exception:
            self.abort()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<lmdbkit.Writer {str(self.path)!r} items={len(self) if not self.closed else self.count} {state}>"
