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
import xxhash
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
    head = codec._head(data)
    assert C.head(data) == head
    for verify in (False, True):  # gather takes what Python takes as the common case, and nothing else
        try:
            got = C.gather([valid, data], None, [(bytearray(64), 0, 32)], 32, lambda b, r: ({}, 0), verify)
        except ValueError as exc:  # its arrays would run past its payload
            assert exc.args == (1,) and head is not None and head[0] + 32 > len(data)
            continue
        intact = head is not None and (not verify or xxhash.xxh3_64_intdigest(data[16:]) == head[1])
        assert (got is not None) == intact


def _batch(bufs, verify=False):
    layout = lklayout.batch_layout(bufs)
    dest = {"x": np.zeros((len(bufs), 8), np.float32)}
    return lklayout.decode_layout(bufs, layout, dest, verify=verify), dest["x"]


@needs_c
@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("case", ["repeating", "unique", "nested", "keys of every width", "memo hits"])
def test_a_batch_decodes_in_c_as_in_python(case, verify, monkeypatch):
    if case == "nested":
        bufs = [codec.encode({"x": np.full(8, i, np.float32), "label": i % 2, "tags": [i]}, f"k{i}") for i in range(40)]
    elif case == "unique":
        bufs = items(40, label=lambda i: f"utt{i}")
    elif case == "keys of every width":
        bufs = items(40, key=lambda i: [None, "7", "k" * 31, "é" * 40, "x" * 300][i % 5])
    elif case == "memo hits":  # headers the decoder met before: none decoded again
        bufs = items(40, label=lambda i: i % 7)
        _batch(items(7, label=lambda i: i % 7))
    else:
        bufs = items(40)
    calls = []

    def spy(name):
        def call(*a):
            out = getattr(C, name)(*a)
            calls.append(f"{name} declined" if out is None and name == "gather" else name)
            return out
        return staticmethod(call)
    monkeypatch.setattr(lklayout, "_C", type("Spy", (), {"head": staticmethod(C.head), "gather": spy("gather")}))
    metas, x = _batch(bufs, verify)
    monkeypatch.setattr(lklayout, "_C", None)
    want, want_x = _batch(bufs, verify)
    assert metas == want and np.array_equal(x, want_x) and x[:, 0].tolist() == list(range(40))
    in_c = case not in ("unique", "nested")  # (headers that do not repeat, or nested ones: item by item)
    assert calls == (["gather"] if in_c else ["gather declined"])  # one pass, verified or not


@needs_c
def test_gather_copies_each_items_arrays_resolves_each_header_once_and_checks_every_bound():
    bufs = items(12, label=lambda i: i % 3)
    starts = [C.head(b)[0] for b in bufs]
    asked = []

    def resolve(b, rest):
        asked.append((b, rest))
        return {"label": b % 3}, 0

    def gather(bufs, copies, need, resolve):
        return C.gather(bufs, None, copies, need, resolve)
    dest = bytearray(12 * 32)
    metas = gather(bufs, [(dest, 0, 32)], 32, resolve)
    assert [b for b, _ in asked] == [0, 1, 2] and [r for _, r in asked] == [C.head(b)[3] for b in bufs[:3]]
    assert [m["label"] for m in metas] == [i % 3 for i in range(12)] and metas[0] is metas[3]
    assert bytes(dest) == b"".join(bytes(b[s:s + 32]) for b, s in zip(bufs, starts))
    assert gather(bufs, [(dest, 0, 32)], 32, lambda b, r: None) is None  # resolve declines: so does gather
    assert gather(bufs + [b"not an item"], [(bytearray(13 * 32), 0, 32)], 32, resolve) is None  # not common
    with pytest.raises(ValueError) as exc:  # item 1's arrays would run past its payload
        gather([bufs[0], bufs[1][:-1]], [(dest, 0, 32)], 32, resolve)
    assert exc.value.args == (1,)
    with pytest.raises(ValueError) as exc:  # a shift before the payload
        gather(bufs, [(dest, 0, 32)], 32, lambda b, r: ({}, -1))
    assert exc.value.args == (0,)
    for copies, need in (([(bytearray(7), 0, 4)], 4), ([(dest, 2, 4)], 4)):  # too small; a copy past need
        with pytest.raises(ValueError):
            gather(bufs, copies, need, resolve)
    with pytest.raises(BufferError):
        gather(bufs, [(bytes(12 * 32), 0, 32)], 32, resolve)  # a read-only destination
    with pytest.raises(ZeroDivisionError):
        gather(bufs, [(dest, 0, 32)], 32, lambda b, r: 1 / 0)
    with pytest.raises(TypeError):
        gather(bufs, [(dest, 0, 32)], 32, lambda b, r: "not (fields, shift)")
    many = items(300, label=lambda i: f"u{i}")  # more headers than it keeps apart: declined
    assert gather(many, [(bytearray(300 * 32), 0, 32)], 32, lambda b, r: ({}, 0)) is None


