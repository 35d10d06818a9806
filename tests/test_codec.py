import itertools
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from lmdbkit import codec, headers
from lmdbkit import layout as lklayout
from lmdbkit.errors import CorruptItemError, EncodeError, LmdbkitError

NUMPY_DTYPES = ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                "float16", "float32", "float64", "complex64", "complex128"]
TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.uint16, torch.int16, torch.uint32, torch.int32,
                torch.uint64, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
                torch.complex64, torch.complex128]
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3, 4), (1, 1, 1, 5)]


def _values(shape, dtype_name, seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if dtype_name == "bool":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if dtype_name.startswith("complex"):
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dtype_name).reshape(shape)
    if dtype_name.startswith(("int", "uint")):
        info = np.iinfo(dtype_name)
        return rng.integers(info.min, info.max, n, dtype=dtype_name, endpoint=True).reshape(shape)
    return (rng.standard_normal(n) * 1000).astype(dtype_name).reshape(shape)


def roundtrip(sample, **kw):
    key, out = codec.decode(codec.encode(sample, "key/1"), **kw)
    assert key == "key/1"
    return out


@pytest.mark.parametrize("dtype,shape", list(itertools.product(NUMPY_DTYPES, SHAPES)))
def test_numpy_roundtrip_exact(dtype, shape):
    a = _values(shape, dtype)
    b = roundtrip({"a": a})["a"]
    assert type(b) is np.ndarray and b.dtype == a.dtype and b.shape == a.shape
    assert np.array_equal(a, b, equal_nan=dtype.startswith(("float", "complex")))
    assert b.flags.writeable and b.flags.c_contiguous and b.flags.owndata or b.base is not None


@pytest.mark.parametrize("dtype,shape", list(itertools.product(TORCH_DTYPES, SHAPES)))
def test_torch_roundtrip_exact(dtype, shape):
    t = torch.from_numpy(_values(shape, "float64")).to(dtype) if dtype not in (
        torch.uint16, torch.uint32, torch.uint64) else torch.from_numpy(_values(shape, str(dtype)[6:]))
    if dtype.is_complex:
        t = torch.from_numpy(_values(shape, str(dtype)[6:]))
    u = roundtrip({"t": t})["t"]
    assert isinstance(u, torch.Tensor) and u.dtype == t.dtype and u.shape == t.shape
    assert torch.equal(u, t)


def test_bfloat16_numpy_and_cross_kind():
    a = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    b = roundtrip({"a": a})["a"]
    assert b.dtype == a.dtype and np.array_equal(b.astype(np.float32), a.astype(np.float32))
    t = roundtrip({"a": a}, decode_to="torch")["a"]
    assert t.dtype == torch.bfloat16 and torch.equal(t.float(), torch.arange(12.).reshape(3, 4))
    n = roundtrip({"t": torch.ones(2, dtype=torch.bfloat16)}, decode_to="numpy")["t"]
    assert n.dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("make", [
    lambda: np.arange(60, dtype=np.float64).reshape(6, 10)[::2, 1::3],          # strided
    lambda: np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),      # Fortran order
    lambda: np.arange(10, dtype=">i4"),                                          # big-endian
    lambda: torch.arange(24.).reshape(4, 6).T,                                   # transposed tensor
    lambda: (torch.arange(10.) * (1 + 2j)).to(torch.complex64)[::3].conj(),                # lazy conj view
    lambda: torch.arange(6.).requires_grad_(),                                   # autograd leaf
])
def test_non_contiguous_and_odd_inputs(make):
    x = make()
    y = roundtrip({"x": x})["x"]
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and torch.equal(y, x.detach().resolve_conj())
    else:
        assert isinstance(y, np.ndarray) and np.array_equal(y, x) and y.dtype == x.dtype.newbyteorder("=")


def test_decode_to_choices():
    sample = {"t": torch.arange(3), "a": np.arange(3)}
    auto = roundtrip(sample)
    assert isinstance(auto["t"], torch.Tensor) and isinstance(auto["a"], np.ndarray)
    assert all(isinstance(v, np.ndarray) for v in roundtrip(sample, decode_to="numpy").values())
    assert all(isinstance(v, torch.Tensor) for v in roundtrip(sample, decode_to="torch").values())


