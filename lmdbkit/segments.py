"""Shared memory that a DataLoader worker fills again and again: its big batches, handed to the main process.

torch hands a worker's batch over as fresh shared memory: a new file whose pages the worker allocates as it
fills them and the main process frees when the batch is dropped. For a batch of 64 STFT items (16 MiB) the new
pages cost more than the copy into them: filling fresh shared memory took 10.2-10.8 ms on this project's
2-core machine, filling private memory that is reused 4.5 ms. So a worker keeps a few ``Segment``s (memfd
files, their pages allocated once with ``posix_fallocate``, so that a full memory limit is an error there,
never a SIGBUS while writing through the map) and fills a free one.

The main process maps a segment the first time it comes (its descriptor fetched over the socket torch uses
for its own shared memory) and keeps it mapped (``Mappings``) until the worker closes it or ends. When all of
a batch's tensors are gone, it writes into the segment's first 8 bytes how many batches of it it has given
back. The worker fills a segment again only once the main process has given back every batch it sent from
it and the worker holds none itself. With 2 workers and batches of 64 STFT items, epochs went from 6.9-8.2k items/s
(fresh shared memory) to 18-23k (a segment mapped anew each batch) and 21-28k (kept mapped).
"""

from __future__ import annotations

import atexit
import errno
import os
import select
import threading
import weakref
from multiprocessing.reduction import DupFd

import torch

from .errors import LmdbkitError

HEADER = 64  # bytes before a segment's data, written by the main process: the batches it gave back, and 1 once it
# keeps the segment mapped (then the worker sends no descriptor again)
KEEP = 8  # segments a worker keeps; a batch that finds none free goes as ``handoff`` says (by value, or torch's)
GRAIN = 1 << 20  # segment sizes are rounded up to this, so that batches of nearly one size share segments