@needs_c
def test_gather_takes_items_from_their_runs_as_from_their_slices():
    found, indices = [(KEY, memoryview(RUN)), (KEY, RUN), (KEY, RUN)], [12, 10, 14]
    bufs = [runs.item(RUN, 14, i) for i in indices]
    copies = [bytearray(3 * 32), bytearray(3 * 32)]
    metas = [C.gather(found, indices, [(d, 0, 32)], 32, lambda b, r: ({"b": b}, 0)) for d, (found, indices) in
             zip(copies, [(found, indices), (bufs, None)])]
    assert metas[0] == metas[1] and copies[0] == copies[1]
    assert copies[0][:4] == np.float32(2).tobytes()  # item 12: the run's third
    for bad in ([(KEY, RUN)] * 2 + [(KEY, RUN[:-1])],  # a run cut short
                [(KEY, RUN)] * 2 + [((20).to_bytes(8, "big"), RUN)],  # a key whose run cannot hold item 14
                [(KEY, RUN)] * 2 + [(KEY[:7], RUN)],  # a key not of 8 bytes
                [(KEY, RUN)] * 2 + [None]):  # not found
        assert C.gather(bad, indices, [(bytearray(3 * 32), 0, 32)], 32, lambda b, r: ({}, 0)) is None
    flipped_table, flipped_item = bytearray(RUN), bytearray(RUN)
    flipped_table[8] ^= 1  # the checksum of the table of starts no longer matches it
    flipped_item[-1] ^= 1  # the last byte of item 14's payload
    for run in (bytes(flipped_table), bytes(flipped_item)):
        found = [(KEY, RUN), (KEY, RUN), (KEY, run)]
        for verify in (False, True):  # verified, declined (Python names it); unverified, taken as it is
            got = C.gather(found, indices, [(bytearray(3 * 32), 0, 32)], 32, lambda b, r: ({}, 0), verify)
            assert (got is None) == verify
    with pytest.raises(TypeError):
        C.gather(found, [12, 10, "14"], [(bytearray(3 * 32), 0, 32)], 32, lambda b, r: ({}, 0))
    with pytest.raises(ValueError):
        C.gather(found, [12, 10], [(bytearray(3 * 32), 0, 32)], 32, lambda b, r: ({}, 0))  # lengths differ


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


@needs_c
def test_an_unverified_batch_of_a_packed_database_is_taken_straight_from_its_runs(tmp_path, monkeypatch):
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path) as w:
        for i in range(200):
            w.append({"x": np.full(64, i, np.float32), "label": i % 4})
    taken = []
    monkeypatch.setattr(lklayout, "_C", type("Spy", (), {
        "head": staticmethod(C.head),
        "gather": staticmethod(lambda items, indices, *a: taken.append((items, indices)) or
                               C.gather(items, indices, *a))}))
    sliced = []
    monkeypatch.setattr(runs, "_C", type("Slices", (), {
        "item_in_run": staticmethod(C.item_in_run),
        "items_in_runs": staticmethod(lambda found, indices: sliced.extend(indices) or
                                      C.items_in_runs(found, indices))}))
    order = [int(i) for i in np.random.default_rng(1).permutation(200)[:64]]
    rows = lmdbkit.LMDBDataset(path, verify=False).__getitems__(order)
    assert [r["x"][0].item() for r in rows] == order and [r["label"] for r in rows] == [i % 4 for i in order]
    (items, indices), = taken  # the (key, run)s the lookups found, not slices of them
    assert indices == order and all(type(f) is tuple and len(f) == 2 for f in items)
    assert len(sliced) <= 5  # the layout's first item and the first of each of its 4 headers, no more


