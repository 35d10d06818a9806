"""lmdbkit: precomputed ML features (above all STFT spectrograms) in LMDB, fed to PyTorch.

Modules that need torch (``dataset``, ``stft``, ``precompute``, ...) are imported on first use of
their names, so ``import lmdbkit`` works without torch.
"""

from __future__ import annotations

import importlib

from .errors import (AudioDecodeError, CommitError, ConfigMismatchError, CorruptItemError, DamagedDatabaseError,
                     DatabaseBusyError, DatabaseExistsError, DatabaseNotFoundError, DiskFullError, DuplicateKeyError,
                     EncodeError, FormatVersionError, IndexNotFoundError, KeyTooLongError, LmdbkitError,
                     MapSizeLimitError, NotADatabaseError, ReadOnlyError, SchemaError, TruncatedDatabaseError,
                     UnsafeFormatError)
from .codec import decode, encode
from .reader import Reader
from .writer import Writer

__version__ = "0.2.0"

# public names that live in modules needing torch (or other optional packages): name -> module
_LAZY = {
    "LMDBDataset": "dataset",
    "LMDBDataTransform": "dataset",
    "SpectrogramTransform": "dataset",
    "create_data_loader": "dataset",
    "create_train_val_loaders": "dataset",
    "pad_collate": "dataset",
    "crop_collate": "dataset",
    "StftConfig": "stft",
    "build_index": "index",
    "query_samples_by_label": "index",
    "query_samples_by_category": "index",
    "verify": "integrity",
    "benchmark_lmdb_performance": "bench",
}

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
    "LMDBDataTransform",
    "LMDBDataset",
    "LmdbkitError",
    "MapSizeLimitError",
    "NotADatabaseError",
    "ReadOnlyError",
    "Reader",
    "SchemaError",
    "SpectrogramTransform",
    "StftConfig",
    "TruncatedDatabaseError",
    "UnsafeFormatError",
    "Writer",
    "__version__",
    "benchmark_lmdb_performance",
    "build_index",
    "create_data_loader",
    "create_train_val_loaders",
    "crop_collate",
    "decode",
    "encode",
    "pad_collate",
    "query_samples_by_category",
    "query_samples_by_label",
    "verify",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lmdbkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
