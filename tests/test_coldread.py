"""Large values read cold: one disk request per value, a batch's requests in flight together (lmdbkit.prefetch).

The page cache is dropped with posix_fadvise(DONTNEED) on closed files, as the benchmark does; what is
checked is what was read and which requests were made, never how fast.
"""

import multiprocessing
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

import lmdbkit
from lmdbkit import heap, prefetch, store
from lmdbkit.bench import drop_page_cache
from lmdbkit.errors import CorruptItemError

from test_reliability import read_only_dir  # noqa: F401 - a fixture, used by name

SIZES = (3, 300, 5_000, 70_000, 66_000)  # float32 elements: in the leaf page, 1-2 pages, many pages


def sample(i: int) -> dict:
    n = SIZES[i % len(SIZES)]
    return {"x": torch.arange(n, dtype=torch.float32) + i, "label": i % 3, "name": f"item {i}"}


def write(path, n=40, **kw):
    """Format 1 (one item per LMDB value) unless pack is given: what is checked is how LMDB's large values are read."""
    with lmdbkit.Writer(path, **{"pack": False, **kw}) as w:
        for i in range(n):
            w.append(sample(i), key=f"k{i}")
    return path


def same(got: dict, i: int) -> bool:
    want = sample(i)
    return torch.equal(got["x"], want["x"]) and got["label"] == want["label"] and got["name"] == want["name"]


@pytest.fixture
def cold_db(tmp_path):
    path = write(tmp_path / "cold.lmdb")
    drop_page_cache(path)
    return path


@pytest.fixture
def requests(monkeypatch):
    """Every madvise(WILLNEED) the prefetcher makes, as (address, length)."""
    madvise = prefetch._MADVISE
    made = []

    def counting(address, length, advice):
        made.append((address.value, length))
        return madvise(address, length, advice)
    monkeypatch.setattr(prefetch, "_MADVISE", counting)
    return made


def test_value_ranges_read_from_the_leaf_are_where_the_bytes_are(cold_db):
    with lmdbkit.Reader(cold_db) as r, r._txn() as txn, open(cold_db / store.DATA_FILE, "rb") as f:
        cursor = txn.cursor(db=r._items)
        big = 0
        for i in range(len(r)):
            cursor.set_key(store.pack_index(i))
            found = r._fetch.file_range(cursor)
            stored = bytes(cursor.value())
            if len(stored) < 2000:  # kept in the leaf page
                assert found is None
                continue
            big += 1
            offset, length = found
            f.seek(offset)
            assert length == len(stored) and f.read(length) == stored
        assert big == 24  # 3 of the 5 sizes live in overflow pages


def test_cold_reads_ask_once_per_large_value_and_warm_reads_never(cold_db, requests):
    r = lmdbkit.Reader(cold_db, decode_to="torch", verify=True)
    got = r.read_many(range(len(r)))
    assert all(same(s, i) for i, s in enumerate(got))
    many_pages = [i for i in range(len(r)) if SIZES[i % len(SIZES)] * 4 > 2 * 4096]
    # one request per value spanning pages that is not in the page cache, none for the others (a value can
    # be in already: LMDB's lookups in other threads read pages beside it)
    assert 0.75 * len(many_pages) <= len(requests) <= len(many_pages)
    assert all(length >= 5_000 * 4 for _, length in requests)  # each covers its whole value
    requests.clear()
    assert all(same(r[i], i) for i in range(len(r))) and same(r.get("k23"), 23)
    # in the page cache now: nothing asked (but for a lookup the scheduler paused past prefetch.COLD_NS)
    assert len(requests) <= 2
    r.close()
    drop_page_cache(cold_db)
    with lmdbkit.Reader(cold_db) as r:
        assert [i for i, s in enumerate(r) if same(s, i)] == list(range(len(r)))  # iteration asks too
        assert 0.75 * len(many_pages) <= len(requests) <= len(many_pages)
        requests.clear()
        assert same(r[3], 3) and same(r.retrieve_batch(["k8", "nope", "k9"])[2], 9)


def test_leaves_learned_from_cold_lookups_find_each_value_before_lmdb_reads_it(cold_db, requests):
    with lmdbkit.Reader(cold_db) as r:
        assert r._fetch.leaves is not None  # a finished database: its map never moves
        r.read_many(range(len(r)))
        with r._txn() as txn:
            cursor = txn.cursor(db=r._items)
            spans = {}
            for i in range(len(r)):
                cursor.set_key(store.pack_index(i))
                spans[i] = r._fetch.span(cursor)
        leaves = r._fetch.leaves
        assert all(leaves.span(store.pack_index(i)) == spans[i] for i in range(len(r)) if spans[i])
        assert leaves.span(store.pack_index(0)) is None and leaves.span(store.pack_index(40)) is None
        assert leaves.span(b"short") is None

