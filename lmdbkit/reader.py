"""The reader: one database, random access by index or key, without torch in the loop.

Construction checks the path and reads the format record (O(1): no scan). The environment is shared
per process (see ``store``) and reopened lazily in any other process that uses the reader (after
``fork``, or after unpickling under ``spawn``: the handle is dropped in ``__getstate__``). Finished
databases open ``readonly, lock=False``; unfinished ones with locking, so they can be read while a
writer is still appending, and a writer's map growth is adopted invisibly.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import json
import os
import pickle
import re
import threading
import time
import warnings
from time import perf_counter_ns
from typing import Any, Iterable, Iterator, Sequence

import lmdb

from . import codec, heap, runs, store
from .errors import (CorruptItemError, DamagedDatabaseError, IndexNotFoundError, LmdbkitError, NotADatabaseError,
                     UnsafeFormatError)
from .writer import index_value


def _deprecated_values(reader, field: str) -> list[tuple[Any, int]]:
    warnings.warn("Reader.values(field) is renamed value_counts(field) (it returns (value, count) pairs of an "
                  "index, not the items); values() will be removed", DeprecationWarning, stacklevel=3)
    return reader.value_counts(field)

_LEGACY_LEN_KEYS = (b"__len__", b"length", b"__length__", b"len", b"num_samples")
ITER_CHUNK = 64  # items per read transaction while iterating


def _lmdb_errors(method):
    """Report LMDB's errors from a read method as DamagedDatabaseError naming the database."""
    @functools.wraps(method)
    def wrapper(self, *args, **kw):
        try:
            return method(self, *args, **kw)
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
    return wrapper


