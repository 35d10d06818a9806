"""The plain DataLoader path: a batch decoded into one block, collated by default_collate without a second copy."""

import os
import pickle
import subprocess

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import lmdbkit
from lmdbkit import batch as lkbatch
from lmdbkit import codec
from lmdbkit import layout as lklayout
from lmdbkit.dataset import collate as lkcollate

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")


def _sample(i):
    return {"x": torch.full((3, 4), float(i)), "c": torch.full((2,), complex(i, -i), dtype=torch.complex64),
            "h": torch.full((2,), complex(i, 1), dtype=torch.complex32), "bf": torch.full((2,), float(i), dtype=torch.bfloat16),
            "y": np.arange(2) + i, "flag": np.array([i % 2 == 0]), "empty": torch.zeros(0, 3),
            "label": i % 3, "score": i / 4, "name": f"n{i}", "nested": {"v": np.arange(2) + i},
            "ok": i % 2 == 0}


@pytest.fixture
def mixed_db(tmp_path):
    p = tmp_path / "mixed.lmdb"
    with lmdbkit.Writer(p) as w:
        for i in range(40):
            w.append(_sample(i), key=f"k{i}")
    return p


def _reference(ds, idx):
    """What the DataLoader made of these items before: each read alone, then default_collate."""
    return default_collate([ds[i] for i in idx])


def _same_batch(got, ref):
    assert list(got) == list(ref)
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        elif k == "nested":
            assert torch.equal(got[k]["v"], v["v"])
        else:
            assert got[k] == v, k


def test_plain_getitems_then_default_collate_equals_reading_one_by_one(mixed_db):
    ds = lmdbkit.LMDBDataset(mixed_db)
    for idx in ([7, 0, 39, 12], [5], list(range(40))):
        rows = ds.__getitems__(idx)
        assert lkbatch.block_of(rows) is not None  # decoded as one block
        ref = _reference(ds, idx)
        _same_batch(default_collate(rows), ref)
        _same_batch(lkcollate(rows), lkcollate([ds[i] for i in idx]))


def test_none_fields_stay_lists_with_lmdbkit_collate(tmp_path):
    p = tmp_path / "none.lmdb"
    with lmdbkit.Writer(p) as w:
        for i in range(4):
            w.append({"x": torch.full((2,), float(i)), "extra": None, "label": i})
    rows = lmdbkit.LMDBDataset(p).__getitems__([2, 0])
    b = lkcollate(rows)
    assert b["extra"] == [None, None] and b["label"].tolist() == [2, 0] and b["x"][:, 0].tolist() == [2.0, 0.0]
    with pytest.raises(TypeError, match="found <class 'NoneType'>"):  # as default_collate refuses None anyway
        default_collate(rows)


def test_rows_are_the_items_and_stay_valid(mixed_db):
    ds = lmdbkit.LMDBDataset(mixed_db)
    rows = ds.__getitems__([3, 9])
    kept = rows[1]
    del rows
    assert type(kept) is not dict and isinstance(kept, dict)
    assert torch.equal(kept["x"], torch.full((3, 4), 9.0)) and kept["label"] == 0 and kept["name"] == "n9"
    plain = pickle.loads(pickle.dumps(kept))  # pickles as a plain dict, without its block
    assert type(plain) is dict and torch.equal(plain["x"], kept["x"])


def test_one_shared_storage_per_batch_in_workers(mixed_db):
    """A worker hands the batch over as one piece of shared memory: arrays and int/float fields together."""
    loader = DataLoader(lmdbkit.LMDBDataset(mixed_db), batch_size=8, num_workers=2, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    ptrs = {k: batches[0][k].untyped_storage().data_ptr() for k in ("x", "c", "h", "bf", "y", "label", "score")}
    assert len(set(ptrs.values())) == 1, ptrs
    assert batches[0]["x"].is_shared() and batches[0]["label"].dtype == torch.int64
    assert batches[0]["score"].dtype == torch.float64 and batches[0]["ok"].dtype == torch.bool
    seen = torch.cat([b["x"][:, 0, 0] for b in batches]).long().tolist()
    assert sorted(seen) == list(range(40))
    for b in batches:
        i = b["x"][:, 0, 0].long()
        assert torch.equal(b["label"], i % 3) and torch.equal(b["score"], i.double() / 4)
        assert torch.equal(b["h"], torch.complex(i.float(), torch.ones(len(i))).unsqueeze(1).expand(-1, 2))
        assert b["name"] == [f"n{j}" for j in i.tolist()]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_plain_dataloader_with_workers_equals_reference(mixed_db, context):
    ds = lmdbkit.LMDBDataset(mixed_db)
    ds[0]  # the parent holds the environment open, as a notebook does
    loader = DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=context)
    for b, start in zip(loader, (0, 16, 32)):
        idx = list(range(start, min(start + 16, 40)))
        ref = _reference(ds, idx)
        _same_batch({k: v for k, v in b.items() if k != "nested"}, {k: v for k, v in ref.items() if k != "nested"})


