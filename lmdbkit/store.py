"""Opening LMDB environments, their sub-databases and the format record.

py-lmdb refuses a second ``lmdb.open`` of the same files in one process, and a forked child inherits the
parent's open environments together with that refusal. So every environment lmdbkit opens lives in a
per-process registry keyed by its data file's identity (``file_id``): all readers (and the writer) of one
database in one process share one environment, and a forked child forgets what it inherited before it opens
its own.
"""

from __future__ import annotations

import errno
import fcntl
import glob as _glob
import json
import os
import socket
import struct
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import lmdb

from .errors import (CorruptItemError, DamagedDatabaseError, DatabaseBusyError, DatabaseNotFoundError, DiskFullError,
                     FormatVersionError, LmdbkitError, NotADatabaseError, ReadOnlyError, TruncatedDatabaseError)
from . import runs
from .prefetch import Prefetcher

FORMAT_NAME = "lmdbkit"
FORMAT_VERSION = 1  # one item per key; what a writer of large items writes (older lmdbkit reads it)
PACKED_VERSION = 2  # small items packed in runs (see runs), default keys implicit
VERSIONS = (FORMAT_VERSION, PACKED_VERSION)
META_KEY = b"format"
METADATA_JSON = "metadata.json"
WRITER_LOCK = "writer.lock"
DATA_FILE, LOCK_FILE = "data.mdb", "lock.mdb"
MAX_KEY_BYTES = 511  # LMDB's compiled-in key limit (mdb_env_get_maxkeysize); also the limit of dupsort values
SUFFIX = ".lmdb"

ITEMS, KEYS, META, SOURCES = b"items", b"keys", b"meta", b"sources"
INDEX_PREFIX = "index:"
MAX_DBS = 64

_INDEX = struct.Struct(">Q")


def pack_index(i: int) -> bytes:
    """An item index as its 8-byte big-endian key (so LMDB's key order is index order)."""
    return _INDEX.pack(i)


def pack_indices(indices: list[int]) -> list[bytes]:
    """``pack_index`` of each (one C-level loop: a batch's keys)."""
    return list(map(_INDEX.pack, indices))


def unpack_index(b) -> int:
    try:
        return _INDEX.unpack(b)[0]
    except struct.error:
        raise DamagedDatabaseError(f"an item index of {len(b)} bytes where 8 are stored: the database is damaged. "
                                   "Run `lmdbkit verify PATH` for a report") from None


def packed(meta: dict) -> bool:
    """Whether a database's items are packed in runs (format 2)."""
    return meta.get("version") == PACKED_VERSION


def implicit_key(key: str) -> int | None:
    """The index whose default key ``key`` is ("17" for item 17), or None. A packed database keeps no keys-table
    entry for an item under its default key."""
    if key.isascii() and key.isdigit() and (key == "0" or key[0] != "0"):
        return int(key)
    return None


def get_item(txn, db, packed: bool, i: int):
    """Item i's stored bytes (a view into the map when ``txn`` has buffers=True), or None: for a writer's own
    reads; a Reader's go through its Prefetcher."""
    if not packed:
        return txn.get(pack_index(i), db=db)
    cursor = txn.cursor(db=db)
    if not cursor.set_range(pack_index(i)):
        return None
    return runs.item(cursor.value(), unpack_index(cursor.key()), i)


def walk_items(txn, db, packed: bool, start: int = 0, *, path: str | None = None) -> Iterable[tuple[int, object]]:
    """(index, stored bytes) of every item from ``start`` on, in index order; a damaged run is a CorruptItemError
    naming ``path`` and the run's last item (``integrity`` walks the table more carefully, reporting and going on)."""
    cursor = txn.cursor(db=db)
    ok = cursor.set_range(pack_index(start))
    while ok:
        k, v = cursor.item()
        last = unpack_index(k)
        if not packed:
            yield last, v
        else:
            try:
                parts = runs.items(v)
            except CorruptItemError as exc:
                raise exc.at(path, last) from exc  # named by its run's last item
            for i, buf in enumerate(parts, start=last - len(parts) + 1):
                if i >= start:
                    yield i, buf
        ok = cursor.next()