class Reader:
    """Read a database written by ``lmdbkit.Writer`` (or, with ``allow_pickle=True``, a legacy one).

    decode_to:   "auto" (arrays come back as the kind written), "numpy" or "torch".
    verify:      check every item's checksum on read (``lmdbkit verify`` checks a whole database).
    allow_pickle: read a legacy pickle-in-LMDB database. Unpickling runs code chosen by whoever wrote
                 the file: only for databases you trust; prefer converting them once.
    max_readers: LMDB reader slots, for unfinished databases opened with locking.
    complex32:   half-size complex arrays (dtype complex32) come back as "complex64" (default) or as their
                 float16 real/imaginary "pairs" [..., 2] (half the bytes to move, e.g. widened on the GPU).
    """

    def __init__(self, path: str | os.PathLike, *, decode_to: codec.DecodeTo = "auto", verify: bool = False,
                 allow_pickle: bool = False, max_readers: int = 126, complex32: str = "complex64"):
        if decode_to not in codec.DECODE_TO:
            raise LmdbkitError(f"decode_to={decode_to!r} is unsupported. Supported values are {list(codec.DECODE_TO)}")
        if complex32 not in codec.COMPLEX32:
            raise LmdbkitError(f"complex32={complex32!r} is unsupported. Supported values are {list(codec.COMPLEX32)}")
        self.complex32 = complex32
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        self.path = str(store.check_exists(path))
        self.decode_to, self.verify, self.allow_pickle, self.max_readers = decode_to, verify, allow_pickle, max_readers
        self._h: store.Handle | None = None
        self._pid = -1
        self._locked = store.reader_needs_lock(self.path)
        try:
            h = self._handle()
            meta = store.read_meta(h)
            self.legacy = meta is None and store.looks_legacy(h)
            if meta is None and not self.legacy:
                meta = self._await_format_record()
                if meta is None:
                    raise NotADatabaseError(
                        f"{self.path} is an LMDB environment but not an lmdbkit database (no format record, "
                        "no str(idx) keys). Write it with lmdbkit.Writer or convert it with `lmdbkit convert`")
                h = self._handle()
            if self.legacy:
                if not allow_pickle:
                    raise UnsafeFormatError(
                        f"{self.path} is a legacy pickle-in-LMDB database (str(idx) keys, pickled values). "
                        "Unpickling can run arbitrary code, so it is refused by default. If you trust its "
                        "source, open it with allow_pickle=True, or convert it once to format 1: "
                        f"`lmdbkit convert legacy {self.path} NEW.lmdb --allow-pickle`")
                meta = self._legacy_meta(h)
            elif not meta.get("complete") and not self._locked:
                # metadata.json said complete but the record says otherwise: read with locking
                self._locked = True
                self._reopen()
        except BaseException:
            self.close()
            raise
        self._meta = meta
        self._complete = bool(meta.get("complete"))
        self._packed = store.packed(meta)  # items in runs, default keys implicit (format 2)
        self._kept = _Kept()

    # -- environment ---------------------------------------------------------------------------------

    def _handle(self) -> store.Handle:
        h = self._h
        if h is not None and self._pid == store.PID:
            return h
        self._h = None
        heap.keep_freed_memory()
        self._h = store.acquire(self.path, lock=self._locked, max_readers=self.max_readers)
        self._pid = store.PID
        self._items = None if self.__dict__.get("legacy") else self._h.db(store.ITEMS)
        self.__dict__.pop("_fetch", None)  # the last environment's
        return self._h

    @functools.cached_property
    def _fetch(self) -> store.Prefetcher:
        """The environment's lookups (``store.Handle.prefetcher``), made at the first read: opening a database
        to ask its length needs none."""
        return self._handle().prefetcher

    def _await_format_record(self, timeout: float = 5.0) -> dict | None:
        """The format record of a database whose writer is still creating it: a Writer makes the environment,
        then commits the record at once, and a reader can open it in between. None when no writer holds the
        database (then it is not one of ours); an LmdbkitError when the writer's first commit does not come."""
        deadline, waited = time.monotonic() + timeout, False
        while (holder := store.writer_holder(self.path)) is not None:
            waited = True
            self._reopen()
            meta = store.read_meta(self._h)
            if meta is not None:
                return meta
            if time.monotonic() > deadline:
                raise NotADatabaseError(
                    f"{self.path} is being created by a writer{holder} whose first commit has not landed after "
                    f"{timeout:g} s; open it again once the writer has written something")
            time.sleep(0.01)
        if not waited:
            return None
        self._reopen()  # the writer committed and closed just now
        return store.read_meta(self._h)

    def _reopen(self) -> None:
        if self._h is not None:
            store.release(self._h)
            self._h = None
        self._handle()

    def _txn(self):
        """A read transaction whose memoryviews point into the map (valid until the transaction ends)."""
        return self._handle().begin(buffers=True)

    def _single(self) -> tuple | None:
        """(transaction, cursor) for a single read of a finished database: this thread's, begun at most KEEP_NS
        ago and kept for the reads that follow; None for a database that is still being written (each of its
        reads takes a transaction of its own, which may hold a reader slot and is ended at once)."""
        if not self._complete or self._locked or self.legacy:
            return None
        k = self._kept
        now = perf_counter_ns()
        if now < k.until and k.h is self._h and self._pid == store.PID:
            return k.txn, k.cursor
        k.drop()
        h = self._handle()
        k.txn = h.env.begin(buffers=True)
        k.cursor, k.h, k.until = k.txn.cursor(db=self._items), h, now + KEEP_NS
        return k.txn, k.cursor

    def close(self) -> None:
        """Release this reader's share of the environment. Idempotent."""
        kept = self.__dict__.get("_kept")
        if kept is not None:
            kept.drop()  # this thread's; other threads' end with the object, before the environment is closed
            self._kept = _Kept()
        h, self._h = self.__dict__.get("_h"), None
        if h is not None and self._pid == store.PID:
            store.release(h)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_h=None, _pid=-1, _items=None)
        for name in ("_kept", "_fetch"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _kept=_Kept())

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- format record -------------------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        """The format record: count, schema, index fields, user metadata, complete flag, timestamps."""
        if not self._complete:
            self._meta = store.read_meta(self._handle()) or self._meta
            self._complete = bool(self._meta.get("complete"))
            self._packed = store.packed(self._meta)  # a writer settles it with its first item
        return self._meta

    @property
    def metadata(self) -> dict:
        """The user metadata stored at write time (e.g. the STFT config)."""
        return self.meta.get("metadata", {})

    def __len__(self) -> int:
        return self.meta["count"]

    def _legacy_meta(self, h: store.Handle) -> dict:
        with h.begin() as txn:
            count = None
            for k in _LEGACY_LEN_KEYS:
                raw = txn.get(k)
                if raw is not None:
                    try:
                        count = int(raw)
                    except ValueError:
                        count = int(pickle.loads(raw))  # allow_pickle was given
                    break
            if count is None:
                count = h.env.stat()["entries"]
                cur = txn.cursor()
                if cur.last():  # non-digit keys sort after the digits: count them from the end
                    while not bytes(cur.key()).isdigit():
                        count -= 1
                        if not cur.prev():
                            break
        return {"format": "legacy-pickle", "version": 0, "count": count, "schema": {}, "index_fields": [],
                "metadata": {}, "complete": True}

    # -- items ---------------------------------------------------------------------------------------

    def _norm(self, i: int) -> int:
        if type(i) is not int:
            try:
                i = i.__index__()
            except AttributeError:
                raise TypeError(f"{self.path}: items are read by integer index, got {type(i).__name__}; "
                                "use .get(key) for keys") from None
        n = self._meta["count"]
        if not self._complete and (i < 0 or i >= n):  # a growing database: look again only when needed
            n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"index {i} is out of range for {self.path}, which holds {n} items")
        return j

    def _decode(self, buf, where: object, with_key: bool = True) -> tuple[str | None, dict]:
        if buf is None:
            raise CorruptItemError("the item is missing from the items table", path=self.path, key=where)
        if self.legacy:
            return None, pickle.loads(buf)
        try:
            return codec.decode(buf, decode_to=self.decode_to, verify=self.verify, complex32=self.complex32,
                                with_key=with_key)
        except CorruptItemError as exc:
            raise exc.at(self.path, where) from exc

    def _raw(self, txn, i: int, cursor=None):
        """Item ``i``'s stored bytes (a view into the map, valid while ``txn`` lasts), or None; ``cursor``: one of
        ``txn`` on the items table to look it up with (else a new one)."""
        if self.legacy:
            return txn.get(str(i).encode())
        if not self._packed:
            return self._fetch.get(txn, self._items, store.pack_index(i), cursor)
        found = self._fetch.get_run(txn, self._items, store.pack_index(i), cursor)
        if found is None:
            return None
        try:
            return runs.in_found(found, i, self.verify)
        except CorruptItemError as exc:
            raise exc.at(self.path, i) from exc

    def _raw_many(self, txn, indices: list[int]) -> list:
        """The stored bytes of several items, their disk reads in flight together (see ``prefetch``)."""
        bufs = self._raw_batch(txn, indices)
        return bufs.items() if type(bufs) is runs.InRuns else bufs

    def _raw_batch(self, txn, indices: list[int]) -> list | runs.InRuns:
        """``_raw_many``, a packed database's items left in their runs (``runs.InRuns``) when none is missing."""
        if self.legacy:
            return [txn.get(str(i).encode()) for i in indices]
        keys = store.pack_indices(indices)
        if not self._packed:
            return self._fetch.get_many(txn, self._items, keys)
        found = self._fetch.get_many(txn, self._items, keys, ranged=True)
        return self._in_runs(found, indices) if None in found else runs.InRuns(found, indices, self._in_runs)

    def _in_runs(self, found: list, indices: list[int]) -> list:
        """Each item's bytes in the (key, run) a ranged lookup found for it, or None (no such run)."""
        try:
            return runs.slices(found, indices, self.verify)
        except CorruptItemError:
            for f, i in zip(found, indices):  # which one: named
                try:
                    runs.slices([f], [i], self.verify)
                except CorruptItemError as exc:
                    raise exc.at(self.path, i) from exc
            raise  # not reached: the same items fail again

    def __getitem__(self, i: int) -> dict:
        k = self._kept
        if not (type(i) is int and 0 <= i < self._meta["count"] and perf_counter_ns() < k.until and k.h is self._h
                and self._pid == store.PID):
            return self._read(i)
        # the common case, in as few steps as it takes: a finished database read again within KEEP_NS, through
        # this thread's kept transaction (``_single``); the item is copied out before the transaction can end
        try:
            buf = self._raw(k.txn, i, k.cursor)
            sample = None if self.verify or buf is None else codec.decode_seen(buf, self.decode_to)
            return sample if sample is not None else self._decode(buf, i, False)[1]
        except lmdb.Error as exc:
            raise self._damaged(exc, i) from exc

    def _read(self, i: int) -> dict:
        """``self[i]`` in general: any index, any database, a transaction begun when none is kept."""
        j = self._norm(i)
        try:
            single = self._single()
            if single is not None:  # the item is copied out of the map before the transaction can end
                return self._decode(self._raw(single[0], j, single[1]), j, False)[1]
            with self._txn() as txn:
                return self._decode(self._raw(txn, j), j, False)[1]
        except lmdb.Error as exc:
            raise self._damaged(exc, j) from exc

    @_lmdb_errors
    def read_many(self, indices: Iterable[int]) -> list[dict]:
        """Several items by index, in one read transaction."""
        idx = [self._norm(i) for i in indices]
        with self._txn() as txn:
            return [self._decode(buf, j, False)[1] for buf, j in zip(self._raw_many(txn, idx), idx)]

    def _damaged(self, exc: Exception, where: object = None) -> LmdbkitError:
        """LMDB's own report of a damaged page, as an LmdbkitError naming the database (and item)."""
        item = f" (reading item {where!r})" if where is not None else ""
        return DamagedDatabaseError(f"{self.path}: LMDB reports damage{item}: {exc}. Run `lmdbkit verify "
                                    f"{self.path}` for a report; restore the database from a good copy")

    @_lmdb_errors
    def key_of(self, i: int) -> str | None:
        """The key an item was written under, from its header (its arrays are not decoded)."""
        j = self._norm(i)
        if self.legacy:
            return str(j)
        with self._txn() as txn:
            buf = self._raw(txn, j)
            try:
                return codec.peek_key(buf) if buf is not None else None
            except CorruptItemError as exc:
                raise exc.at(self.path, j) from exc

    @_lmdb_errors
    def index_of(self, key: str) -> int | None:
        """The index of a key, or None."""
        if self.legacy:
            return int(key) if key.isdigit() and int(key) < len(self) else None
        with self._txn() as txn:
            return self._index_in(txn, key)

    def _index_in(self, txn, key: str) -> int | None:
        raw = txn.get(key.encode(), db=self._keys_db())
        if raw is not None:
            return store.unpack_index(raw)
        i = store.implicit_key(key) if self._packed else None
        if i is None or i >= len(self):
            return None
        buf = self._raw(txn, i)
        try:
            return i if buf is not None and codec.peek_key(buf) == key else None
        except CorruptItemError as exc:
            raise exc.at(self.path, i) from exc

    def _keys_db(self):
        return self._handle().db(store.KEYS)

    @_lmdb_errors
    def near_keys(self, key: str, n: int = 3) -> list[str]:
        """Up to ``n`` stored keys most like ``key`` among its sorted neighbours (for "did you mean")."""
        if self.legacy:
            return []
        kb, m = key.encode(), 4 * n
        with self._txn() as txn:  # the 4n keys after where ``key`` would sort, and the 4n before it
            cur = txn.cursor(db=self._keys_db())
            inside = cur.set_range(kb)
            found = [bytes(k).decode() for k, _ in zip(cur.iternext(values=False), range(m))] if inside else []
            if (cur.set_range(kb) and cur.prev()) or (not inside and cur.last()):
                found += [bytes(k).decode() for k, _ in zip(cur.iterprev(values=False), range(m))]
            if self._packed:
                found += self._default_keys_near(txn, key, m)
        return difflib.get_close_matches(key, found, n, 0.0)

    def _default_keys_near(self, txn, key: str, m: int) -> list[str]:
        """The default keys (an item's index as text, which a packed database keeps in no keys table) of up to
        2m items around the number that ``key`` starts with (or ends with), or the last ones if it is beyond."""
        digits = re.match(r"\d+", key) or re.search(r"\d+$", key)
        if digits is None:
            return []
        count = len(self)
        at = min(int(digits.group()), count - 1)
        out = []
        for i in range(max(0, at - m), min(count, at + m + 1)):
            buf = self._raw(txn, i)
            try:
                if buf is not None and codec.peek_key(buf) == str(i):
                    out.append(str(i))
            except CorruptItemError:
                continue  # a suggestion, not a check: verify reports damage
        return out

    def get(self, key: str, default: Any = KeyError) -> dict:
        """The item written under ``key``; KeyError (naming the key and path) if absent, unless a default is given."""
        j = self.index_of(key)
        if j is None:
            if default is KeyError:
                raise KeyError(f"key {key!r} is not in {self.path}")
            return default
        return self[j]

    @_lmdb_errors
    def retrieve_batch(self, keys: Iterable[str | int]) -> list[dict | None]:
        """The items for several keys (str) or indices (int), in one transaction; None where a key is missing
        (an index out of range raises IndexError, as ``reader[i]`` does)."""
        wanted = [_key_or_index(k, self.path) for k in keys]
        if self.legacy:
            return [self.get(k, None) if isinstance(k, str) else self[k] for k in wanted]
        with self._txn() as txn:
            found = []
            for k in wanted:
                if isinstance(k, str):
                    found.append((k, self._index_in(txn, k)))
                else:
                    found.append((k, self._norm(k)))
            bufs = iter(self._raw_many(txn, [j for _, j in found if j is not None]))
            return [None if j is None else self._decode(next(bufs), k, False)[1] for k, j in found]

    # the names older storage classes used, so ported code runs as it is
    def retrieve_sample(self, key: str) -> dict:
        """The item written under ``key`` (the older storage classes' name for ``get``)."""
        return self.get(key)

    def get_all_keys(self) -> list[str]:
        """Every key in index order (the older storage classes' name for ``keys``)."""
        return self.keys()

    @_lmdb_errors
    def keys(self) -> list[str]:
        """Every key, in index order (so ``keys()[i]`` is the key of ``reader[i]``)."""
        if self.legacy:
            return [str(i) for i in range(len(self))]
        with self._txn() as txn:
            pairs = [(store.unpack_index(v), bytes(k).decode()) for k, v in txn.cursor(db=self._keys_db())]
        if self._packed:  # an item without an entry is under its default key
            given = dict(pairs)
            return [given.get(i) or str(i) for i in range(len(self))]
        pairs.sort()
        return [k for _, k in pairs]

    def items(self) -> Iterator[tuple[str | None, dict]]:
        """(key, sample) pairs in index order, a chunk of items per read transaction (their reads requested
        together, see ``prefetch``).

        No transaction stays open while the caller holds the generator, so a writer in this process may grow
        the map (which ends every transaction of the environment) between two items.
        """
        if self.legacy:
            for i in range(len(self)):
                yield str(i), self[i]
            return
        n = len(self)
        for start in range(0, n, ITER_CHUNK):
            idx = list(range(start, min(n, start + ITER_CHUNK)))
            try:
                with self._txn() as txn:
                    chunk = [self._decode(buf, j) for buf, j in zip(self._raw_many(txn, idx), idx)]
            except lmdb.Error as exc:
                raise self._damaged(exc, start) from exc
            yield from chunk

    def __iter__(self) -> Iterator[dict]:
        for _, sample in self.items():
            yield sample

    # -- secondary indexes ---------------------------------------------------------------------------

    @property
    def index_fields(self) -> list[str]:
        return list(self.meta.get("index_fields", []))

    def index_name(self, field: str) -> str:
        """The indexed field a query name means: itself, with ``__`` read as ``.`` (``metadata__category``, for
        keyword arguments), or the one indexed nested field it is the last name of (``category``)."""
        fields = self.index_fields
        for name in (field, field.replace("__", ".")):
            if name in fields:
                return name
            found = [f for f in fields if f.endswith("." + name)]
            if len(found) == 1:
                return found[0]
            if found:
                raise IndexNotFoundError(f"{self.path}: {field!r} could mean any of the indexed fields {found}; "
                                         "give the full path")
        return field

    def _index_db(self, field: str):
        field = self.index_name(field)
        if field not in self.index_fields:
            raise IndexNotFoundError(
                f"{self.path} has no index on {field!r}; indexed fields are {self.index_fields}. Build one with "
                f"lmdbkit.build_index({self.path!r}, {field!r}) (command line: lmdbkit index PATH {field}) or write with Writer(..., index_fields=({field!r},))")
        return self._handle().db(store.index_db_name(field))

    @_lmdb_errors
    def query(self, **conditions: Any) -> list[int]:
        """Sorted indices of the items whose indexed fields equal the given values (several intersect).

        A nested field is named by its path, ``query(**{"metadata.category": "A"})``, or as a keyword
        ``query(metadata__category="A")``, or by its last name when that is unambiguous, ``query(category="A")``.
        """
        if not conditions:
            raise LmdbkitError("query() needs at least one field=value condition")
        result: set[int] | None = None
        with self._txn() as txn:
            for field, value in conditions.items():
                name = self.index_name(field)
                cur = txn.cursor(db=self._index_db(name))
                found: set[int] = set()
                if cur.set_key(index_value(value, field=name)):
                    found = set(map(store.unpack_index, cur.iternext_dup()))
                result = found if result is None else result & found
        return sorted(result or ())

    def values(self, field: str) -> list[tuple[Any, int]]:
        """Deprecated name of ``value_counts`` (it read as the dict method beside ``keys()`` and ``get()``)."""
        return _deprecated_values(self, field)

    @_lmdb_errors
    def value_counts(self, field: str) -> list[tuple[Any, int]]:
        """The distinct values of an indexed field with their item counts, as (value, count) pairs.

        Pairs, not a dict, because a field may hold both 1 and True (or 0 and False), which the index keeps
        apart and a dict would merge; ``dict(reader.value_counts("label"))`` is fine for a field of one type.
        """
        out: list[tuple[Any, int]] = []
        with self._txn() as txn:
            cur = txn.cursor(db=self._index_db(field))
            for k in cur.iternext_nodup():
                out.append((json.loads(bytes(k)), cur.count()))
        return out

    def __repr__(self) -> str:
        kind = "legacy pickle" if self.legacy else ("complete" if self._meta.get("complete") else "incomplete")
        return f"<lmdbkit.Reader {self.path!r} items={len(self)} {kind}>"


