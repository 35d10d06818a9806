import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import lmdbkit
from lmdbkit import store
from lmdbkit.errors import DatabaseNotFoundError

from conftest import HAVE_MEMFD, make_samples


def _write(path, start, n):
    with lmdbkit.Writer(path, index_fields=("label",)) as w:
        for s in make_samples(n):
            s["i"] += start
            w.append(s, key=f"{path.name}/{s['i']}")


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_yield_each_item_once_per_epoch(small_db, context):
    ds = lmdbkit.LMDBDataset(small_db)
    assert ds[0]["i"] == 0  # the parent holds the environment open, as a notebook does
    loader = DataLoader(ds, batch_size=8, num_workers=4, shuffle=True, multiprocessing_context=context,
                        persistent_workers=True)
    for _epoch in range(2):
        seen = torch.cat([b["i"] for b in loader]).tolist()
        assert sorted(seen) == list(range(100))
    batch = next(iter(loader))
    assert batch["x"].shape == (8, 16) and batch["x"].dtype == torch.float32
    assert ds[99]["i"] == 99  # the parent's handle still works after the workers


def test_fork_child_can_open_same_path_after_parent():
    """py-lmdb refuses a second open of one path per process; a forked child must drop the inherited one."""
    code = (
        "import os, sys, lmdbkit\n"
        "r = lmdbkit.Reader(sys.argv[1]); r[0]\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    r2 = lmdbkit.Reader(sys.argv[1]); ok = r2[3]['i'] == 3 and r[4]['i'] == 4\n"
        "    os._exit(0 if ok else 1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status) or (r[5]['i'] != 5))\n"
    )
    import tempfile, pathlib
    with tempfile.TemporaryDirectory() as d:
        p = pathlib.Path(d) / "f.lmdb"
        _write(p, 0, 10)
        assert subprocess.run([sys.executable, "-c", code, str(p)]).returncode == 0


def test_concatenation_list_directory_glob(tmp_path):
    a, b, c = tmp_path / "train-0-of-3.lmdb", tmp_path / "train-1-of-3.lmdb", tmp_path / "train-2-of-3.lmdb"
    _write(a, 0, 10)
    _write(b, 10, 5)
    _write(c, 15, 7)
    for spec in ([a, b, c], tmp_path, str(tmp_path / "train-*-of-3.lmdb")):
        ds = lmdbkit.LMDBDataset(spec)
        assert len(ds) == 22
        assert [ds[i]["i"] for i in range(22)] == list(range(22))
        assert ds[-1]["i"] == 21 and ds[10]["i"] == 10 and ds[15]["i"] == 15
        assert ds.get(f"{b.name}/12")["i"] == 12
        assert ds.meta["count"] == 22
        assert [s["i"] for s in ds.__getitems__([21, 0, 12, 3])] == [21, 0, 12, 3]
        assert ds.query(label=1) == [i for i in range(22) if (i if i < 10 else (i - 10 if i < 15 else i - 15)) % 3 == 1]
        ds.close()
    with pytest.raises(IndexError, match="index 22 is out of range for 3 databases"):
        lmdbkit.LMDBDataset([a, b, c])[22]
    with pytest.raises(DatabaseNotFoundError, match="matches no database"):
        lmdbkit.LMDBDataset(str(tmp_path / "val-*.lmdb"))


def test_getitems_of_one_database_takes_negative_indices_and_names_one_out_of_range(small_db):
    ds = lmdbkit.LMDBDataset(small_db)
    assert [s["i"] for s in ds.__getitems__([-1, 0, -100, 57])] == [99, 0, 0, 57]
    assert [s["i"] for s in ds.source.read_many([-2, 3])] == [98, 3]
    for bad in (100, -101):
        with pytest.raises(IndexError, match=f"index {bad} is out of range for .*small.lmdb, which holds 100 items"):
            ds.__getitems__([3, bad, 4])
    ds.close()


def test_getitems_uses_one_transaction_per_database(small_db, monkeypatch):
    ds = lmdbkit.LMDBDataset(small_db)
    calls = []
    real = lmdbkit.Reader._txn
    monkeypatch.setattr(lmdbkit.Reader, "_txn", lambda self: calls.append(1) or real(self))
    out = ds.__getitems__(list(range(0, 64)))
    assert [s["i"] for s in out] == list(range(64)) and len(calls) == 1