def test_metadata_and_scalars_roundtrip():
    meta = {"label": 3, "big": 2**63 - 1, "neg": -2**63, "f": 0.1, "inf": float("inf"), "t": True, "n": None,
            "s": "speech/en/utt_001.wav#3 — ü", "b": bytes(range(256)), "empty": "",
            "nested": {"list": [1, "two", [3.0, None], {"deep": b"x"}], "by_int": {1: "one"}},
            "np_int": np.int64(7), "np_float": np.float32(0.5), "arr_in_list": [np.arange(3), torch.ones(2)]}
    out = roundtrip(meta)
    for k in ("label", "big", "neg", "f", "inf", "t", "n", "s", "b", "empty", "nested"):
        assert out[k] == meta[k] and type(out[k]) is type(meta[k]), k
    assert type(out["np_int"]) is np.int64 and out["np_int"] == 7
    assert type(out["np_float"]) is np.float32 and out["np_float"] == 0.5
    assert np.array_equal(out["arr_in_list"][0], np.arange(3)) and torch.equal(out["arr_in_list"][1], torch.ones(2))
    assert roundtrip({"tuple": (1, 2)})["tuple"] == [1, 2]  # documented: tuples come back as lists


@pytest.mark.parametrize("bad,match", [
    ({"s": {1, 2}}, "field 's': values of type set"),
    ({"o": object()}, "field 'o': values of type object"),
    ({"deep": {"x": [1, {2}]}}, r"field 'deep.x\[1\]'"),
    ({1: 2}, "field names must be str"),
    ({"c": torch.zeros(2, dtype=torch.float8_e4m3fn)}, "dtype torch.float8_e4m3fn is unsupported. Supported dtypes are"),
    ({"u": np.array(["a"])}, "numpy dtype <U1 is unsupported"),
])
def test_unsupported_values_name_field(bad, match):
    with pytest.raises(EncodeError, match=match):
        codec.encode(bad)
    with pytest.raises(EncodeError, match="sample must be a dict"):
        codec.encode([1, 2])


def test_exact_encoded_size():
    a = np.zeros((4, 5), np.complex64)
    data = codec.encode({"a": a}, None)
    hlen = codec.read_prefix(data)[0]
    assert len(data) == codec.PREFIX_SIZE + hlen + a.nbytes
    assert hlen < 64  # a compact header