class Segment:
    """A memfd the worker maps, sized once. ``sent`` counts batches pickled from it (worker side);
    ``returned`` (the file's first 8 bytes) those the main process gave back; ``held`` is the worker's own use."""

    __slots__ = ("fd", "mapped", "address", "size", "sent", "held", "returned", "kept",
                 "__weakref__")

    def __init__(self, size: int):
        self.fd = os.memfd_create("lmdbkit-batch", os.MFD_CLOEXEC)
        try:
            os.posix_fallocate(self.fd, 0, size)  # ENOSPC/ENOMEM now, not SIGBUS on a write through the map
            self.mapped = _map(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.address, self.size, self.sent, self.held = self.mapped.data_ptr() + HEADER, size, 0, False
        self.returned, self.kept = self.mapped[:16].view(torch.int64).unbind(0)

    def free(self) -> bool:
        return not self.held and int(self.returned) == self.sent

    def close(self) -> None:
        del self.mapped, self.returned, self.kept  # unmapped with its last view
        os.close(self.fd)


class Pool:
    """This process's segments (a DataLoader worker has one pool), by the address of their data."""

    def __init__(self):
        self.segments: dict[int, Segment] = {}
        self.pid, self.token = os.getpid(), os.urandom(8)
        self.dropped: list[tuple] = []  # segments closed since the last send, for the main process to forget
        self.lock = threading.Lock()  # (``send`` runs in the result queue's feeder thread)
        self.broken = False

    def bytes(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 tensor of ``nbytes`` in a free segment; None when all KEEP segments are in use, or where
        this process cannot make segments."""
        if self.broken:
            return None
        free = [s for s in self.segments.values() if s.free()]
        fits = [s for s in free if s.size >= HEADER + nbytes]
        if fits:
            seg = min(fits, key=lambda s: s.size)
        else:
            if len(self.segments) >= KEEP:
                if not free:
                    return None
                self._drop(max(free, key=lambda s: s.size))  # too small for this batch: make room
            try:
                seg = Segment(-(-(HEADER + nbytes) // GRAIN) * GRAIN)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise  # no room: the caller's LmdbkitError names the remedy
                self.broken = True  # memfd refused (a seccomp profile, say), no /proc: torch's shared memory
                return None
            except RuntimeError:  # torch could not map /proc/self/fd/N
                self.broken = True
                return None
            self.segments[seg.address] = seg
        seg.held = True
        data = seg.mapped[HEADER:HEADER + nbytes].numpy()
        weakref.finalize(data, _let_go, weakref.ref(seg))  # the worker's tensors are gone: the worker holds none
        return torch.from_numpy(data)

    def segment_of(self, storage: torch.UntypedStorage) -> Segment | None:
        return self.segments.get(storage.data_ptr())

    def send(self, seg: Segment) -> tuple:
        """Pickle args for ``receive``: the segment's name, its descriptor unless the main process keeps it
        mapped, its size, which send of it this is, and the segments this pool closed since."""
        name = (self.pid, self.token, seg.address)
        fd_ref = None if int(seg.kept) else DupFd(seg.fd)
        seg.sent += 1
        with self.lock:
            dropped, self.dropped = self.dropped, []
        return name, fd_ref, seg.size, seg.sent, dropped

    def _drop(self, seg: Segment) -> None:
        del self.segments[seg.address]
        with self.lock:
            self.dropped.append((self.pid, self.token, seg.address))
        seg.close()

    def abandon(self) -> None:
        """In a forked child: close its copies of the parent's segments (descriptors and maps)."""
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()


def _map(fd: int, size: int) -> torch.Tensor:
    """The file as a uint8 tensor, mapped shared; torch keeps no descriptor (Python's mmap would keep one)."""
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=size, dtype=torch.uint8)


def _let_go(ref: weakref.ref) -> None:
    seg = ref()
    if seg is not None:
        seg.held = False


_pool: Pool | None = None


def pool() -> Pool | None:
    """This process's pool (made on first use), None where memfd is missing."""
    global _pool
    if not hasattr(os, "memfd_create"):
        return None
    if _pool is None:
        _pool = Pool()
    return _pool


def receive(name: tuple, fd_ref, size: int, count: int, dropped: list) -> torch.Tensor:
    """The main process's uint8 tensor over the whole received segment. When it and every tensor made from it
    are gone, the segment's first 8 bytes say so to the worker."""
    maps = _mappings()
    maps.forget(dropped)
    if fd_ref is None:
        mapped = maps.get(name)
        if mapped is None:
            raise LmdbkitError(f"a DataLoader worker (pid {name[0]}) sent a batch in shared memory this process "
                               "no longer maps: please report this as a bug")
    else:
        fd = fd_ref.detach()
        try:
            mapped = _map(fd, size)
        finally:
            os.close(fd)
        if maps.keep(name, mapped):
            mapped[8:16].view(torch.int64)[0] = 1  # (before the batch can be given back: then the worker sends again)
    data = mapped.numpy()
    weakref.finalize(data, _give_back, mapped, count)  # the tensor below (and its views) hold ``data``
    return torch.from_numpy(data)


def _give_back(mapped: torch.Tensor, count: int) -> None:
    mapped[:8].view(torch.int64)[0] = count


class Mappings:
    """The segments this (main) process keeps mapped, by name (worker pid, pool token, address), each until its
    worker closes it or ends: a thread waits on a pidfd of each worker. Mapping a segment anew for each batch
    (its descriptor fetched over a socket from the worker, which must win its GIL to answer) took a median
    0.8 ms of a 2.7 ms batch of 64 STFT items with 2 workers."""

    def __init__(self):
        self.pid, self.lock = os.getpid(), threading.Lock()
        self.maps: dict[tuple, torch.Tensor] = {}
        self.pidfds: dict[int, int] = {}  # worker pid -> its pidfd
        self.wake = os.pipe()
        self.thread: threading.Thread | None = None

    def keep(self, name: tuple, mapped: torch.Tensor) -> bool:
        """Keep ``mapped`` until its worker drops or ends; False where this cannot watch the worker (no pidfd)."""
        pid = name[0]
        with self.lock:
            if pid not in self.pidfds:
                try:
                    self.pidfds[pid] = os.pidfd_open(pid)
                except (AttributeError, OSError):  # no pidfd here, or the worker is gone already
                    return False
                if self.thread is None:
                    self.thread = threading.Thread(target=self._watch, name="lmdbkit-segments", daemon=True)
                    self.thread.start()
                    atexit.register(self._stop)
                os.write(self.wake[1], b"+")
            self.maps[name] = mapped
        return True

    def get(self, name: tuple) -> torch.Tensor | None:
        with self.lock:
            return self.maps.get(name)

    def forget(self, names: list) -> None:
        if names:
            with self.lock:
                for name in names:
                    self.maps.pop(name, None)

    def _watch(self) -> None:
        poll, watched = select.poll(), {}
        poll.register(self.wake[0], select.POLLIN)
        while True:
            with self.lock:
                for pid, fd in self.pidfds.items():
                    if fd not in watched:
                        poll.register(fd, select.POLLIN)
                        watched[fd] = pid
            for fd, _event in poll.poll():
                if fd == self.wake[0]:
                    if b"." in os.read(fd, 512):
                        return
                    continue
                poll.unregister(fd)
                pid = watched.pop(fd)
                with self.lock:  # the worker ended: its segments go once no batch of theirs is left
                    del self.pidfds[pid]
                    for name in [n for n in self.maps if n[0] == pid]:
                        del self.maps[name]
                os.close(fd)

    def _stop(self) -> None:
        """At exit, before the interpreter finalizes: a daemon thread woken then (by a worker ending) would be
        stopped inside torch's code, and the process abort ("terminate called without an active exception")."""
        if os.getpid() == self.pid and self.thread is not None:  # (a forked child inherits the atexit call)
            os.write(self.wake[1], b".")
            self.thread.join(5)

    def abandon(self) -> None:
        """In a forked child: let go of what it inherited (no thread runs there, and the lock may be held)."""
        for fd in (*self.wake, *self.pidfds.values()):
            os.close(fd)
        self.maps.clear()


_maps: Mappings | None = None


def _mappings() -> Mappings:
    global _maps
    if _maps is None:
        _maps = Mappings()
    return _maps


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker, say) keeps none of its parent's segments mapped: a worker forked
    while the main process still mapped an earlier loader's segments would hold their memory for its life."""
    global _pool, _maps
    for inherited in (_pool, _maps):
        if inherited is not None:
            inherited.abandon()
    _pool = _maps = None


os.register_at_fork(after_in_child=_after_fork_in_child)
