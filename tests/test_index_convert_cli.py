import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings, strategies as st

import lmdbkit
from lmdbkit import convert, index
from lmdbkit.errors import IndexNotFoundError, LmdbkitError, SchemaError, UnsafeFormatError
from lmdbkit.integrity import verify

# -- indexes and queries ----------------------------------------------------------------------------

VALUES = st.one_of(st.integers(-3, 3), st.sampled_from(["A", "B", "1", ""]), st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(VALUES, VALUES), min_size=1, max_size=60), VALUES, VALUES)
def test_queries_match_brute_force(tmp_path_factory, rows, q1, q2):
    p = tmp_path_factory.mktemp("q") / "q.lmdb"
    with lmdbkit.Writer(p, index_fields=("a",), commit_items=7) as w:
        for a, b in rows:
            w.append({"a": a, "b": b, "x": np.zeros(2)})
    index.build_index(p, "b", progress=False)  # built afterwards must equal written along
    r = lmdbkit.Reader(p)

    def same(u, v):  # the index tells 1, "1" and True apart
        return type(u) is type(v) and u == v
    assert r.query(a=q1) == [i for i, (a, _) in enumerate(rows) if same(a, q1)]
    assert r.query(b=q2) == [i for i, (_, b) in enumerate(rows) if same(b, q2)]
    assert r.query(a=q1, b=q2) == [i for i, (a, b) in enumerate(rows) if same(a, q1) and same(b, q2)]
    counts = {}
    for a, _ in rows:
        counts[(type(a), a)] = counts.get((type(a), a), 0) + 1
    assert {(type(k), k): v for k, v in r.value_counts("a")} == counts and len(r.value_counts("a")) == len(counts)
    r.close()


def test_index_helpers_and_errors(small_db):
    assert index.query_samples_by_label(small_db, 2) == list(range(2, 100, 3))
    with pytest.raises(IndexNotFoundError, match=r"no index on 'category'; indexed fields are \['label'\]. Build one"):
        index.query_samples_by_category(small_db, "A")
    assert index.build_index(small_db, "category", progress=False) == 100
    assert index.query_samples_by_category(small_db, "A") == list(range(0, 100, 2))
    with lmdbkit.Writer(small_db, mode="append") as w:  # later appends keep both indexes current
        w.append({"x": np.zeros(16, np.float32), "i": 100, "label": 2, "category": "A"})
    assert index.query_samples_by_category(small_db, "A")[-1] == 100 and index.query(small_db, label=2)[-1] == 100
    with pytest.raises(lmdbkit.SchemaError, match="indexes hold int, str or bool"):
        index.build_index(small_db, "x", progress=False)
    assert lmdbkit.Reader(small_db).meta["complete"] is True


# -- converters -------------------------------------------------------------------------------------

def _read_all(p):
    with lmdbkit.Reader(p, decode_to="numpy") as r:
        return r.keys(), list(r), r.metadata


def test_convert_pt_lists_and_batched_dicts(tmp_path):
    src = tmp_path / "pt"
    src.mkdir()
    torch.save([{"x": torch.full((3,), float(i)), "label": i % 2, "name": f"n{i}"} for i in range(5)], src / "batch_000.pt")
    torch.save({"x": torch.arange(12.).reshape(4, 3), "label": torch.tensor([0, 1, 0, 1]), "name": list("abcd")},
               src / "batch_001.pt")
    res = convert.convert("pt", src, tmp_path / "pt.lmdb", index_fields=("label",), progress=False)
    assert res["items"] == 9
    keys, items, md = _read_all(tmp_path / "pt.lmdb")
    assert keys[:2] == ["batch_000.pt#0", "batch_000.pt#1"] and keys[-1] == "batch_001.pt#3"
    assert np.array_equal(items[2]["x"], [2, 2, 2]) and items[6]["name"] == "b" and items[6]["label"] == 1
    assert np.array_equal(items[8]["x"], [9, 10, 11]) and md["converted_from"]["files"] == 2
    assert lmdbkit.Reader(tmp_path / "pt.lmdb").query(label=1) == [1, 3, 6, 8]


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_convert_zarr(tmp_path, zarr_format):
    g = zarr.open_group(str(tmp_path / "z.zarr"), mode="w", zarr_format=zarr_format)
    g.attrs["sample_rate"] = 16000
    spec = g.create_array("spec", shape=(10, 4, 5), chunks=(3, 4, 5), dtype="float32")
    spec[:] = np.arange(200, dtype=np.float32).reshape(10, 4, 5)
    lab = g.create_array("label", shape=(10,), chunks=(4,), dtype="int64")
    lab[:] = np.arange(10) % 3
    res = convert.from_zarr(tmp_path / "z.zarr", tmp_path / "z.lmdb", chunk=4, progress=False, index_fields=("label",))
    keys, items, md = _read_all(tmp_path / "z.lmdb")
    assert res["items"] == 10 and keys == [str(i) for i in range(10)]
    assert np.array_equal(items[7]["spec"], np.arange(200, dtype=np.float32).reshape(10, 4, 5)[7])
    assert items[7]["label"] == 1 and type(items[7]["label"]) is int
    assert md["attributes"] == {"sample_rate": 16000} and md["converted_from"]["format"] == f"zarr v{zarr_format}"


