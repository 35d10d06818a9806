"""How a batch made in a DataLoader worker reaches the main process: in shared memory the worker reuses
(``segments``), or by value through the pipe when no segment is free and the batch is small.

A DataLoader worker pickles each batch into its result queue (multiprocessing's ForkingPickler, for which
``batch`` registers ``reducer``). torch pickles a tensor as a piece of shared memory: a file that the worker
creates and maps and whose descriptor the main process fetches over a socket from the worker, then maps again,
a cost a batch whatever its size. A batch whose tensors lie in one of the worker's segments pickles as the
segment's name and where each tensor lies in it (its descriptor too, the first time). When none is free (the
main process holds that many batches), a batch of at most ``BY_VALUE_MAX`` bytes is made in private memory
(``batch.storage_views``) and pickles as its bytes; unpickled, its tensors are views of one writable
buffer.
Anything else (tensors of several storages, a segment whose batch is still out) pickles as torch does.
Pickled anywhere else (``pickle``, ``copy``, ``torch.save``), a batch is a plain dict of its fields.

Measured with 2 workers, batches of 64, on this project's 2-core machine (``create_data_loader``, alternating
runs of each): by value against torch's shared memory, 1 KiB items 100-130k against 39-57k items/s, 4 KiB
items (batches of 256 KiB) 61-75k against 40-49k, 8 KiB items 37-50k against 40k, and a prototype sending
every batch by value 19k against 26k for 16 KiB items (hence the bound); segments against by value, 1 KiB
148-168k against 121-140k, 4 KiB 128-154k against 73-79k.
"""

from __future__ import annotations

import torch
import torch.utils.data

from . import segments

BY_VALUE_MAX = 512 << 10  # bytes: a worker's batch up to this size travels by value


def reducer(kind: type):
    """How a DataLoader worker pickles a batch (a dict) into its result queue, as a ``kind`` (dict or a subclass):
    in a reused segment (``segments``) when its tensors lie in one, by value when small, else as any dict."""
    def reduce(batch: dict):
        try:
            return in_segment(batch, kind) or by_value(batch, kind) or (kind, (dict(batch),))
        except Exception:  # (the queue's feeder would drop the batch, and the DataLoader wait for it forever)
            return kind, (dict(batch),)
    return reduce


def _tensors(batch: dict):
    """(the one storage of the batch's tensors, their specs, the other fields); None when the tensors are
    not contiguous CPU views of one storage."""
    storage, specs, rest = None, [], {}
    for k, v in batch.items():
        if type(v) is not torch.Tensor:
            specs.append((k, None))
            rest[k] = v
            continue
        s = v.untyped_storage()
        storage = s if storage is None else storage
        if s.data_ptr() != storage.data_ptr() or s.device.type != "cpu" or not v.is_contiguous() or v.requires_grad:
            return None
        specs.append((k, (v.storage_offset() * v.element_size(), v.numel() * v.element_size(), v.dtype,
                          tuple(v.shape))))
    return (storage, specs, rest) if storage is not None else None


def in_segment(batch: dict, kind: type):
    """``(rebuild, args)`` sending a worker's batch whose tensors lie in one of its segments; None otherwise,
    and when that segment's last batch is still out (then it pickles by value or as torch does: a copy)."""
    pool = segments.pool() if torch.utils.data.get_worker_info() is not None else None
    found = _tensors(batch) if pool is not None else None
    seg = pool.segment_of(found[0]) if found else None
    if seg is None or int(seg.returned) != seg.sent:
        return None
    _storage, specs, rest = found
    specs = [(k, spec and (segments.HEADER + spec[0], *spec[1:])) for k, spec in specs]  # (from the file's start)
    return _rebuild_segment, (kind, pool.send(seg), specs, rest)


def _rebuild_segment(kind: type, sent: tuple, specs: list, rest: dict) -> dict:
    return _assemble(kind, segments.receive(*sent), specs, rest)


def by_value(batch: dict, kind: type):
    """``(rebuild, args)`` that pickles ``batch`` (a dict) by value as a ``kind`` (dict or a subclass), in a
    DataLoader worker; None elsewhere and when its tensors are not contiguous CPU views of one private
    storage of at most BY_VALUE_MAX bytes."""
    if torch.utils.data.get_worker_info() is None:
        return None
    found = _tensors(batch)
    if found is None:
        return None
    storage, specs, rest = found
    if storage.is_shared() or storage.nbytes() > BY_VALUE_MAX:
        return None
    data = bytearray(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
    return _rebuild, (kind, data, specs, rest)


def _rebuild(kind: type, data: bytearray, specs: list, rest: dict) -> dict:
    return _assemble(kind, torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
                     specs, rest)


def _assemble(kind: type, base: torch.Tensor, specs: list, rest: dict) -> dict:
    """The batch, a ``kind``: each tensor field a view of the bytes ``base`` by its spec (byte start, nbytes,
    dtype, shape), the other fields from ``rest``, in their order."""
    out = kind()
    for k, spec in specs:
        if spec is None:
            out[k] = rest[k]
        else:
            start, nbytes, dtype, shape = spec
            out[k] = base[start:start + nbytes].view(dtype).view(shape)
    return out
