"""Sample codec (format 1): a dict of arrays, tensors and metadata <-> bytes, without pickle.

Layout of one encoded item (little-endian)::

    0   magic  b"LK"
    2   u8     format version (1)
    3   u8     flags (reserved, 0)
    4   u32    header length H
    8   u64    xxh3-64 checksum of bytes[16:]   (header + payload)
    16  H      header: msgpack map {"k": key or None, "f": {field: value}}
    16+H       payload: the raw C-order bytes of every array, one after another

Metadata values are stored as native msgpack (int, float, bool, None, str, bytes, lists and dicts of
those; tuples come back as lists). Arrays and tensors are msgpack extension values of type 1 whose
body is ``<BBBBQQ`` (kind, dtype code, ndim, compression, payload offset, stored length) followed by
``ndim`` u64 dimensions. Decoding bounds-checks every length against the buffer before it allocates,
then makes exactly one copy of each array from the buffer (e.g. LMDB's memory map) into the result.
"""

from __future__ import annotations

import struct
import sys
import zlib
from typing import Any, Callable, Literal

import msgpack
import numpy as np
import xxhash

from .errors import CorruptItemError, EncodeError, LmdbkitError

MAGIC = b"LK"
VERSION = 1
_PREFIX = struct.Struct("<2sBBIQ")
PREFIX_SIZE = _PREFIX.size  # 16
_ARRAY = struct.Struct("<BBBBQQ")
_EXT_ARRAY = 1

DecodeTo = Literal["auto", "numpy", "torch"]
DECODE_TO = ("auto", "numpy", "torch")

# kind of an array value: how it was given, so that "auto" decoding gives the same kind back
KIND_NUMPY, KIND_TORCH, KIND_NUMPY_SCALAR = 0, 1, 2

# dtype codes; bfloat16 is stored as its raw 16 bits
DTYPES = (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
)
_CODE = {name: code for code, name in enumerate(DTYPES, start=1)}
_NAME = {code: name for name, code in _CODE.items()}
_STORAGE = {name: np.dtype("<u2" if name == "bfloat16" else name).newbyteorder("<") for name in DTYPES}
_STORAGE["bool"] = np.dtype(bool)


# -- compression: a registry of small functions, off by default -------------------------------------

def _zstd():
    try:
        import zstandard
    except ImportError as exc:
        raise LmdbkitError("compression='zstd' needs the zstandard package: pip install zstandard") from exc
    return zstandard


COMPRESSORS: dict[str, tuple[int, Callable[[bytes], bytes], Callable[[bytes, int], bytes]]] = {
    # name: (code, compress(raw) -> bytes, decompress(stored, expected_size) -> bytes)
    "zlib": (1, lambda raw: zlib.compress(raw, 1), lambda data, n: zlib.decompressobj().decompress(data, n)),
    "zstd": (2, lambda raw: _zstd().ZstdCompressor(level=3).compress(raw),
             lambda data, n: _zstd().ZstdDecompressor().decompress(data, max_output_size=n)),
}
_DECOMPRESS = {code: dec for code, _, dec in COMPRESSORS.values()}


def check_compression(name: str | None) -> int:
    """The code of a compression name (0 for None); unknown names list the choices."""
    if name is None:
        return 0
    if name not in COMPRESSORS:
        raise LmdbkitError(f"compression={name!r} is unsupported. Supported compressions are "
                           f"{[None, *sorted(COMPRESSORS)]}")
    if name == "zstd":
        _zstd()
    return COMPRESSORS[name][0]


# -- encoding ---------------------------------------------------------------------------------------

def _torch():
    return sys.modules.get("torch")


def _as_numpy(value: Any, field: str) -> tuple[np.ndarray, str, int] | None:
    """(C-contiguous little-endian numpy view, dtype name, kind) for an array-like, else None."""
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise EncodeError(f"field {field!r}: {value.layout} tensors are not supported; "
                              "call .to_dense() before writing")
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _CODE:
            raise EncodeError(f"field {field!r}: dtype {t.dtype} is unsupported. Supported dtypes are {list(DTYPES)}")
        arr = t.view(torch.int16).numpy().view("<u2") if name == "bfloat16" else t.numpy()
        return arr, name, KIND_TORCH
    if isinstance(value, np.generic):
        value, kind = np.asarray(value), KIND_NUMPY_SCALAR
    elif isinstance(value, np.ndarray):
        kind = KIND_NUMPY
    else:
        return None
    name = value.dtype.name
    if name not in _CODE:
        raise EncodeError(f"field {field!r}: numpy dtype {value.dtype} is unsupported. "
                          f"Supported dtypes are {list(DTYPES)}")
    arr = value
    if name == "bfloat16":  # ml_dtypes.bfloat16
        arr = arr.view("<u2")
    elif arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    return arr, name, kind


