import json
import logging
import os
import pickle
import platform
import signal
import subprocess
import sys
import textwrap
import time

import lmdb
import numpy as np
import pytest

import lmdbkit
from lmdbkit import store
from lmdbkit.reader import MultiReader
from lmdbkit.errors import (ConfigMismatchError, CorruptItemError, DatabaseExistsError, DatabaseNotFoundError,
                            DuplicateKeyError, IndexNotFoundError, LmdbkitError, MapSizeLimitError,
                            NotADatabaseError, SchemaError, UnsafeFormatError)

from conftest import make_samples


def test_reader_api(small_db):
    with lmdbkit.Reader(small_db) as r:
        assert len(r) == 100
        assert r[42]["i"] == 42 and r[-1]["i"] == 99 and r[-100]["i"] == 0
        assert r.get("k7")["i"] == 7
        assert r.keys() == [f"k{i}" for i in range(100)]
        assert r.key_of(5) == "k5" and r.index_of("k5") == 5 and r.index_of("nope") is None
        batch = r.retrieve_batch(["k3", "missing", "k9"])
        assert batch[0]["i"] == 3 and batch[1] is None and batch[2]["i"] == 9
        assert [s["i"] for s in r] == list(range(100))
        assert [k for k, _ in r.items()][:2] == ["k0", "k1"]
        assert [s["i"] for s in r.read_many([5, -1, 0])] == [5, 99, 0]
        m = r.meta
        assert m["count"] == 100 and m["complete"] is True and m["version"] == 2 and m["index_fields"] == ["label"]
        assert m["schema"]["x"] == {"kind": "array", "dtype": "float32", "ndim": 1}
        assert json.loads((small_db / "metadata.json").read_text())["count"] == 100
        assert isinstance(r[0]["x"], np.ndarray)
        with pytest.raises(IndexError, match=r"index 100 is out of range for .*small.lmdb, which holds 100 items"):
            r[100]
        with pytest.raises(IndexError, match="-101"):
            r[-101]
        with pytest.raises(KeyError, match="'nope' is not in"):
            r.get("nope")
        assert r.get("nope", None) is None


def test_reader_decode_to_torch(small_db):
    import torch
    r = lmdbkit.Reader(small_db, decode_to="torch")
    assert isinstance(r[0]["x"], torch.Tensor)
    with pytest.raises(LmdbkitError, match="decode_to='jax' is unsupported. Supported values are"):
        lmdbkit.Reader(small_db, decode_to="jax")


def test_query_and_values(small_db):
    r = lmdbkit.Reader(small_db)
    assert r.query(label=1) == list(range(1, 100, 3))
    assert r.value_counts("label") == [(0, 34), (1, 33), (2, 33)]
    with pytest.warns(DeprecationWarning, match=r"renamed value_counts"):  # the old name still works
        assert r.values("label") == r.value_counts("label")
    with pytest.warns(DeprecationWarning), MultiReader([small_db, small_db]) as m:
        assert m.values("label") == [(0, 68), (1, 66), (2, 66)]
    assert r.query(label=7) == []
    with pytest.raises(IndexNotFoundError, match=r"no index on 'category'; indexed fields are \['label'\]"):
        r.query(category="A")


def test_writer_refuses_existing_then_append_and_overwrite(small_db):
    with pytest.raises(DatabaseExistsError, match="mode='append'.*mode='overwrite'"):
        lmdbkit.Writer(small_db)
    with lmdbkit.Writer(small_db, mode="append") as w:
        assert len(w) == 100
        assert w.append(make_samples(1)[0], key="k100") == 100
    r = lmdbkit.Reader(small_db)
    assert len(r) == 101 and r.query(label=0)[-1] == 100  # index continued too
    r.close()
    with lmdbkit.Writer(small_db, mode="overwrite") as w:
        w.append({"a": 1})
    assert len(lmdbkit.Reader(small_db)) == 1
    with pytest.raises(LmdbkitError, match="mode='truncate' is unsupported"):
        lmdbkit.Writer(small_db, mode="truncate")