# A finished database's single reads in one thread share a read transaction and its cursor for up to this
# long: beginning and ending a transaction and making a cursor cost ~0.9 us of a ~7 us read of a small item.
# Such a database is opened without LMDB's lock, so its readers hold nothing a writer waits for; the bound
# keeps what a read sees no older than this (a database appended to by another process while it is read as
# finished is not supported: README, "Workers, fork, locking and map size").
KEEP_NS = 1_000_000


class _Kept(threading.local):
    """One thread's kept read transaction of a Reader (``Reader._single``)."""

    h = txn = cursor = None
    until = 0

    def drop(self) -> None:
        txn, self.txn, self.cursor, self.h, self.until = self.txn, None, None, None, 0
        if txn is not None:
            try:
                txn.abort()
            except lmdb.Error:  # its environment was closed (in a forked child: the parent's)
                pass


def _key_or_index(k, path: str) -> str | int:
    """A retrieve_batch entry as a key (str) or an index (int); anything else is refused, naming it."""
    if isinstance(k, str):
        return k
    if not isinstance(k, bool):
        try:
            return k.__index__()
        except AttributeError:
            pass
    raise LmdbkitError(f"{path}: retrieve_batch takes keys (str) or item indices (int), got {type(k).__name__} "
                       f"{k!r}")


