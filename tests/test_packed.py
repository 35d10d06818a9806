"""Format 2: small items packed in runs (lmdbkit.runs), default keys implicit; format 1 still read and written."""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import lmdbkit
from lmdbkit import runs, store
from lmdbkit.errors import ConfigMismatchError, CorruptItemError, DuplicateKeyError

import format1_samples

FORMAT1 = Path(__file__).parent / "data" / "format1.lmdb"


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (np.ndarray, torch.Tensor)):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return a == b


@pytest.fixture
def format1(tmp_path):
    path = tmp_path / "format1.lmdb"
    shutil.copytree(FORMAT1, path)
    return path


def test_a_database_written_by_lmdbkit_0_1_reads_appends_and_verifies(format1):
    want = format1_samples.samples()
    with lmdbkit.Reader(format1, decode_to="numpy") as r:
        assert r.meta["version"] == 1 and len(r) == len(want)
        assert all(equal(r[i], s) for i, (_, s) in enumerate(want))
        assert all(equal(got, s) for got, (_, s) in zip(r.read_many(range(len(r))[::-1]), want[::-1]))
        assert r.get("item-5")["label"] == 2 and r.keys() == [k for k, _ in want] and r.query(label=1) == [1, 4, 7, 10]
    batch = lmdbkit.LMDBDataset(format1, prebatch=True).__getitems__([2, 6, 10])  # the same shapes: one batch
    assert torch.equal(batch["float32"][1], torch.from_numpy(want[6][1]["float32"]))
    with lmdbkit.Writer(format1, mode="append") as w:  # it stays format 1: one item per value
        w.append(want[1][1], key="again")
    with lmdbkit.Reader(format1) as r:
        assert r.meta["version"] == 1 and equal(r.get("again"), want[1][1]) and r.index_of("13") is None
    assert lmdbkit.verify(format1, progress=False).ok


@pytest.mark.parametrize("pack", [None, True, False])
def test_every_dtype_and_shape_round_trips_packed_or_not(tmp_path, pack):
    path, want = tmp_path / "db.lmdb", format1_samples.samples()
    with lmdbkit.Writer(path, pack=pack, index_fields=("label",)) as w:
        for key, s in want:
            w.append(s, key=key)
    with lmdbkit.Reader(path, decode_to="numpy", verify=True) as r:
        assert r.meta["version"] == (1 if pack is False else 2)
        assert all(equal(r[i], s) for i, (_, s) in enumerate(want))
        order = [12, 0, 5, 5, 11, 3]
        assert all(equal(got, want[i][1]) for got, i in zip(r.read_many(order), order))
        assert [k for k, _ in r.items()] == [k for k, _ in want] and r.index_of("item-12") == 12
    ds = lmdbkit.LMDBDataset(path, prebatch=True)
    assert torch.equal(ds.__getitems__([2, 6, 10])["int16"][2], torch.from_numpy(want[10][1]["int16"]))
    ds.close()
    assert lmdbkit.verify(path, progress=False).ok


def test_small_items_fill_their_pages_and_large_ones_keep_a_run_each(tmp_path):
    path = tmp_path / "db.lmdb"
    sizes = [256] * 100 + [70_000, 256, 3, 20_000, 256]  # float32 counts: 1 KiB items, then mixed
    with lmdbkit.Writer(path) as w:
        for i, n in enumerate(sizes):
            w.append({"x": np.full(n, i, np.float32)})
    with lmdbkit.Reader(path) as r:
        assert all(np.array_equal(s["x"], np.full(n, i, np.float32)) for i, (s, n) in enumerate(zip(r, sizes)))
        with r._txn() as txn:
            found = [(store.unpack_index(k), runs.count(v), len(v)) for k, v in txn.cursor(db=r._items)]
    assert [n for _, n, _ in found[:6]] == [15] * 6  # fifteen 1 KiB items to a run of four pages, 99% full
    assert all(16_000 < size <= 4 * 4096 - runs.PAGE_HEADER for _, _, size in found[:6])
    assert any(n == 1 and size > 280_000 for _, n, size in found)  # the 280 KB item alone
    assert sum(n for _, n, _ in found) == len(sizes) and found[-1][0] == len(sizes) - 1
    assert all(size <= runs.RUN_MAX or n == 1 for _, n, size in found)


def test_runs_split_as_documented():
    assert runs.split([1073] * 31) == [15, 15, 1]
    assert runs.split([100_000, 10, 10]) == [1, 2]
    assert runs.split([10, 100_000, 10]) == [1, 1, 1]  # a large item never joins a run of small ones
    assert runs.split([]) == []
    run = runs.pack([b"a", b"bc", b""])
    assert runs.count(run) == 3 and [bytes(x) for x in runs.items(run)] == [b"a", b"bc", b""]
    assert bytes(runs.item(run, 9, 8)) == b"bc" and runs.table_ok(run)