def index_db_name(field: str) -> bytes:
    return (INDEX_PREFIX + field).encode()


@dataclass
class Handle:
    """One open environment and its sub-database handles, shared within one process."""

    path: str
    env: lmdb.Environment
    key: tuple[int, int]  # file_id: what the registry knows it by
    writable: bool
    locked: bool
    pid: int = field(default_factory=os.getpid)
    users: int = 0
    dbs: dict = field(default_factory=dict)
    _prefetcher: Prefetcher | None = None

    @property
    def prefetcher(self) -> Prefetcher:
        """This environment's reads of large values (see ``prefetch``), made on first use."""
        p = self._prefetcher
        if p is None:
            p = self._prefetcher = Prefetcher(self.begin, self.env.stat()["psize"],
                                              finished=not self.writable and not self.locked)
        return p

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
            if self._prefetcher is not None:
                self._prefetcher.leaves = None  # the map moves: forget addresses in it
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
_registry: dict[tuple[int, int], Handle] = {}  # by the identity of each database's data file (``file_id``)
_writer_locks: "weakref.WeakSet[WriterLock]" = weakref.WeakSet()
PID = os.getpid()  # this process's pid, kept by the fork hook below (os.getpid() is a system call per read)


def _forget_inherited() -> None:
    """In a forked child: close the environments inherited from the parent, so this process may open its own.

    Our readers hold no transaction across calls, so closing here touches none of the parent's reader
    slots; the parent's own handles are untouched (they live in the parent's memory).
    """
    global _lock, PID
    _lock = threading.RLock()
    PID = os.getpid()
    for wl in list(_writer_locks):
        wl.release()  # the parent keeps its lock; this child holds no writer
    for h in list(_registry.values()):
        try:
            h.env.close()
        except Exception:
            pass
    _registry.clear()


os.register_at_fork(after_in_child=_forget_inherited)


def file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """The identity of the database at ``path``: its data file's (device, inode); None where it has none yet.

    One database is one environment in a process, whatever name it is reached by (LMDB's locks belong to the
    process and the file: a second environment of the same files would release them on closing). A database
    that another process has made again at the same path is new files, so it gets an environment of its own
    while readers of the old one finish. One stat: resolving the path (``os.path.realpath``) took ~20 µs."""
    try:
        st = os.stat(os.path.join(path, DATA_FILE))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def acquire(path: str | os.PathLike, *, writable: bool = False, lock: bool = True, map_size: int | None = None,
            max_readers: int = 126, sync: bool = True) -> Handle:
    """Open (or share) the environment of the database at ``path`` in this process."""
    key = file_id(path)
    with _lock:
        h = None if key is None else _registry.get(key)
        if h is not None and h.pid != os.getpid():  # fork without our hook (should not happen)
            _registry.pop(key)
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
        rp = os.path.abspath(path)
        check_data_file(rp)  # a truncated data.mdb would kill this process with SIGBUS on first touch
        try:
            if writable:
                env = lmdb.open(rp, map_size=map_size or 1 << 26, max_dbs=MAX_DBS, subdir=True, sync=sync,
                                metasync=sync, readahead=False, meminit=False, max_readers=max_readers, lock=True)
            else:
                env = lmdb.open(rp, readonly=True, lock=lock, readahead=False, meminit=False, max_dbs=MAX_DBS,
                                subdir=True, max_readers=max_readers, create=False)
        except lmdb.Error as exc:
            if "already open in this process" in str(exc):  # py-lmdb's guard: not by an lmdbkit object
                raise DatabaseBusyError(
                    f"{path}: its files are already open in this process outside lmdbkit (an lmdb.Environment of "
                    "your own?), or an older database at this path is (another process made it again while a "
                    f"Reader here held the old one, and the new files took the old ones' inodes): close those, "
                    f"then open it again ({exc})") from exc
            raise open_error(path, exc, writable=writable, locked=lock) from exc
        # a new database's key once LMDB has made its files (if they are gone again already, one no other has)
        key = key or file_id(rp) or (-1, id(env))
        h = Handle(rp, env, key, writable=writable, locked=lock or writable, users=1)
        if not writable:
            try:
                h.open_all()
            except lmdb.Error as exc:
                env.close()
                raise DamagedDatabaseError(f"{path}: LMDB cannot read it ({exc}); the file is damaged. "
                                        f"Run `lmdbkit verify {path}` for a report") from exc
        _registry[h.key] = h
        return h


