"""Shared memory that a DataLoader worker fills again and again: its big batches, handed to the main process.

torch hands a worker's batch over as fresh shared memory: a new file whose pages the worker allocates as it
fills them and the main process frees when the batch is dropped. For a batch of 64 STFT items (16 MiB) the new
pages cost more than the copy into them: filling fresh shared memory took 10.2-10.8 ms on this project's
2-core machine, filling reused memory 4.5 ms. So a worker keeps a few ``Segment``s (memfd files, their pages
allocated once with ``posix_fallocate``, so that a full memory limit is an error there, never a SIGBUS while
writing through the map) and fills a free one. The main process maps the segment it receives (its descriptor
comes over the socket torch uses for its own shared memory) and, when the batch's tensors are all gone,
writes how many batches of it it has given back into the segment's first 8 bytes. The worker fills a segment
again only once the main process has given back every batch it sent from it and the worker holds none itself.
"""

from __future__ import annotations

import os
import weakref
from multiprocessing.reduction import DupFd

import torch

HEADER = 64  # bytes before a segment's data: the count of batches the main process gave back, then padding
KEEP = 8  # segments a worker keeps; a batch that finds none free goes in torch's fresh shared memory
GRAIN = 1 << 20  # segment sizes are rounded up to this, so that batches of nearly one size share segments


class Segment:
    """A memfd the worker maps, sized once. ``sent`` counts batches pickled from it (worker side);
    ``returned`` (the file's first 8 bytes) those the main process gave back; ``held`` is the worker's own use."""

    __slots__ = ("fd", "mapped", "address", "size", "sent", "held", "returned", "__weakref__")

    def __init__(self, size: int):
        self.fd = os.memfd_create("lmdbkit-batch", os.MFD_CLOEXEC)
        try:
            os.posix_fallocate(self.fd, 0, size)  # ENOSPC/ENOMEM now, not SIGBUS on a write through the map
            self.mapped = _map(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.address, self.size, self.sent, self.held = self.mapped.data_ptr() + HEADER, size, 0, False
        self.returned = self.mapped[:8].view(torch.int64)

    def free(self) -> bool:
        return not self.held and int(self.returned[0]) == self.sent

    def close(self) -> None:
        del self.mapped, self.returned  # unmapped with its last view
        os.close(self.fd)


class Pool:
    """This process's segments (a DataLoader worker has one pool), by the address of their data."""

    def __init__(self):
        self.segments: dict[int, Segment] = {}
        self.pid = os.getpid()

    def bytes(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 tensor of ``nbytes`` in a free segment; None when all KEEP segments are in use."""
        free = [s for s in self.segments.values() if s.free()]
        fits = [s for s in free if s.size >= HEADER + nbytes]
        if fits:
            seg = min(fits, key=lambda s: s.size)
        else:
            if len(self.segments) >= KEEP:
                if not free:
                    return None
                self._drop(max(free, key=lambda s: s.size))  # too small for this batch: make room
            seg = Segment(-(-(HEADER + nbytes) // GRAIN) * GRAIN)
            self.segments[seg.address] = seg
        seg.held = True
        data = seg.mapped[HEADER:HEADER + nbytes].numpy()
        weakref.finalize(data, _let_go, weakref.ref(seg))  # the worker's tensors are gone: the worker holds none
        return torch.from_numpy(data)

    def segment_of(self, storage: torch.UntypedStorage) -> Segment | None:
        return self.segments.get(storage.data_ptr()) if os.getpid() == self.pid else None

    def _drop(self, seg: Segment) -> None:
        del self.segments[seg.address]
        seg.close()


def _map(fd: int, size: int) -> torch.Tensor:
    """The file as a uint8 tensor, mapped shared; torch keeps no descriptor (Python's mmap would keep one)."""
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=size, dtype=torch.uint8)


def _let_go(ref: weakref.ref) -> None:
    seg = ref()
    if seg is not None:
        seg.held = False


_pool: Pool | None = None


def pool() -> Pool | None:
    """This process's pool (made on first use; a forked child makes its own), None where memfd is missing."""
    global _pool
    if not hasattr(os, "memfd_create"):
        return None
    if _pool is None or _pool.pid != os.getpid():
        _pool = Pool()
    return _pool


def send(seg: Segment) -> tuple:
    """Pickle args for ``receive``: the segment's descriptor, its size, and which send of it this is."""
    fd_ref = DupFd(seg.fd)
    seg.sent += 1
    return fd_ref, seg.size, seg.sent


def receive(fd_ref, size: int, count: int) -> torch.Tensor:
    """The main process's uint8 tensor over the whole received segment. When it and every tensor made from it
    are gone, the segment's first 8 bytes say so to the worker."""
    fd = fd_ref.detach()
    try:
        mapped = _map(fd, size)
    finally:
        os.close(fd)
    data = mapped.numpy()
    weakref.finalize(data, _give_back, mapped, count)  # the tensor below (and its views) hold ``data``
    return torch.from_numpy(data)


def _give_back(mapped: torch.Tensor, count: int) -> None:
    mapped[:8].view(torch.int64)[0] = count