def test_convert_hdf5_nested_strings_attributes_bounded_memory(tmp_path):
    import tracemalloc
    n = 6000
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.attrs["corpus"] = "demo"
        f.create_dataset("features", data=np.random.default_rng(0).standard_normal((n, 1000)).astype(np.float32))
        f.create_dataset("meta/label", data=np.arange(n) % 4)
        f.create_dataset("meta/name", data=[f"utt{i}".encode() for i in range(n)])
        f["features"].attrs["unit"] = "dB"
    tracemalloc.start()
    res = convert.from_hdf5(tmp_path / "f.h5", tmp_path / "h.lmdb", chunk=256, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert res["items"] == n
    # streamed: chunks plus the writer's commit buffer (1000 items), far below the 24 MB of features whole
    assert peak < n * 1000 * 4 / 2
    with lmdbkit.Reader(tmp_path / "h.lmdb") as r:
        s = r[1234]
        assert s["meta/label"] == 1234 % 4 and s["meta/name"] == "utt1234" and s["features"].shape == (1000,)
        assert r.metadata["attributes"] == {"corpus": "demo"} and r.metadata["array_attributes"]["features"] == {"unit": "dB"}
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("a", data=np.zeros(3))
        f.create_dataset("b", data=np.zeros(4))
    with pytest.raises(LmdbkitError, match="must share their first dimension"):
        convert.from_hdf5(tmp_path / "bad.h5", tmp_path / "bad.lmdb", progress=False)


def test_convert_numpy_npy_folder_and_npz(tmp_path):
    d = tmp_path / "npy"
    d.mkdir()
    for i in range(5):
        np.save(d / f"s{i}.npy", np.full((2, i + 1), i, np.int16))
    convert.from_numpy(d, tmp_path / "n.lmdb", field="feat", progress=False, chunk=2)
    keys, items, _ = _read_all(tmp_path / "n.lmdb")
    assert keys == [f"s{i}" for i in range(5)] and items[3]["feat"].shape == (2, 4) and items[3]["feat"].dtype == np.int16
    np.savez(tmp_path / "a.npz", x=np.arange(12).reshape(6, 2), y=np.arange(6) * 0.5)
    convert.convert("numpy", tmp_path / "a.npz", tmp_path / "z.lmdb", progress=False)
    keys, items, _ = _read_all(tmp_path / "z.lmdb")
    assert len(items) == 6 and np.array_equal(items[5]["x"], [10, 11]) and items[5]["y"] == 2.5


def test_convert_legacy_needs_opt_in(tmp_path):
    import pickle
    import lmdb
    env = lmdb.open(str(tmp_path / "old.lmdb"))
    with env.begin(write=True) as txn:
        for i in range(7):
            txn.put(str(i).encode(), pickle.dumps({"x": torch.tensor([i, i]), "label": i % 2}))
    env.close()
    with pytest.raises(UnsafeFormatError, match="--allow-pickle"):
        convert.convert("legacy", tmp_path / "old.lmdb", tmp_path / "new.lmdb", progress=False)
    res = convert.convert("legacy", tmp_path / "old.lmdb", tmp_path / "new.lmdb", allow_pickle=True,
                          index_fields=("label",), progress=False)
    assert res["items"] == 7
    r = lmdbkit.Reader(tmp_path / "new.lmdb")  # format 1 now: no opt-in needed
    assert torch.equal(r[5]["x"], torch.tensor([5, 5])) and r.query(label=0) == [0, 2, 4, 6] and r.keys()[3] == "3"


def test_interrupted_conversion_resumes(tmp_path, monkeypatch):
    np.savez(tmp_path / "a.npz", x=np.arange(100))
    real = convert._chunked

    def dies_after_two(columns, n, chunk):
        for k, c in enumerate(real(columns, n, chunk)):
            if k == 2:
                raise KeyboardInterrupt
            yield c
    monkeypatch.setattr(convert, "_chunked", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert.from_numpy(tmp_path / "a.npz", tmp_path / "a.lmdb", chunk=10, progress=False)
    assert len(lmdbkit.Reader(tmp_path / "a.lmdb")) == 20
    monkeypatch.setattr(convert, "_chunked", real)
    res = convert.from_numpy(tmp_path / "a.npz", tmp_path / "a.lmdb", chunk=10, progress=False)
    assert res == {"destination": str(tmp_path / "a.lmdb"), "items": 100, "chunks_resumed": 2, "arrays_found": 1,
                   "arrays_converted": 1}
    assert [s["x"] for s in lmdbkit.Reader(tmp_path / "a.lmdb")] == list(range(100))


def test_unknown_format_lists_choices(tmp_path):
    with pytest.raises(LmdbkitError, match=r"format 'csv' is unsupported. Supported formats are \['hdf5', "):
        convert.convert("csv", tmp_path, tmp_path / "x.lmdb")


# -- verify -----------------------------------------------------------------------------------------

def test_verify_names_the_damaged_item(tmp_path):
    p = tmp_path / "v.lmdb"
    with lmdbkit.Writer(p, index_fields=("label",)) as w:
        for i in range(50):
            w.append({"x": np.full(256, i, np.float32), "label": i % 4}, key=f"item-{i}")
    assert verify(p, progress=False).ok
    data = bytearray((p / "data.mdb").read_bytes())
    pos = data.find(np.full(256, 37, np.float32).tobytes())
    assert pos > 0
    data[pos + 100] ^= 0xFF  # flip bits inside item 37's payload
    (p / "data.mdb").write_bytes(bytes(data))
    rep = verify(p, progress=False)
    assert not rep.ok and [(q["index"], q["key"]) for q in rep.problems] == [(37, "item-37")]
    assert rep.problems[0]["problem"] == "checksum mismatch" and "item-37" in str(rep)
    cli = subprocess.run([sys.executable, "-m", "lmdbkit", "verify", str(p)], capture_output=True, text=True)
    assert cli.returncode == 1 and "item-37" in cli.stdout and "checksum mismatch" in cli.stdout


def test_verify_finds_index_and_count_damage(tmp_path):
    import lmdb
    from lmdbkit import store
    p = tmp_path / "v.lmdb"
    with lmdbkit.Writer(p, index_fields=("label",)) as w:
        for i in range(10):
            w.append({"label": i % 2}, key=f"k{i}")
    env = lmdb.open(str(p), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.delete(b"1", store.pack_index(3), db=env.open_db(b"index:label", txn=txn, dupsort=True, dupfixed=True))
        txn.delete(b"k5", db=env.open_db(b"keys", txn=txn))
    env.close()
    rep = verify(p, progress=False)
    texts = [q["problem"] for q in rep.problems]
    assert any("index on 'label' misses this item under 1" in t for t in texts)
    assert any(re.match(r"the keys table holds 9 keys .*for 10 items", t) for t in texts)


# -- command line -----------------------------------------------------------------------------------

def _lmdbkit(*args):
    return subprocess.run([sys.executable, "-m", "lmdbkit", *map(str, args)], capture_output=True, text=True)


def test_cli_info_query_compact_index(small_db, tmp_path):
    out = _lmdbkit("info", small_db, "--json")
    assert out.returncode == 0
    info = json.loads(out.stdout)
    assert info["items"] == 100 and info["complete"] and info["index_fields"] == ["label"] and info["index_values"] == {"label": 3}
    assert "100 items" in _lmdbkit("info", small_db).stdout
    q = json.loads(_lmdbkit("query", small_db, "label=1", "--json", "--limit", "0").stdout)
    assert q["count"] == 33 and q["items"][1] == {"index": 4, "key": "k4"}
    assert _lmdbkit("index", small_db, "category").returncode == 0
    assert json.loads(_lmdbkit("query", small_db, "category=A", "label=1", "--json").stdout)["count"] == 16
    res = _lmdbkit("compact", small_db, tmp_path / "c.lmdb")
    assert res.returncode == 0, res.stderr
    a, b = lmdbkit.Reader(small_db), lmdbkit.Reader(tmp_path / "c.lmdb")
    assert a.keys() == b.keys() and all(np.array_equal(x["x"], y["x"]) for x, y in zip(a, b))
    assert b.query(category="B") == a.query(category="B")


@pytest.mark.parametrize("args,message", [
    (("info", "/no/such.lmdb"), "no such database"),
    (("query", "DB", "label"), "write field=value"),
    (("query", "DB", "nope=1"), "no index on 'nope'"),
    (("convert", "hdf5", "/no/file.h5", "OUT"), "no such file or folder to convert"),
    (("compact", "DB", "DB"), "is not empty"),
])
def test_cli_bad_arguments_give_one_line_and_nonzero(small_db, tmp_path, args, message):
    args = [str(small_db) if a == "DB" else str(tmp_path / "o.lmdb") if a == "OUT" else a for a in args]
    res = _lmdbkit(*args)
    assert res.returncode == 2 and message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_help_and_bench_passthrough():
    h = _lmdbkit("--help")
    assert h.returncode == 0 and all(c in h.stdout for c in ("info", "verify", "convert", "compact", "query", "bench"))
    assert "examples:" in h.stdout
    b = _lmdbkit("bench", "--help")
    assert b.returncode == 0 and "--full" in b.stdout
    assert _lmdbkit("frobnicate").returncode == 2


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_convert_zarr_keeps_arrays_of_sub_groups(tmp_path, zarr_format):
    """A Zarr store laid out as the older writer made it: arrays in sub-groups, none of them dropped."""
    g = zarr.open_group(str(tmp_path / "z.zarr"), mode="w", zarr_format=zarr_format)
    g.create_array("csi", shape=(6, 4), dtype="float32")[:] = np.arange(24, dtype=np.float32).reshape(6, 4)
    g.create_group("labels").create_array("position", shape=(6, 2), dtype="float32")[:] = np.full((6, 2), 7.0)
    g.create_group("features").create_group("deep").create_array("id", shape=(6,), dtype="int64")[:] = np.arange(6)
    res = convert.from_zarr(tmp_path / "z.zarr", tmp_path / "z.lmdb", chunk=4, progress=False)
    assert res["items"] == 6 and res["arrays_found"] == res["arrays_converted"] == 3
    keys, items, md = _read_all(tmp_path / "z.lmdb")
    assert set(items[5]) == {"csi", "labels/position", "features/deep/id"}
    assert np.array_equal(items[5]["labels/position"], [7.0, 7.0]) and items[5]["features/deep/id"] == 5
    assert np.array_equal(items[5]["csi"], np.arange(20, 24, dtype=np.float32))


# -- nested fields, as the older storage class's samples hold them ------------------------------------

def video_sample(i: int, label=None) -> dict:
    return {"data": np.full((2, 3), i, np.float32), "label": i % 2 if label is None else label,
            "metadata": {"category": "AB"[i % 2], "method": ["faceswap", "deepfake", "real"][i % 3],
                         "source": f"id{i:03d}", "frames": {"first": i}}}


def test_nested_fields_indexed_and_queried_where_they_live(tmp_path):
    path = tmp_path / "video.lmdb"
    with lmdbkit.Writer(path, index_fields=("label", "metadata.category", "metadata.method")) as w:
        for i in range(12):
            w.append(video_sample(i), key=f"v{i}")
    with lmdbkit.Reader(path) as r:
        assert r.index_fields == ["label", "metadata.category", "metadata.method"]
        a = [i for i in range(12) if i % 2 == 0]
        assert r.query(**{"metadata.category": "A"}) == a == r.query(metadata__category="A") == r.query(category="A")
        assert r.query(**{"metadata.category": "B", "metadata.method": "real"}) == [5, 11]
        assert dict(r.value_counts("method")) == {"faceswap": 4, "deepfake": 4, "real": 4}
    assert index.query_samples_by_category(path, "A") == a  # no top-level category: the nested one
    assert index.build_index(path, "metadata.source", progress=False) == 12
    assert index.build_index(path, "first", progress=False) == 12  # -> metadata.frames.first
    with lmdbkit.Reader(path) as r:
        assert r.query(source="id007") == [7] and r.query(**{"metadata.frames.first": 3}) == [3]
    p = _lmdbkit("query", path, "metadata.category=A", "--json")
    assert p.returncode == 0 and [x["index"] for x in json.loads(p.stdout)["items"]] == a
    ds = lmdbkit.LMDBDataset(path)
    assert [int(s["metadata"]["frames"]["first"]) for s in ds.subset(**{"metadata.method": "deepfake"})] == [1, 4, 7, 10]
    ds.close()
    assert verify(path).ok


def test_older_config_names_resolve_to_the_nested_field(tmp_path):
    path = tmp_path / "old.lmdb"
    with lmdbkit.Writer(path, index_fields=["label", "category", "method"]) as w:  # the older config, as written
        for i in range(6):
            w.append(video_sample(i), key=f"v{i}")
    with lmdbkit.Reader(path) as r:  # recorded by their full paths
        assert r.index_fields == ["label", "metadata.category", "metadata.method"] and r.query(category="B") == [1, 3, 5]
    with lmdbkit.Writer(path, mode="append", index_fields=["label", "category", "method"]) as w:  # a rerun
        w.append(video_sample(6), key="v6")
    with lmdbkit.Reader(path) as r:
        assert r.query(method="faceswap") == [0, 3, 6]
    both = dict(video_sample(0), extra={"category": "x"})
    with pytest.raises(SchemaError, match=r"'category' is ambiguous.*'metadata.category', 'extra.category'"):
        lmdbkit.Writer(tmp_path / "amb.lmdb", index_fields=["category"]).append(both)
    with pytest.raises(SchemaError, match=r"'colour' is not a field of the samples.*nested \['metadata.category'"):
        lmdbkit.Writer(tmp_path / "none.lmdb", index_fields=["colour"]).append(video_sample(0))


def test_labels_sliced_from_batches_are_indexed_as_their_values(tmp_path):
    import torch
    labels, flags = torch.tensor([0, 1, 2, 1]), np.array([True, False, True, True])
    path = tmp_path / "sliced.lmdb"
    with lmdbkit.Writer(path, index_fields=("label", "flag", "metadata.category")) as w:
        for i in range(4):  # labels[i]: a 0-d tensor; flags[i]: a numpy bool
            w.append(dict(video_sample(i, label=labels[i]), flag=flags[i]), key=f"v{i}")
    with lmdbkit.Reader(path) as r:
        assert r.query(label=1) == [1, 3] and r.query(flag=True) == [0, 2, 3]
    path2 = tmp_path / "later.lmdb"  # indexed afterwards (lmdbkit index): the 0-d tensor is read back whole
    with lmdbkit.Writer(path2) as w:
        for i in range(4):
            w.append(video_sample(i, label=labels[i]), key=f"v{i}")
    p = _lmdbkit("index", path2, "label")
    assert p.returncode == 0, p.stderr
    assert index.query(path2, label=2) == [2]
    p = _lmdbkit("index", path2, "nosuch")
    assert p.returncode != 0 and "NoneType" not in p.stderr and "'nosuch' is not a field" in p.stderr


def test_pt_batches_with_labels_sliced_from_a_batch_tensor_convert_indexed(tmp_path):
    """The per-batch workflow saved lists of samples whose label is labels[i], a 0-d tensor."""
    src = tmp_path / "pt"
    src.mkdir()
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    for b in range(2):
        torch.save([{"stft": torch.randn(4, 5), "label": labels[3 * b + i],
                     "metadata": {"category": "AB"[i % 2]}} for i in range(3)], src / f"batch_{b}.pt")
    convert.from_pt_dir(src, tmp_path / "pt.lmdb", index_fields=("label", "category"), progress=False)
    with lmdbkit.Reader(tmp_path / "pt.lmdb") as r:
        assert r.index_fields == ["label", "metadata.category"]
        assert r.query(label=1) == [1, 3] and r.query(category="B") == [1, 4]


def test_query_and_index_take_a_split_folder_and_a_miss_lists_the_values(demo_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    res = _lmdbkit("query", data, "label_name=doggo")
    assert res.returncode == 0 and "0 items match" in res.stdout
    assert "values of label_name: 'chirp_down', 'chirp_up'" in res.stdout  # what would have matched
    res = _lmdbkit("query", data, "label=2", "--limit", "0")
    with _multi(data) as m:
        assert res.stdout.count("\n") - 1 == len(m.query(label=2)) and "train.lmdb)" in res.stdout
    res = _lmdbkit("index", data, "segment")
    assert res.returncode == 0 and res.stdout.count("indexed 'segment'") == 3
    assert _lmdbkit("query", data / "*.lmdb", "segment=0").returncode == 0
    assert _lmdbkit("verify", data).returncode == 0


def _multi(path):
    from lmdbkit.reader import MultiReader
    return MultiReader(path)


@pytest.mark.parametrize("command", ["precompute", "train"])
def test_precompute_and_train_commands_document_every_option(command):
    import importlib
    ap = importlib.import_module(f"lmdbkit.{command}").build_parser()
    for action in ap._actions:
        assert action.help, f"lmdbkit {command}: {action.option_strings} has no help"
    res = _lmdbkit(command, "--help")
    assert res.returncode == 0 and res.stdout.startswith(f"usage: lmdbkit {command}")
    if command == "precompute":
        assert "--index-fields" in res.stdout and "(default: 512)" in res.stdout
