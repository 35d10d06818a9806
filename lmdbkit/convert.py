"""Converters from older formats to lmdbkit format 1.

Each converter streams its source in bounded chunks (never the whole source in memory), shows a progress
bar, commits each chunk together with a record of it, so a converter that is interrupted and started again
skips the chunks already written, and checks the item count at the end.

- ``from_pt_dir``: a folder of per-batch ``.pt`` files, each a list of sample dicts or a dict of batched
  tensors (and lists of the same length);
- ``from_zarr``: a Zarr group (format 3 or 2) whose arrays, at any depth (fields named by path, e.g.
  ``labels/position``), share the first dimension as the sample axis;
- ``from_hdf5``: an HDF5 file whose datasets share the first dimension (attributes go to the metadata);
- ``from_numpy``: a folder of ``.npy`` files (one sample each) or an ``.npz`` file whose arrays share the
  first dimension;
- ``from_legacy_lmdb``: a pickle-in-LMDB database (``str(idx)`` keys), with ``allow_pickle=True`` only.

Columns with one value per sample (1-D arrays) become metadata values (Python int, float, bool or str, so
they can be indexed); higher-dimensional columns become one array per sample.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from .progress import tqdm

from .errors import LmdbkitError, UnsafeFormatError
from .reader import Reader
from .writer import Writer

CHUNK = 1024
FORMATS = ("pt", "zarr", "hdf5", "numpy", "legacy")


def _row_value(col: np.ndarray, i: int) -> Any:
    v = col[i]
    if isinstance(v, np.ndarray):
        return np.ascontiguousarray(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, np.generic):
        return v.item() if v.dtype.kind in "biufUS" else v
    return v


def _chunked(columns: dict[str, Any], n: int, chunk: int) -> Iterator[tuple[str, list[tuple[str, dict]]]]:
    """(source id, [(key, sample)]) for each chunk of rows of same-length columns, read one chunk at a time."""
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = {name: col[start:stop] for name, col in columns.items()}
        block = {k: (np.asarray(v) if not isinstance(v, list) else v) for k, v in block.items()}
        samples = [(str(start + j), {k: _row_value(v, j) for k, v in block.items()}) for j in range(stop - start)]
        yield f"rows:{start}-{stop - 1}", samples


def _write(dest, chunks: Iterable[tuple[str, list[tuple[str, dict]] | Callable]], *, expected: int | None, desc: str,
           metadata: dict, index_fields=(), mode: str = "append", progress: bool = True,
           map_size_gb: float | None = None) -> dict:
    """Write chunks as sources (skipping those already written), then check the count."""
    with Writer(dest, mode=mode, metadata=metadata, index_fields=tuple(index_fields), map_size_gb=map_size_gb,
                durable=False) as w:
        done = w.sources()
        bar = tqdm(total=expected, desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
        bar.update(sum(len(v.get("items", [])) for v in done.values()))
        skipped = 0
        for source, samples in chunks:
            if source in done:
                skipped += 1
                continue
            if callable(samples):  # loaded only when needed, so a restart does not reload finished files
                samples = samples()
            w.append_source(source, samples)
            bar.update(len(samples))
        bar.close()
        n = len(w)
    if expected is not None and n != expected:
        raise LmdbkitError(f"conversion into {dest} wrote {n} items, the source holds {expected}; "
                           "run the conversion again (mode='overwrite') and check the source")
    return {"destination": str(dest), "items": n, "chunks_resumed": skipped}


def _check_fields(result: dict, columns: dict[str, Any], src) -> dict:
    """The conversion's result with the arrays found and converted; an error naming any array that was found
    in the source but is not a field of the items (nothing is dropped silently)."""
    from .reader import Reader
    with Reader(result["destination"]) as r:
        fields = set(r.meta.get("schema", {}))
    missing = sorted(set(columns) - fields)
    if missing:
        raise LmdbkitError(f"{src}: {len(missing)} of its {len(columns)} arrays did not become fields of "
                           f"{result['destination']}: {missing}; converted fields are {sorted(fields)}")
    return dict(result, arrays_found=len(columns), arrays_converted=len(columns))


def _shared_length(columns: dict[str, Any], where: str) -> int:
    """The common first dimension of array-like columns (arrays, tensors, lists), or a clear error."""
    if not columns:
        raise LmdbkitError(f"{where} holds no arrays to convert")

    def length(col):
        shape = getattr(col, "shape", None)
        if shape is not None:
            return shape[0] if len(shape) else None
        return len(col) if isinstance(col, (list, tuple)) else None
    lengths = {name: length(col) for name, col in columns.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise LmdbkitError(f"{where}: the arrays must share their first dimension (the sample axis); "
                           f"found {lengths}")
    return next(iter(lengths.values()))


def _jsonable(attrs: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        out[str(k)] = v
    return out


# -- the converters ---------------------------------------------------------------------------------

def from_pt_dir(src: str | os.PathLike, dest: str | os.PathLike, *, allow_pickle: bool = False,
                pattern: str = "*.pt", **kw) -> dict:
    """A folder of per-batch .pt files (sorted by name) -> dest. Keys: ``<file name>#<i>``.

    Files load with ``torch.load(weights_only=True)`` (tensors, dicts, lists, numbers, strings); older files
    holding other pickled objects need ``allow_pickle=True`` (only for files you trust).
    """
    import torch
    files = sorted(Path(src).glob(pattern))
    if not files:
        raise LmdbkitError(f"no {pattern} files in {src}")

    def load(f: Path):
        try:
            return torch.load(f, map_location="cpu", weights_only=not allow_pickle)
        except Exception as exc:
            if not allow_pickle and "weights_only" in str(exc):
                raise UnsafeFormatError(f"{f} holds pickled objects beyond tensors and plain containers; if you "
                                        "trust it, convert with allow_pickle=True (--allow-pickle)") from exc
            raise LmdbkitError(f"{f}: cannot load it with torch.load ({exc})") from exc

    def samples_of(f: Path, obj) -> list[tuple[str, dict]]:
        if isinstance(obj, dict):  # a dict of batched tensors (and lists of the same length)
            n = _shared_length(obj, str(f))

            def row(v, i):
                x = v[i]
                if isinstance(x, torch.Tensor):
                    return x.item() if x.dim() == 0 else x.clone()  # one value per sample is metadata
                return x
            rows = [{k: row(v, i) for k, v in obj.items()} for i in range(n)]
        elif isinstance(obj, (list, tuple)) and all(isinstance(s, dict) for s in obj):
            rows = list(obj)
        else:
            raise LmdbkitError(f"{f}: expected a list of sample dicts or a dict of batched tensors, "
                               f"found {type(obj).__name__}")
        return [(f"{f.name}#{i}", s) for i, s in enumerate(rows)]

    def chunks():
        for f in files:
            yield f.name, (lambda f=f: samples_of(f, load(f)))
    return _write(dest, chunks(), expected=None, desc=f"convert {Path(src).name}",
                  metadata={"converted_from": {"format": "pt", "path": str(src), "files": len(files)}}, **kw)


def from_zarr(src: str | os.PathLike, dest: str | os.PathLike, *, chunk: int = CHUNK, **kw) -> dict:
    """A Zarr group (format 3 or 2) whose arrays share the first dimension -> dest. Keys: the row number."""
    import zarr
    g = zarr.open_group(str(src), mode="r")
    # every array at every depth, named by its path ("labels/position"), as the HDF5 converter names them
    columns = {path: node for path, node in g.members(max_depth=None) if isinstance(node, zarr.Array)}
    n = _shared_length(columns, str(src))
    md = {"converted_from": {"format": f"zarr v{g.metadata.zarr_format}", "path": str(src)},
          "attributes": _jsonable(dict(g.attrs)),
          "array_attributes": {name: _jsonable(dict(a.attrs)) for name, a in columns.items() if len(a.attrs)}}
    out = _write(dest, _chunked(columns, n, chunk), expected=n, desc=f"convert {Path(src).name}", metadata=md, **kw)
    return _check_fields(out, columns, src)


def from_hdf5(src: str | os.PathLike, dest: str | os.PathLike, *, chunk: int = CHUNK, **kw) -> dict:
    """An HDF5 file whose datasets (at any depth; names joined with "/") share the first dimension -> dest."""
    import h5py
    with h5py.File(src, "r") as f:
        columns: dict[str, Any] = {}
        f.visititems(lambda name, obj: columns.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
        n = _shared_length(columns, str(src))
        md = {"converted_from": {"format": "hdf5", "path": str(src)}, "attributes": _jsonable(dict(f.attrs)),
              "array_attributes": {k: _jsonable(dict(d.attrs)) for k, d in columns.items() if len(d.attrs)}}
        out = _write(dest, _chunked(columns, n, chunk), expected=n, desc=f"convert {Path(src).name}", metadata=md,
                     **kw)
        return _check_fields(out, columns, src)


def from_numpy(src: str | os.PathLike, dest: str | os.PathLike, *, field: str = "array", chunk: int = CHUNK,
               **kw) -> dict:
    """A folder of .npy files (one sample each, field ``field``, key = file stem) or an .npz file whose
    arrays share the first dimension (key = row number) -> dest."""
    p = Path(src)
    if p.is_file() and p.suffix == ".npz":
        with np.load(p, allow_pickle=False, mmap_mode=None) as z:
            columns = {k: z[k] for k in z.files}  # npz members are read whole; use .npy files for huge data
        n = _shared_length(columns, str(p))
        out = _write(dest, _chunked(columns, n, chunk), expected=n, desc=f"convert {p.name}",
                     metadata={"converted_from": {"format": "npz", "path": str(p)}}, **kw)
        return _check_fields(out, columns, p)
    files = sorted(p.glob("*.npy")) if p.is_dir() else []
    if not files:
        raise LmdbkitError(f"{src} is neither an .npz file nor a folder of .npy files")

    def chunks():
        for start in range(0, len(files), chunk):
            part = files[start:start + chunk]
            yield f"files:{part[0].name}..{part[-1].name}", [
                (f.stem, {field: np.load(f, allow_pickle=False)}) for f in part]
    return _write(dest, chunks(), expected=len(files), desc=f"convert {p.name}",
                  metadata={"converted_from": {"format": "npy", "path": str(p)}}, **kw)


def from_legacy_lmdb(src: str | os.PathLike, dest: str | os.PathLike, *, allow_pickle: bool = False,
                     chunk: int = CHUNK, **kw) -> dict:
    """A legacy pickle-in-LMDB database -> dest, in format 1. Needs allow_pickle=True: unpickling runs code
    chosen by whoever wrote the file. Keys: the old ``str(idx)`` keys."""
    if not allow_pickle:
        raise UnsafeFormatError(f"{src} is read by unpickling, which can run arbitrary code; convert it with "
                                "allow_pickle=True (--allow-pickle) only if you trust where it came from")
    r = Reader(src, allow_pickle=True)
    n = len(r)

    def chunks():
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            yield f"rows:{start}-{stop - 1}", [(str(i), r[i]) for i in range(start, stop)]
    try:
        return _write(dest, chunks(), expected=n, desc=f"convert {Path(src).name}",
                      metadata={"converted_from": {"format": "legacy pickle-in-LMDB", "path": str(src)}}, **kw)
    finally:
        r.close()


CONVERTERS: dict[str, Callable[..., dict]] = {
    "pt": from_pt_dir, "zarr": from_zarr, "hdf5": from_hdf5, "numpy": from_numpy, "legacy": from_legacy_lmdb,
}


def convert(fmt: str, src: str | os.PathLike, dest: str | os.PathLike, **kw) -> dict:
    """Dispatch to a converter by name (one of FORMATS)."""
    if fmt not in CONVERTERS:
        raise LmdbkitError(f"format {fmt!r} is unsupported. Supported formats are {sorted(CONVERTERS)}")
    if not Path(src).exists():
        raise LmdbkitError(f"{src}: no such file or folder to convert")
    return CONVERTERS[fmt](src, dest, **kw)
