"""PyTorch side: a map-style Dataset over one or many databases, transforms, collates and loaders."""

from __future__ import annotations

import os
import random
from contextlib import ExitStack
from typing import Any, Callable, Iterable

import lmdb
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torch.utils.data._utils.collate import default_collate

from . import codec
from .batch import Batch, Block, Collated, block_of, decode_block, samples, stack
from .errors import DamagedDatabaseError, LmdbkitError
from .reader import MultiReader, Reader
# (the transforms lived here: their names stay importable from lmdbkit.dataset, listed in __all__)
from .transforms import (Compose, FixFrames, LMDBDataTransform, Normalize, SpectrogramTransform, ToSpectrogram,
                         to_device)


class LMDBDataset(Dataset):
    """A torch Dataset over one database, a list of them, a folder of ``*.lmdb`` or a glob (concatenated).

    Items are dicts (arrays as torch tensors by default, see ``decode_to``), passed through ``transform``
    if one is given. ``__getitems__`` reads a whole DataLoader batch with one transaction per database.
    It is safe with DataLoader workers under fork and spawn: each process opens its own environment.
    ``verify=True`` (the default here, unlike Reader) checks each item's checksum: measured at ~1% of a
    DataLoader epoch with 2 workers, it turns silently damaged bytes into a CorruptItemError naming the item.
    """

    def __init__(self, paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                 transform: Callable[[dict], Any] | None = None, decode_to: codec.DecodeTo = "torch",
                 verify: bool = True, allow_pickle: bool = False, max_readers: int = 126, prebatch: bool = False,
                 complex32: str = "complex64"):
        self.source = MultiReader(paths, decode_to=decode_to, verify=verify, allow_pickle=allow_pickle,
                                  max_readers=max_readers, complex32=complex32)
        self.complex32 = complex32
        self.paths, self.readers = self.source.paths, self.source.readers
        self.transform = transform
        if prebatch and (transform is not None or decode_to != "torch" or allow_pickle):
            raise LmdbkitError("prebatch=True collates raw torch items: it needs transform=None, "
                               "decode_to='torch' and no legacy databases")
        self.prebatch = prebatch
        # items are decoded a batch at a time into one block when they come back as torch tensors
        self._blocks = decode_to == "torch" and not any(r.legacy for r in self.readers)

    def refresh(self) -> None:
        """Re-read the lengths (for databases that are still being written)."""
        self.source.refresh()

    @property
    def offsets(self) -> list[int]:
        return self.source.offsets

    def __len__(self) -> int:
        return len(self.source)

    def locate(self, i: int) -> tuple[Reader, int]:
        """The reader holding global index ``i`` and the index within it."""
        return self.source.locate(i)

    def _out(self, sample: dict) -> Any:
        return self.transform(sample) if self.transform is not None else sample

    def __getitem__(self, i: int) -> Any:
        return self._out(self.source[i])

    def __getitems__(self, indices: list[int]) -> list | Batch:
        """A batch: one read transaction per database touched, items in the order asked.

        Items whose arrays share one shape and dtype are decoded together into one block: each array is
        copied from the memory map straight into its row of one batch tensor (in shared memory inside a
        DataLoader worker when there is no transform). The items come back as dicts whose arrays are views of
        those rows, and ``default_collate`` (or lmdbkit's ``collate``) hands back the block's tensors instead
        of stacking a second copy (see ``lmdbkit.batch``). With ``prebatch=True`` it returns that collated
        ``Batch`` itself. Batches whose items differ in shape are read item by item. In a DataLoader worker, a
        transform's dict outputs come back as ``Sample``s (plain dicts to whoever uses them), which
        ``default_collate`` (and lmdbkit's ``collate``) stack into one segment the worker reuses.
        """
        if self._blocks:
            try:
                block = self._block(indices)
            except lmdb.Error as exc:
                raise DamagedDatabaseError(f"{self.source.path}: LMDB reports damage reading a batch: {exc}. Run "
                                           "`lmdbkit verify PATH` for a report") from exc
            if block is not None:
                if self.prebatch:
                    return block.batch(_collate_metas)
                rows = block.rows()
                return rows if self.transform is None else samples([self.transform(s) for s in rows])
        out = [self._out(s) for s in self.source.read_many(indices)]
        return out if self.transform is None else samples(out)

    def _block(self, indices: list[int]) -> Block | None:
        indices = list(indices)
        groups = self.source.groups(indices)
        if not groups:
            return None
        with ExitStack() as stack:
            bufs, verify = self._raw_bufs(groups, stack)
            if type(bufs) is list and None in bufs:
                return None
            shared = self.transform is None and torch.utils.data.get_worker_info() is not None

            def where(b: int) -> tuple[str, int]:
                r, j = self.source.locate(indices[b])
                return r.path, j
            return decode_block(bufs, where, verify=verify, complex32=self.complex32, shared=shared)

    @staticmethod
    def _raw_bufs(groups: list, stack) -> tuple[list, bool | list[bool]]:
        """The stored bytes of a batch's items, one transaction per database (kept open by ``stack``), each
        database's reads requested together; and whether to verify them (one flag, or one per item)."""
        if len(groups) == 1:
            r, _, js = groups[0]
            return r._raw_batch(stack.enter_context(r._txn()), js), r.verify
        n = sum(len(js) for *_, js in groups)
        bufs: list = [None] * n
        verify: list = [False] * n
        for r, positions, js in groups:
            txn = stack.enter_context(r._txn())
            for pos, buf in zip(positions, r._raw_many(txn, js)):
                bufs[pos], verify[pos] = buf, r.verify
        return bufs, verify

    def get(self, key: str) -> Any:
        """The item written under ``key`` (searched in every database)."""
        return self._out(self.source.get(key))

    def key_of(self, i: int) -> str | None:
        return self.source.key_of(i)

    @property
    def meta(self) -> dict:
        """The format record (of the first database; with several, ``count`` is the total)."""
        return self.source.meta

    @property
    def metas(self) -> list[dict]:
        return self.source.metas

    def query(self, **conditions: Any) -> list[int]:
        """Global indices of the items matching an index query (see Reader.query)."""
        return self.source.query(**conditions)

    def subset(self, **conditions: Any) -> Subset:
        """A torch Subset of the items matching an index query."""
        return Subset(self, self.query(**conditions))

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "LMDBDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<lmdbkit.LMDBDataset {len(self)} items from {len(self.paths)} database(s): {self.paths[:3]}>"