def test_after_one_cold_lookup_values_are_asked_for_before_lmdb_looks_them_up(tmp_path, requests):
    path = tmp_path / "big.lmdb"  # large values only: every key in one leaf page
    with lmdbkit.Writer(path) as w:
        for i in range(30):
            w.append(sample(5 * i + 3), key=f"k{i}")
    drop_page_cache(path)
    with lmdbkit.Reader(path) as r:
        found, learned = [], r._fetch.leaves.span
        r._fetch.leaves.span = lambda key, ranged=False: found.append(learned(key, ranged)) or found[-1]
        for i in (8, 13, 18, 23):  # the first lookup learns the leaf; the others are asked for before LMDB's
            assert same(r[i], 5 * i + 3)
        with r._txn() as txn:
            cursor = txn.cursor(db=r._items)
            spans = [cursor.set_key(store.pack_index(i)) and r._fetch.span(cursor) for i in (13, 18, 23)]
        assert found == spans and {a for a, _ in requests} == {a for a, _ in spans} | {requests[0][0]}


def test_databases_still_written_learn_no_addresses_and_start_no_threads(tmp_path):
    w = lmdbkit.Writer(tmp_path / "open.lmdb")
    for i in range(5):
        w.append(sample(i), key=f"k{i}")
    w.close(complete=False)
    with lmdbkit.Reader(tmp_path / "open.lmdb") as r:  # opened with the lock: a writer may grow its map, and
        assert r._fetch.leaves is None and not r._fetch.finished  # threads would take the readers' lock slots
        assert [same(s, i) for i, s in enumerate(r.read_many(range(5)))] == [True] * 5


def test_every_item_equal_through_every_read_path_cold(cold_db):
    with lmdbkit.Reader(cold_db) as r:
        order = list(np.random.default_rng(0).permutation(len(r))) + [5, 5, -1]
        assert all(same(s, int(i) % len(r)) for i, s in zip(order, r.read_many(order)))
        got = r.retrieve_batch([f"k{i}" for i in (39, 0, 17)] + ["missing"])
        assert same(got[0], 39) and same(got[1], 0) and same(got[2], 17) and got[3] is None
    drop_page_cache(cold_db)
    ds = lmdbkit.LMDBDataset([cold_db, cold_db], prebatch=True)
    batch = ds.__getitems__([3, 44, 8, 49])  # x differs in shape: a list; same shapes: one Batch
    assert [same(s, i % 40) for s, i in zip(batch, (3, 44, 8, 49))] == [True] * 4
    batch = ds.__getitems__([3, 48, 43, 48])
    assert isinstance(batch, lmdbkit.dataset.Batch) and batch["x"].shape == (4, 70_000)
    assert torch.equal(batch["x"][1], sample(8)["x"]) and batch["label"].tolist() == [0, 2, 0, 2]
    ds.close()


def test_layouts_it_does_not_know_read_the_same_bytes(cold_db, monkeypatch):
    monkeypatch.setattr(prefetch, "_MADVISE", None)  # another platform: no hints at all
    with lmdbkit.Reader(cold_db) as r:
        assert not r._fetch.enabled and all(same(s, i) for i, s in enumerate(r.read_many(range(40))))
    assert not prefetch.Prefetcher(lambda **kw: None, 2 * prefetch.OS_PAGE).enabled  # pages not OS pages


def _child_reads(path, q):
    # numpy only: torch's own thread pool does not survive a fork of a process that used it
    with lmdbkit.Reader(path, decode_to="numpy") as r:
        q.put(all(np.array_equal(s["x"], np.arange(SIZES[i % len(SIZES)], dtype=np.float32) + i)
                  for i, s in enumerate(r.read_many(range(len(r))))))


@pytest.mark.slow
def test_forked_child_reads_cold_batches_after_the_parent_did(tmp_path):
    path = write(tmp_path / "db.lmdb")
    r = lmdbkit.Reader(path)
    drop_page_cache(path)
    assert len(r.read_many(range(40))) == 40 and prefetch._POOL is not None  # the parent's threads exist
    r.close()
    drop_page_cache(path)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_reads, args=(path, q))
    p.start()
    try:
        assert q.get(timeout=60) is True  # a child has none of its parent's threads: it makes its own
    finally:
        p.join(timeout=30)
        p.kill()
    assert p.exitcode == 0


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("prebatch", [True, False])
def test_dataloader_workers_read_cold_databases_exactly(tmp_path, context, prebatch):
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path) as w:
        for i in range(96):
            w.append({"x": torch.full((64, 300), float(i)), "i": i}, key=f"k{i}")
    drop_page_cache(path)
    loader = lmdbkit.create_data_loader(path, batch_size=16, shuffle=True, num_workers=2, prebatch=prebatch,
                                        multiprocessing_context=context, persistent_workers=False)
    seen = []
    for b in loader:
        assert torch.equal(b["x"][:, 0, 0].long(), b["i"])
        seen += b["i"].tolist()
    assert sorted(seen) == list(range(96))
    loader.dataset.close()