def test_decode_makes_one_copy_owned_by_result():
    a = np.random.default_rng(0).standard_normal(1 << 20)  # 8 MiB
    buf = bytearray(codec.encode({"a": a}))
    tracemalloc.start()
    try:
        out = codec.decode(memoryview(buf))[1]["a"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert a.nbytes <= peak < 1.2 * a.nbytes  # exactly one array-sized allocation
    buf[-8:] = b"\xff" * 8
    assert np.array_equal(out, a)  # the result does not alias the buffer


def test_checksum_stored_and_verified():
    data = bytearray(codec.encode({"a": np.arange(100)}))
    assert codec.checksum_ok(data)
    data[-3] ^= 0x40
    assert not codec.checksum_ok(data)
    codec.decode(data)  # without verify the damage is silent (fast path) ...
    with pytest.raises(CorruptItemError, match="checksum mismatch"):
        codec.decode(data, verify=True)  # ... and caught on request


@pytest.mark.parametrize("compression", ["zlib"])
def test_compression_roundtrip_and_bomb_guard(compression):
    a = np.zeros((256, 257), np.complex64)
    data = codec.encode({"a": a}, compression=compression)
    assert len(data) < a.nbytes / 10
    assert np.array_equal(codec.decode(data)[1]["a"], a)
    bad = bytearray(data)
    bad[-2] ^= 1
    with pytest.raises(CorruptItemError, match="checksum"):
        codec.decode(bad)


def test_unknown_compression_lists_choices():
    with pytest.raises(LmdbkitError, match=r"compression='lz5' is unsupported. Supported compressions are \[None, "):
        codec.encode({"a": np.zeros(2)}, compression="lz5")


def test_every_truncation_is_a_clean_error():
    data = codec.encode({"a": np.arange(50, dtype=np.int32), "m": {"x": [1, 2]}}, "k")
    for n in range(len(data)):
        codec.decode(data)  # the whole item first: its checked descriptors are then reused for equal ones
        with pytest.raises(CorruptItemError):
            codec.decode(data[:n])


def _with_header(data: bytes, edit) -> bytes:
    """The item with its msgpack header edited (and a valid checksum, so only the bounds checks stand)."""
    import msgpack
    import xxhash
    hlen = codec.read_prefix(data)[0]
    header = msgpack.unpackb(data[codec.PREFIX_SIZE:codec.PREFIX_SIZE + hlen], strict_map_key=False)
    edit(header)
    new = msgpack.packb(header, use_bin_type=True)
    body = new + data[codec.PREFIX_SIZE + hlen:]
    return codec._PREFIX.pack(codec.MAGIC, codec.VERSION, 0, len(new), xxhash.xxh3_64_intdigest(body)) + body


@pytest.mark.parametrize("edit,match", [
    (lambda h: h[2][0].__setitem__(6, [1 << 40]), "needs 8796093022208 bytes"),      # huge claimed shape
    (lambda h: h[2][0].__setitem__(6, [-4]), "bad array shape"),
    (lambda h: h[2][0].__setitem__(4, 1 << 62), "runs past the"),                    # offset out of bounds
    (lambda h: h[2][0].__setitem__(2, 99), "unknown dtype code 99"),
    (lambda h: h[2][0].__setitem__(3, 7), "unknown compression code 7"),
    (lambda h: h[2].append(["b", 0, 1]), "malformed array descriptor"),
    (lambda h: h.__setitem__(1, [1, 2]), "not a sample record"),
    (lambda h: h.__setitem__(0, 5), "key is not a string"),
])
def test_crafted_headers_fail_cleanly_without_allocating(edit, match):
    data = codec.encode({"a": np.arange(4, dtype=np.int64)}, "k")
    with pytest.raises(CorruptItemError, match=match):
        codec.decode(_with_header(data, edit))


VALID = [codec.encode({"a": np.arange(20, dtype=np.float32).reshape(4, 5), "t": torch.ones(3, dtype=torch.bfloat16),
                       "m": {"k": [1, "x", None, b"y"]}}, "key"),
         codec.encode({"z": np.zeros((0, 3)), "c": np.ones(4, np.complex128)}, None, compression="zlib")]


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_raise_lmdbkit_errors(data):
    for blob in (data, codec.MAGIC + b"\x01\x00" + data):
        try:
            codec.decode(blob, decode_to="numpy")
        except LmdbkitError:
            pass


@settings(max_examples=1500, deadline=None)
@example(VALID[0], [(46, 128)], 63)  # once found: a mutated header put a dict where the dtype code goes
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 10**6))
def test_fuzz_mutated_items_only_raise_lmdbkit_errors(valid, flips, cut):
    data = bytearray(valid)
    for pos, val in flips:
        data[pos % len(data)] = val
    data = data[: max(1, cut % (len(data) + 1))]
    for verify in (False, True):
        try:
            codec.decode(bytes(data), verify=verify)
        except LmdbkitError:
            pass


def test_large_payloads_start_on_a_cache_line_in_the_map(tmp_path):
    """A large item's arrays are moved (offsets in their descriptors, zero bytes before them) so that its payload
    starts on a 64-byte line where LMDB maps a large value, whatever its header's length; small items are not
    padded."""
    from lmdbkit import Reader, Writer
    from lmdbkit.prefetch import address
    keys = ["k", "a" * 100, "speech/en/" + "x" * 300 + ".wav#12"]
    items = [{"stft": torch.randn(257, 128, dtype=torch.complex64), "mel": np.full((80, 100), i, np.float32),
              "label": i} for i in range(len(keys))]
    assert codec.parse(codec.encode({"x": np.arange(256, dtype=np.float32)}, "k"))[4][0][4] == 0
    with Writer(tmp_path / "a.lmdb") as w:
        for key, item in zip(keys, items):
            w.append(item, key=key)
    with Reader(tmp_path / "a.lmdb") as r:
        with r._txn() as txn:
            for i in range(len(keys)):
                buf = r._raw(txn, i)
                start, _, _, _, arrays = codec.parse(buf)
                assert (address(buf) + start + arrays[0][4]) % codec.ALIGN == 0
        for i, item in enumerate(items):
            got = r[i]
            assert torch.equal(got["stft"], item["stft"]) and np.array_equal(got["mel"], item["mel"])
            assert got["label"] == i and r.key_of(i) == keys[i]


# -- headers seen before (lmdbkit.headers): items of one schema and metadata differ only in their keys ------------

