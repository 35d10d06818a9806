"""How a batch made in a DataLoader worker reaches the main process: a small one by value, through the pipe.

A DataLoader worker pickles each batch into its result queue, and torch pickles a tensor as a piece of shared
memory: a file that the worker creates and maps and whose descriptor the main process fetches over a socket
from the worker, then maps again: a cost a batch whatever its size, most of a small batch's (below). A batch
of 64 items of 1 KiB is 64 KiB, which the pipe carries in far less. So a batch whose tensors are views of one
private block of at most ``BY_VALUE_MAX`` bytes (``batch.decode_block`` makes it private in a worker when it
is that small) pickles as those bytes and how each tensor lies in them; unpickled, its tensors are views of
one writable buffer. Measured with 2 workers, batches of 64, on this project's 2-core machine, by value
against shared memory (``create_data_loader``, alternating runs of each): 1 KiB items 100-130k against 39-57k
items/s, 4 KiB items (batches of 256 KiB) 61-75k against 40-49k, 8 KiB items (512 KiB) 37-50k against 40k;
a prototype that sent every batch by value gave 19k against 26k for 16 KiB items (1 MiB), hence the bound.
Anything else pickles as before.
"""

from __future__ import annotations

import torch
import torch.utils.data

BY_VALUE_MAX = 512 << 10  # bytes: a worker's batch up to this size travels by value


def by_value(batch: dict, kind: type):
    """``(rebuild, args)`` that pickles ``batch`` (a dict) by value as a ``kind`` (dict or a subclass), in a
    DataLoader worker; None elsewhere (``torch.save``, ``copy``: as any dict) and when its tensors are not
    contiguous CPU views of one private storage of at most BY_VALUE_MAX bytes."""
    if torch.utils.data.get_worker_info() is None:
        return None
    storage, specs, rest = None, [], {}
    for k, v in batch.items():
        if type(v) is not torch.Tensor:
            specs.append((k, None))
            rest[k] = v
            continue
        s = v.untyped_storage()
        storage = s if storage is None else storage
        if (s.data_ptr() != storage.data_ptr() or s.device.type != "cpu" or s.is_shared() or not v.is_contiguous()
                or v.requires_grad):
            return None
        specs.append((k, (v.storage_offset() * v.element_size(), v.numel() * v.element_size(), v.dtype,
                          tuple(v.shape))))
    if storage is None or storage.nbytes() > BY_VALUE_MAX:
        return None
    data = bytearray(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
    return _rebuild, (kind, data, specs, rest)


def _rebuild(kind: type, data: bytearray, specs: list, rest: dict) -> dict:
    base = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    out = kind()
    for k, spec in specs:
        if spec is None:
            out[k] = rest[k]
        else:
            start, nbytes, dtype, shape = spec
            out[k] = base[start:start + nbytes].view(dtype).view(shape)
    return out