class MultiReader:
    """Several databases read as one (shards, or a list/folder/glob of databases), with global indices.

    Keyword options are those of Reader. LMDBDataset is this plus torch; the widgets and plots use it as is.
    """

    def __init__(self, paths, **reader_kw):
        self.paths = [str(p) for p in store.resolve_paths(paths)]
        self.readers: list[Reader] = []
        try:
            for p in self.paths:
                self.readers.append(Reader(p, **reader_kw))
        except BaseException:
            self.close()
            raise
        self.refresh()

    def refresh(self) -> None:
        """Re-read the lengths (for databases that are still being written)."""
        self.offsets = [0]
        for r in self.readers:
            self.offsets.append(self.offsets[-1] + len(r))

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def path(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} databases ({self.paths[0]}, ...)"

    def locate(self, i: int) -> tuple[Reader, int]:
        """The reader holding global index ``i`` and the index within it."""
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"index {i} is out of range for {self.path}, which "
                             f"hold{'s' if len(self.paths) == 1 else ''} {n} items")
        r = bisect.bisect_right(self.offsets, j) - 1
        return self.readers[r], j - self.offsets[r]

    def groups(self, indices: list[int]) -> list[tuple[Reader, Sequence[int], list[int]]]:
        """The databases a batch of global indices touches, in first-use order, each as (reader, the batch
        positions it holds, their indices within it). One database needs no search; negative indices count
        from the end; an index out of range is an IndexError naming it."""
        if len(self.readers) == 1:
            r, n = self.readers[0], len(self)
            js = [i + n if i < 0 else i for i in indices]
            if not js:
                return []
            if 0 <= min(js) and max(js) < n:
                return [(r, range(len(js)), js)]
        found: dict[int, tuple[Reader, list[int], list[int]]] = {}
        for pos, i in enumerate(indices):
            r, j = self.locate(i)
            group = found.setdefault(id(r), (r, [], []))
            group[1].append(pos)
            group[2].append(j)
        return list(found.values())

    def __getitem__(self, i: int) -> dict:
        reader, j = self.locate(i)
        return reader[j]

    def read_many(self, indices) -> list[dict]:
        """Items by global index, in the order asked: one read transaction per database touched."""
        indices = list(indices)
        out: list = [None] * len(indices)
        for reader, positions, js in self.groups(indices):
            for pos, sample in zip(positions, reader.read_many(js)):
                out[pos] = sample
        return out

    def __iter__(self):
        for r in self.readers:
            yield from r

    def index_of(self, key: str) -> int | None:
        """The global index of a key, or None."""
        for r, off in zip(self.readers, self.offsets):
            j = r.index_of(key)
            if j is not None:
                return off + j
        return None

    def get(self, key: str, default: Any = KeyError) -> dict:
        i = self.index_of(key)
        if i is None:
            if default is KeyError:
                raise KeyError(f"key {key!r} is not in {self.paths}")
            return default
        return self[i]

    def key_of(self, i: int) -> str | None:
        reader, j = self.locate(i)
        return reader.key_of(j)

    def near_keys(self, key: str, n: int = 3) -> list[str]:
        """Up to ``n`` stored keys most like ``key``, over every database."""
        return difflib.get_close_matches(key, [k for r in self.readers for k in r.near_keys(key, n)], n, 0.0)

    def keys(self) -> list[str]:
        return [k for r in self.readers for k in r.keys()]

    def retrieve_batch(self, keys) -> list[dict | None]:
        """The items for several keys (str) or global indices (int); None where a key is missing."""
        out = []
        for k in keys:
            k = _key_or_index(k, self.path)
            out.append(self.get(k, None) if isinstance(k, str) else self[k])
        return out

    retrieve_sample = Reader.retrieve_sample
    get_all_keys = Reader.get_all_keys

    @property
    def meta(self) -> dict:
        """The format record of the first database; with several, ``count`` is the total."""
        m = dict(self.readers[0].meta)
        if len(self.readers) > 1:
            m["count"] = len(self)
            m["databases"] = self.paths
        return m

    @property
    def metadata(self) -> dict:
        return self.readers[0].metadata

    @property
    def metas(self) -> list[dict]:
        return [r.meta for r in self.readers]

    @property
    def index_fields(self) -> list[str]:
        """Fields indexed in every database."""
        fields = [f for f in self.readers[0].index_fields if all(f in r.index_fields for r in self.readers)]
        return fields

    def query(self, **conditions: Any) -> list[int]:
        """Global indices of the items matching an index query (see Reader.query)."""
        return [off + j for r, off in zip(self.readers, self.offsets) for j in r.query(**conditions)]

    def values(self, field: str) -> list[tuple[Any, int]]:
        """Deprecated name of ``value_counts``."""
        return _deprecated_values(self, field)

    def value_counts(self, field: str) -> list[tuple[Any, int]]:
        """Distinct values of an indexed field with their counts, over every database."""
        merged: dict[tuple[str, Any], list] = {}
        for r in self.readers:
            for v, n in r.value_counts(field):
                merged.setdefault((type(v).__name__, v), [v, 0])[1] += n
        return [(v, n) for v, n in merged.values()]

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> "MultiReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<lmdbkit.MultiReader {len(self)} items from {len(self.paths)} database(s)>"