# -- collate ----------------------------------------------------------------------------------------

def _collate_metas(metas: list[dict]) -> dict:
    """default_collate's view of a block's non-array fields (what Block.batch leaves to collate)."""
    return _collate_rest(metas, set())


def _collate_rest(batch: list[dict], skip: set) -> dict:
    out = {}
    for k in batch[0]:
        if k in skip:
            continue
        vals = [b[k] for b in batch]
        if any(v is None for v in vals) or isinstance(vals[0], (str, bytes)):
            out[k] = vals  # kept as a list: None and strings do not stack
        else:
            out[k] = default_collate(vals)
    return out


def pad_collate(batch: list[dict], *, field: str = "stft", value: float = 0.0) -> dict:
    """Collate items whose ``field`` differs in its last (time) axis: zero-pad to the longest and add
    ``lengths`` (the valid frames of each). Other fields collate as usual; strings and None stay lists."""
    xs = [torch.as_tensor(b[field]) for b in batch]
    longest = max(x.shape[-1] for x in xs)
    out = _collate_rest(batch, {field})
    out[field] = torch.stack([torch.nn.functional.pad(x, (0, longest - x.shape[-1]), value=value) for x in xs])
    out["lengths"] = torch.tensor([x.shape[-1] for x in xs])
    return out


def crop_collate(batch: list[dict], *, field: str = "stft") -> dict:
    """Collate items whose ``field`` differs in its last axis by cropping all to the shortest."""
    xs = [torch.as_tensor(b[field]) for b in batch]
    shortest = min(x.shape[-1] for x in xs)
    out = _collate_rest(batch, {field})
    out[field] = torch.stack([x[..., :shortest] for x in xs])
    return out


