"""The writer: samples in, one LMDB database out, with a map that grows by itself.

Appended items are buffered and committed every ``commit_items`` items or ``commit_bytes`` bytes, in one
transaction that also updates the format record (count, schema), so the database is consistent after
every commit: a killed process leaves every committed item readable. When LMDB reports the map full,
the writer aborts that transaction, doubles the map (logging it) and replays the batch; only a user-set
``max_size_gb`` stops it, with all committed items intact.

Small items are packed several to an LMDB value (format 2, ``runs``): the last run stays open in memory and
each commit writes it again, extended, under its new last index, in the same transaction as the rest.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Literal

import lmdb
import msgpack

from . import codec, heap, runs, store
from .errors import (CommitError, ConfigMismatchError, DatabaseBusyError, DatabaseExistsError, DiskFullError,
                     DuplicateKeyError, KeyTooLongError, LmdbkitError, MapSizeLimitError, NotADatabaseError,
                     ReadOnlyError, SchemaError, UnsafeFormatError)

log = logging.getLogger(__name__)

GiB = 1 << 30
DEFAULT_MAP_SIZE = 64 << 20
INDEXABLE = (bool, int, str)
Mode = Literal["create", "append", "overwrite"]
MODES = ("create", "append", "overwrite")


MAX_MAP_GB = 1 << 17  # 128 TiB: the user address space of x86-64 and arm64 Linux


def _field_names(fields: Iterable[str] | str) -> tuple[str, ...]:
    """index_fields as a tuple of names; a bare string is one field (not its characters)."""
    if isinstance(fields, str):
        fields = (fields,)
    try:
        out = tuple(fields)
    except TypeError:
        raise LmdbkitError(f"index_fields={fields!r}: give field names, e.g. ('label', 'category')") from None
    for f in out:
        if not isinstance(f, str) or not f:
            raise LmdbkitError(f"index_fields={out!r}: every field name is a non-empty string, got {f!r}")
        check_key_bytes(store.index_db_name(f), what=f"index field name {f!r}")
    return out


def _same_fields(given, stored) -> bool:
    """Whether index_fields given to an append name the stored ones (a stored "metadata.category" may be given
    as "category", as when it was first written)."""
    return len(given) == len(stored) and all(g == s or s.endswith("." + g) for g, s in zip(given, stored))


def check_key_bytes(b: bytes, *, what: str) -> bytes:
    """``b``, or KeyTooLongError naming what it is, its length and the limit (before anything is queued)."""
    limit = store.MAX_KEY_BYTES
    if len(b) > limit:
        shown = b[:60].decode(errors="replace")
        raise KeyTooLongError(f"{what} is {len(b)} bytes in UTF-8 ({shown!r}...); LMDB keys hold at most {limit} "
                              "bytes. Use a shorter key (e.g. a hash of the long one, with the full text as a field)")
    return b


def encode_key(key: str, *, what: str) -> bytes:
    """A key's UTF-8 bytes, or a clear error for text that has no UTF-8 form (lone surrogates)."""
    try:
        return key.encode()
    except UnicodeEncodeError as exc:
        raise LmdbkitError(f"{what} {key!r} is not valid Unicode text ({exc.reason} at position {exc.start}: "
                           "often a file name with non-UTF-8 bytes); give a key with valid characters") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


MISSING = object()  # field_value's answer for a field the sample does not have


def field_value(sample: dict, path: str) -> Any:
    """A field's value: ``path`` as a top-level name, else as a dotted path into nested dicts
    (``"metadata.category"``); MISSING if the sample has no such field."""
    if path in sample:
        return sample[path]
    value: Any = sample
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def nested_paths(sample: dict, prefix: str = "") -> list[str]:
    """The dotted path of every value inside a nested dict of a sample (top-level names not included)."""
    out = []
    for k, v in sample.items():
        if isinstance(v, dict) and isinstance(k, str):
            out += [f"{prefix}{k}.{kk}" for kk in v if isinstance(kk, str)]
            out += nested_paths(v, f"{prefix}{k}.")
    return out