def test_transform_subset_and_pickle(small_db):
    import pickle
    ds = lmdbkit.LMDBDataset(small_db, transform=lambda s: (s["x"] * 2, s["label"]))
    x, y = ds[4]
    assert torch.equal(x, lmdbkit.LMDBDataset(small_db)[4]["x"] * 2) and y == 1
    sub = lmdbkit.LMDBDataset(small_db).subset(label=2)
    assert len(sub) == 33 and all(s["label"] == 2 for s in sub)
    ds2 = pickle.loads(pickle.dumps(lmdbkit.LMDBDataset(small_db)))
    assert ds2[7]["i"] == 7


def test_close_releases_environment(small_db):
    before = store.open_count()
    ds = lmdbkit.LMDBDataset(small_db)
    ds[0]
    ds.close()
    ds.close()
    assert store.open_count() == before


def test_import_lmdbkit_does_not_import_torch():
    code = "import sys, lmdbkit; lmdbkit.Reader; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_public_names_are_pinned():
    assert sorted(lmdbkit.__all__) == sorted([
        "AudioDecodeError", "CommitError", "ConfigMismatchError", "CorruptItemError", "DamagedDatabaseError",
        "DatabaseBusyError", "DatabaseExistsError", "DatabaseNotFoundError", "DiskFullError", "DuplicateKeyError",
        "EncodeError", "FormatVersionError", "IndexNotFoundError", "KeyTooLongError", "LMDBDataTransform",
        "LMDBDataset", "LmdbkitError", "MapSizeLimitError", "NotADatabaseError", "ReadOnlyError", "Reader",
        "SchemaError", "SpectrogramTransform", "StftConfig", "TruncatedDatabaseError", "UnsafeFormatError",
        "Writer", "__version__",
        "benchmark_lmdb_performance", "build_index", "create_data_loader", "create_train_val_loaders",
        "crop_collate", "decode", "encode", "pad_collate", "query_samples_by_category", "query_samples_by_label",
        "verify",
    ])
    for name in lmdbkit.__all__:
        assert getattr(lmdbkit, name) is not None


@pytest.fixture
def fixed_db(tmp_path):
    p = tmp_path / "fixed.lmdb"
    with lmdbkit.Writer(p, index_fields=("label",)) as w:
        for i in range(40):
            w.append({"x": torch.full((3, 4), float(i)), "c": torch.full((2,), complex(i, -i), dtype=torch.complex64),
                      "bf": torch.full((2,), float(i), dtype=torch.bfloat16), "y": np.arange(2) + i,
                      "label": i % 3, "name": f"n{i}", "extra": None}, key=f"k{i}")
    return p


def test_prebatch_equals_collating_samples(fixed_db):
    from torch.utils.data import default_collate
    from lmdbkit.dataset import Batch, collate
    plain, pre = lmdbkit.LMDBDataset(fixed_db), lmdbkit.LMDBDataset(fixed_db, prebatch=True)
    idx = [7, 0, 39, 12]
    batch = pre.__getitems__(idx)
    assert isinstance(batch, Batch) and list(batch) == ["x", "c", "bf", "y", "label", "name", "extra"]
    ref = collate(plain.__getitems__(idx))
    for k in ("x", "c", "bf", "y", "label"):
        assert torch.equal(batch[k], ref[k]) and batch[k].dtype == ref[k].dtype, k
    assert batch["name"] == ["n7", "n0", "n39", "n12"] and batch["extra"] == [None] * 4
    assert torch.equal(batch["x"], default_collate([plain[i]["x"] for i in idx]))
    assert collate(batch) is batch


def test_prebatch_falls_back_for_variable_shapes(small_db, tmp_path):
    p = tmp_path / "var.lmdb"
    with lmdbkit.Writer(p) as w:
        for n in (3, 3, 5):
            w.append({"x": torch.zeros(n)})
    out = lmdbkit.LMDBDataset(p, prebatch=True).__getitems__([0, 1, 2])
    assert isinstance(out, list) and [s["x"].shape[0] for s in out] == [3, 3, 5]
    assert isinstance(lmdbkit.LMDBDataset(p, prebatch=True).__getitems__([0, 1]), dict)
    with pytest.raises(lmdbkit.LmdbkitError, match="prebatch=True collates raw torch items"):
        lmdbkit.LMDBDataset(p, prebatch=True, transform=lambda s: s)