def open_error(path, exc: Exception, *, writable: bool, locked: bool) -> LmdbkitError:
    """The LmdbkitError for an lmdb.open that failed: read-only media, permissions, or not a database."""
    code = _errno_of(exc)
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or isinstance(exc, lmdb.ReadonlyError):
        what = "is on read-only media" if code == errno.EROFS else "is not writable by you"
        if writable:
            return ReadOnlyError(f"{path} {what}, so nothing can be written there ({exc}). Write to a folder "
                                 "you can write to, or fix its permissions")
        if locked:
            return ReadOnlyError(
                f"{path} is not marked complete (a writer may still be running, or one was interrupted), so it "
                f"is opened with LMDB's lock file, which needs a writable folder; the folder {what} ({exc}). "
                "Copy the database to writable storage, or finish it first: "
                f"lmdbkit.Writer({str(path)!r}, mode='append').close()")
        return ReadOnlyError(f"{path}: permission denied ({exc}); you need read access to its files")
    if code == errno.ENOSPC:
        return DiskFullError(f"disk full at {path}: LMDB cannot create its files ({exc}). Free space, then retry")
    if code == errno.ENOMEM:
        return LmdbkitError(f"{path}: LMDB cannot map the database ({exc}): the map size is larger than this "
                            "process can reserve. Give a smaller map_size_gb (the map grows by itself)")
    return NotADatabaseError(f"{path}: LMDB cannot open it ({exc}). Is it an LMDB database directory, "
                             "readable by you?")