def encode(sample: dict, key: str | None = None, *, compression: str | None = None) -> bytes:
    """Encode one sample (a dict with str keys) into bytes. Raises EncodeError for what cannot be stored."""
    if not isinstance(sample, dict):
        raise EncodeError(f"a sample must be a dict of field -> value, got {type(sample).__name__}")
    ccode = check_compression(compression)
    compress = COMPRESSORS[compression][1] if compression else None
    chunks: list = []
    offset = 0

    def default(value: Any, field: str = "?"):
        nonlocal offset
        found = _as_numpy(value, field)
        if found is None:
            raise EncodeError(f"field {field!r}: values of type {type(value).__name__} cannot be stored. "
                              "Supported: torch tensors, numpy arrays, int, float, bool, None, str, bytes, "
                              "and lists/dicts of those")
        arr, name, kind = found
        raw = memoryview(arr).cast("B") if arr.size else b""
        code = 0
        if compress is not None and arr.nbytes:
            raw, code = compress(raw), ccode
        body = _ARRAY.pack(kind, _CODE[name], arr.ndim, code, offset, len(raw)) + struct.pack(f"<{arr.ndim}Q", *arr.shape)
        chunks.append(raw)
        offset += len(raw)
        return msgpack.ExtType(_EXT_ARRAY, body)

    fields = {}
    for field, value in sample.items():
        if not isinstance(field, str):
            raise EncodeError(f"field names must be str, got {field!r}")
        fields[field] = value
    try:
        header = msgpack.packb({"k": key, "f": {f: _pre(v, f, default) for f, v in fields.items()}},
                               use_bin_type=True, default=default)
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"sample {key!r} cannot be encoded: {exc}") from exc
    h = xxhash.xxh3_64(header)
    for c in chunks:
        h.update(c)
    return b"".join([_PREFIX.pack(MAGIC, VERSION, 0, len(header), h.intdigest()), header, *chunks])


