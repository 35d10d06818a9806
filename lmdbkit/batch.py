"""A batch of items decoded into one block, so that a DataLoader batch costs one copy from the memory map.

``decode_block`` copies each array field of every item straight from the map into its row of one batch
tensor (inside a DataLoader worker, in shared memory that the worker reuses: ``segments``; ``handoff`` says
how the batch reaches the main process). The items are then handed out
as ``Row`` dicts, whose arrays are views of those rows. ``Row`` is registered in torch's
``default_collate_fn_map`` (torch's documented way to extend ``default_collate``), so a plain
``DataLoader(LMDBDataset(path))`` collates a batch of untouched rows by handing back the block's tensors
instead of allocating 64 tensors, faulting them in, and stacking them into a second copy. Rows that a
transform replaced or that come from different blocks are collated exactly as ``default_collate`` does.
"""

from __future__ import annotations

import errno
import functools
import math
import operator
from multiprocessing.reduction import ForkingPickler
from typing import Callable

import numpy as np
import torch
from torch.utils.data._utils.collate import collate as _collate
from torch.utils.data._utils.collate import default_collate_fn_map

from . import codec, handoff, layout as layouts, segments
from .errors import DamagedDatabaseError, LmdbkitError


class Batch(dict):
    """A batch that LMDBDataset(prebatch=True) collated itself; lmdbkit's collate passes it through. A
    DataLoader worker hands it to the main process as ``handoff`` says (multiprocessing's pickler); anything
    else pickles it as a Batch of its fields."""

    def __reduce__(self):
        return Batch, (dict(self),)


class Collated(dict):
    """default_collate's batch of one Block's rows, made in a DataLoader worker: a plain dict once it reaches
    the main process (``handoff``), or wherever else it is pickled."""

    def __reduce__(self):
        return dict, (dict(self),)


class Block:
    """Items decoded together: ``arrays`` maps each array field to one tensor [n, ...]; ``metas`` holds each
    item's other fields; ``order`` is the fields' stored order. ``scalars`` are [n] tensors (int64, float64)
    for the int and float fields, filled when collated, in the same storage as the arrays: a DataLoader
    worker hands the whole batch to the main process as one piece of shared memory (or as bytes: ``handoff``)."""

    __slots__ = ("n", "arrays", "scalars", "metas", "order", "_views")

    def __init__(self, arrays: dict, scalars: dict, metas: list[dict], order: list[str]):
        self.arrays, self.scalars, self.metas, self.order, self.n = arrays, scalars, metas, order, len(metas)
        self._views: dict | None = None

    def rows(self) -> list["Row"]:
        """The items as dicts in their stored field order, array fields as views of the block's rows."""
        views = self._views = {k: t.unbind(0) for k, t in self.arrays.items()}
        out = list(map(Row, self.metas))  # every field in its place, the arrays None until set here
        for k, rows in views.items():  # (a field at a time: 0.73-0.78 -> 0.64-0.67 µs a row of 1 KiB)
            for row, view in zip(out, rows):
                row[k] = view
        for b, row in enumerate(out):
            row.block, row.pos = self, b
        return out

    def batch(self, collate_rest, into: type | None = None) -> dict:
        """The collated batch, an ``into`` (default Batch): the block's tensors, int and float fields as int64 and
        float64 tensors (what default_collate makes of them), the other fields collated by ``collate_rest``."""
        done = dict(self.arrays)
        for k, t in self.scalars.items():
            vals = [m[k] for m in self.metas]
            kind = int if t.dtype == torch.int64 else float
            if all(type(v) is kind for v in vals):
                try:
                    t.numpy()[:] = vals
                except OverflowError:  # beyond int64: collated (and refused) as default_collate does
                    continue
                done[k] = t
        rest = [k for k in self.order if k not in done]
        if rest:
            done.update(collate_rest([{k: m[k] for k in rest} for m in self.metas]))
        return (into or Batch)({k: done[k] for k in self.order})

    def owns(self, batch: list) -> bool:
        """Whether ``batch`` is this block's rows, all of them, in order, with their arrays untouched. Each
        check is one pass at C level (map), as this runs for every batch collated."""
        views = self._views
        if views is None or len(batch) != self.n:
            return False
        try:
            if set(map(type, batch)) != {Row} or set(map(_BLOCK, batch)) != {self}:
                return False
            if list(map(_POS, batch)) != list(range(self.n)) or set(map(len, batch)) != {len(self.order)}:
                return False
            return all(all(map(operator.is_, map(operator.itemgetter(k), batch), v)) for k, v in views.items())
        except (KeyError, AttributeError):  # an array taken out; a Row made by hand
            return False


_BLOCK, _POS = operator.attrgetter("block"), operator.attrgetter("pos")


