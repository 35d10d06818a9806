"""The shared memory a DataLoader worker reuses for its big batches (lmdbkit.segments): a segment is filled
again only once the main process has dropped every batch it got from it and the worker holds none."""

import os
import pickle
import subprocess
import sys
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

import lmdbkit
from lmdbkit import handoff, segments
from lmdbkit.batch import Batch, Collated
from lmdbkit.dataset import collate

from conftest import HAVE_MEMFD, HAVE_PIDFD


pytestmark = pytest.mark.skipif(not HAVE_MEMFD, reason="no memfd_create here: workers hand batches over as before")
needs_pidfd = pytest.mark.skipif(not HAVE_PIDFD, reason="no pidfd_open here: every batch brings its descriptor")


class _Dup:  # a received descriptor, as DupFd.detach gives it
    def __init__(self, fd):
        self.fd = fd

    def detach(self):
        return os.dup(self.fd)


def test_a_segment_is_free_once_neither_process_holds_its_batch():
    pool = segments.Pool()
    data = pool.bytes(3000)
    (seg,) = pool.segments.values()
    assert seg.size == segments.GRAIN and not seg.free()
    data[:] = 7
    del data
    assert seg.free()  # the worker dropped it before sending
    again = pool.bytes(2000)
    assert list(pool.segments.values()) == [seg]
    name, fd_ref, size, count, dropped = pool.send(seg)
    del again
    assert not seg.free()  # sent, not yet given back
    got = segments.receive(name, _Dup(seg.fd), size, count, dropped)[segments.HEADER:segments.HEADER + 2000]
    assert got.eq(7).all()
    os.close(fd_ref.detach())  # (what the main process would fetch)
    view = got[10:20]
    del got
    assert not seg.free()  # a view of the received batch is still alive
    del view
    assert seg.free() and int(seg.returned) == seg.sent == 1


def test_a_worker_keeps_at_most_KEEP_segments_and_trades_a_small_free_one_for_a_bigger_batch():
    pool = segments.Pool()
    held = [pool.bytes(1000) for _ in range(segments.KEEP)]
    assert len(pool.segments) == segments.KEEP and pool.bytes(1000) is None  # all in use: torch's shared memory
    del held[0]
    big = pool.bytes(3 * segments.GRAIN)
    assert big is not None and len(pool.segments) == segments.KEEP
    assert sorted(s.size for s in pool.segments.values())[-1] == 4 * segments.GRAIN


def test_a_forked_child_keeps_none_of_its_parents_segments(monkeypatch):
    """Neither the worker side (a pool) nor the main side (the segments it keeps mapped): a DataLoader worker
    forked while the main process maps an earlier loader's segments would hold their memory for its life."""
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    parent = segments.pool()
    batch = Batch(x=parent.bytes(4096))
    received = pickle.loads(ForkingPickler.dumps(batch))  # this process maps it twice: as worker and as main
    assert received["x"].numel() == 4096
    del batch, received  # (a batch alive at the fork keeps its memory in the child, as any tensor does)
    (inherited,) = [s.fd for s in parent.segments.values()][-1:]
    pid = os.fork()
    if pid == 0:
        try:
            os.fstat(inherited)
            closed = False
        except OSError:
            closed = True
        with open("/proc/self/maps") as f:
            mapped = sum("lmdbkit-batch" in line for line in f)
        os._exit(0 if segments.pool() is not parent and closed and segments._maps is None and mapped == 0 else 1)
    assert os.waitpid(pid, 0)[1] == 0
    os.fstat(inherited)  # the parent's own are open and mapped
    with open("/proc/self/maps") as f:
        assert sum("lmdbkit-batch" in line for line in f) >= 2


@pytest.fixture
def stft_like_db(tmp_path):
    p = tmp_path / "big.lmdb"
    with lmdbkit.Writer(p) as w:
        for i in range(192):
            w.append({"x": torch.full((64, 64), float(i)), "label": i})  # 16 KiB items, 256 KiB batches of 16
    return p


def _count_receives(monkeypatch):
    received = []
    receive = segments.receive
    monkeypatch.setattr(segments, "receive", lambda *a: received.append(a[3]) or receive(*a))
    return received


@pytest.mark.parametrize("prebatch", [True, False])
def test_batches_the_main_process_holds_are_never_filled_again(stft_like_db, monkeypatch, prebatch):
    received = _count_receives(monkeypatch)
    ds = lmdbkit.LMDBDataset(stft_like_db, prebatch=prebatch)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, shuffle=True, persistent_workers=True,
                                         collate_fn=collate if prebatch else None)
    held = list(loader)  # 6 batches a worker, all held: none of their segments may be filled again
    assert len(received) == 12 and set(received) == {1}  # each segment sent once
    for b in held:
        assert torch.equal(b["x"], b["label"].float()[:, None, None].expand(-1, 64, 64))
    del held, b
    received.clear()
    for _ in range(2):
        seen = []
        for b in loader:  # dropped as the next one comes: their segments are filled again
            assert torch.equal(b["x"], b["label"].float()[:, None, None].expand(-1, 64, 64))
            seen += b["label"].tolist()
        assert sorted(seen) == list(range(192))
    assert max(received) > 1