def _packed_with(tmp_path, damage: dict):
    """A packed database of 60 items (runs of 15, keyed 14, 29, 44, 59), ``damage[key](run)`` done to those runs."""
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path) as w:
        for i in range(60):
            w.append({"x": np.full(256, i, np.float32), "label": i % 3})
    import lmdb
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(b"items", txn=txn)
        for last, change in damage.items():
            run = bytearray(txn.get(last.to_bytes(8, "big"), db=db))
            change(run)
            txn.put(last.to_bytes(8, "big"), bytes(run), db=db)
    env.close()
    return path


@pytest.mark.parametrize("python", [False, True])
def test_an_unverified_batch_names_an_item_its_run_cannot_hold(tmp_path, python, monkeypatch):
    def past_its_run(run):
        run[16 + 4 * 4:16 + 4 * 5] = (len(run) + 8).to_bytes(4, "little")  # item 3 ends past its run
    path = _packed_with(tmp_path, {14: past_its_run})
    if python:
        for module in (runs, codec, lklayout, prefetch):
            monkeypatch.setattr(module, "_C", None)
    ds = lmdbkit.LMDBDataset(path, verify=False)
    with pytest.raises(CorruptItemError, match=r"db\.lmdb: item 3: .*item 3 spans bytes"):
        ds.__getitems__([40, 3, 41])
    assert [r["x"][0].item() for r in ds.__getitems__([40, 2, 41])] == [40, 2, 41]


@pytest.mark.parametrize("python", [False, True])
def test_a_verified_batch_still_names_a_damaged_table_or_item(tmp_path, python, monkeypatch):
    def moved_end(run):
        run[16 + 4 * 4:16 + 4 * 5] = run[16 + 4 * 6:16 + 4 * 7]  # item 3's end moved onto item 5's

    def flipped(run):
        run[-1] ^= 1  # the last byte of item 29's payload
    path = _packed_with(tmp_path, {14: moved_end, 29: flipped})
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


def _unpacks(monkeypatch) -> list:
    """msgpack.unpackb's calls from here on."""
    import msgpack
    calls, real = [], msgpack.unpackb
    monkeypatch.setattr(msgpack, "unpackb", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@needs_c
def test_a_batch_takes_headers_the_decoder_met_before_without_msgpack(monkeypatch):
    first, second = items(30), items(60)[30:]  # the same three headers but for the keys
    _batch(first)
    calls = _unpacks(monkeypatch)
    metas, x = _batch(second)
    assert len(calls) == 1  # the batch's layout, from its first item; the items themselves: none
    assert [m["label"] for m in metas] == [i % 3 for i in range(30, 60)]
    assert x[:, 0].tolist() == list(range(30, 60))
    metas[0]["label"] = 99  # a batch's fields are its own: the memo's stay as they were
    assert [m["label"] for m in _batch(second)[0]][:2] == [0, 1]


@needs_c
@pytest.mark.parametrize("verify", [False, True])
def test_a_batch_of_big_items_whose_pads_differ_takes_the_headers_met_before(verify, monkeypatch):
    def big(lo, hi):  # ~72 KiB items: their arrays' alignment pad follows the key's length
        return [codec.encode({"x": np.full(18_000, i, np.float32), "label": i % 3}, "k" * (1 + i % 7))
                for i in range(lo, hi)]

    def batch(bufs):
        dest = {"x": np.zeros((len(bufs), 18_000), np.float32)}
        return lklayout.decode_layout(bufs, lklayout.batch_layout(bufs), dest, verify=verify), dest["x"]
    first, second = big(0, 42), big(42, 84)  # the same 21 headers (3 labels x 7 pads) but for the keys
    assert len({C.head(b)[3] for b in first}) == 21 and {C.head(b)[0] % 64 for b in first} != {0}
    for _ in range(3):  # a batch learns the headers of up to a quarter of its items
        batch(first)
    calls = _unpacks(monkeypatch)
    metas, x = batch(second)
    assert len(calls) == 1  # the batch's layout, from its first item; the items themselves: none
    assert [m["label"] for m in metas] == [i % 3 for i in range(42, 84)]
    assert x[:, 0].tolist() == list(range(42, 84)) and x[:, -1].tolist() == list(range(42, 84))


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
