"""Exceptions. One base class, one subclass per condition; every message names the path, key or
parameter, the bad value and the remedy."""

from __future__ import annotations


class LmdbkitError(Exception):
    """Base class of every error lmdbkit raises on purpose."""


class DatabaseNotFoundError(LmdbkitError, FileNotFoundError):
    """The path does not exist."""


class NotADatabaseError(LmdbkitError):
    """The path exists but holds no lmdbkit (or legacy) LMDB database."""


class DamagedDatabaseError(LmdbkitError):
    """The database's files are damaged (LMDB reports a broken page, or a file is cut short)."""


class TruncatedDatabaseError(DamagedDatabaseError):
    """data.mdb is shorter than the database it holds (an interrupted copy or download)."""


class ReadOnlyError(LmdbkitError, PermissionError):
    """The database's folder cannot be written (read-only media or permissions) where writing is needed."""


class CommitError(LmdbkitError):
    """A commit failed. ``not_committed`` lists the keys of the buffered items that were not written
    (they stay buffered: ``commit()`` again once the cause is fixed); ``committed`` is the count on disk."""

    def __init__(self, message: str, *, not_committed: list | None = None, committed: int | None = None):
        super().__init__(message)
        self.not_committed, self.committed = list(not_committed or []), committed


class DiskFullError(CommitError):
    """The disk (or quota) is full."""


class FormatVersionError(LmdbkitError):
    """The database was written in a format version this lmdbkit cannot read."""


class CorruptItemError(LmdbkitError):
    """An item's bytes are truncated, malformed or fail their checksum."""

    def __init__(self, reason: str, *, path: str | None = None, key: object = None):
        self.reason, self.path, self.key = reason, path, key
        where = ""
        if path is not None:
            where = f"{path}: item {key!r}: " if key is not None else f"{path}: "
        hint = f" Run `lmdbkit verify {path}` for a full report." if path is not None else ""
        super().__init__(f"{where}corrupt item: {reason}.{hint}")

    def at(self, path: str, key: object) -> "CorruptItemError":
        """The same error, located in a database."""
        return CorruptItemError(self.reason, path=path, key=key)


class UnsafeFormatError(LmdbkitError):
    """A legacy pickle-in-LMDB database was opened without allow_pickle=True."""


class ConfigMismatchError(LmdbkitError):
    """Continuing a database with settings that differ from the ones it was written with."""

    def __init__(self, path: str, stored: dict, requested: dict, remedy: str):
        self.path, self.stored, self.requested = path, stored, requested
        keys = sorted(set(stored) | set(requested), key=str)
        diff = [k for k in keys if stored.get(k) != requested.get(k)]
        width = max([len(str(k)) for k in diff] + [9])
        rows = [f"  {'setting':<{width}}  {'stored':<24}  requested"]
        rows += [f"  {str(k):<{width}}  {stored.get(k, '<absent>')!r:<24}  {requested.get(k, '<absent>')!r}" for k in diff]
        self.differences = {k: (stored.get(k), requested.get(k)) for k in diff}
        super().__init__(f"{path} was written with other settings:\n" + "\n".join(rows) + f"\n{remedy}")


class DatabaseExistsError(LmdbkitError, FileExistsError):
    """A writer in mode='create' found an existing database."""


class DatabaseBusyError(LmdbkitError):
    """The database is open in this process in a way that conflicts with the request."""


class DuplicateKeyError(LmdbkitError, ValueError):
    """A sample key was written twice."""


class KeyTooLongError(LmdbkitError, ValueError):
    """A sample key, source id or indexed value is longer than LMDB's key limit (511 bytes)."""


class MapSizeLimitError(LmdbkitError):
    """The database reached the user-set hard cap max_size_gb."""


class EncodeError(LmdbkitError, TypeError):
    """A sample holds a value the codec cannot store."""


class ValueRangeError(LmdbkitError, ValueError):
    """A computed value does not fit the dtype asked to store it (e.g. power above float16's 65504)."""


class SchemaError(LmdbkitError, ValueError):
    """A sample's fields or dtypes differ from the database's schema."""


class IndexNotFoundError(LmdbkitError, KeyError):
    """A query names a field that has no secondary index."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class AudioDecodeError(LmdbkitError):
    """An audio file could not be decoded."""


__all__ = [
    "AudioDecodeError",
    "CommitError",
    "ConfigMismatchError",
    "CorruptItemError",
    "DamagedDatabaseError",
    "DatabaseBusyError",
    "DatabaseExistsError",
    "DatabaseNotFoundError",
    "DiskFullError",
    "DuplicateKeyError",
    "EncodeError",
    "FormatVersionError",
    "IndexNotFoundError",
    "KeyTooLongError",
    "LmdbkitError",
    "MapSizeLimitError",
    "NotADatabaseError",
    "ReadOnlyError",
    "SchemaError",
    "TruncatedDatabaseError",
    "UnsafeFormatError",
]
