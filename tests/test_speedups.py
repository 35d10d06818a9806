"""The compiled part of the read path (lmdbkit._speedups, see lmdbkit.speedups): built here, the same results
as the pure-Python steps it stands for, and only ever the common case: whatever it declines, Python takes and
names. Random and mutated runs and items must never crash it or make it disagree with Python."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lmdbkit
from lmdbkit import codec, prefetch, runs, speedups
from lmdbkit import layout as lklayout
from lmdbkit.errors import CorruptItemError

C = speedups.C
needs_c = pytest.mark.skipif(C is None, reason="lmdbkit._speedups is not built here")


@pytest.fixture
def pure(monkeypatch):
    """The pure-Python read path in this process (as with LMDBKIT_PURE_PYTHON=1)."""
    monkeypatch.setattr(runs, "_C", None)
    monkeypatch.setattr(codec, "_C", None)
    monkeypatch.setattr(lklayout, "_C", None)
    monkeypatch.setattr(prefetch, "_C", None)


def items(n, label=lambda i: i % 3, key=lambda i: f"k{i}"):
    return [codec.encode({"x": np.full(8, i, np.float32), "label": label(i)}, key(i)) for i in range(n)]


RUN = runs.pack(items(5))  # items 10..14 of a database: the run's key is 14
KEY = (14).to_bytes(8, "big")


@pytest.mark.skipif(shutil.which("cc") is None or not os.path.exists(os.path.join(sysconfig.get_paths()["include"],
                                                                                  "Python.h"))
                    or os.environ.get("LMDBKIT_PURE_PYTHON", "") not in ("", "0"),
                    reason="no C compiler or no Python headers here, or LMDBKIT_PURE_PYTHON set")
def test_the_extension_is_built_where_a_compiler_is():
    assert C is not None, "make setup (pip install -e .) should have built lmdbkit/_speedups.c"


def test_lmdbkit_reads_the_same_in_pure_python(small_db):
    script = textwrap.dedent(f"""
        import lmdbkit, lmdbkit.speedups as s
        assert s.C is None
        with lmdbkit.Reader({str(small_db)!r}) as r:
            assert r[7]["i"] == 7 and [x["i"] for x in r.read_many([3, 99, 0])] == [3, 99, 0]
        batch = lmdbkit.LMDBDataset({str(small_db)!r}, prebatch=True).__getitems__(list(range(0, 100, 7)))
        assert batch["i"].tolist() == list(range(0, 100, 7))
        """)
    env = {"LMDBKIT_PURE_PYTHON": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)


@needs_c
def test_an_item_in_its_run_is_the_same_slice_as_pythons():
    for i in range(10, 15):
        got = C.item_in_run((KEY, memoryview(RUN)), i)
        assert type(got) is memoryview and bytes(got) == bytes(runs.item(RUN, 14, i))
    assert [bytes(x) for x in C.items_in_runs([(KEY, RUN), None], [12, 3])[:1]] == [bytes(runs.item(RUN, 14, 12))]
    assert C.items_in_runs([None], [3]) == [None]
    for i in (9, 15, -1, -(1 << 63)):  # not in this run: declined, and runs.item says why
        with pytest.raises(ValueError):
            C.item_in_run((KEY, RUN), i)
        with pytest.raises(CorruptItemError, match="is not among its 5 items"):
            runs.in_found((KEY, RUN), i)
    for bad in ((b"\x00" * 7, RUN), (KEY,), "not a tuple", (None, RUN), (KEY, None)):
        with pytest.raises(ValueError):
            C.item_in_run(bad, 12)


@needs_c
@settings(max_examples=2000, deadline=None)
@example([(4, 255)], 10**6)  # n past the table
@example([(16, 250)], 10**6)  # item 0 starting before the table's end
@given(st.lists(st.tuples(st.integers(0, 10**5), st.integers(0, 255)), max_size=4), st.integers(0, 10**6))
def test_a_damaged_run_is_declined_or_read_as_python_reads_it(flips, cut):
    data = bytearray(RUN)
    for pos, val in flips:
        data[pos % len(data)] = val
    data = bytes(data[:cut % (len(data) + 1)])
    for i in range(9, 16):
        try:
            got = bytes(C.item_in_run((KEY, data), i))
        except ValueError:
            got = None
        try:
            want = bytes(runs.item(data, 14, i))
        except CorruptItemError:
            want = None
        assert got is None or got == want  # the C part never reads what Python would refuse


@needs_c
@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(items(3, key=lambda i: [None, "7", "k" * 31, "é" * 40, "x" * 300][i % 5]) +
                       items(2, key=lambda i: "x" * 300)),
       st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 255)), max_size=4), st.integers(0, 10**6))
def test_an_items_head_is_pythons_for_any_bytes(valid, flips, cut):
    data = bytearray(valid)
    for pos, val in flips:
        data[pos % len(data)] = val
    data = bytes(data[:cut % (len(data) + 1)])
    assert C.head(data) == codec._head(data)
    want = [codec._head(data), codec._head(valid)]
    assert C.heads([data, valid]) == ([-1 if h is None else h[0] for h in want],
                                      [None if h is None else h[3] for h in want],
                                      [None if h is None else h[1] for h in want])


@needs_c
def test_copy_rows_copies_each_items_arrays_and_checks_every_bound():
    bufs = [bytes(range(40)), bytes(range(100, 140))]
    dest = bytearray(8)
    C.copy_rows(bufs, [4, 10], [(dest, 2, 4)], 6)
    assert bytes(dest) == bytes([6, 7, 8, 9, 112, 113, 114, 115])
    C.copy_rows(bufs, [None, 0], [(dest, 0, 4)], 4)  # None: skipped
    assert bytes(dest) == bytes([6, 7, 8, 9, 100, 101, 102, 103])
    with pytest.raises(ValueError) as exc:
        C.copy_rows(bufs, [0, 35], [(dest, 0, 4)], 6)  # item 1's arrays would run past its 40 bytes
    assert exc.value.args == (1,)
    for ats, copies, need in (([-1, 0], [(dest, 0, 4)], 4),  # before the buffer
                              ([0, 0], [(bytearray(7), 0, 4)], 4),  # a destination too small
                              ([0, 0], [(dest, 2, 4)], 4)):  # a copy past need
        with pytest.raises(ValueError):
            C.copy_rows(bufs, ats, copies, need)
    with pytest.raises(BufferError):
        C.copy_rows(bufs, [0, 0], [(bytes(8), 0, 4)], 4)  # read-only destination


def _batch(bufs):
    layout = lklayout.batch_layout(bufs)
    dest = {"x": np.zeros((len(bufs), 8), np.float32)}
    return lklayout.decode_layout(bufs, layout, dest, verify=False), dest["x"]


@needs_c
@pytest.mark.parametrize("case", ["repeating", "unique", "nested", "keys of every width"])
def test_a_batch_decodes_in_c_as_in_python(case, monkeypatch):
    if case == "nested":
        bufs = [codec.encode({"x": np.full(8, i, np.float32), "label": i % 2, "tags": [i]}, f"k{i}") for i in range(40)]
    elif case == "unique":
        bufs = items(40, label=lambda i: f"utt{i}")
    elif case == "keys of every width":
        bufs = items(40, key=lambda i: [None, "7", "k" * 31, "é" * 40, "x" * 300][i % 5])
    else:
        bufs = items(40)
    calls = []
    monkeypatch.setattr(lklayout, "_C", type("Spy", (), {
        "head": staticmethod(C.head),
        "heads": staticmethod(lambda b: calls.append("heads") or C.heads(b)),
        "copy_rows": staticmethod(lambda *a: calls.append("copy_rows") or C.copy_rows(*a))}))
    metas, x = _batch(bufs)
    monkeypatch.setattr(lklayout, "_C", None)
    want, want_x = _batch(bufs)
    assert metas == want and np.array_equal(x, want_x) and x[:, 0].tolist() == list(range(40))
    assert calls == (["heads", "copy_rows"] if case in ("repeating", "keys of every width") else ["heads"])


@needs_c
def test_a_batch_item_short_of_its_arrays_is_named_as_in_python(pure):
    bufs = items(20)
    bufs[13] = bufs[13][:-4]
    with pytest.raises(CorruptItemError, match="arrays run past the 28-byte payload") as in_python:
        _batch(bufs)
    lklayout._C = C
    with pytest.raises(CorruptItemError) as in_c:
        _batch(bufs)
    assert str(in_c.value) == str(in_python.value)


@needs_c
def test_a_batch_whose_layout_differs_is_left_to_item_by_item():
    bufs = items(20) + [codec.encode({"x": np.zeros(9, np.float32), "label": 0}, "other")]
    layout = lklayout.batch_layout(bufs)
    assert lklayout.decode_layout(bufs, layout, {"x": np.zeros((21, 8), np.float32)}, verify=False) is None


def test_a_packed_database_reads_the_same_either_way(tmp_path, pure):
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path) as w:
        for i in range(300):
            w.append({"x": np.full(64, i, np.float32), "label": i % 4})
    order = list(np.random.default_rng(0).permutation(300))
    ds = lmdbkit.LMDBDataset(path, prebatch=True)
    want = [ds.source[i]["x"][0] for i in order], ds.__getitems__(order)
    codec._C = runs._C = lklayout._C = prefetch._C = C
    got = [ds.source[i]["x"][0] for i in order], ds.__getitems__(order)
    assert want[0] == got[0] == [float(i) for i in order]
    assert all(np.array_equal(want[1][k], got[1][k]) for k in ("x", "label"))


@pytest.mark.parametrize("python", [False, True])
def test_a_verified_batch_still_names_a_damaged_table_or_item(tmp_path, python, monkeypatch):
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path) as w:
        for i in range(60):
            w.append({"x": np.full(256, i, np.float32), "label": i % 3})
    import lmdb
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(b"items", txn=txn)
        run = bytearray(txn.get((14).to_bytes(8, "big"), db=db))
        run[16 + 4 * 4:16 + 4 * 5] = run[16 + 4 * 6:16 + 4 * 7]  # item 3's end moved onto item 5's
        txn.put((14).to_bytes(8, "big"), bytes(run), db=db)
        run = bytearray(txn.get((29).to_bytes(8, "big"), db=db))
        run[-1] ^= 1  # the last byte of item 29's payload
        txn.put((29).to_bytes(8, "big"), bytes(run), db=db)
    env.close()
    if python:
        monkeypatch.setattr(runs, "_C", None)
        monkeypatch.setattr(codec, "_C", None)
        monkeypatch.setattr(lklayout, "_C", None)
    ds = lmdbkit.LMDBDataset(path)  # verify=True
    with pytest.raises(CorruptItemError, match=r"db\.lmdb: item 3: .*checksum mismatch in its table of item starts"):
        ds.__getitems__([40, 3, 41])
    with pytest.raises(CorruptItemError, match=r"db\.lmdb: item 29: .*checksum mismatch"):
        ds.__getitems__(list(range(15, 45)))
    assert ds.__getitems__(list(range(30, 60)))[0]["x"][0] == 30
    assert lmdbkit.LMDBDataset(path, verify=False).__getitems__([29])[0]["x"][-1] != 29  # unverified: read as it is


@needs_c
def test_a_batch_takes_headers_the_decoder_met_before_without_msgpack(monkeypatch):
    import msgpack
    first, second = items(30), items(60)[30:]  # the same three headers but for the keys
    _batch(first)
    calls = []
    real = msgpack.unpackb
    monkeypatch.setattr(msgpack, "unpackb", lambda *a, **k: calls.append(1) or real(*a, **k))
    metas, x = _batch(second)
    assert len(calls) == 1  # the batch's layout, from its first item; the items themselves: none
    assert [m["label"] for m in metas] == [i % 3 for i in range(30, 60)]
    assert x[:, 0].tolist() == list(range(30, 60))
    metas[0]["label"] = 99  # a batch's fields are its own: the memo's stay as they were
    assert [m["label"] for m in _batch(second)[0]][:2] == [0, 1]


@pytest.mark.parametrize("lookups", ["C", "python"])
def test_timed_lookups_stop_after_the_first_slow_one_and_pass_errors_on(lookups):
    import time
    if lookups == "C" and C is None:
        pytest.skip("lmdbkit._speedups is not built here")
    timed_lookups = C.timed_lookups if lookups == "C" else prefetch.timed_lookups
    seen = []

    def find(key):
        seen.append(key)
        if key == b"slow":
            time.sleep(0.002)
        return key != b"absent"

    def take():
        return ("item", seen[-1])
    keys = [b"a", b"absent", b"slow", b"b"]
    values, slow, waited = timed_lookups(find, take, keys, 1_000_000)  # 1 ms
    assert values == [("item", b"a"), None, ("item", b"slow")] and slow == 2 and waited >= 2_000_000
    assert timed_lookups(find, take, [b"a", b"b"], 1_000_000) == ([("item", b"a"), ("item", b"b")], -1, 0)
    assert timed_lookups(find, take, [], 1) == ([], -1, 0)

    def broken(key):
        raise RuntimeError("lookup failed")
    with pytest.raises(RuntimeError, match="lookup failed"):
        timed_lookups(broken, take, [b"a"], 1_000_000)