def test_a_damaged_run_is_a_corrupt_item_never_another_items_bytes(tmp_path):
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path) as w:
        for i in range(40):
            w.append({"x": np.full(256, i, np.float32), "i": i})
    import lmdb
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(b"items", txn=txn)
        run = bytearray(txn.get(store.pack_index(14), db=db))
        run[16 + 4 * 4:16 + 4 * 5] = run[16 + 4 * 6:16 + 4 * 7]  # item 3's end moved onto item 5's
        txn.put(store.pack_index(14), bytes(run), db=db)
        txn.put(store.pack_index(29), b"LR\x02\x00", db=db)  # a run cut short
    env.close()
    with lmdbkit.Reader(path, verify=True) as r:
        with pytest.raises(CorruptItemError, match=r"db\.lmdb: item 3: .*checksum mismatch in its table of item starts"):
            r[3]
        with pytest.raises(CorruptItemError, match=r"item 20: .*shorter than the 16-byte head"):
            r.read_many([30, 20])
        assert r[30]["x"][0] == 30 and r[39]["x"][0] == 39
    with pytest.raises(CorruptItemError, match=r"db\.lmdb: item 14: .*run of packed items: its table of item starts"):
        lmdbkit.build_index(path, "i")  # reads every item's header: the cut run is named, nothing written
    rep = lmdbkit.verify(path, progress=False)
    texts = [p["problem"] for p in rep.problems]
    assert not rep.ok and any("table of item starts" in t for t in texts) and any("15..29 are unreadable" in t for t in texts)


def test_default_keys_are_implicit_and_still_unique(tmp_path):
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path, commit_items=7) as w:
        for i in range(30):
            w.append({"i": i}, key=None if i % 3 else f"k{i}")  # None: the default key, its index as text
        w.append({"i": 30}, key="30")
        with pytest.raises(DuplicateKeyError, match="'13'"):
            w.append({"i": 31}, key="13")  # item 13 has it, with no keys-table entry
        with pytest.raises(DuplicateKeyError):
            w.append({"i": 31}, key="k3")
        assert "5" in w and "3" not in w and "k3" in w
        w.append({"i": 31}, key="3")  # item 3 is under k3: "3" is free
    with lmdbkit.Reader(path) as r:
        with r._txn() as txn:
            assert txn.stat(r._handle().db(store.KEYS))["entries"] == 11  # k0..k27 and "3" at 31
        assert r.index_of("5") == 5 and r.index_of("3") == 31 and r.index_of("k3") == 3 and r.index_of("05") is None
        assert r.index_of("32") is None and r.get("29")["i"] == 29
        assert r.keys() == [f"k{i}" if i % 3 == 0 else str(i) for i in range(30)] + ["30", "3"]
        assert [s["i"] if s else None for s in r.retrieve_batch(["7", "k9", "nope", 2])] == [7, 9, None, 2]
        # "did you mean" offers default keys too, though no keys table holds them (item 6's key is k6)
        assert "5" in r.near_keys("5x") and "29" in r.near_keys("290") and "6" not in r.near_keys("6x", 10)
        assert "k3" in r.near_keys("k3x") and r.near_keys("zzz")[:1] != ["4"]
    assert lmdbkit.verify(path, progress=False).ok


def test_appending_continues_the_open_run_and_keeps_the_packing(tmp_path):
    path = tmp_path / "db.lmdb"
    for start in range(0, 40, 8):  # every writer stops inside a run of 15
        with lmdbkit.Writer(path, mode="append") as w:
            for i in range(start, start + 8):
                w.append({"x": np.full(256, i, np.float32)})
    with lmdbkit.Reader(path) as r:
        assert [int(s["x"][0]) for s in r] == list(range(40))
        with r._txn() as txn:
            assert [runs.count(v) for _, v in txn.cursor(db=r._items)] == [15, 15, 10]
    with pytest.raises(ConfigMismatchError, match="pack"):
        lmdbkit.Writer(path, mode="append", pack=False)
    with pytest.raises(lmdbkit.LmdbkitError, match="pack='yes'"):
        lmdbkit.Writer(tmp_path / "other.lmdb", pack="yes")


KILLED = """
import sys, numpy as np, lmdbkit
w = lmdbkit.Writer(sys.argv[1], mode="append", commit_items=10)
for i in range(int(sys.argv[2]), 10**6):
    w.append({"x": np.full(256, i, np.float32)})
    if i % 10 == 9:
        print(i, flush=True)
"""


