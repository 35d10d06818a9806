"""PyTorch side: a map-style Dataset over one or many databases."""

from __future__ import annotations

import bisect
import os
from typing import Any, Callable, Iterable

import torch
from torch.utils.data import Dataset, Subset

from . import codec, store
from .reader import Reader


class LMDBDataset(Dataset):
    """A torch Dataset over one database, a list of them, a folder of ``*.lmdb`` or a glob (concatenated).

    Items are dicts (arrays as torch tensors by default, see ``decode_to``), passed through ``transform``
    if one is given. ``__getitems__`` reads a whole DataLoader batch with one transaction per database.
    It is safe with DataLoader workers under fork and spawn: each process opens its own environment.
    """

    def __init__(self, paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                 transform: Callable[[dict], Any] | None = None, decode_to: codec.DecodeTo = "torch",
                 verify: bool = False, allow_pickle: bool = False, max_readers: int = 126):
        self.paths = [str(p) for p in store.resolve_paths(paths)]
        self.transform = transform
        self.readers = []
        try:
            for p in self.paths:
                self.readers.append(Reader(p, decode_to=decode_to, verify=verify, allow_pickle=allow_pickle,
                                           max_readers=max_readers))
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

    def locate(self, i: int) -> tuple[Reader, int]:
        """The reader holding global index ``i`` and the index within it."""
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            where = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} databases ({self.paths[0]}, ...)"
            raise IndexError(f"index {i} is out of range for {where}, which hold{'s' if len(self.paths) == 1 else ''} {n} items")
        r = bisect.bisect_right(self.offsets, j) - 1
        return self.readers[r], j - self.offsets[r]

    def _out(self, sample: dict) -> Any:
        return self.transform(sample) if self.transform is not None else sample

    def __getitem__(self, i: int) -> Any:
        reader, j = self.locate(i)
        return self._out(reader[j])

    def __getitems__(self, indices: list[int]) -> list:
        """A batch: one read transaction per database touched, items in the order asked."""
        groups: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(indices):
            reader, j = self.locate(i)
            groups.setdefault(id(reader), []).append((pos, j))
        out: list = [None] * len(indices)
        by_id = {id(r): r for r in self.readers}
        for rid, pairs in groups.items():
            samples = by_id[rid].read_many(j for _, j in pairs)
            for (pos, _), s in zip(pairs, samples):
                out[pos] = self._out(s)
        return out

    def get(self, key: str) -> Any:
        """The item written under ``key`` (searched in every database)."""
        for r in self.readers:
            j = r.index_of(key)
            if j is not None:
                return self._out(r[j])
        raise KeyError(f"key {key!r} is not in {self.paths}")

    def key_of(self, i: int) -> str | None:
        reader, j = self.locate(i)
        return reader.key_of(j)

    @property
    def meta(self) -> dict:
        """The format record (of the first database; with several, ``count`` is the total)."""
        m = dict(self.readers[0].meta)
        if len(self.readers) > 1:
            m["count"] = len(self)
            m["databases"] = self.paths
        return m

    @property
    def metas(self) -> list[dict]:
        return [r.meta for r in self.readers]

    def query(self, **conditions: Any) -> list[int]:
        """Global indices of the items matching an index query (see Reader.query)."""
        return [off + j for r, off in zip(self.readers, self.offsets) for j in r.query(**conditions)]

    def subset(self, **conditions: Any) -> Subset:
        """A torch Subset of the items matching an index query."""
        return Subset(self, self.query(**conditions))

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> "LMDBDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<lmdbkit.LMDBDataset {len(self)} items from {len(self.paths)} database(s): {self.paths[:3]}>"


__all__ = ["LMDBDataset"]