def _pre(value: Any, field: str, default: Callable) -> Any:
    """Turn arrays into extension values up front, so errors name their field."""
    if isinstance(value, (np.ndarray, np.generic)) or (_torch() is not None and isinstance(value, _torch().Tensor)):
        return default(value, field)
    if isinstance(value, dict):
        return {k: _pre(v, f"{field}.{k}", default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_pre(v, f"{field}[{i}]", default) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    return default(value, field)


# -- decoding ---------------------------------------------------------------------------------------

def _corrupt(reason: str) -> CorruptItemError:
    return CorruptItemError(reason)


def read_prefix(buf) -> tuple[int, int]:
    """(header length, stored checksum), after checking magic, version and bounds."""
    if len(buf) < PREFIX_SIZE:
        raise _corrupt(f"{len(buf)} bytes is shorter than the {PREFIX_SIZE}-byte item prefix")
    magic, version, _flags, hlen, checksum = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise _corrupt(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise _corrupt(f"item format version {version}, this lmdbkit reads version {VERSION}")
    if PREFIX_SIZE + hlen > len(buf):
        raise _corrupt(f"header length {hlen} runs past the end of the {len(buf)}-byte item")
    return hlen, checksum


def checksum_ok(buf) -> bool:
    """Whether the stored xxh3-64 checksum matches the item's header and payload."""
    _, stored = read_prefix(buf)
    return xxhash.xxh3_64_intdigest(memoryview(buf)[PREFIX_SIZE:]) == stored


def decode(buf, *, decode_to: DecodeTo = "auto", verify: bool = False) -> tuple[str | None, dict]:
    """Decode one item into (key, sample). ``buf`` may be bytes or a memoryview into a memory map.

    decode_to: "auto" gives back the kind that was written (torch tensor or numpy array; numpy when torch
    cannot be imported), "numpy" gives numpy arrays, "torch" gives torch tensors (numpy scalars stay scalars).
    verify: check the checksum first (compressed arrays are always checked before they are inflated).
    """
    buf = memoryview(buf)
    hlen, stored = read_prefix(buf)
    if verify and xxhash.xxh3_64_intdigest(buf[PREFIX_SIZE:]) != stored:
        raise _corrupt("checksum mismatch")
    payload = buf[PREFIX_SIZE + hlen:]
    verified = verify
    torch = None
    if decode_to != "numpy":
        torch = _torch()
        if torch is None and decode_to == "torch":
            import torch  # noqa: F811 - imported only when tensors are asked for

    def ext_hook(code: int, data: bytes):
        nonlocal verified
        if code != _EXT_ARRAY or len(data) < _ARRAY.size:
            raise _corrupt(f"unknown extension value (type {code}, {len(data)} bytes)")
        kind, dcode, ndim, ccode, off, n = _ARRAY.unpack_from(data, 0)
        if len(data) != _ARRAY.size + 8 * ndim:
            raise _corrupt(f"array descriptor of {len(data)} bytes does not fit ndim={ndim}")
        shape = struct.unpack_from(f"<{ndim}Q", data, _ARRAY.size)
        name = _NAME.get(dcode)
        if name is None:
            raise _corrupt(f"unknown dtype code {dcode}")
        if off + n > len(payload):
            raise _corrupt(f"array of {n} bytes at offset {off} runs past the {len(payload)}-byte payload")
        dt = _STORAGE[name]
        size = 1
        for d in shape:
            size *= d
        nbytes = size * dt.itemsize
        raw = payload[off:off + n]
        if ccode:
            if ccode not in _DECOMPRESS:
                raise _corrupt(f"unknown compression code {ccode}")
            if not verified:  # never inflate bytes that might be a random bomb
                if xxhash.xxh3_64_intdigest(buf[PREFIX_SIZE:]) != stored:
                    raise _corrupt("checksum mismatch")
                verified = True
            try:
                raw = _DECOMPRESS[ccode](raw, nbytes)
            except Exception as exc:
                raise _corrupt(f"cannot decompress array: {exc}") from exc
        if len(raw) != nbytes:
            raise _corrupt(f"array of shape {tuple(shape)} {name} needs {nbytes} bytes, found {len(raw)}")
        arr = np.frombuffer(raw, dtype=dt, count=size).reshape(shape).copy() if size else np.empty(shape, dt)
        return _finish(arr, name, kind, decode_to, torch)

    try:
        header = msgpack.unpackb(buf[PREFIX_SIZE:PREFIX_SIZE + hlen], raw=False, use_list=True,
                                 strict_map_key=False, ext_hook=ext_hook)
    except LmdbkitError:
        raise
    except Exception as exc:  # msgpack raises many kinds on malformed input
        raise _corrupt(f"malformed header ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict) or not isinstance(header.get("f"), dict):
        raise _corrupt("header is not a sample record")
    key = header.get("k")
    if key is not None and not isinstance(key, str):
        raise _corrupt("header key is not a string")
    return key, header["f"]


def _finish(arr: np.ndarray, name: str, kind: int, decode_to: str, torch) -> Any:
    if kind == KIND_NUMPY_SCALAR:
        return _numpy_bf16(arr, name)[()] if name == "bfloat16" else arr[()]
    want_torch = decode_to == "torch" or (decode_to == "auto" and kind == KIND_TORCH and torch is not None)
    if want_torch:
        if name == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)
    if name == "bfloat16":
        return _numpy_bf16(arr, name)
    if arr.dtype.byteorder == "<" and sys.byteorder == "little":
        return arr.view(arr.dtype.newbyteorder("="))
    return arr.astype(arr.dtype.newbyteorder("="))


def _numpy_bf16(arr: np.ndarray, name: str) -> np.ndarray:
    try:
        import ml_dtypes
    except ImportError as exc:
        raise LmdbkitError("a bfloat16 array decoded to numpy needs ml_dtypes (pip install ml_dtypes); "
                           "or read it with decode_to='torch'") from exc
    return arr.view(ml_dtypes.bfloat16)


def peek_key(buf) -> str | None:
    """The key stored in an item's header, without decoding its arrays."""
    buf = memoryview(buf)
    hlen, _ = read_prefix(buf)
    try:
        header = msgpack.unpackb(buf[PREFIX_SIZE:PREFIX_SIZE + hlen], raw=False, strict_map_key=False,
                                 ext_hook=lambda code, data: None)
    except Exception as exc:
        raise _corrupt(f"malformed header ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt("header is not a sample record")
    return header.get("k")


def describe(value: Any) -> dict:
    """The schema entry of one field value: kind and dtype for arrays, type name for metadata."""
    found = _as_numpy(value, "?")
    if found is not None:
        arr, name, kind = found
        return {"kind": ("array", "tensor", "scalar")[kind], "dtype": name, "ndim": arr.ndim}
    return {"kind": "meta", "type": type(value).__name__}