GROW = """
import sys, lmdbkit
sys.path.insert(0, sys.argv[2])
from test_coldread import sample
with lmdbkit.Writer(sys.argv[1], commit_items=4, map_size_gb=0.004) as w:  # a 4 MiB map: it doubles ~3 times
    for i in range(120):
        w.append(sample(i), key=f"k{i}")
        if i == 0:
            w.commit()
            print("ready", flush=True)
"""


def test_database_growing_in_another_process_reads_exactly(tmp_path):
    path = tmp_path / "growing.lmdb"
    writer = subprocess.Popen([sys.executable, "-c", GROW, str(path), os.path.dirname(__file__)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        r = lmdbkit.Reader(path)
        rounds = 0
        while writer.poll() is None:
            got = r.read_many(range(len(r)))  # items committed so far, from a map the writer keeps growing
            assert all(same(s, i) for i, s in enumerate(got))
            rounds += 1
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0 and rounds > 1
    assert len(r) == 120 and all(same(s, i) for i, s in enumerate(r.read_many(range(120))))
    r.close()


def test_corrupt_large_item_is_named(cold_db):
    with lmdbkit.Reader(cold_db) as r, r._txn() as txn:
        cursor = txn.cursor(db=r._items)
        cursor.set_key(store.pack_index(13))
        offset, length = r._fetch.file_range(cursor)
    with open(cold_db / store.DATA_FILE, "r+b") as f:
        f.seek(offset + length - 1000)
        f.write(b"\xff" * 8)
    drop_page_cache(cold_db)
    with lmdbkit.Reader(cold_db, verify=True) as r:
        with pytest.raises(CorruptItemError, match=r"cold\.lmdb.*13|13.*cold\.lmdb"):
            r.read_many([12, 13, 14])
        assert same(r[14], 14)
    drop_page_cache(cold_db)
    ds = lmdbkit.LMDBDataset(cold_db, prebatch=True)  # verify=True by default
    with pytest.raises(CorruptItemError, match="13"):
        ds.__getitems__([3, 13, 8])
    ds.close()


def test_read_only_media_cold(read_only_dir):
    rw, ro = read_only_dir
    write(rw / "db.lmdb")
    drop_page_cache(rw / "db.lmdb")
    with lmdbkit.Reader(ro / "db.lmdb") as r:
        assert all(same(s, i) for i, s in enumerate(r.read_many(range(40))))
        assert same(r[38], 38)


def test_freed_batch_memory_is_kept_for_the_next_batch():
    check = "import lmdbkit.heap as h; print(h.keep_freed_memory())"
    glibc = platform.libc_ver()[0] == "glibc"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(glibc)
    off = dict(os.environ, LMDBKIT_KEEP_HEAP="0")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, env=off).stdout
    assert out.strip() == "False"


def test_packed_runs_read_cold_exactly_asking_once_per_run(tmp_path, requests):
    path = tmp_path / "packed.lmdb"
    with lmdbkit.Writer(path) as w:  # 1 KiB items: packed, 15 to a run of four pages
        for i in range(300):
            w.append({"x": torch.full((256,), float(i)), "i": i})
    drop_page_cache(path)
    order = [int(i) for i in np.random.default_rng(0).permutation(300)]
    with lmdbkit.Reader(path) as r:
        assert r.meta["version"] == 2
        got = r.read_many(order[:150]) + [r[i] for i in order[150:]]
        assert all(s["i"] == i and torch.equal(s["x"], torch.full((256,), float(i))) for i, s in zip(order, got))
    # requests only for runs (300 items in 20 runs), each for a whole run of four pages
    from lmdbkit import runs
    assert 0 < len({a for a, _ in requests}) <= 20 and all(4096 < n <= runs.RUN_MAX for _, n in requests)


def test_leaves_of_a_packed_table_find_the_run_of_any_index(tmp_path):
    path = tmp_path / "packed.lmdb"
    with lmdbkit.Writer(path) as w:
        for i in range(3000):  # 200 runs: the run keys fill more than one leaf page
            w.append({"x": torch.full((256,), float(i))})
    drop_page_cache(path)
    with lmdbkit.Reader(path) as r:
        r.read_many(list(range(0, 3000, 7)))  # cold: the leaves are learned
        leaves = r._fetch.leaves
        with r._txn() as txn:
            cursor = txn.cursor(db=r._items)
            for i in range(0, 3000, 13):
                cursor.set_range(store.pack_index(i))
                want = r._fetch.span(cursor)
                assert leaves.span(store.pack_index(i), ranged=True) in (want, None)
        assert sum(leaves.span(store.pack_index(i), ranged=True) is not None for i in range(3000)) > 2500