@pytest.mark.parametrize("workers", [0, 2])
def test_create_data_loader_prebatches_with_and_without_workers(fixed_db, workers):
    loader = lmdbkit.create_data_loader(fixed_db, batch_size=8, num_workers=workers, shuffle=True)
    assert loader.dataset.prebatch
    batches = list(loader)
    assert sorted(torch.cat([b["label"] for b in batches]).tolist()) == sorted(i % 3 for i in range(40))
    xs = torch.cat([b["x"][:, 0, 0] for b in batches]).long().tolist()
    assert sorted(xs) == list(range(40))
    assert not batches[0]["x"].is_shared()  # a worker's batch comes in a segment it reuses (lmdbkit.segments)
    assert not lmdbkit.create_data_loader(fixed_db, transform=lambda s: s, num_workers=0).dataset.prebatch


def test_prebatch_names_a_corrupt_item(fixed_db):
    from conftest import replace_stored
    replace_stored(fixed_db, 5, b"LK\x01\x00not a header")
    ds = lmdbkit.LMDBDataset(fixed_db, prebatch=True)
    with pytest.raises(lmdbkit.CorruptItemError, match=r"fixed.lmdb: item 5: corrupt item"):
        ds.__getitems__([1, 5, 7])
    assert ds.__getitems__([1, 7])["label"].tolist() == [1, 1]


def test_workers_fill_batches_under_the_file_system_sharing_strategy(tmp_path):
    """torch.multiprocessing.set_sharing_strategy("file_system") (the usual remedy for "too many open files")
    moved a batch's shared memory away from the views a worker was filling: the worker died of SIGSEGV. Each
    batch goes in torch's shared memory first (no reused segments: lmdbkit.segments), then in segments."""
    code = (
        "import sys, torch, lmdbkit, lmdbkit.segments\n"
        "from torch.utils.data import DataLoader\n"
        "torch.multiprocessing.set_sharing_strategy('file_system')\n"
        "import lmdbkit.handoff; lmdbkit.handoff.BY_VALUE_MAX = 0\n"  # none by value (the forked workers see it)
        f"for keep in (0, {8 if HAVE_MEMFD else 0}):\n"
        "    lmdbkit.segments.KEEP = keep\n"
        "    for path, size in ((sys.argv[1], 256), (sys.argv[2], 40_000)):\n"  # copied in place; written with pwrite
        "        with lmdbkit.Writer(path, mode='overwrite') as w:\n"
        "            for i in range(96):\n"
        "                w.append({'x': torch.full((size,), float(i)), 'label': i})\n"
        "        for loader in (DataLoader(lmdbkit.LMDBDataset(path), batch_size=16, num_workers=2, shuffle=True),\n"
        "                       lmdbkit.create_data_loader(path, batch_size=16, num_workers=2, shuffle=True)):\n"
        "            got = []\n"
        "            for b in loader:\n"
        "                assert b['x'].is_shared() == (keep == 0)\n"
        "                assert torch.equal(b['x'], b['label'][:, None].float().expand(-1, size))\n"
        "                got += b['label'].tolist()\n"
        "            assert sorted(got) == list(range(96)), got\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "small.lmdb"), str(tmp_path / "large.lmdb")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("handoff", ["by value", pytest.param("segment", marks=pytest.mark.skipif(
    not HAVE_MEMFD, reason="no memfd_create here")), "shared memory"])