def test_spawned_workers_hand_batches_over_in_segments(stft_like_db):
    code = (
        "import sys, torch, lmdbkit, lmdbkit.segments as segments\n"
        "received = []\n"
        "receive = segments.receive\n"
        "segments.receive = lambda *a: received.append(a) or receive(*a)\n"
        "if __name__ == '__main__':\n"
        "    loader = lmdbkit.create_data_loader(sys.argv[1], batch_size=64, num_workers=2, shuffle=True,\n"
        "                                        multiprocessing_context='spawn')\n"
        "    got = []\n"
        "    for b in loader:\n"
        "        assert torch.equal(b['x'], b['label'].float()[:, None, None].expand(-1, 64, 64))\n"
        "        got += b['label'].tolist()\n"
        "    assert sorted(got) == list(range(192)) and len(received) == 3, (got, received)\n"
        "    print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(stft_like_db)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_no_room_for_a_segment_is_an_error_naming_the_remedy(stft_like_db):
    """A full memory limit must fail where the segment is made (posix_fallocate), never as a SIGBUS while the
    worker writes through the map. RLIMIT_FSIZE refuses the segment's size for real (EFBIG)."""
    code = (
        "import resource, signal, sys, torch, lmdbkit\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, resource.RLIM_INFINITY))\n"
        "loader = lmdbkit.create_data_loader(sys.argv[1], batch_size=64, num_workers=1)\n"
        "try:\n"
        "    next(iter(loader))\n"
        "except lmdbkit.LmdbkitError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(stft_like_db)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cannot fill a batch of 64 items in shared memory" in proc.stdout and "num_workers=0" in proc.stdout


def test_a_batch_sent_twice_is_copied_the_second_time(monkeypatch):
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as if in a DataLoader worker
    data = segments.pool().bytes(handoff.BY_VALUE_MAX + 4096)
    batch = Batch(x=data.view(torch.float32))
    batch["x"][:] = 3
    first = pickle.loads(ForkingPickler.dumps(batch))
    second = pickle.loads(ForkingPickler.dumps(batch))  # its segment is still out: torch shares a copy
    assert not first["x"].is_shared() and second["x"].is_shared()
    first["x"][:] = 5
    assert second["x"].eq(3).all()


def _wait_for(check, seconds=30.0):
    import time
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


@needs_pidfd
def test_the_main_process_maps_a_segment_once_and_forgets_it_when_the_worker_ends(stft_like_db, monkeypatch):
    sent = []
    receive = segments.receive
    monkeypatch.setattr(segments, "receive", lambda *a: sent.append(a) or receive(*a))
    loader = lmdbkit.create_data_loader(stft_like_db, batch_size=16, num_workers=2, shuffle=True,
                                        persistent_workers=False)
    for _ in range(2):
        kept = list(loader)  # the second epoch's workers are new processes; the last batch is still held
        del kept
    held = list(loader)
    workers = {name[0] for name, *_ in sent}
    assert len(workers) == 6 and all(a[1] is None for a in sent if a[3] > 1)  # a descriptor once per segment
    assert _wait_for(lambda: not set(segments._mappings().pidfds) & workers)  # the workers ended: forgotten
    assert not any(name[0] in workers for name in segments._mappings().maps)
    for b in held:  # the batches still held keep their memory
        assert torch.equal(b["x"], b["label"].float()[:, None, None].expand(-1, 64, 64))


@needs_pidfd
def test_a_segment_the_worker_closes_is_forgotten_and_without_pidfd_every_batch_brings_its_descriptor(monkeypatch):
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as if in a DataLoader worker
    monkeypatch.setattr(segments, "KEEP", 1)
    pool = segments.Pool()
    monkeypatch.setattr(segments, "_pool", pool)
    descriptors = []
    receive = segments.receive
    monkeypatch.setattr(segments, "receive", lambda *a: descriptors.append(a[1] is not None) or receive(*a))

    def round_trip(nbytes):
        batch = Batch(x=pool.bytes(nbytes))
        batch["x"][:] = 9
        back = pickle.loads(ForkingPickler.dumps(batch))
        assert back["x"].eq(9).all()
    round_trip(1000)
    (small,) = pool.segments.values()
    name = (pool.pid, pool.token, small.address)
    assert name in segments._mappings().maps and int(small.kept) == 1
    round_trip(1000)  # mapped already: no descriptor
    assert descriptors == [True, False]
    round_trip(3 * segments.GRAIN)  # KEEP is 1: the small segment is closed for a bigger one
    assert name not in segments._mappings().maps and len(pool.segments) == 1
    monkeypatch.delattr(os, "pidfd_open")
    monkeypatch.setattr(segments, "_maps", None)
    for _ in range(2):
        round_trip(5 * segments.GRAIN)
        assert not segments._mappings().maps and not any(int(s.kept) for s in pool.segments.values())
    assert descriptors[-2:] == [True, True]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) in (dict, Collated) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return type(b) is list and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_a_transforms_outputs_are_collated_into_a_segment_as_default_collate_would(monkeypatch):
    """create_data_loader's collate in a worker stacks a transform's outputs into one segment; what comes out
    equals lmdbkit's collate outside a worker, field for field, dtype for dtype."""
    g = torch.Generator().manual_seed(0)
    items = [{"x": torch.randn(3, 4, generator=g), "c": torch.randn(2, generator=g).to(torch.complex64),
              "bf": torch.randn(2, generator=g).to(torch.bfloat16), "label": i, "score": i / 3, "flag": i % 2 == 0,
              "name": f"n{i}", "extra": None, "arr": torch.arange(2).numpy() + i, "nested": {"a": i}}
             for i in range(5)]
    want = collate(items)  # outside a worker: default_collate's way
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    got = collate(items)
    assert type(got) is Collated and _same(want, got)
    assert segments.pool().segment_of(got["x"].untyped_storage()) is not None  # one storage, in a segment
    assert got["c"].untyped_storage().data_ptr() == got["x"].untyped_storage().data_ptr()
    ragged = [dict(d, x=torch.zeros(i + 1)) for i, d in enumerate(items)]  # left to default_collate, which refuses
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        collate(ragged)
    from lmdbkit.batch import stack
    assert stack([(1, 2), (3, 4)], shared=True) is None and stack([{"a": 1}, {"b": 1}], shared=True) is None
    assert stack([{"a": "x"}, {"a": "y"}], shared=True) is None  # nothing to stack: collated as before


def test_create_data_loader_hands_a_transforms_batches_over_in_segments(stft_like_db, monkeypatch):
    received = _count_receives(monkeypatch)
    tf = lambda s: dict(s, x=s["x"][:, :16] * 2, half=float(s["label"]) / 2)  # noqa: E731
    loader = lmdbkit.create_data_loader(stft_like_db, transform=tf, batch_size=16, num_workers=2, shuffle=True)
    seen = []
    for b in loader:
        assert type(b) is dict and b["x"].shape == (16, 64, 16) and b["half"].dtype == torch.float64
        assert torch.equal(b["x"], 2 * b["label"].float()[:, None, None].expand(-1, 64, 16))
        assert torch.equal(b["half"], b["label"].double() / 2)
        seen += b["label"].tolist()
    assert sorted(seen) == list(range(192)) and len(received) == 12


def test_the_plain_dataloader_hands_a_transforms_batches_over_in_segments(stft_like_db, monkeypatch):
    """Inside a worker, LMDBDataset hands a transform's dicts to collate as Samples (dicts registered in
    default_collate_fn_map): default_collate stacks them into a segment; any other collate sees dicts."""
    received = _count_receives(monkeypatch)
    tf = lambda s: dict(s, x=s["x"][:, :16] * 2, half=float(s["label"]) / 2)  # noqa: E731
    ds = lmdbkit.LMDBDataset(stft_like_db, transform=tf)
    seen = []
    for b in torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, shuffle=True):
        assert type(b) is dict and b["x"].shape == (16, 64, 16) and b["half"].dtype == torch.float64
        assert torch.equal(b["x"], 2 * b["label"].float()[:, None, None].expand(-1, 64, 16))
        seen += b["label"].tolist()
    assert sorted(seen) == list(range(192)) and len(received) == 12
    lists = list(torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, collate_fn=lambda items: items))
    assert all(type(s) is dict and torch.equal(s["x"], 2 * torch.full((64, 16), float(s["label"])))
               for batch in lists for s in batch)
    assert type(ds[3]) is dict and type(ds.__getitems__([1, 2])[0]) is dict  # outside a worker: as they are


def test_workers_fall_back_to_torchs_shared_memory_where_memfd_is_refused(stft_like_db, monkeypatch):
    """A container's seccomp profile may refuse memfd_create (EPERM): the batches go as before, not an error."""
    def refused(*_a):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "memfd_create", refused)  # (the forked workers see it too)
    received = _count_receives(monkeypatch)
    seen = []
    for b in lmdbkit.create_data_loader(stft_like_db, batch_size=64, num_workers=2, shuffle=True):
        assert b["x"].is_shared() and torch.equal(b["x"], b["label"].float()[:, None, None].expand(-1, 64, 64))
        seen += b["label"].tolist()
    assert sorted(seen) == list(range(192)) and not received