def test_transformed_rows_are_collated_as_they_are(mixed_db):
    """A transform that changes a row in place, or returns a new dict, is collated from what it returns."""
    def in_place(s):
        s["x"] = s["x"] * 2
        return s
    for tf in (in_place, lambda s: {"x": s["x"] + 1, "label": s["label"]}):
        ds = lmdbkit.LMDBDataset(mixed_db, transform=tf)
        b = default_collate(ds.__getitems__([1, 2]))
        expect = torch.stack([tf(lmdbkit.LMDBDataset(mixed_db)[i])["x"] for i in (1, 2)])
        assert torch.equal(b["x"], expect)
    rows = lmdbkit.LMDBDataset(mixed_db).__getitems__([1, 2, 3])
    assert lkbatch.block_of(rows[:2]) is None and lkbatch.block_of(rows[::-1]) is None  # not the whole block
    assert torch.equal(default_collate(rows[:2])["x"][1], torch.full((3, 4), 2.0))


def test_a_batch_is_its_blocks_only_when_every_row_is_untouched(mixed_db):
    """block_of hands back the block's tensors only for its own rows, all, in order, arrays and keys untouched."""
    ds = lmdbkit.LMDBDataset(mixed_db)
    def rows():
        return ds.__getitems__([1, 2, 3])
    assert lkbatch.block_of(rows()) is not None
    other = rows()
    edits = {
        "an array replaced": lambda r: r[1].__setitem__("x", r[1]["x"] + 0),
        "an array taken out": lambda r: r[2].pop("x"),
        "a key added": lambda r: r[0].__setitem__("extra", 1),
        "a row swapped for a copy": lambda r: r.__setitem__(1, lkbatch.Row(r[1])),
        "a row swapped for a plain dict": lambda r: r.__setitem__(1, dict(r[1])),
        "a row from another block": lambda r: r.__setitem__(2, other[2]),
        "two rows in another order": lambda r: r.insert(0, r.pop(1)),
    }
    for what, edit in edits.items():
        batch = rows()
        edit(batch)
        assert lkbatch.block_of(batch) is None, what
        if len({tuple(r) for r in batch}) == 1:  # (rows whose keys differ do not collate, as with default_collate)
            assert torch.equal(default_collate(batch)["x"], torch.stack([r["x"] for r in batch])), what


def test_items_of_different_layouts_are_read_one_by_one(tmp_path):
    p = tmp_path / "var.lmdb"
    with lmdbkit.Writer(p) as w:
        w.append({"x": torch.zeros(3), "label": 1})
        w.append({"x": torch.zeros(5), "label": 2})
    q = tmp_path / "more.lmdb"  # another database, concatenated: its items have one more field
    with lmdbkit.Writer(q) as w:
        w.append({"x": torch.zeros(3), "label": 3, "more": 1})
    ds = lmdbkit.LMDBDataset([p, q])
    for idx in ([0, 1], [0, 2]):
        rows = ds.__getitems__(idx)
        assert lkbatch.block_of(rows) is None and [type(r) for r in rows] == [dict, dict]
    assert [r["label"] for r in ds.__getitems__([1, 0, 2])] == [2, 1, 3]


@pytest.mark.parametrize("workers", [0, 2])
def test_large_items_of_one_layout_are_one_block_whatever_their_alignment_pad(tmp_path, workers):
    """Items of 64 KiB+ carry 0-63 bytes of alignment pad, which depends on the header's length (here the
    key's): the batch is still decoded as one block (it once fell back to reading item by item)."""
    p = tmp_path / "big.lmdb"
    keys = [f"{'k' * (i * 7)}{i}" for i in range(12)]
    with lmdbkit.Writer(p) as w:
        for i, k in enumerate(keys):
            w.append({"spec": torch.full((130, 128), float(i)), "mel": np.full((4, 5), i, np.float32), "label": i}, key=k)
    ds = lmdbkit.LMDBDataset(p)
    with ds.readers[0]._txn() as txn:  # the pads differ, so their offsets do
        assert len({codec.parse(ds.readers[0]._raw(txn, i))[4][0][4] for i in range(12)}) > 1
    rows = ds.__getitems__(list(range(11, -1, -1)))
    assert lkbatch.block_of(rows) is not None
    got = default_collate(rows)
    assert torch.equal(got["spec"][:, 0, 0], torch.arange(11, -1, -1, dtype=torch.float32))
    assert torch.equal(got["mel"][:, 3, 4], torch.arange(11, -1, -1, dtype=torch.float32))
    batches = list(DataLoader(ds, batch_size=4, num_workers=workers))
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.arange(12))
    assert all(torch.equal(b["spec"][:, 129, 127], b["label"].float()) for b in batches)