class Row(dict):
    """One item of a Block: a plain dict to whoever uses it. Pickles as a plain dict."""

    __slots__ = ("block", "pos")

    def __reduce__(self):
        return dict, (dict(self),)


ForkingPickler.register(Batch, handoff.reducer(Batch))  # how a DataLoader worker's result queue pickles them
ForkingPickler.register(Collated, handoff.reducer(dict))


def decode_block(bufs: list, where: Callable[[int], tuple[str, int]], *, verify: bool | list[bool], complex32: str,
                 shared: bool) -> Block | None:
    """Decode items whose arrays share one layout (``layout.batch_layout``) into a Block; None when their
    fields or arrays differ in shape or dtype, or are compressed (decode those one by one). A malformed item
    raises its CorruptItemError naming it. ``where(b)`` is (path, index) of item b, named by a CorruptItemError."""
    try:
        layout = layouts.batch_layout(bufs)
    except codec.CorruptItemError:
        return None
    if layout is None:
        return None
    n = len(bufs)
    shapes = {}
    for name, _kind, dname, _ccode, _off, _n, shape, _nbytes in layout.arrays:
        dname, shape = codec.decoded_dtype(dname, shape, complex32)
        shapes[name] = (getattr(torch, dname), (n, *shape))
    numbers = {k: torch.int64 if type(v) is int else torch.float64 for k, v in layout.first.items()
               if k not in shapes and type(v) in (int, float)}
    groups = shapes, {k: (dt, (n,)) for k, dt in numbers.items()}
    arrays, scalars = storage_views(*groups, shared=shared)
    file = _shared_file(arrays)  # (before the numpy views: see _shared_file)
    dests = {name: (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy() for name, t in arrays.items()}
    try:
        metas = layouts.decode_layout(bufs, layout, dests, verify=verify, complex32=complex32, decode_to="torch",
                                    file=file)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise _no_room(n, exc) from exc
        path = where(0)[0]
        raise DamagedDatabaseError(f"{path}: reading a batch failed ({exc}): is data.mdb truncated? Run "
                                   f"`lmdbkit verify {path}` for a report") from exc
    except codec.CorruptItemError:
        for b, buf in enumerate(bufs):  # find the item, so that the error names it
            try:
                codec.decode(buf, verify=verify if type(verify) is bool else verify[b])
            except codec.CorruptItemError as exc:
                raise exc.at(*where(b)) from exc
        raise
    if metas is None:  # an item's layout differs from the first's
        return None
    return Block(arrays, scalars, metas, layout.order)


def _no_room(n: int, exc: OSError) -> LmdbkitError:
    return LmdbkitError(f"cannot fill a batch of {n} items in shared memory: {exc}. DataLoader workers hand "
                        "batches over in shared memory (/dev/shm and the memory limit): give it more room "
                        "(docker run --shm-size=...), or use num_workers=0")


ALIGN = 64


def _size(*groups: dict) -> tuple[list[int], int]:
    """(where each tensor starts, the bytes of all) in ``storage_views``'s storage for these groups."""
    offsets, total = [], 0
    for group in groups:
        for dtype, shape in group.values():
            offsets.append(total)
            total += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
    return offsets, total


def storage_views(*groups: dict, shared: bool) -> list[dict]:
    """Tensors of the given (dtype, shape) per name, all views of one uninitialised byte storage, each aligned
    to 64 bytes. ``shared`` (a DataLoader worker's batch): in a reused segment where one is free (``segments``),
    else in private memory when small enough to travel by value, else in torch's shared memory (``handoff``)."""
    offsets, total = _size(*groups)
    total = max(total, ALIGN)
    pool = segments.pool() if shared else None
    try:
        storage = pool.bytes(total) if pool is not None else None
        if storage is None:
            storage = batch_tensor(torch.uint8, (total,), shared=shared and total > handoff.BY_VALUE_MAX)
    except OSError as exc:  # (each group's tensors are [items, ...])
        raise _no_room(next((shape[0] for g in groups for _dt, shape in g.values()), 0), exc) from exc
    out, k = [], 0
    for group in groups:
        views = {}
        for name, (dtype, shape) in group.items():
            start = offsets[k]
            views[name] = storage[start:start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            k += 1
        out.append(views)
    return out


def batch_tensor(dtype: torch.dtype, shape: tuple, *, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; in shared memory when asked (as default_collate allocates in workers). A private
    byte storage (what ``storage_views`` asks for) is numpy's memory: numpy asks the kernel for huge pages for
    arrays of 4 MiB and more (``madvise``), and copying a batch of 64 ~256 KiB items into 4 KiB pages took
    1.85-2.20 ms against 1.48-1.60 into numpy's (one process, this project's 2-core machine; a miss of the TLB
    every 4 KiB written)."""
    if not shared:
        if dtype == torch.uint8:
            return torch.from_numpy(np.empty(shape, np.uint8))
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(*shape)


def _shared_file(arrays: dict) -> tuple[int, dict[str, int]] | None:
    """(fd, byte offset of each array) of the shared-memory file behind the block's storage; None where torch
    shares memory otherwise (the ``file_system`` sharing strategy): then the arrays are copied through the
    mapping. Asking a storage of named shared memory for a file descriptor moves it to new memory (the
    tensors follow; a numpy view made before would point at memory given back, and a worker writing through
    it died of SIGSEGV), so it is asked only under the ``file_descriptor`` strategy, before any view is made."""
    first = next(iter(arrays.values()), None)
    if (first is None or not first.untyped_storage().is_shared()  # a reused segment: copied through its map
            or torch.multiprocessing.get_sharing_strategy() != "file_descriptor"):
        return None
    try:
        fd, _size = first.untyped_storage()._share_fd_cpu_()
    except (RuntimeError, AttributeError):
        return None
    return fd, {k: t.storage_offset() * t.element_size() for k, t in arrays.items()}


def stack(items: list, *, shared: bool) -> Block | None:
    """A Block of dicts of one set of keys (a transform's outputs), each tensor field stacked into its rows of
    one storage (a reused segment in a DataLoader worker: ``shared``), as default_collate would stack it; a
    tensor field whose items differ in shape, dtype or device, and every other field, are left to the Block's
    collate. None when the items are not such dicts or have no tensor field to stack."""
    first = items[0]
    if not all(type(d) in (dict, Sample) and d.keys() == first.keys() for d in items):
        return None
    n, shapes, numbers = len(items), {}, {}
    for k, v in first.items():
        if type(v) is torch.Tensor:
            if v.device.type == "cpu" and all(type(d[k]) is torch.Tensor and d[k].shape == v.shape and d[k].dtype ==
                                              v.dtype and d[k].device == v.device and not d[k].requires_grad
                                              for d in items):
                shapes[k] = (v.dtype, (n, *v.shape))
        elif type(v) in (int, float):
            numbers[k] = (torch.int64 if type(v) is int else torch.float64, (n,))
    if not shapes:
        return None
    arrays, scalars = storage_views(shapes, numbers, shared=shared)
    for k, out in arrays.items():
        torch.stack([d[k] for d in items], out=out)
    metas = [{k: d[k] for k in first if k not in arrays} for d in items]
    return Block(arrays, scalars, metas, list(first))


def block_of(batch) -> Block | None:
    """The Block whose untouched rows ``batch`` is, else None."""
    block = getattr(batch[0], "block", None) if type(batch) is list and batch and type(batch[0]) is Row else None
    return block if block is not None and block.owns(batch) else None


def _each_field(items: list[dict], *, collate_fn_map=None) -> dict:
    """What default_collate makes of a list of dicts: each field collated on its own."""
    return {k: _collate([d[k] for d in items], collate_fn_map=collate_fn_map) for k in items[0]}


def _collate_rows(batch: list, *, collate_fn_map=None):
    """default_collate for Row dicts: the block's own tensors when the batch is one block's untouched rows;
    otherwise what default_collate makes of any list of dicts."""
    rest = functools.partial(_each_field, collate_fn_map=collate_fn_map)
    block = block_of(batch)
    if block is not None:
        in_worker = torch.utils.data.get_worker_info() is not None
        return block.batch(rest, Collated if in_worker else dict)
    return rest(batch)


class Sample(dict):
    """A transform's output (a plain dict) on its way to collate in a DataLoader worker (``samples``): a plain
    dict to whoever uses it, and pickled as one."""

    __slots__ = ()

    def __reduce__(self):
        return dict, (dict(self),)


def samples(items: list) -> list:
    """A worker's transformed items, the plain dicts among them as ``Sample``s, so that default_collate stacks a
    batch of them into one segment the worker reuses (``_collate_samples``); elsewhere the items as they are."""
    if torch.utils.data.get_worker_info() is None:
        return items
    return [Sample(d) if type(d) is dict else d for d in items]


def _collate_samples(batch: list, *, collate_fn_map=None):
    """default_collate for Samples: their tensor fields stacked into one segment (``stack``), the other fields
    (and tensors that do not stack) as default_collate collates them."""
    rest = functools.partial(_each_field, collate_fn_map=collate_fn_map)
    block = stack(batch, shared=torch.utils.data.get_worker_info() is not None)
    return rest(batch) if block is None else block.batch(rest, Collated)


default_collate_fn_map[Row] = _collate_rows
default_collate_fn_map[Sample] = _collate_samples