def collate(batch: list[dict] | Batch) -> dict:
    """Default collate for sample dicts that keeps strings and None as lists instead of failing, and passes
    through a batch that LMDBDataset(prebatch=True) collated itself."""
    if isinstance(batch, Batch):
        return batch
    block = block_of(batch)
    if block is not None:  # a block's untouched rows: its own tensors, not a second copy
        return block.batch(_collate_metas)
    if torch.utils.data.get_worker_info() is not None and batch:  # a transform's outputs, in a DataLoader worker
        block = stack(batch, shared=True)  # (stacked into a segment the worker reuses, not fresh shared memory)
        if block is not None:
            return block.batch(_collate_metas, Collated)
    return _collate_rest(batch, set())


# -- samplers and loaders ---------------------------------------------------------------------------

class ShardSampler(DistributedSampler):
    """A DistributedSampler that does not pad: each epoch's rank shards are disjoint and together cover the
    dataset exactly (ranks may differ by one item). Shuffled by (seed, epoch) like DistributedSampler."""

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            order = list(range(len(self.dataset)))
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.num_replicas + (1 if self.rank < n % self.num_replicas else 0)


def _seed_worker(worker_id: int) -> None:
    """numpy and random in each worker get seeds derived from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def cores() -> int:
    """CPU cores this process may run on (what torch's DataLoader checks num_workers against)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_workers() -> int:
    """DataLoader workers when none are given: 4, or fewer on a machine with fewer cores."""
    return min(4, cores())


def create_data_loader(db_path, transform: Callable | None = None, batch_size: int = 32, *, shuffle: bool = False,
                       num_workers: int | None = None, target_device: str | torch.device = "cpu",
                       collate_fn: Callable | None = None, seed: int = 0, drop_last: bool = False,
                       persistent_workers: bool | None = None, prefetch_factor: int | None = None,
                       multiprocessing_context: str | None = None, **dataset_kw) -> DataLoader:
    """A DataLoader over ``LMDBDataset(db_path)``: seeded shuffling and workers, persistent workers, pinned
    memory when ``target_device`` is CUDA, and a ShardSampler by itself when torch.distributed is
    initialised (call ``loader.sampler.set_epoch(epoch)`` each epoch, as with DistributedSampler).
    ``num_workers=None``: ``default_workers()`` (4, or the number of cores if fewer)."""
    if num_workers is None:
        num_workers = default_workers()
    if isinstance(db_path, Dataset):
        ds = db_path
    else:
        # without a per-sample transform, items go straight from the memory map into the batch tensors
        dataset_kw.setdefault("prebatch", transform is None and collate_fn is None
                              and dataset_kw.get("decode_to", "torch") == "torch" and not dataset_kw.get("allow_pickle"))
        ds = LMDBDataset(db_path, transform=transform, **dataset_kw)
    sampler = None
    if dist.is_available() and dist.is_initialized():
        sampler = ShardSampler(ds, shuffle=shuffle, seed=seed)
        shuffle = False
    g = torch.Generator()
    g.manual_seed(seed)
    workers = num_workers > 0
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn or collate, pin_memory=torch.device(target_device).type == "cuda",
                      drop_last=drop_last, generator=g, worker_init_fn=_seed_worker if workers else None,
                      persistent_workers=workers if persistent_workers is None else persistent_workers,
                      prefetch_factor=prefetch_factor if workers else None,
                      multiprocessing_context=multiprocessing_context if workers else None)


def create_train_val_loaders(train_db_path, val_db_path, batch_size: int = 32, num_workers: int | None = None,
                             target_device: str | torch.device = "cpu", *, transform: Callable | None = None,
                             val_transform: Callable | None = None, seed: int = 0,
                             **kw) -> tuple[DataLoader, DataLoader]:
    """(train loader: shuffled, drop_last; val loader: in order), sharing the options of create_data_loader."""
    train = create_data_loader(train_db_path, transform, batch_size, shuffle=True, num_workers=num_workers,
                               target_device=target_device, seed=seed, drop_last=True, **kw)
    val = create_data_loader(val_db_path, val_transform if val_transform is not None else transform, batch_size,
                             shuffle=False, num_workers=num_workers, target_device=target_device, seed=seed, **kw)
    return train, val


__all__ = ["LMDBDataset", "LMDBDataTransform", "Compose", "ToSpectrogram", "FixFrames", "Normalize",
           "SpectrogramTransform", "to_device", "pad_collate", "crop_collate", "collate", "ShardSampler",
           "create_data_loader", "create_train_val_loaders"]