def test_big_ints_are_collated_as_default_collate_does(tmp_path):
    p = tmp_path / "big.lmdb"
    with lmdbkit.Writer(p) as w:
        for v in (1, 2**63 + 5):
            w.append({"x": torch.zeros(2), "v": v})
    rows = lmdbkit.LMDBDataset(p).__getitems__([0, 1])
    with pytest.raises(Exception) as ref:
        default_collate([dict(r) for r in rows])
    with pytest.raises(type(ref.value), match=str(ref.value)):  # the same refusal, not a silently wrapped value
        default_collate(rows)


def test_a_corrupt_item_in_a_batch_is_named(mixed_db):
    from conftest import replace_stored, stored
    good = bytearray(stored(mixed_db, 6))
    good[-1] ^= 0xFF  # one payload bit: only the checksum can tell
    replace_stored(mixed_db, 6, bytes(good))
    ds = lmdbkit.LMDBDataset(mixed_db)
    with pytest.raises(lmdbkit.CorruptItemError, match=r"mixed.lmdb: item 6: corrupt item.*checksum"):
        ds.__getitems__([1, 6, 7])
    assert default_collate(ds.__getitems__([1, 7]))["label"].tolist() == [1, 1]


def test_decode_layout_by_pwrite_equals_copying(tmp_path):
    bufs = [codec.encode({"a": np.arange(20000, dtype=np.float32) + i, "l": i}) for i in range(3)]
    layout = lklayout.batch_layout(bufs)
    path = tmp_path / "shm"
    with open(path, "w+b") as f:
        f.truncate(3 * 80000)
        dests = {"a": np.zeros((3, 20000), np.float32)}  # not written: the file is
        metas = lklayout.decode_layout(bufs, layout, dests, verify=True, file=(f.fileno(), {"a": 0}))
    got = np.fromfile(path, np.float32).reshape(3, 20000)
    assert np.array_equal(got, np.arange(20000, dtype=np.float32)[None] + np.arange(3)[:, None])
    assert metas == [{"a": None, "l": 0}, {"a": None, "l": 1}, {"a": None, "l": 2}] and not dests["a"].any()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root)")
def test_full_shared_memory_is_an_error_not_a_crash(tmp_path, monkeypatch):
    """A worker's batch that does not fit in shared memory: an LmdbkitError naming /dev/shm, never SIGBUS."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        f = open(mnt / "batch", "w+b")
        f.truncate(1 << 20)  # sparse, as torch's shared memory is: the pages are only found missing when written
        monkeypatch.setattr(lkbatch, "_shared_file", lambda arrays: (f.fileno(), {k: 0 for k in arrays}))
        monkeypatch.setattr(lklayout, "PWRITE_MIN", 1)
        big = [codec.encode({"a": np.ones(50_000, np.float32) * i}) for i in range(40)]
        with pytest.raises(lmdbkit.LmdbkitError, match=r"shared memory.*/dev/shm.*--shm-size"):
            lkbatch.decode_block(big, lambda b: ("db", b), verify=[True] * 40, complex32="complex64",
                                 shared=True)
        f.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_batch_of_zero_dimensional_complex32_items_reads_their_values(tmp_path):
    # a 0-d row of a [n] batch array is a view only as a[b, ...]; a[b] was a copy, and the values were lost
    path = tmp_path / "z.lmdb"
    with lmdbkit.Writer(path) as w:
        for i in range(4):
            w.append({"z": torch.tensor(complex(i, -i)).to(torch.complex32), "i": i})
    ds = lmdbkit.LMDBDataset(path)
    got = default_collate(ds.__getitems__([3, 1, 2]))
    assert torch.equal(got["z"], torch.tensor([3 - 3j, 1 - 1j, 2 - 2j], dtype=torch.complex64))
    ds.close()