def test_a_writer_killed_inside_a_run_loses_nothing_committed(tmp_path):
    path = tmp_path / "db.lmdb"
    start = 0
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", KILLED, str(path), str(start)], stdout=subprocess.PIPE, text=True)
        for _ in range(7):
            last = int(p.stdout.readline())
        p.send_signal(signal.SIGKILL)
        p.wait()
        with lmdbkit.Reader(path) as r:
            n = len(r)
            assert n >= last - 9 and [int(s["x"][0]) for s in r] == list(range(n))
        start = n
    assert lmdbkit.verify(path, progress=False).ok


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("pack", [True, False])
def test_dataloader_workers_read_packed_and_unpacked_alike(tmp_path, context, pack):
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path, pack=pack) as w:
        for i in range(100):
            w.append({"x": torch.full((64,), float(i)), "i": i})
    ds = lmdbkit.LMDBDataset(path)
    assert ds[7]["i"] == 7  # the parent holds it open, as a notebook does
    seen = []
    for b in DataLoader(ds, batch_size=16, shuffle=True, num_workers=2, multiprocessing_context=context):
        assert torch.equal(b["x"][:, 0].long(), b["i"])
        seen += b["i"].tolist()
    assert sorted(seen) == list(range(100))
    ds.close()


def test_a_reader_opened_before_the_first_item_follows_the_writers_packing(tmp_path):
    path = tmp_path / "db.lmdb"
    w = lmdbkit.Writer(path)
    r = lmdbkit.Reader(path)  # format 1 so far: nothing is written
    assert len(r) == 0 and r.meta["version"] == 1
    for i in range(20):
        w.append({"x": np.full(256, i, np.float32)})
    w.commit()
    assert len(r) == 20 and r.meta["version"] == 2 and r[19]["x"][0] == 19 and r.index_of("7") == 7
    w.close()
    r.close()


@pytest.mark.parametrize("decode_to", ["auto", "numpy", "torch"])
@pytest.mark.parametrize("pack", [True, False])
def test_a_read_again_takes_the_seen_header_and_reads_what_decode_reads(tmp_path, pack, decode_to, monkeypatch):
    from conftest import stored
    from lmdbkit import codec, headers
    path = tmp_path / "db.lmdb"
    size = 256 if pack else 20_000  # packed 1 KiB items; items of overflow pages of their own
    with lmdbkit.Writer(path, pack=pack) as w:
        for i in range(40):
            w.append({"x": np.full(size, i, np.float32), "t": torch.arange(3, dtype=torch.int16) * i, "label": i % 3})
    calls = []
    decode = codec.decode
    monkeypatch.setattr(lmdbkit.reader, "KEEP_NS", 10**12)  # one kept transaction for the whole test
    monkeypatch.setattr(codec, "_MEMO", headers.Memo(codec._plain))  # no header seen before
    monkeypatch.setattr(codec, "decode", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    with lmdbkit.Reader(path, decode_to=decode_to) as r:
        first = [r[i] for i in range(40)]  # each header met first (a label; a key's length) is decoded in full
        assert 3 <= len(calls) <= 6
        calls.clear()
        got = [r[i] for i in range(40)]
        assert calls == []  # each read again took the kept header's way
        assert r[-1]["label"] == 39 % 3 and r[np.int64(5)]["x"][0] == 5  # any index still reads (the general way)
    for i in range(40):
        assert equal(got[i], decode(stored(path, i), decode_to=decode_to)[1]) and equal(got[i], first[i])
    assert type(got[7]["x"]) is (torch.Tensor if decode_to == "torch" else np.ndarray)  # written as numpy
    assert type(got[7]["t"]) is (np.ndarray if decode_to == "numpy" else torch.Tensor)


@pytest.mark.parametrize("pack", [True, False])
def test_an_item_cut_short_behind_a_seen_header_is_named_not_read(tmp_path, pack):
    from conftest import replace_stored, stored
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path, pack=pack) as w:
        for i in range(20):
            w.append({"x": np.full(256, i, np.float32), "label": 1})
    replace_stored(path, 9, stored(path, 9)[:-100])  # its header as every item's; its payload 100 bytes short
    with lmdbkit.Reader(path) as r:
        assert [r[i]["x"][0] for i in range(9)] == list(range(9))
        with pytest.raises(CorruptItemError, match=r"db\.lmdb: item 9: .*"):
            r[9]
        assert r[10]["x"][0] == 10


def test_verify_turned_on_later_checks_every_read_again(tmp_path):
    from conftest import replace_stored, stored
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path) as w:
        for i in range(20):
            w.append({"x": np.full(256, i, np.float32), "label": 1})
    bad = bytearray(stored(path, 5))
    bad[-1] ^= 0xFF  # a payload byte flipped: the same length, the checksum no longer matches
    replace_stored(path, 5, bytes(bad))
    with lmdbkit.Reader(path) as r:
        [r[i] for i in range(20)]  # unverified: read as stored
        r.verify = True
        with pytest.raises(CorruptItemError, match=r"item 5: .*checksum mismatch"):
            r[5]