def resolve_field(sample: dict, name: str, *, where: object) -> str:
    """The field an index name means: itself if the sample has it (top-level or as a dotted path), else the one
    nested field whose last name it is (``category`` -> ``metadata.category``); SchemaError if none or several."""
    if field_value(sample, name) is not MISSING:
        return name
    found = [p for p in nested_paths(sample) if p.rsplit(".", 1)[-1] == name]
    if len(found) == 1:
        return found[0]
    if found:
        raise SchemaError(f"{where}: index field {name!r} is ambiguous: the samples have {found}; give the full "
                          "path (e.g. index_fields=(" + repr(found[0]) + ",))")
    raise SchemaError(f"{where}: index field {name!r} is not a field of the samples; their fields are "
                      f"{sorted(str(k) for k in sample)}" + (f" and nested {nested_paths(sample)}"
                                                              if nested_paths(sample) else ""))


def index_value(value: Any, *, field: str, key: object = None) -> bytes:
    """The canonical UTF-8 form of an indexed value: its JSON text, so 1, "1" and true stay distinct.

    A 0-d tensor or array, or a numpy scalar (a label sliced from a batch: ``labels[i]``), is indexed as its
    Python value."""
    if value is MISSING:
        raise SchemaError(f"item {key!r} has no field {field!r} to index; give it in every sample, or index "
                          "another field")
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, INDEXABLE):
        raise SchemaError(f"indexed field {field!r} of item {key!r} is {type(value).__name__} {value!r}; "
                          "indexes hold int, str or bool values")
    try:
        b = json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise SchemaError(f"indexed field {field!r} of item {key!r} is {value!r}, which is not valid Unicode text "
                          "(lone surrogates); give valid text") from None
    return check_key_bytes(b, what=f"the value of indexed field {field!r} of item {key!r}")


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
      pack:          pack items into runs (format 2, see ``runs``): None (default) packs when the first item
                     encodes to at most runs.PACK_MAX (16 KiB), where one item per LMDB value wastes its pages;
                     False writes format 1 (one item per value, what lmdbkit 0.1 reads); True packs.
                     A packed database keeps no keys-table entry for an item under its default key.
    """

    def __init__(self, path: str | os.PathLike, *, mode: Mode = "create", map_size_gb: float | None = None,
                 max_size_gb: float | None = None, commit_items: int = 1000, commit_bytes: int = 64 << 20,
                 durable: bool = True, index_fields: Iterable[str] = (), metadata: dict | None = None,
                 compression: str | None = None, max_readers: int = 126, pack: bool | None = None):
        self.closed = True  # until the database is open: close()/__del__ of a refused writer do nothing
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            raise LmdbkitError(f"path={path!r}: give a str or pathlib.Path of the <name>.lmdb folder")
        self.path = Path(path)
        if mode not in MODES:
            raise LmdbkitError(f"mode={mode!r} is unsupported. Supported modes are {list(MODES)}")
        for name, v in (("commit_items", commit_items), ("commit_bytes", commit_bytes), ("max_readers", max_readers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LmdbkitError(f"{name}={v!r}: give a positive integer")
        for name, v in (("map_size_gb", map_size_gb), ("max_size_gb", max_size_gb)):
            if v is not None and not (isinstance(v, (int, float)) and 0 < v < MAX_MAP_GB):
                raise LmdbkitError(f"{name}={v!r}: give a size in GiB above 0 and below {MAX_MAP_GB} (what a "
                                   "64-bit process can map), or None: the map grows by itself")
        codec.check_compression(compression)
        if pack not in (None, True, False):
            raise LmdbkitError(f"pack={pack!r}: give True, False or None (pack small items)")
        self.pack = pack
        self.max_size = int(max_size_gb * GiB) if max_size_gb else None
        map_size = int(map_size_gb * GiB) if map_size_gb else DEFAULT_MAP_SIZE
        if self.max_size is not None:
            if map_size_gb and map_size > self.max_size:
                raise LmdbkitError(f"map_size_gb={map_size_gb} is above max_size_gb={max_size_gb}; "
                                   "raise max_size_gb or lower map_size_gb")
            map_size = min(map_size, self.max_size)
        self.commit_items, self.commit_bytes = commit_items, commit_bytes
        self.compression = compression
        self.index_fields = _field_names(index_fields)
        self.mode = mode
        self.durable = durable
        self._pid = os.getpid()

        heap.keep_freed_memory()  # each commit's items reuse the last one's memory instead of faulting in new pages
        created = self._prepare(mode)  # takes the writer lock
        try:
            self._h = store.acquire(self.path, writable=True, map_size=map_size, max_readers=max_readers,
                                    sync=durable)
        except BaseException:
            self._lock.release()
            self._undo_create(created)
            raise
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
            # index sub-databases are made at the first commit after the fields are settled: a refused append must
            # write nothing, and a name like "category" may turn out to mean "metadata.category" (first sample)
            self._index: dict[str, Any] = {}
            self._fields_resolved = self.count > 0
            if map_size > self._h.env.info()["map_size"]:
                self._h.env.set_mapsize(map_size)
            self._pending: list[tuple[bytes, bytes, bytes]] = []   # (index key, sample key, encoded)
            self._pending_keys: set[bytes] = set()
            self._pending_sources: list[tuple[bytes, bytes]] = []
            self._pending_index: list[tuple[bytes, bytes, bytes]] = []
            self._pending_bytes = 0
            self._packed = store.packed(self.meta)
            self._tail = self._open_run() if self._packed else []  # the open last run's items, ending at count - 1
            self._in_source = False       # inside append_source: append_source decides when to commit
            self._sig: tuple | None = None
            self._rtxn = self._h.env.begin()
            self.closed = False
            self._commit(mark_complete=False)  # an (empty) consistent database from the start
        except BaseException:
            self.closed = True
            store.release(self._h)
            self._lock.release()
            self._undo_create(created)
            raise

    # -- setup ---------------------------------------------------------------------------------------

    def _prepare(self, mode: str) -> bool | None:
        """Check the path, take the writer lock, apply the mode. Returns True if this call created the folder,
        False if it will create the database files in an existing empty folder, None if a database exists."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise NotADatabaseError(f"{p} exists and is a file, not an LMDB database folder; choose another path")
        ours = {store.WRITER_LOCK}
        existed = p.is_dir()
        if existed and not (p / store.DATA_FILE).exists() and any(q.name not in ours for q in p.iterdir()):
            raise NotADatabaseError(f"{p} exists and is not an LMDB database; refusing to write into it. "
                                    "Choose another path or remove it yourself")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise store.open_error(p, exc, writable=True, locked=True) from exc
        self._lock = store.WriterLock(p)
        if not (p / store.DATA_FILE).exists():
            return not existed
        if mode == "create":
            self._lock.release()
            raise DatabaseExistsError(f"{p} already exists. Pass mode='append' to continue it or "
                                      "mode='overwrite' to replace it")
        if mode == "overwrite":
            if store.is_open(p):
                self._lock.release()
                raise DatabaseBusyError(f"{p} is open in this process; close its readers before overwriting it")
            for q in p.iterdir():  # everything but the lock this writer holds
                if q.name not in ours:
                    shutil.rmtree(q) if q.is_dir() and not q.is_symlink() else q.unlink()
            return False
        return None

    def _undo_create(self, created: bool | None) -> None:
        """Remove what a refused or failed new writer created (never an existing database)."""
        if created is None:
            return
        p = self.path
        for name in (store.DATA_FILE, store.LOCK_FILE, store.METADATA_JSON, store.WRITER_LOCK):
            try:
                (p / name).unlink()
            except OSError:
                pass
        if created:
            try:
                p.rmdir()
            except OSError:
                pass

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

    def _open_run(self) -> list[bytes]:
        """The items of the last run when it is still open (a later commit extends it), else []."""
        with self._h.begin() as txn:
            cursor = txn.cursor(db=self._items)
            if not cursor.last():
                return []
            items = [bytes(x) for x in runs.items(cursor.value())]
        return items if runs.still_open(items) else []

    def _decide_packing(self, first: bytes) -> None:
        """At the first item of a database: pack it (format 2) or not (format 1)."""
        self._packed = len(first) <= runs.PACK_MAX if self.pack is None else self.pack
        self.meta["version"] = store.PACKED_VERSION if self._packed else store.FORMAT_VERSION

    def _resume(self, stored: dict, metadata: dict | None) -> None:
        stored_md = stored.get("metadata", {})
        if metadata is not None:
            requested = flatten(json.loads(json.dumps(metadata)))
            before = flatten({k: stored_md.get(k) for k in metadata})
            if requested != before:
                raise ConfigMismatchError(str(self.path), before, requested,
                                          "Continue with the stored settings, or pass mode='overwrite' to start over")
            stored = dict(stored, metadata=dict(stored_md, **metadata))
        if self.index_fields and not _same_fields(self.index_fields, stored.get("index_fields", [])):
            raise ConfigMismatchError(str(self.path), {"index_fields": stored.get("index_fields")},
                                      {"index_fields": list(self.index_fields)},
                                      "Append with the same index_fields, or pass mode='overwrite'")
        self.index_fields = tuple(stored.get("index_fields", ()))
        if stored.get("compression") != self.compression and self.compression is not None:
            raise ConfigMismatchError(str(self.path), {"compression": stored.get("compression")},
                                      {"compression": self.compression}, "Append with the stored compression")
        self.compression = stored.get("compression")
        if self.pack is not None and stored["count"] and self.pack != store.packed(stored):
            raise ConfigMismatchError(str(self.path), {"pack": store.packed(stored)}, {"pack": self.pack},
                                      "Append with the stored packing (pack=None follows it)")
        self.meta = dict(stored, complete=False, updated=_now())
        self.count = stored["count"]
        self.schema = stored.get("schema", {})

    # -- writing -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Items appended so far (committed or buffered)."""
        return self.count + len(self._pending)

    def _check_open(self) -> None:
        if self._pid != os.getpid():
            raise DatabaseBusyError(
                f"this Writer of {self.path} was opened by process {self._pid}; a forked child (pid {os.getpid()}) "
                "cannot write through it (two processes would interleave their commits). Write from the parent, "
                "or close it there and open a new Writer in the child")
        if self.closed:
            raise LmdbkitError(f"the writer of {self.path} is closed; open a new Writer(mode='append')")

    def __contains__(self, key: str) -> bool:
        kb = encode_key(key, what="key")
        return kb in self._pending_keys or self._holds_key(key, kb)

    def _holds_key(self, key: str, kb: bytes) -> bool:
        """Whether a committed item has this key: in the keys table, or (packed) as the default key of its index."""
        if len(kb) <= store.MAX_KEY_BYTES and self._rtxn.get(kb, db=self._keys) is not None:
            return True
        i = store.implicit_key(key) if self._packed else None
        if i is None or i >= self.count:
            return False
        with self._h.begin(buffers=True) as txn:
            return codec.peek_key(store.get_item(txn, self._items, True, i)) == key

    def append(self, sample: dict, *, key: str | None = None) -> int:
        """Add one sample; returns its index. ``key`` (default: the index as text) must be unique."""
        self._check_open()
        i = len(self)
        key = str(i) if key is None else key
        if not isinstance(key, str) or not key:
            raise LmdbkitError(f"key={key!r}: sample keys are non-empty strings")
        kb = check_key_bytes(encode_key(key, what="key"), what=f"key {key[:60]!r}")
        if kb in self._pending_keys or self._holds_key(key, kb):
            raise DuplicateKeyError(f"{self.path}: key {key!r} is already in the database; sample keys must be unique")
        data, sig = codec.encode_with_schema(sample, key, compression=self.compression)
        if i == 0:
            self._decide_packing(data)
        if sig != self._sig:
            self._check_schema(sample, sig, key)
        if not self._fields_resolved and self.index_fields:
            fields = tuple(resolve_field(sample, f, where=f"{self.path}: sample {key!r}") for f in self.index_fields)
            self.index_fields = fields
            self.meta["index_fields"] = list(fields)
        index_entries = [(f, index_value(field_value(sample, f), field=f, key=key)) for f in self.index_fields]
        self._fields_resolved = True
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
        """Add all samples of one source (e.g. an audio file) and record the source.

        A source's samples are committed together unless they outgrow ``commit_bytes`` (a long file): then
        the writer commits what it has with a partial record of the source, so memory stays bounded by
        ``commit_bytes``. After a crash a source is fully present (``has_source``), absent, or partial with its
        first ``source_progress(source)`` samples committed: resuming redoes exactly what is missing.
        """
        self._check_open()
        sb = check_key_bytes(encode_key(source, what="source"), what=f"source {source[:60]!r}")
        info = dict(info or {})
        before = self._source_record(source)  # a partial source continues where it stopped
        idx = list(before["items"]) if before and before.get("partial") else []
        mark = self._mark()
        self._in_source = True
        try:
            for k, s in samples:
                idx.append(self.append(s, key=k))
                if self._pending_bytes >= self.commit_bytes:  # a long source: commit its part so far
                    self._pending_sources.append((sb, json.dumps(dict(info, items=idx, partial=True)).encode()))
                    self.commit()
                    mark = self._mark()
        except BaseException:
            self._rollback(mark)  # what this source appended since its last commit
            raise
        finally:
            self._in_source = False
        self._pending_sources.append((sb, json.dumps(dict(info, items=idx)).encode()))
        if len(self._pending) >= self.commit_items or self._pending_bytes >= self.commit_bytes:
            self.commit()
        return idx

    def _mark(self) -> tuple[int, int, int, int]:
        return len(self._pending), len(self._pending_index), self._pending_bytes, len(self._pending_sources)

    def _rollback(self, mark: tuple[int, int, int, int]) -> None:
        for _, kb, _ in self._pending[mark[0]:]:
            self._pending_keys.discard(kb)
        del self._pending[mark[0]:], self._pending_index[mark[1]:], self._pending_sources[mark[3]:]
        self._pending_bytes = mark[2]

    def _source_record(self, source: str) -> dict | None:
        sb = encode_key(source, what="source")
        if len(sb) > store.MAX_KEY_BYTES:
            return None
        for s, rec in reversed(self._pending_sources):
            if s == sb:
                return json.loads(rec)
        raw = self._rtxn.get(sb, db=self._sources)
        return None if raw is None else json.loads(bytes(raw))

    def has_source(self, source: str) -> bool:
        """Whether every sample of ``source`` is written (or buffered)."""
        rec = self._source_record(source)
        return rec is not None and not rec.get("partial")

    def source_progress(self, source: str) -> int:
        """How many samples of ``source`` are written (or buffered): all of them, the committed part of a
        partial one, or 0."""
        rec = self._source_record(source)
        return 0 if rec is None else len(rec.get("items", ()))

    def sources(self) -> dict[str, dict]:
        """Committed sources and what was written for each (``partial: true`` for a source cut by a crash)."""
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
        (field,) = _field_names(field)
        self.commit()
        if self.count:  # "category" may mean "metadata.category": ask the first item
            with self._h.begin(buffers=True) as txn:
                first = codec.parse(store.get_item(txn, self._items, self._packed, 0))[3]
            field = resolve_field(first, field, where=self.path)
        if field in self.index_fields:
            return 0
        d = self._index_db(field)
        from .progress import tqdm
        entries: list[tuple[bytes, bytes]] = []
        written = 0

        def flush():
            nonlocal written
            self._rtxn.abort()  # growing the map must find no transaction open
            try:
                while True:
                    try:
                        with self._h.env.begin(write=True) as txn:
                            for v, ik in entries:
                                txn.put(v, ik, db=d, dupdata=True)
                        break
                    except lmdb.MapFullError:
                        self._grow()
                    except lmdb.Error as exc:
                        raise self._commit_failed(exc) from exc
            finally:
                self._rtxn = self._h.env.begin()
            written += len(entries)
            entries.clear()

        # read in chunks, each in its own transaction, and write between them: growing the map (set_mapsize)
        # invalidates every open transaction of the environment, so none may be open while flush() runs
        bar = tqdm(total=self.count, disable=not progress, desc=f"index {field}")
        start = 0
        while start < self.count:
            with self._h.begin(buffers=True) as txn:
                walk = store.walk_items(txn, self._items, self._packed, start, path=str(self.path))
                start = self.count
                for i, buf in walk:
                    try:
                        _, _, key, fields, arrays = codec.parse(buf)  # header only: no array is copied
                        value = field_value(fields, field)
                        if isinstance(value, msgpack.ExtType) or (value is None and any(a[0] == field for a in arrays)):
                            value = field_value(codec.decode(buf, decode_to="numpy")[1], field)  # an array (0-d?)
                    except codec.CorruptItemError as exc:
                        raise exc.at(str(self.path), i) from exc
                    entries.append((index_value(value, field=field, key=key), store.pack_index(i)))
                    if len(entries) >= 100_000:
                        start = i + 1
                        break
            bar.update(len(entries))
            flush()
        bar.close()
        self.index_fields = (*self.index_fields, field)
        self.meta["index_fields"] = list(self.index_fields)
        self.commit()
        return written

    def set_metadata(self, **values: Any) -> None:
        """Merge user metadata into the format record (written at the next commit)."""
        self.meta["metadata"] = dict(self.meta.get("metadata", {}), **values)

    def commit(self) -> None:
        """Commit the buffered items now. If it fails (CommitError, DiskFullError), the items stay buffered
        and the error lists their keys: fix the cause (free space) and call ``commit()`` again."""
        self._check_open()
        self._commit(mark_complete=False)

    def _index_db(self, field: str):
        d = self._index.get(field)
        if d is None:
            d = self._index[field] = self._h.db(store.index_db_name(field), create=True, dupsort=True, dupfixed=True)
        return d

    def _commit(self, *, mark_complete: bool) -> None:
        n = len(self._pending)
        meta = dict(self.meta, count=self.count + n, schema=self.schema, complete=mark_complete, updated=_now())
        blob = json.dumps(meta).encode()
        self._rtxn.abort()
        try:
            if self._fields_resolved or mark_complete:  # readers find an index (maybe empty) for every field
                for f in self.index_fields:
                    self._index_db(f)
            self._write(blob)
        finally:
            self._rtxn = self._h.env.begin()
        self.count += n
        self.meta = meta
        self._drop_pending()

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._pending_keys.clear()
        self._pending_index.clear()
        self._pending_sources.clear()
        self._pending_bytes = 0

    def _write(self, blob: bytes) -> None:
        while True:
            try:
                with self._h.env.begin(write=True) as txn:
                    if self._packed:
                        tail = self._put_runs(txn)
                    else:
                        for ik, _, data in self._pending:
                            txn.put(ik, data, db=self._items, append=True)
                    for i, (ik, kb, _) in enumerate(self._pending, start=self.count):
                        if self._packed and kb == str(i).encode():
                            continue  # a default key: implicit in a packed database
                        if not txn.put(kb, ik, db=self._keys, overwrite=False):
                            raise DuplicateKeyError(f"{self.path}: key {kb.decode()!r} is already in the database")
                    for f, v, ik in self._pending_index:
                        txn.put(v, ik, db=self._index[f.decode()], dupdata=True)
                    for s, rec in self._pending_sources:
                        txn.put(s, rec, db=self._sources)
                    txn.put(store.META_KEY, blob, db=self._meta)
                if self._packed:
                    self._tail = tail
                break
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                raise self._commit_failed(exc) from exc

    def _put_runs(self, txn) -> list[bytes]:
        """Write the open run (extended) and the buffered items as runs; returns the new open run's items."""
        items = self._tail + [data for _, _, data in self._pending]
        if not items:
            return self._tail
        if self._tail:  # stored under its last item's index: the last committed one
            txn.delete(store.pack_index(self.count - 1), db=self._items)
        last, pos = self.count - len(self._tail) - 1, 0
        for n in runs.split([len(x) for x in items]):
            last += n
            txn.put(store.pack_index(last), runs.pack(items[pos:pos + n]), db=self._items, append=True)
            pos += n
        run = items[pos - n:]
        return [bytes(x) for x in run] if runs.still_open(run) else []

    def _commit_failed(self, exc: Exception) -> CommitError:
        """The error for a commit LMDB refused: what is on disk, which buffered items were not written, why."""
        keys = [kb.decode(errors="replace") for _, kb, _ in self._pending]
        if not keys:
            lost = "no buffered items were waiting"
        else:
            shown = ", ".join(repr(k) for k in keys[:3]) + (f", ... {keys[-1]!r}" if len(keys) > 3 else "")
            lost = (f"the {len(keys)} buffered items (indices {self.count}..{self.count + len(keys) - 1}, keys "
                    f"{shown}) were not written; they stay buffered")
        where = f"{self.count} items committed (intact); {lost}"
        code = store._errno_of(exc)
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            free = None
        full = code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < max(4 * self._pending_bytes, 16 << 20))
        if full:
            return DiskFullError(f"disk full at {self.path}: {where}. Free space, then call commit() again, or close "
                                 f"and continue later with Writer(path, mode='append') ({exc})",
                                 not_committed=keys, committed=self.count)
        if code in (errno.EROFS, errno.EACCES, errno.EPERM) or isinstance(exc, lmdb.ReadonlyError):
            return ReadOnlyError(f"{self.path} cannot be written ({exc}): {where}")
        return CommitError(f"{self.path}: LMDB refused the commit ({exc}): {where}. Call commit() again once the "
                           "cause is fixed", not_committed=keys, committed=self.count)

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
        """Commit what is buffered, mark the database complete (unless complete=False) and write metadata.json.

        If the last commit fails, the writer still closes (the database keeps every committed item, marked
        incomplete) and the error lists the items that were not written.
        """
        if self.closed:
            return
        self._check_open()
        try:
            self._commit(mark_complete=complete)
            if not self.durable:
                self._h.env.sync(True)
            store.write_metadata_json(self.path, self.meta)
        finally:
            self.closed = True
            self._rtxn.abort()
            store.release(self._h)
            self._lock.release()

    def abort(self) -> None:
        """Close without committing the buffered items; the database keeps what was committed, incomplete."""
        if self.closed or self._pid != os.getpid():
            return
        self._drop_pending()
        self.close(complete=False)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        if self._pid != os.getpid():
            return  # a forked child leaving a with-block it inherited: the parent's writer is not ours
        # keep every whole item appended before the exception (a half-added source was rolled back),
        # marked incomplete; if even that fails, keep what was committed and say what was not
        try:
            self.close(complete=False)
        except Exception as failed:
            note = f"lmdbkit: while closing {self.path} after this error: {failed}"
            if hasattr(exc, "add_note") and not isinstance(exc, CommitError):
                exc.add_note(note)
            log.error(note)
            self.abort()

    def __del__(self):
        # an unclosed writer (e.g. dropped in a notebook) must not keep the database locked
        try:
            if not self.closed and self._pid == os.getpid():
                self.close(complete=False)
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<lmdbkit.Writer {str(self.path)!r} items={len(self) if not self.closed else self.count} {state}>"