@pytest.mark.parametrize("key", [None, "7", "k" * 31, "é" * 40, "x" * 300])  # nil, fixstr, str8, str16
def test_a_header_seen_before_skips_msgpack_and_keeps_each_items_key(key, monkeypatch):
    monkeypatch.setattr(codec, "_MEMO", headers.Memo())
    x = np.arange(256, dtype=np.float32)
    codec.decode(codec.encode({"x": x, "label": 3}, "first"))
    calls = []
    unpackb = codec.msgpack.unpackb
    monkeypatch.setattr(codec.msgpack, "unpackb", lambda *a, **kw: calls.append(1) or unpackb(*a, **kw))
    got_key, out = codec.decode(codec.encode({"x": x + 1, "label": 3}, key))
    assert calls == []  # the rest of its header was seen: taken from the memo
    assert got_key == key and out["label"] == 3 and np.array_equal(out["x"], x + 1)
    _, other = codec.decode(codec.encode({"x": x, "label": 4}, key))
    assert other["label"] == 4 and calls == [1]  # other metadata: another header


def test_items_sharing_a_header_get_fields_of_their_own():
    x = np.zeros(4, np.float32)
    a = codec.decode(codec.encode({"x": x, "label": 1}, "a"))[1]
    a["label"] = "changed"
    a["extra"] = 1
    b = codec.decode(codec.encode({"x": x, "label": 1}, "b"))[1]
    assert b == {"x": b["x"], "label": 1}


def test_nested_metadata_is_not_taken_from_the_memo():
    x = np.zeros(4, np.float32)
    for i in range(3):
        out = codec.decode(codec.encode({"x": x, "meta": {"tags": ["a"], "arr": np.full(2, i)}}, str(i)))[1]
        assert out["meta"]["tags"] == ["a"] and out["meta"]["arr"].tolist() == [i, i]


def test_a_seen_header_does_not_hide_a_short_payload_or_a_bad_key():
    data = codec.encode({"x": np.arange(64, dtype=np.float32), "label": 2}, "abc")
    codec.decode(data)
    with pytest.raises(CorruptItemError):
        codec.decode(data[:-4])
    bad = bytearray(data)
    bad[codec.PREFIX_SIZE + 2] = 0xFF  # the key's first byte: not UTF-8
    with pytest.raises(CorruptItemError):
        codec.decode(bytes(bad))


def test_the_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(headers.Memo, "SEEN_MAX", 8)
    monkeypatch.setattr(codec, "_MEMO", headers.Memo())
    for i in range(20):
        codec.decode(codec.encode({"x": np.zeros(2, np.float32), "label": i}))
    assert 0 < len(codec._MEMO.seen) <= 8


def test_the_memo_rests_while_no_header_repeats(monkeypatch):
    monkeypatch.setattr(headers.Memo, "REST", 50)
    memo = headers.Memo()
    monkeypatch.setattr(codec, "_MEMO", memo)
    x = np.zeros(2, np.float32)
    unique = [codec.encode({"x": x, "id": f"utt{i}"}) for i in range(headers.Memo.MISSES_MAX + 1)]
    for buf in unique:
        codec.decode(buf)
    assert memo.resting == 50 and not memo.seen  # every header missed: it stopped keeping them
    for i in range(60):  # resting, then keeping again: every item decodes as itself all along
        assert codec.decode(codec.encode({"x": x + i, "id": "same"}))[1]["x"][0] == i
    assert memo.resting == 0 and len(memo.seen) == 1


@pytest.mark.parametrize("sample", [{"x": np.zeros(2, np.float32), "tags": ["a"]},  # nested: never kept
                                    {"x": np.zeros(64, np.float32)}])  # compressed below: never kept
def test_the_memo_rests_for_headers_it_cannot_keep(sample, monkeypatch):
    memo = headers.Memo()
    monkeypatch.setattr(codec, "_MEMO", memo)
    buf = codec.encode(sample, compression=None if "tags" in sample else "zlib")
    for _ in range(headers.Memo.MISSES_MAX + 1):
        codec.decode(buf)
    assert memo.resting and not memo.seen


def test_a_batch_of_items_sharing_headers_keeps_each_items_metadata():
    bufs = [codec.encode({"x": np.full(4, i, np.float32), "label": i % 2, "tags": [i] if i >= 4 else None}, f"k{i}")
            for i in range(6)]
    layout = lklayout.batch_layout(bufs)
    dest = {"x": np.empty((6, 4), np.float32)}
    metas = lklayout.decode_layout(bufs, layout, dest, verify=True)
    assert [m["label"] for m in metas] == [0, 1, 0, 1, 0, 1]
    assert [m["tags"] for m in metas] == [None, None, None, None, [4], [5]]
    assert dest["x"][:, 0].tolist() == [0, 1, 2, 3, 4, 5]