def _errno_of(exc: Exception) -> int | None:
    """The errno behind an lmdb.Error (py-lmdb puts it in the message as 'mdb_...: <strerror>')."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    text = str(exc)
    for code in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
        if os.strerror(code) in text:
            return code
    return None


def release(h: Handle) -> None:
    """Drop one user of a handle; the environment closes with its last user."""
    with _lock:
        if h.pid != os.getpid():
            return
        h.users -= 1
        if h.users <= 0 and _registry.get(h.key) is h:
            del _registry[h.key]
            h.env.close()


def is_open(path: str | os.PathLike) -> bool:
    """Whether this process holds the environment at ``path`` open."""
    h = _registry.get(file_id(path))
    return h is not None and h.pid == os.getpid()


def open_count() -> int:
    """How many environments this process holds open (for tests and diagnostics)."""
    return len(_registry)


# -- recognising databases --------------------------------------------------------------------------

def check_exists(path: str | os.PathLike) -> Path:
    """The path as a Path, or a clear error if it is missing or holds no LMDB environment. Creates nothing."""
    p = Path(path)
    if os.path.isfile(os.path.join(p, DATA_FILE)):  # the usual case, in one stat
        return p
    if not p.exists():
        raise DatabaseNotFoundError(f"{p}: no such database (looked for {where(p)}). Check the path, or write "
                                    "one first with lmdbkit.Writer or notebooks/precompute.ipynb")
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
    try:
        txn = txn or h.begin()
        try:
            raw = txn.get(META_KEY, db=d)
            raw = None if raw is None else bytes(raw)
        finally:
            if own:
                txn.abort()
    except lmdb.Error as exc:
        raise DamagedDatabaseError(f"{h.path}: LMDB cannot read the format record ({exc}); the database is "
                                   f"damaged. Run `lmdbkit verify {h.path}` for a report") from exc
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise DamagedDatabaseError(f"{h.path}: the format record is not valid JSON ({exc}); the database is "
                                   "damaged. Restore it from a good copy") from exc
    if type(meta) is not dict:
        raise DamagedDatabaseError(f"{h.path}: the format record is not a JSON object; the database is damaged")
    if meta.get("format") != FORMAT_NAME:
        raise NotADatabaseError(f"{h.path}: its meta record names format {meta.get('format')!r}, not {FORMAT_NAME!r}")
    if meta.get("version") not in VERSIONS:
        raise FormatVersionError(f"{h.path} is lmdbkit format version {meta.get('version')}; this lmdbkit reads "
                                 f"versions {list(VERSIONS)}. Upgrade lmdbkit (pip install -U lmdbkit)")
    return meta


def looks_legacy(h: Handle) -> bool:
    """Whether the main database holds `str(idx)` keys, as older pickle-in-LMDB scripts wrote."""
    try:
        with h.begin() as txn:
            cur = txn.cursor()
            for n, k in enumerate(cur.iternext(values=False)):
                if bytes(k).isdigit():
                    return True
                if n > 64:
                    break
    except lmdb.Error as exc:
        raise DamagedDatabaseError(f"{h.path}: LMDB cannot read its main table ({exc}); the database is damaged. "
                                   f"Run `lmdbkit verify {h.path}` for a report") from exc
    return False


def check_data_file(path: str | os.PathLike) -> None:
    """Refuse a data.mdb that is shorter than its newest meta page says, before LMDB maps it.

    An interrupted copy, a copy to a full disk or a partial download leaves such a file; LMDB would map
    it and the first read of a missing page would kill the process with SIGBUS. The two meta pages at the
    start of data.mdb record the last page in use; LMDB uses the one with the higher transaction id.
    """
    f = os.path.join(path, DATA_FILE)
    try:
        fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # a new database: LMDB creates it
    except OSError as exc:
        raise open_error(path, exc, writable=False, locked=False) from exc
    try:
        head = os.pread(fd, 2 * 4096, 0)  # both meta pages at the usual page size; more for larger pages
        size = os.fstat(fd).st_size
        psize = _meta_page_size(head)
        if psize and psize > 4096:
            head = os.pread(fd, 2 * psize, 0)
    except OSError as exc:
        raise open_error(path, exc, writable=False, locked=False) from exc
    finally:
        os.close(fd)
    if size == 0:
        return  # created but never committed (LMDB writes its meta pages on open)
    metas = [m for off in (0, psize) if (m := _read_meta_page(head, off)) is not None] if psize else []
    if not metas:
        raise TruncatedDatabaseError(
            f"{f} is {size} bytes and holds no valid LMDB meta page: the file is incomplete or is not an LMDB "
            "database (an interrupted copy or download?). Copy it again from the original")
    last_pg, _txnid = max(metas, key=lambda m: m[1])
    need = (last_pg + 1) * psize
    if size < need:
        raise TruncatedDatabaseError(
            f"{f} is incomplete: the file holds {size} bytes but the database needs {need} "
            f"({last_pg + 1} pages of {psize} bytes). It was cut short (an interrupted copy, a copy to a full "
            "disk, a partial download); copy it again from the original")


_META_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = 16


def _meta_page_size(head: bytes) -> int | None:
    """The page size recorded in the first meta page (MDB_meta's free-db md_pad), if it is plausible."""
    if len(head) < _PAGE_HEADER + 28:
        return None
    magic, _version = struct.unpack_from("<II", head, _PAGE_HEADER)
    psize = struct.unpack_from("<I", head, _PAGE_HEADER + 24)[0]
    if magic != _META_MAGIC or psize < 512 or psize > 65536 or psize & (psize - 1):
        return None
    return psize


def _read_meta_page(head: bytes, off: int) -> tuple[int, int] | None:
    """(last page number, transaction id) of the meta page at ``off``, or None if it is not one."""
    m = off + _PAGE_HEADER
    if len(head) < m + 136:
        return None
    magic, _version = struct.unpack_from("<II", head, m)
    if magic != _META_MAGIC:
        return None
    return struct.unpack_from("<QQ", head, m + 120)


def reader_needs_lock(path: str | os.PathLike) -> bool:
    """Whether a reader must open ``path`` with LMDB's lock: only while it may still be written.

    A database that metadata.json marks complete needs no lock (read-only media, NFS). Without lock.mdb no
    writer has ever opened the environment (a writer creates it), so opening it without a lock creates no
    file in a folder that may not be ours.
    """
    if metadata_json_complete(path):
        return False
    return os.path.exists(os.path.join(path, LOCK_FILE))


def metadata_json_complete(path: str | os.PathLike) -> bool:
    """Whether the human-readable mirror says the database was closed cleanly (so readers need no lock)."""
    try:
        return bool(json.loads(read_bytes(os.path.join(path, METADATA_JSON))).get("complete"))
    except (OSError, ValueError, AttributeError):  # (AttributeError: JSON that is not an object)
        return False


def read_bytes(path: str) -> bytes:
    """A file's bytes, in system calls only: Python's ``open()`` builds a buffered file object first (it took
    ~10 µs here for a small file, against ~4). Every open of a database reads its metadata.json."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, 1 << 16):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def write_metadata_json(path: str | os.PathLike, meta: dict) -> None:
    """Write the human-readable mirror atomically; on failure leave no temporary file behind."""
    tmp = os.path.join(path, METADATA_JSON + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, os.path.join(path, METADATA_JSON))
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"disk full at {path}: cannot write {METADATA_JSON} ({exc.strerror}); the database "
                                f"itself holds {meta.get('count')} committed items. Free space, then append "
                                "(Writer(path, mode='append')) or close it again") from exc
        raise LmdbkitError(f"{path}: cannot write {METADATA_JSON} ({exc})") from exc


# -- one writer per database, across processes --------------------------------------------------------

class WriterLock:
    """An exclusive lock on ``<path>/writer.lock`` held for a writer's whole life.

    LMDB's own write lock lasts one transaction, so two writers in two processes would interleave their
    commits. This lock is a ``flock`` on its own file: the kernel drops it when its holder exits, however
    it exits (a SIGKILLed writer never leaves the database locked), and it works on local filesystems and,
    through the kernel's emulation, on NFS. The holder writes its pid and host into the file, so a refused
    writer can say who holds it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.join(path, WRITER_LOCK)
        self.pid = os.getpid()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise open_error(path, exc, writable=True, locked=True) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DatabaseBusyError(
                f"{path} is being written by another process{holder}; one writer per database. Wait for it to "
                "finish (or stop it), then open the writer again") from None
        except OSError as exc:
            os.close(fd)
            raise LmdbkitError(f"{path}: cannot lock {WRITER_LOCK} ({exc}); writing needs a filesystem with "
                               "file locks") from exc
        self.fd = fd
        _writer_locks.add(self)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {self.pid} host {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without the note (e.g. the disk is full)

    def release(self) -> None:
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            if self.pid == os.getpid():
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
            _writer_locks.discard(self)
            os.close(fd)  # in a forked child this drops only the child's copy; the parent keeps its lock


def writer_holder(path: str | os.PathLike) -> str | None:
    """Who holds ``<path>/writer.lock`` (" (pid N on HOST)", or "" when it does not say), or None when no writer
    does. Probes with a shared flock that it drops at once; creates nothing."""
    try:
        fd = os.open(os.path.join(path, WRITER_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        return ""
    if len(text) >= 4 and text[0] == "pid" and text[2] == "host":
        return f" (pid {text[1]} on {text[3]})"
    return ""


# -- many databases: a path, a list, a directory of *.lmdb, or a glob --------------------------------

def where(path: str | os.PathLike) -> str:
    """The absolute path a (maybe relative) path names, and the working directory it was taken from."""
    p = Path(path)
    return str(p) if p.is_absolute() else f"{p.absolute()}, working directory {os.getcwd()}"


def resolve_paths(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The database directories a spec names, in a stable order. Creates nothing."""
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if any(ch in s for ch in "*?["):
            found = sorted(Path(p) for p in _glob.glob(s))
            if not found:
                raise DatabaseNotFoundError(f"the glob {s!r} matches no database (looked in {where(Path(s).parent)})")
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