def test_writer_options_are_keyword_only(tmp_path):
    with pytest.raises(TypeError):
        lmdbkit.Writer(tmp_path / "a.lmdb", "overwrite")


def test_writer_refuses_foreign_directory(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    for mode in ("create", "overwrite", "append"):
        with pytest.raises(NotADatabaseError, match="refusing to write"):
            lmdbkit.Writer(d, mode=mode)
    assert (d / "notes.txt").read_text() == "keep me"


def test_duplicate_keys(tmp_path):
    p = tmp_path / "d.lmdb"
    with lmdbkit.Writer(p, commit_items=2) as w:
        w.append({"a": 1}, key="x")
        w.append({"a": 2}, key="y")  # committed now
        w.append({"a": 3}, key="z")  # buffered
        with pytest.raises(DuplicateKeyError, match="key 'x' is already in the database"):
            w.append({"a": 4}, key="x")
        with pytest.raises(DuplicateKeyError, match="key 'z'"):
            w.append({"a": 4}, key="z")
    assert lmdbkit.Reader(p).keys() == ["x", "y", "z"]


def test_schema_is_enforced(tmp_path):
    with lmdbkit.Writer(tmp_path / "s.lmdb") as w:
        w.append({"x": np.zeros(3, np.float32), "y": 1})
        with pytest.raises(SchemaError, match=r"has fields \['x'\], the database has \['x', 'y'\]"):
            w.append({"x": np.zeros(3, np.float32)})
        with pytest.raises(SchemaError, match="field 'x' is float64, the database stores float32"):
            w.append({"x": np.zeros(3), "y": 1})
        w.append({"x": np.zeros(5, np.float32), "y": None})  # shapes and metadata values may vary


def test_commits_every_n_items_and_m_bytes(tmp_path):
    p = tmp_path / "c.lmdb"
    w = lmdbkit.Writer(p, commit_items=10)
    for s in make_samples(25):
        w.append(s)
    assert len(w) == 25 and len(lmdbkit.Reader(p)) == 20  # what a reader sees is what was committed
    w.close()
    q = tmp_path / "b.lmdb"
    w = lmdbkit.Writer(q, commit_bytes=4000)
    for i in range(10):
        w.append({"x": np.zeros(250, np.float32)})  # ~1 KB each: a commit every 4 items
    assert len(lmdbkit.Reader(q)) == 8
    w.close()


def test_map_grows_by_doubling_and_logs(tmp_path, caplog):
    p = tmp_path / "g.lmdb"
    caplog.set_level(logging.INFO, logger="lmdbkit.writer")
    with lmdbkit.Writer(p, map_size_gb=1 / 1024, commit_items=5) as w:  # 1 MiB to start
        for i in range(100):
            w.append({"x": np.full(64 * 1024, i, np.float32)})  # 256 KiB each, 25 MiB in all
    grows = [r for r in caplog.records if "growing to" in r.message]
    assert len(grows) >= 4
    r = lmdbkit.Reader(p)
    assert len(r) == 100 and all(int(r[i]["x"][0]) == i for i in range(100))


def test_initial_reservation_of_2048_gb_is_accepted(tmp_path):
    with lmdbkit.Writer(tmp_path / "big.lmdb", map_size_gb=2048) as w:
        w.append({"a": np.arange(3)})
    assert os.path.getsize(tmp_path / "big.lmdb" / "data.mdb") < 1 << 20  # reserved, not written


def test_hard_cap_stops_cleanly_and_keeps_committed(tmp_path):
    p = tmp_path / "cap.lmdb"
    with pytest.raises(MapSizeLimitError, match=r"reached max_size_gb=0.00390625 with \d+ items committed"):
        with lmdbkit.Writer(p, max_size_gb=4 / 1024, commit_items=2) as w:
            for i in range(100):
                w.append({"x": np.full(64 * 1024, i, np.float32)}, key=f"k{i}")
    r = lmdbkit.Reader(p)
    assert 4 <= len(r) < 100 and not r.meta["complete"]
    assert all(int(r[i]["x"][0]) == i for i in range(len(r)))


def test_exception_inside_with_leaves_readable_incomplete_db(tmp_path):
    p = tmp_path / "e.lmdb"
    with pytest.raises(RuntimeError):
        with lmdbkit.Writer(p, commit_items=10) as w:
            for s in make_samples(15):
                w.append(s)
            raise RuntimeError("boom")
    r = lmdbkit.Reader(p)
    assert len(r) == 15 and r.meta["complete"] is False and [s["i"] for s in r] == list(range(15))
    assert json.loads((p / "metadata.json").read_text())["complete"] is False


def test_append_source_is_atomic_and_recorded(tmp_path):
    p = tmp_path / "src.lmdb"
    with lmdbkit.Writer(p, commit_items=1) as w:
        w.append_source("a.wav", [("a.wav#0", {"v": 0}), ("a.wav#1", {"v": 1})], info={"frames": 10})
        with pytest.raises(DuplicateKeyError):
            w.append_source("b.wav", [("b.wav#0", {"v": 2}), ("a.wav#0", {"v": 3})])
        assert len(w) == 2 and not w.has_source("b.wav")  # the half-added source was rolled back
        assert w.sources() == {"a.wav": {"frames": 10, "items": [0, 1]}}
    assert lmdbkit.Reader(p).keys() == ["a.wav#0", "a.wav#1"]


def test_refused_append_writes_nothing(small_db):
    data = (small_db / "data.mdb").read_bytes()
    with pytest.raises(ConfigMismatchError, match="index_fields"):
        lmdbkit.Writer(small_db, mode="append", index_fields=("category",))
    assert (small_db / "data.mdb").read_bytes() == data  # no index:category sub-database was created
    assert lmdbkit.Reader(small_db).index_fields == ["label"]


def test_metadata_mismatch_on_append(tmp_path):
    p = tmp_path / "m.lmdb"
    with lmdbkit.Writer(p, metadata={"n_fft": 512}) as w:
        w.append({"a": 1})
    with pytest.raises(ConfigMismatchError, match=r"(?s)n_fft\s+512\s+1024"):
        lmdbkit.Writer(p, mode="append", metadata={"n_fft": 1024})
    with lmdbkit.Writer(p, mode="append", metadata={"n_fft": 512}) as w:
        w.append({"a": 2})


KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, lmdbkit
    path, durable = sys.argv[1], sys.argv[2] == "1"
    w = lmdbkit.Writer(path, commit_items=7, durable=durable)
    i = 0
    while True:
        w.append({"x": np.full(1000, i, np.float32), "i": i}, key=f"k{i}")
        if i == 50:
            print("ready", flush=True)
        i += 1
""")


@pytest.mark.parametrize("durable", [True, False])
def test_killed_writer_keeps_every_committed_item(tmp_path, durable):
    p = tmp_path / "k.lmdb"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(p), "1" if durable else "0"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = lmdbkit.Reader(p)
    n = len(r)
    assert n >= 49 and n % 7 == 0 and r.meta["complete"] is False
    assert [s["i"] for s in r] == list(range(n))
    assert all(r[i]["x"][0] == i for i in range(n))
    r.close()
    with lmdbkit.Writer(p, mode="append") as w:  # and it continues where the commits ended
        w.append({"x": np.zeros(1000, np.float32), "i": n}, key=f"k{n}")
    assert len(lmdbkit.Reader(p)) == n + 1


CONCURRENT_WRITER = textwrap.dedent("""
    import sys, time, numpy as np, lmdbkit
    with lmdbkit.Writer(sys.argv[1], map_size_gb=1 / 1024, commit_items=20, max_readers=8) as w:
        for i in range(600):
            w.append({"x": np.full(16 * 1024, i, np.float32), "i": i})
            if i % 20 == 19:
                time.sleep(0.005)
""")


def test_read_while_writing_follows_growth(tmp_path):
    p = tmp_path / "live.lmdb"
    proc = subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(p)])
    try:
        deadline = time.time() + 30
        while True:  # until the writer's first commit (its format record): on a loaded machine, seconds
            try:
                r = lmdbkit.Reader(p)  # the lock table has the size its creator (the writer) gave it
                break
            except (lmdbkit.DatabaseNotFoundError, lmdbkit.NotADatabaseError):
                assert time.time() < deadline and proc.poll() is None, "the writer made no database"
                time.sleep(0.05)
        assert r._handle().locked and r._handle().env.max_readers() == 8
        seen = []
        while proc.poll() is None or len(seen) < 3:
            n = len(r)
            if n:
                last = r[n - 1]
                assert last["i"] == n - 1 and last["x"][0] == n - 1
                seen.append(n)
            time.sleep(0.01)
            if proc.poll() is not None and len(seen) >= 1:
                break
    finally:
        proc.wait()
    assert proc.returncode == 0
    assert len(r) == 600 and r.meta["complete"] is True
    assert len(set(seen)) > 1  # the reader saw the database grow
    assert [s["i"] for s in r] == list(range(600))


def test_bad_paths_create_nothing(tmp_path):
    missing = tmp_path / "nope.lmdb"
    with pytest.raises(DatabaseNotFoundError, match="nope.lmdb: no such database"):
        lmdbkit.Reader(missing)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotADatabaseError, match="without data.mdb"):
        lmdbkit.Reader(empty)
    assert list(empty.iterdir()) == []
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(NotADatabaseError, match="is a file"):
        lmdbkit.Reader(f)
    foreign = tmp_path / "foreign.lmdb"
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    before = sorted(os.listdir(foreign))
    with pytest.raises(NotADatabaseError, match="not an lmdbkit database"):
        lmdbkit.Reader(foreign)
    assert sorted(os.listdir(foreign)) == before
    data = (foreign / "data.mdb").read_bytes()
    with pytest.raises(NotADatabaseError, match="LMDB environment with other data"):
        lmdbkit.Writer(foreign, mode="append")
    assert (foreign / "data.mdb").read_bytes() == data


def _write_legacy(path, n, payload=None):
    import torch
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(n):
            value = payload if payload is not None and i == 0 else {"x": torch.full((3,), float(i)), "label": i}
            txn.put(str(i).encode(), pickle.dumps(value))
        txn.put(b"__len__", str(n).encode())
    env.close()


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_legacy_needs_opt_in_and_pickle_never_runs_without_it(tmp_path):
    p, marker = tmp_path / "legacy.lmdb", tmp_path / "pwned"
    _write_legacy(p, 5, payload=Exploit(str(marker)))
    with pytest.raises(UnsafeFormatError, match="legacy pickle-in-LMDB.*allow_pickle=True"):
        lmdbkit.Reader(p)
    with pytest.raises(UnsafeFormatError):
        lmdbkit.LMDBDataset(p)
    before = (p / "data.mdb").read_bytes()
    with pytest.raises(UnsafeFormatError):
        lmdbkit.Writer(p, mode="append")
    assert (p / "data.mdb").read_bytes() == before  # refused before anything was written
    assert not marker.exists()
    r = lmdbkit.Reader(p, allow_pickle=True)
    assert len(r) == 5 and r[3]["label"] == 3 and not marker.exists()
    r[0]  # the opt-in really unpickles: the payload runs only now
    assert marker.exists()


def test_legacy_without_len_key(tmp_path):
    import torch
    p = tmp_path / "l2.lmdb"
    env = lmdb.open(str(p))
    with env.begin(write=True) as txn:
        for i in range(12):
            txn.put(str(i).encode(), pickle.dumps({"x": torch.tensor(i)}))
        txn.put(b"__keys__", pickle.dumps([str(i) for i in range(12)]))
    env.close()
    r = lmdbkit.Reader(p, allow_pickle=True)
    assert len(r) == 12 and [int(s["x"]) for s in r] == list(range(12))


def test_open_reads_meta_only(tmp_path):
    """Constructing a reader makes the same calls for 1k and 100k items: no scan (timings only printed)."""
    counts = {}
    for n in (1000, 100_000):
        p = tmp_path / f"n{n}.lmdb"
        with lmdbkit.Writer(p, commit_items=10_000) as w:
            for i in range(n):
                w.append({"i": i}, key=f"k{i}")
        calls = []

        def prof(frame, event, arg):
            if event in ("call", "c_call"):
                calls.append(event)
        lmdbkit.Reader(p).close()  # warm caches (imports, regexes) before counting
        sys.setprofile(prof)
        try:
            r = lmdbkit.Reader(p)
            length = len(r)
        finally:
            sys.setprofile(None)
        assert length == n
        counts[n] = len(calls)
        t0 = time.perf_counter()
        for _ in range(20):
            lmdbkit.Reader(p).close()
        print(f"open+len {n} items: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms")
        r.close()
        del r
    assert counts[1000] == counts[100_000]


def test_close_is_idempotent_and_del_quiet(small_db, capfd):
    import gc
    gc.collect()
    before = store.open_count()  # other tests' objects may still hold environments of their own paths
    r = lmdbkit.Reader(small_db)
    r[0]
    assert store.open_count() == before + 1
    r.close()
    r.close()
    r2 = lmdbkit.Reader(small_db)
    del r2
    gc.collect()
    assert capfd.readouterr().err == ""
    assert store.open_count() == before


def test_reader_pickles(small_db):
    r = lmdbkit.Reader(small_db)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2[10]["i"] == 10 and len(r2) == 100


@pytest.mark.parametrize("pack", [True, False])
def test_single_reads_share_one_transaction_per_thread_of_a_finished_database(tmp_path, monkeypatch, pack):
    path = tmp_path / "t.lmdb"
    samples = make_samples(200)
    with lmdbkit.Writer(path, pack=pack) as w:
        for s in samples:
            w.append(s)
    r = lmdbkit.Reader(path)
    assert r[3]["i"] == 3
    first = r._single()
    assert first is not None and r._single()[0] is first[0]  # kept for the reads that follow
    wrong, txns = [], []

    def work(seed):
        rng = np.random.default_rng(seed)
        for i in rng.integers(0, 200, 3000).tolist():
            got = r[i]
            if got["i"] != i or not np.array_equal(got["x"], samples[i]["x"]):
                wrong.append(i)
        txns.append(r._single()[0])
    import threading
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and len({id(t) for t in txns} | {id(first[0])}) == 5  # each thread its own
    monkeypatch.setattr(lmdbkit.reader, "KEEP_NS", 0)  # kept no longer than KEEP_NS
    assert r[4]["i"] == 4 and r._single()[0] is not first[0]
    kept = r._single()[0]
    r.close()
    with pytest.raises(lmdb.Error):  # ended by close, before the environment is released
        kept.get(b"0")
    assert r[5]["i"] == 5  # and the reader opens again when used


def test_single_reads_after_fork_use_the_childs_own_transaction(small_db):
    import multiprocessing
    r = lmdbkit.Reader(small_db)
    assert r[1]["i"] == 1 and r._single() is not None
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put([r[i]["i"] for i in (0, 7, 99)] + [r._single()[0] is not None]))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0 and got == [0, 7, 99, True]
    assert r[2]["i"] == 2  # the parent's own, untouched


def test_a_database_being_written_keeps_no_transaction(tmp_path):
    path = tmp_path / "growing.lmdb"
    with lmdbkit.Writer(path) as w:
        for s in make_samples(20):
            w.append(s)
        w.commit()
        r = lmdbkit.Reader(path)  # unfinished: read with locking, a transaction per read
        assert r[5]["i"] == 5 and r._single() is None
        r.close()


def test_same_path_shares_one_environment(small_db):
    before = store.open_count()
    a, b = lmdbkit.Reader(small_db), lmdbkit.Reader(small_db)
    assert a._handle() is b._handle() and store.open_count() == before + 1
    a.close()
    assert b[1]["i"] == 1
    b.close()
    assert store.open_count() == before


def test_one_environment_for_one_database_under_any_of_its_names(small_db, tmp_path):
    link = tmp_path / "link.lmdb"
    link.symlink_to(small_db)
    a, b = lmdbkit.Reader(small_db), lmdbkit.Reader(link)
    assert a._handle() is b._handle()
    a.close()
    b.close()


def test_a_database_made_again_by_another_process_is_read_anew_while_the_old_one_is_open(tmp_path):
    # the environment is shared by the database's files, not its path: a Reader still holding the old
    # database keeps it, and a Reader opened after another process re-made it reads the new one
    p = tmp_path / "db.lmdb"
    with lmdbkit.Writer(p) as w:
        for s in make_samples(3):
            w.append(s)
    old = lmdbkit.Reader(p)
    assert len(old) == 3
    # (the old reader holds no lock file: kept open here, its inode cannot pass to the new database's lock file,
    # which py-lmdb would take for the old environment's; see the next test)
    held = os.open(p / "lock.mdb", os.O_RDONLY)
    code = ("import sys, lmdbkit\n"
            "with lmdbkit.Writer(sys.argv[1], mode='overwrite') as w:\n"
            "    for i in range(5):\n"
            "        w.append({'i': 100 + i})\n")
    subprocess.run([sys.executable, "-c", code, str(p)], check=True)
    new = lmdbkit.Reader(p)
    assert len(new) == 5 and new[0]["i"] == 100
    assert len(old) == 3 and old[2]["i"] == 2
    assert not store.is_open(tmp_path / "elsewhere.lmdb")
    old.close()
    assert new[4]["i"] == 104 and store.is_open(p)
    new.close()
    assert not store.is_open(p)
    os.close(held)


def test_databases_whose_files_cannot_be_told_apart_still_get_environments_of_their_own(tmp_path, monkeypatch):
    # (a database whose data file is gone again between LMDB's open and its stat has no identity to key on)
    monkeypatch.setattr(store, "file_id", lambda path: None)
    with lmdbkit.Writer(tmp_path / "a.lmdb") as a, lmdbkit.Writer(tmp_path / "b.lmdb") as b:
        assert a._h is not b._h
        a.append({"i": 1})
        b.append({"i": 2})
    monkeypatch.undo()
    assert lmdbkit.Reader(tmp_path / "b.lmdb")[0]["i"] == 2


def test_files_open_outside_lmdbkit_are_named_as_such(small_db):
    env = lmdb.open(str(small_db), readonly=True, lock=False)
    with pytest.raises(lmdbkit.DatabaseBusyError, match="already open in this process outside lmdbkit.*close"):
        lmdbkit.Reader(small_db)
    env.close()
    assert len(lmdbkit.Reader(small_db)) > 0


@pytest.mark.parametrize("text", ["[1, 2]", "{\"complete\": tru", "", "\"complete\""])
def test_a_damaged_metadata_json_is_only_a_mirror(tmp_path, text):
    # the format record inside LMDB is what a reader goes by; metadata.json only spares it the lock
    p = tmp_path / "db.lmdb"
    with lmdbkit.Writer(p) as w:
        for s in make_samples(3):
            w.append(s)
    (p / "metadata.json").write_text(text)
    with lmdbkit.Reader(p) as r:
        assert len(r) == 3 and r[2]["i"] == 2


def test_writer_refused_while_reader_open_in_process(small_db):
    r = lmdbkit.Reader(small_db)
    with pytest.raises(lmdbkit.DatabaseBusyError, match="close"):
        lmdbkit.Writer(small_db, mode="overwrite")
    r.close()
    assert small_db.exists()


def test_reader_shares_writers_environment(tmp_path):
    p = tmp_path / "w.lmdb"
    with lmdbkit.Writer(p, commit_items=5) as w:
        for s in make_samples(12):
            w.append(s)
        r = lmdbkit.Reader(p)  # same process, database unfinished: shares the writer's environment
        assert len(r) == 10 and r[9]["i"] == 9
    assert len(r) == 12
    r.close()


def test_corrupt_item_names_database_and_key(small_db):
    from conftest import replace_stored
    replace_stored(small_db, 4, b"LK\x01\x00garbage")
    r = lmdbkit.Reader(small_db)
    with pytest.raises(CorruptItemError, match=r"small.lmdb: item 4: corrupt item: .*lmdbkit verify"):
        r[4]
    assert r[5]["i"] == 5  # one bad item does not poison the rest


def test_older_storage_class_calls_run_as_written(small_db):
    """Code ported from the older LMDB storage class and per-batch scripts, unchanged."""
    from lmdbkit import bench
    from lmdbkit.reader import MultiReader
    storage = lmdbkit.Reader(small_db)
    keys = storage.get_all_keys()
    assert keys == storage.keys() and len(keys) == len(storage)
    sample = storage.retrieve_sample(keys[5])
    assert np.array_equal(sample["x"], storage[5]["x"]) and sample["i"] == 5
    by_key, by_index = storage.retrieve_batch(keys[:3]), storage.retrieve_batch([0, 1, np.int64(2)])
    assert [s["i"] for s in by_key] == [s["i"] for s in by_index] == [0, 1, 2]
    assert storage.retrieve_batch(["missing", -1])[0] is None and storage.retrieve_batch([-1])[0]["i"] == 99
    with pytest.raises(IndexError):
        storage.retrieve_batch([100])
    with pytest.raises(LmdbkitError, match=r"keys \(str\) or item indices \(int\), got float 0.5"):
        storage.retrieve_batch([0.5])
    storage.close()
    perf = bench.benchmark_lmdb_performance(small_db, num_samples=50)
    assert perf["avg_random_access_time_ms"] == perf["random_ms_per_sample"] > 0
    assert perf["avg_sequential_access_time_ms"] > 0 and perf["samples_per_second_random"] > 0
    both = MultiReader([small_db, small_db])
    assert [s["i"] for s in both.retrieve_batch([150, keys[1]])] == [50, 1] and both.get_all_keys()[100] == keys[0]
    both.close()
    dataset = lmdbkit.LMDBDataset(small_db)
    dataset.close()


WRITE_FAULTS = """
import resource, sys, numpy as np, lmdbkit
item = {"x": np.ones(64 * 1024, np.float32)}  # 256 KiB: 64 pages
with lmdbkit.Writer(sys.argv[1], commit_items=50, durable=False) as w:
    for i in range(100):  # two commits: memory is now the heap's
        w.append(item)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(100):
        w.append(item)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's")
def test_writing_reuses_the_last_commits_memory_instead_of_faulting_new_pages(tmp_path):
    # each item is encoded into a new buffer and LMDB copies it into new pages, all freed at the commit; a writer
    # keeps that memory for the next commit (lmdbkit.heap): 100 items of 64 pages would fault ~12,800 pages fresh
    run = lambda env: int(subprocess.run([sys.executable, "-c", WRITE_FAULTS, str(tmp_path / env["N"])], env=env,
                                         capture_output=True, text=True, check=True).stdout)
    tuned = run(dict(os.environ, N="a.lmdb"))
    untuned = run(dict(os.environ, N="b.lmdb", LMDBKIT_KEEP_HEAP="0"))
    assert untuned > 100 * 64, untuned  # what this test guards against is real on this machine
    assert tuned < untuned / 4, (tuned, untuned)