# -- a single read's common case (codec.decode_seen): the memo's header, plain arrays, one copy each ---------------

@pytest.mark.parametrize("decode_to", ["auto", "numpy", "torch"])
@pytest.mark.parametrize("dtype,shape", list(itertools.product(NUMPY_DTYPES, [(), (1,), (7,), (2, 3, 4)])))
def test_a_seen_header_decodes_the_quick_way_exactly_as_decode_does(dtype, shape, decode_to, monkeypatch):
    monkeypatch.setattr(codec, "_MEMO", headers.Memo(codec._plain))
    a, t = _values(shape, dtype), torch.arange(6, dtype=torch.int16).reshape(2, 3)
    first = codec.encode({"a": a, "t": t, "label": 2}, "first")
    assert codec.decode_seen(first, decode_to) is None  # not seen yet: decode takes it (and keeps its header)
    codec.decode(first)
    other = np.asarray(a + 1 if dtype != "bool" else ~a)  # (a 0-d array's sum is a numpy scalar: kept an array)
    buf = codec.encode({"a": other, "t": t * 2, "label": 2}, "second")
    quick, full = codec.decode_seen(buf, decode_to), codec.decode(buf, decode_to=decode_to)[1]
    assert quick.keys() == full.keys() == {"a", "t", "label"} and quick["label"] == 2
    for k in ("a", "t"):
        assert type(quick[k]) is type(full[k]) and quick[k].dtype == full[k].dtype and quick[k].shape == full[k].shape
        assert np.array_equal(np.asarray(quick[k]), np.asarray(full[k]))
    assert type(quick["a"]) is (torch.Tensor if decode_to == "torch" else np.ndarray)
    assert type(quick["t"]) is (np.ndarray if decode_to == "numpy" else torch.Tensor)
    arr = np.asarray(quick["a"])  # a copy of its own, not a view of the buffer
    assert arr.flags.writeable and arr.flags.c_contiguous and not np.shares_memory(arr, np.frombuffer(buf, np.uint8))
    assert codec.decode_seen(buf, decode_to) is not quick  # a dict of its own each time


@pytest.mark.parametrize("sample", [
    {"x": np.zeros((0, 3), np.float32)},                            # empty: nothing to copy
    {"x": np.float32(1.5)},                                         # a numpy scalar comes back as one
    {"x": torch.zeros(3, dtype=torch.bfloat16)},                    # numpy has no bfloat16
    {"x": torch.zeros(3, dtype=torch.complex32)},                   # widened to complex64
    {"x": np.zeros(4, np.float32), "tags": ["a"]},                  # nested metadata: never kept
])
def test_what_is_not_the_common_case_is_left_to_decode(sample, monkeypatch):
    monkeypatch.setattr(codec, "_MEMO", headers.Memo(codec._plain))
    buf = codec.encode(sample)
    codec.decode(buf)
    assert codec.decode_seen(buf) is None


def test_a_seen_header_on_a_short_payload_is_left_to_decode_which_names_it(monkeypatch):
    monkeypatch.setattr(codec, "_MEMO", headers.Memo(codec._plain))
    data = codec.encode({"x": np.arange(64, dtype=np.float32), "label": 2}, "abc")
    codec.decode(data)
    assert codec.decode_seen(data) is not None
    for cut in (1, 4, 200):
        assert codec.decode_seen(data[:-cut]) is None
        with pytest.raises(CorruptItemError):
            codec.decode(data[:-cut])
    assert codec.decode_seen(b"LK") is None and codec.decode_seen(b"") is None


def test_no_quick_look_while_the_memo_rests(monkeypatch):
    memo = headers.Memo(codec._plain)
    monkeypatch.setattr(codec, "_MEMO", memo)
    buf = codec.encode({"x": np.zeros(4, np.float32), "label": 1})
    codec.decode(buf)
    assert codec.decode_seen(buf) is not None
    memo.resting = 10  # headers stopped repeating: a read goes straight to decode
    assert codec.decode_seen(buf) is None and codec.decode(buf)[1]["label"] == 1