def test_workers_hand_batches_over_by_value_in_segments_or_in_shared_memory(fixed_db, tmp_path, monkeypatch,
                                                                            handoff):
    from lmdbkit import handoff as handoffs, segments
    from lmdbkit.dataset import Batch
    if handoff != "segment":
        monkeypatch.setattr(segments, "KEEP", 0)  # no segment is free (the forked workers see it too)
    if handoff == "shared memory":
        monkeypatch.setattr(handoffs, "BY_VALUE_MAX", 0)  # nor small enough: torch's shared memory
    received = []
    receive = segments.receive
    monkeypatch.setattr(segments, "receive", lambda *a: received.append(a[3]) or receive(*a))  # (the main process)
    numeric = tmp_path / "numeric.lmdb"  # default_collate (the plain DataLoader) refuses None and takes no str
    with lmdbkit.Writer(numeric) as w:
        for s in lmdbkit.LMDBDataset(fixed_db):
            w.append({k: s[k] for k in ("x", "c", "bf", "y", "label")})
    plain = DataLoader(lmdbkit.LMDBDataset(numeric), batch_size=8, num_workers=2, shuffle=True,
                       multiprocessing_context="fork")
    pre = lmdbkit.create_data_loader(fixed_db, batch_size=8, num_workers=2, shuffle=True,
                                     multiprocessing_context="fork")
    ref = lmdbkit.LMDBDataset(fixed_db)
    for loader, kind in ((plain, dict), (pre, Batch)):
        seen, received[:] = [], []
        for b in loader:
            assert type(b) is kind and b["x"].is_shared() == (handoff == "shared memory")
            for j, i in enumerate((b["x"][:, 0, 0]).long().tolist()):
                want = ref[i]
                for k in ("x", "c", "bf", "y"):
                    assert torch.equal(b[k][j], want[k]) and b[k].dtype == want[k].dtype, k
                assert b["label"][j] == want["label"]
                if kind is Batch:
                    assert b["name"][j] == want["name"] and b["extra"][j] is None
            b["x"] += 1  # writable
            seen += b["x"][:, 0, 0].long().tolist()
        assert sorted(seen) == list(range(1, 41))
        assert len(received) == (5 if handoff == "segment" else 0)


@pytest.mark.parametrize("handoff", ["by value", pytest.param("segment", marks=pytest.mark.skipif(
    not HAVE_MEMFD, reason="no memfd_create here"))])
def test_a_batch_pickles_by_value_or_in_a_segment_with_every_dtype_and_shape(monkeypatch, handoff):
    """How a DataLoader worker's result queue (multiprocessing's ForkingPickler) pickles a batch; pickle and
    copy see a plain dict, as they do outside a worker."""
    import pickle
    from multiprocessing.reduction import ForkingPickler
    from lmdbkit import handoff as handoffs, segments
    from lmdbkit.batch import Batch, Collated, storage_views
    assert handoffs.by_value(Batch(x=torch.zeros(3)), Batch) is None  # outside a DataLoader worker: as any dict
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as if in one
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
              torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]
    shapes = {f"f{i}": (dt, (3, *shape)) for i, (dt, shape) in
              enumerate((dt, shape) for dt in dtypes for shape in ((), (0,), (2, 5)))}
    (views,) = storage_views(shapes, shared=handoff == "segment")
    for k, t in views.items():
        t.copy_(torch.arange(t.numel()).reshape(t.shape).to(t.dtype) if t.numel() else t)
    batch = Batch(views, names=["a", "b", "c"], extra=None)
    received = []
    receive = segments.receive
    monkeypatch.setattr(segments, "receive", lambda *a: received.append(a) or receive(*a))
    back = pickle.loads(ForkingPickler.dumps(batch))
    assert len(received) == (handoff == "segment")
    assert type(back) is Batch and list(back) == list(batch) and back["names"] == ["a", "b", "c"]
    for k, t in views.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
        assert back[k].numel() == 0 or back[k].data_ptr() != t.data_ptr()
        assert not back[k].is_shared()
    assert type(pickle.loads(ForkingPickler.dumps(Collated(batch)))) is dict
    for plain in (pickle.loads(pickle.dumps(batch)), __import__("copy").deepcopy(batch)):  # not the queue's pickler
        assert type(plain) is Batch and all(torch.equal(plain[k], t) for k, t in views.items())
    # what it does not take: tensors of two storages, a shared or too big one; they pickle as torch does
    private = storage_views({"x": (torch.float32, (4,))}, shared=False)[0]
    for other in (Batch(views, y=torch.zeros(2)), Batch({k: t.share_memory_() for k, t in private.items()}),
                  Batch(x=torch.zeros(handoffs.BY_VALUE_MAX + 1))):
        assert handoffs.in_segment(other, Batch) is None and handoffs.by_value(other, Batch) is None
        back = pickle.loads(ForkingPickler.dumps(other))
        assert type(back) is Batch and all(torch.equal(back[k], v) for k, v in other.items() if k != "names")


