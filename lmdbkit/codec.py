"""Sample codec (format 1): a dict of arrays, tensors and metadata <-> bytes, without pickle.

Layout of one encoded item (little-endian)::

    0   magic  b"LK"
    2   u8     format version (1)
    3   u8     flags (reserved, 0)
    4   u32    header length H
    8   u64    xxh3-64 checksum of bytes[16:]   (header + payload)
    16  H      header: msgpack [key or None, {field: value}, [array descriptor, ...]]
    16+H       payload: the raw C-order bytes of every array, one after another (in an item of at least
               ALIGN_MIN payload bytes, after 0-63 zero bytes that put the arrays on a cache line in LMDB's map;
               the descriptors' offsets say where each array is, so a reader needs to know nothing of this)

Metadata values are stored as native msgpack (int, float, bool, None, str, bytes, lists and dicts of
those; tuples come back as lists). A top-level array or tensor field is None in the field map (which
keeps the field order) and described in the list by ``[field, kind, dtype code, compression, payload
offset, stored length, [shape]]``: plain msgpack, decoded without Python hooks. Arrays nested inside
metadata lists/dicts are msgpack extension values of type 1 whose body is ``<BBBBQQ`` (kind, dtype code,
ndim, compression, offset, length) followed by ``ndim`` u64 dimensions. Decoding bounds-checks every length against the buffer before it allocates,
then makes exactly one copy of each array from the buffer (e.g. LMDB's memory map) into the result.
"""

from __future__ import annotations

import struct
import sys
import threading
import warnings
import zlib
from typing import Any, Callable, Literal

import msgpack
import numpy as np
import xxhash

from . import headers
from .headers import after_key as _after_key, key as _key
from .speedups import C as _C
from .errors import CorruptItemError, EncodeError, LmdbkitError

MAGIC = b"LK"
VERSION = 1
_PREFIX = struct.Struct("<2sBBIQ")
PREFIX_SIZE = _PREFIX.size  # 16
_ARRAY = struct.Struct("<BBBBQQ")
_EXT_ARRAY = 1

MAX_DEPTH = 64  # nesting of metadata lists/dicts, checked when writing and when reading
DecodeTo = Literal["auto", "numpy", "torch"]
DECODE_TO = ("auto", "numpy", "torch")
# how a stored complex32 array is read: as complex64 (one widening copy), or as its float16 pairs [..., 2]
# (half the bytes, e.g. to move to the GPU and widen there; torch.view_as_complex(x.float()) makes it complex)
COMPLEX32 = ("complex64", "pairs")

# kind of an array value: how it was given, so that "auto" decoding gives the same kind back
KIND_NUMPY, KIND_TORCH, KIND_NUMPY_SCALAR = 0, 1, 2

# dtype codes; bfloat16 is stored as its raw 16 bits, complex32 (torch.complex32) as float16 real and
# imaginary parts, read back as complex64 (COMPLEX32 chooses)
DTYPES = (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128", "complex32",
)
_CODE = {name: code for code, name in enumerate(DTYPES, start=1)}
_NAME = {code: name for name, code in _CODE.items()}
_RAW = {"bfloat16": "<u2", "complex32": "<u4"}  # numpy has neither: their bits, copied whole
_STORAGE = {name: np.dtype(_RAW.get(name, name)).newbyteorder("<") for name in DTYPES}
_STORAGE["bool"] = np.dtype(bool)
_ITEMSIZE = {name: dt.itemsize for name, dt in _STORAGE.items()}
_LITTLE = sys.byteorder == "little"
if _LITTLE:
    _STORAGE = {k: v.newbyteorder("=") for k, v in _STORAGE.items()}


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
             lambda data, n: _zstd_decompressor().decompress(data, max_output_size=n)),
}
_local = threading.local()


def _zstd_decompressor():
    """One decompression context per thread (making one costs more than inflating a small array)."""
    d = getattr(_local, "zstd", None)
    if d is None:
        d = _local.zstd = _zstd().ZstdDecompressor()
    return d
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


_NATIVE_NAMES = {np.dtype(n): n for n in DTYPES if n not in _RAW}


def _as_numpy(value: Any, field: str) -> tuple[np.ndarray, str, int] | None:
    """(C-contiguous little-endian numpy view, dtype name, kind) for an array-like, else None."""
    t = type(value)
    if t is np.ndarray:
        name = _NATIVE_NAMES.get(value.dtype)
        if name is not None and value.flags.c_contiguous and (_LITTLE or value.dtype.byteorder in "<|"):
            return value, name, KIND_NUMPY  # the common case: nothing to convert
        kind = KIND_NUMPY
    elif isinstance(value, np.generic):
        value, kind = np.asarray(value), KIND_NUMPY_SCALAR
    elif isinstance(value, np.ndarray):
        kind = KIND_NUMPY
    else:
        torch = _torch()
        if torch is None or not isinstance(value, torch.Tensor):
            return None
        return _tensor_as_numpy(value, field, torch)
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


def _tensor_as_numpy(value, field: str, torch) -> tuple[np.ndarray, str, int]:
    if value.layout != torch.strided:
        raise EncodeError(f"field {field!r}: {value.layout} tensors are not supported; "
                          "call .to_dense() before writing")
    name = _TORCH_NAMES.get(value.dtype)
    if name is None:
        name = str(value.dtype).removeprefix("torch.")
        if name not in _CODE:
            raise EncodeError(f"field {field!r}: dtype {value.dtype} is unsupported. Supported dtypes are {list(DTYPES)}")
        _TORCH_NAMES[value.dtype] = name
    if name == "complex32":
        t = value.detach().cpu().resolve_conj().contiguous()
        return torch.view_as_real(t).numpy().view("<u4")[..., 0], name, KIND_TORCH
    if name != "bfloat16":
        try:  # the common case: a CPU tensor without grad, conj or neg bits
            arr = value.numpy()
            if arr.flags.c_contiguous:
                return arr, name, KIND_TORCH
        except (RuntimeError, TypeError):
            pass
    t = value.detach()
    if t.device.type == "meta":
        raise EncodeError(f"field {field!r}: a tensor on the 'meta' device has no data to store; "
                          "materialise it (e.g. torch.empty_like(t, device='cpu')) before writing")
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    arr = t.view(torch.int16).numpy().view("<u2") if name == "bfloat16" else t.numpy()
    return arr, name, KIND_TORCH


_TORCH_NAMES: dict = {}
# dtypes numpy holds natively, in the byte order read here: decode's common case copies them straight out
_PLAIN = frozenset(n for n in DTYPES if n not in _RAW) if _LITTLE else frozenset({"bool", "uint8", "int8"})


def encode(sample: dict, key: str | None = None, *, compression: str | None = None) -> bytes:
    """Encode one sample (a dict with str keys) into bytes. Raises EncodeError for what cannot be stored."""
    return encode_with_schema(sample, key, compression=compression)[0]


def encode_with_schema(sample: dict, key: str | None = None, *,
                       compression: str | None = None) -> tuple[bytes, tuple]:
    """(encoded bytes, schema signature): the signature is a tuple of (field, kind, dtype name or None)."""
    if type(sample) is not dict and not isinstance(sample, dict):
        raise EncodeError(f"a sample must be a dict of field -> value, got {type(sample).__name__}")
    ccode = check_compression(compression)
    compress = COMPRESSORS[compression][1] if compression else None
    chunks: list = []
    offset = 0

    def store(value: Any, field: str) -> tuple | None:
        """(kind, dtype code, compression, offset, length, shape) of an array, its bytes queued; None if not an array."""
        nonlocal offset
        found = _as_numpy(value, field)
        if found is None:
            return None
        arr, name, kind = found
        raw = memoryview(arr).cast("B") if arr.size else b""
        code = 0
        if compress is not None and arr.nbytes:
            raw, code = compress(raw), ccode
        chunks.append(raw)
        desc = (kind, _CODE[name], code, offset, len(raw), list(arr.shape))
        offset += len(raw)
        return desc

    def default(value: Any, field: str = "?"):
        desc = store(value, field)
        if desc is None:
            raise EncodeError(f"field {field!r}: values of type {type(value).__name__} cannot be stored. "
                              "Supported: torch tensors, numpy arrays, int, float, bool, None, str, bytes, "
                              "and lists/dicts of those")
        kind, dcode, code, off, n, shape = desc
        return msgpack.ExtType(_EXT_ARRAY, _ARRAY.pack(kind, dcode, len(shape), code, off, n) +
                               struct.pack(f"<{len(shape)}Q", *shape))

    fields: dict = {}
    arrays: list = []
    signature = []
    for field, value in sample.items():
        if type(field) is not str:
            raise EncodeError(f"field names must be str, got {field!r}")
        desc = store(value, field)
        if desc is None:
            fields[field] = _pre(value, field, default)
            signature.append((field, "meta", None))
        else:
            fields[field] = None
            arrays.append([field, *desc])
            signature.append((field, _KIND_NAMES[desc[0]], _NAME[desc[1]], len(desc[5])))
    try:
        header = msgpack.packb([key, fields, arrays], use_bin_type=True, default=default)
    except EncodeError:
        raise
    except UnicodeEncodeError as exc:
        raise EncodeError(f"sample {key!r} holds text that is not valid Unicode ({exc.reason}: {exc.object[:60]!r}); "
                          "give valid text (e.g. decode file names with errors='replace')") from exc
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"sample {key!r} cannot be encoded: {exc}") from exc
    if offset >= ALIGN_MIN and len(chunks) == len(arrays):  # a large item, its arrays all top-level
        header, pad = _aligned(header, key, fields, arrays)
        if pad:
            chunks.insert(0, bytes(pad))
    h = xxhash.xxh3_64(header)
    for c in chunks:
        h.update(c)
    return b"".join([_PREFIX.pack(MAGIC, VERSION, 0, len(header), h.intdigest()), header, *chunks]), tuple(signature)


ALIGN = 64  # a cache line
ALIGN_MIN = 64 << 10  # items with at least this many payload bytes have their payload aligned
VALUE_START = 16  # where a large value's bytes start in LMDB's map: after its first overflow page's header


def _aligned(header: bytes, key, fields: dict, arrays: list) -> tuple[bytes, int]:
    """(header, pad): the header with every array's offset moved by ``pad`` bytes, so that the payload that
    follows ``pad`` zero bytes starts on a cache line in LMDB's memory map (a large value starts VALUE_START
    bytes into a page). Copies into aligned buffers (a batch tensor) run faster from an aligned source (~1.15x
    measured for batches of 256 KiB arrays). Any reader reads the offsets as written; a batch's items may
    differ in their pad (``_shift``). (header, 0) if it does not settle."""
    given, pad = header, 0
    for _ in range(4):  # moving the offsets can lengthen their msgpack ints, and so the header
        want = -(VALUE_START + PREFIX_SIZE + len(header)) % ALIGN
        if want == pad:
            return header, pad
        pad = want
        header = msgpack.packb([key, fields, [[*a[:4], a[4] + pad, *a[5:]] for a in arrays]], use_bin_type=True)
    return given, 0


_KIND_NAMES = ("array", "tensor", "scalar")


_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what msgpack stores
_KEY_TYPES = (str, int, bytes, bool)  # dict keys that read back as themselves


def _pre(value: Any, field: str, default: Callable, depth: int = 0) -> Any:
    """Turn arrays into extension values up front and check what msgpack would refuse, so errors name their field."""
    t = type(value)
    if t is str or t is float or t is bool or value is None or t is bytes:
        return value
    if t is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise EncodeError(f"field {field!r}: the integer {value} does not fit in 64 bits; store it as a str "
                              "(or a float, losing precision)")
        return value
    if depth > MAX_DEPTH:
        raise EncodeError(f"field {field!r}: metadata nested more than {MAX_DEPTH} levels deep; flatten it")
    if isinstance(value, (np.ndarray, np.generic)) or (_torch() is not None and isinstance(value, _torch().Tensor)):
        return default(value, field)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if type(k) not in _KEY_TYPES or (type(k) is int and not _INT_MIN <= k <= _INT_MAX):
                raise EncodeError(f"field {field!r}: metadata dict key {k!r} is {type(k).__name__}, which would not "
                                  "read back as a key; use str keys (or int, bytes, bool)")
            out[k] = _pre(v, f"{field}.{k}", default, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_pre(v, f"{field}[{i}]", default, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, int):  # an int subclass (IntEnum): stored as the int
        return _pre(int(value), field, default, depth)
    if isinstance(value, (float, str, bytes)):
        return value
    return default(value, field)


# -- decoding ---------------------------------------------------------------------------------------

def _corrupt(reason: str) -> CorruptItemError:
    return CorruptItemError(reason)


def unpack_head(buf, layout: struct.Struct, magic: bytes, version: int, what: str) -> tuple:
    """The fields of a head that starts with magic and a version byte (an item's prefix, a run's head), after
    checking its length, magic and version."""
    if len(buf) < layout.size:
        raise _corrupt(f"{len(buf)} bytes is shorter than the {layout.size}-byte {what}")
    fields = layout.unpack_from(buf, 0)
    if fields[0] != magic:
        raise _corrupt(f"bad magic {bytes(fields[0])!r} in the {what} (expected {magic!r})")
    if fields[1] != version:
        raise _corrupt(f"the {what} says format version {fields[1]}; this lmdbkit reads version {version}")
    return fields


def read_prefix(buf) -> tuple[int, int]:
    """(header length, stored checksum), after checking magic, version and bounds."""
    _magic, _version, _flags, hlen, checksum = unpack_head(buf, _PREFIX, MAGIC, VERSION, "item prefix")
    if PREFIX_SIZE + hlen > len(buf):
        raise _corrupt(f"header length {hlen} runs past the end of the {len(buf)}-byte item")
    return hlen, checksum


def checksum_ok(buf) -> bool:
    """Whether the stored xxh3-64 checksum matches the item's header and payload."""
    _, stored = read_prefix(buf)
    return xxhash.xxh3_64_intdigest(memoryview(buf)[PREFIX_SIZE:]) == stored


def parse(buf) -> tuple[int, int, str | None, dict, list]:
    """(payload start, stored checksum, key, fields with top-level arrays as None, array descriptors) after
    checking the prefix and every descriptor against the buffer; the payload is not touched.

    Each descriptor is ``(field, kind, dtype name, compression code, offset, stored length, shape tuple,
    decoded byte size)``, checked so that allocating an array of that shape and copying ``stored length``
    bytes from ``offset`` stays within the buffer and within what the shape needs.
    """
    return _parse(buf)[:5]


def _parse(buf, with_key: bool = True) -> tuple[int, int, str | None, dict, list, bool]:
    """``parse``, and whether the fields are flat (no metadata list, dict or nested array to decode). The key
    may be left None when not ``with_key``. A header seen before but for its key is taken from the memo
    (``headers``); this runs for every item read, so the memo's lookup is inline."""
    memo, rest = _MEMO, None
    if memo.resting:
        memo.resting -= 1
    else:
        head = _C.head(buf) if _C is not None else _head(buf)
        if head is not None:
            start, stored, at, rest = head
            entry = memo.seen.get(rest)
            if entry is not None and entry[2] <= len(buf) - start:
                try:
                    key = _key(buf, PREFIX_SIZE, at) if with_key else None
                    memo.misses = 0
                    return start, stored, key, dict(entry[0]), entry[1], True
                except UnicodeDecodeError:
                    pass  # _header names the error
    start, stored, key, fields, arrays = _header(buf)
    checked = _checked_like_last(arrays, len(buf) - start)
    flat = _flat(fields)
    if not memo.resting:
        memo.remember(rest, fields, checked, flat)
    return start, stored, key, fields, checked, flat


def _head(buf) -> tuple[int, int, int, bytes] | None:
    """(payload start, stored checksum, where the header's key ends, the header's bytes after the key) of an
    item laid out as lmdbkit writes it, else None (``_header`` then names what is wrong). ``speedups.C.head``
    is the same in C."""
    if len(buf) < PREFIX_SIZE:
        return None
    magic, version, _flags, hlen, stored = _PREFIX.unpack_from(buf, 0)
    start = PREFIX_SIZE + hlen
    if magic != MAGIC or version != VERSION or start > len(buf):
        return None
    at = _after_key(buf, PREFIX_SIZE, start)
    return (start, stored, at, bytes(buf[at:start])) if at else None


def _flat(fields: dict) -> bool:
    """Whether no metadata value is a list, dict or nested array (each would be decoded)."""
    for v in fields.values():
        t = type(v)
        if t is list or t is dict or t is msgpack.ExtType:
            return False
    return True


def _plain(checked: list) -> tuple | None:
    """How ``decode_seen`` copies out the arrays of these checked descriptors: (field, dtype, offset, shape,
    written as a tensor) each, or None unless every one is decode's common case (uncompressed, not empty, a
    dtype numpy holds natively, not a numpy scalar)."""
    out = []
    for name, kind, dname, ccode, off, _n, shape, nbytes in checked:
        if ccode or not nbytes or dname not in _PLAIN or kind == KIND_NUMPY_SCALAR:
            return None
        out.append((name, _STORAGE[dname], off, shape, kind == KIND_TORCH))
    return tuple(out)


_MEMO = headers.Memo(_plain)


# the last item's descriptors as stored, checked, and the lowest and highest payload byte they reach
_last_checked: tuple = ([], [], 0, 0)


def _checked_like_last(arrays: list, payload: int) -> list:
    """``_checked``, reusing the last item's result when this item's descriptors equal it, or differ only by
    offsets moved alike (another alignment pad, ``_shift``): items of one schema read one after another cost
    a comparison and a bounds check on the payload's length."""
    global _last_checked
    raw, checked, low, need = _last_checked
    shift = 0 if arrays == raw else _shift(arrays, raw)
    if shift is not None and low + shift >= 0 and need + shift <= payload:
        return checked if not shift else [(*d[:4], d[4] + shift, *d[5:]) for d in checked]
    checked = _checked(arrays, payload)
    if not any(d[3] for d in checked):  # compressed lengths vary with the data: not worth keeping
        _last_checked = (arrays, checked, min((d[4] for d in checked), default=0),
                         max((d[4] + d[5] for d in checked), default=0))
    return checked


def _header(buf) -> tuple[int, int, str | None, dict, list]:
    """(payload start, stored checksum, key, fields, the array descriptors as stored) after checking the prefix
    and the header's shape; the descriptors are not checked (``_checked`` does that)."""
    n = len(buf)
    if n < PREFIX_SIZE:
        raise _corrupt(f"{n} bytes is shorter than the {PREFIX_SIZE}-byte item prefix")
    magic, version, _flags, hlen, stored = _PREFIX.unpack_from(buf, 0)
    start = PREFIX_SIZE + hlen
    if magic != MAGIC or version != VERSION or start > n:
        read_prefix(buf)  # raises the precise error
    try:
        key, fields, arrays = msgpack.unpackb(memoryview(buf)[PREFIX_SIZE:start], raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many kinds on malformed input
        raise _corrupt(f"malformed header ({type(exc).__name__}: {exc})"[:300]) from exc
    if type(fields) is not dict or type(arrays) is not list:
        raise _corrupt("header is not a sample record")
    if key is not None and type(key) is not str:
        raise _corrupt("header key is not a string")
    return start, stored, key, fields, arrays


def _checked(arrays: list, payload: int) -> list:
    checked = []
    for desc in arrays:
        if type(desc) is not list or len(desc) != 7:
            raise _corrupt(f"malformed array descriptor {desc!r}"[:200])
        field, kind, dcode, ccode, off, n, shape = desc
        checked.append(check_array(field, kind, dcode, ccode, off, n, shape, payload))
    return checked


MAX_NDIM = 32
MAX_ARRAY_BYTES = 1 << 48  # 256 TiB: far above any item, far below what makes numpy's size arithmetic overflow


def check_array(field, kind, dcode, ccode, off, n, shape, payload: int) -> tuple:
    """(field, kind, dtype name, compression, offset, length, shape tuple, decoded bytes) of one stored array,
    after checking every number against the payload's length: CorruptItemError before anything is allocated."""
    # the common case, an uncompressed array of a known dtype within the payload, in as few steps as possible
    if (type(dcode) is int and type(kind) is int and type(off) is int and type(n) is int and ccode == 0
            and type(field) is str and type(shape) is list and 0 <= kind <= 2 and 0 <= off and 0 < n
            and off + n <= payload and len(shape) <= MAX_NDIM):
        name = _NAME.get(dcode)
        if name is not None:
            size = _ITEMSIZE[name]
            for d in shape:
                if type(d) is not int or d < 0:
                    break
                size *= d
            else:
                if size == n:
                    return field, kind, name, 0, off, n, tuple(shape), n
    return _check_array_slowly(field, kind, dcode, ccode, off, n, shape, payload)


def _check_array_slowly(field, kind, dcode, ccode, off, n, shape, payload: int) -> tuple:
    """check_array for compressed and empty arrays, and the precise error for anything malformed."""
    if type(field) is not str or type(shape) is not list:
        raise _corrupt(f"malformed array descriptor for field {field!r}"[:200])
    name = _NAME.get(dcode) if type(dcode) is int else None
    if name is None or type(kind) is not int or not 0 <= kind <= 2:
        raise _corrupt(f"unknown dtype code {dcode!r} or kind {kind!r} (written by a newer lmdbkit? "
                       "upgrade lmdbkit to read it)"[:200])
    if type(ccode) is not int or (ccode and ccode not in _DECOMPRESS):
        raise _corrupt(f"unknown compression code {ccode!r}"[:200])
    if type(off) is not int or type(n) is not int or off < 0 or n < 0 or off + n > payload:
        raise _corrupt(f"array of {n!r} bytes at offset {off!r} runs past the {payload}-byte payload"[:200])
    if len(shape) > MAX_NDIM:
        raise _corrupt(f"array of {len(shape)} dimensions (at most {MAX_NDIM} are written)")
    size = bound = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise _corrupt(f"bad array shape {shape!r}"[:200])
        size *= d
        bound *= d or 1  # numpy multiplies every dimension, even beside a zero
    if bound * _ITEMSIZE[name] > MAX_ARRAY_BYTES:
        raise _corrupt(f"array shape {shape!r} is impossibly large"[:200])
    nbytes = size * _ITEMSIZE[name]
    if not ccode and n != nbytes:
        raise _corrupt(f"array of shape {tuple(shape)} {name} needs {nbytes} bytes, found {n}")
    return field, kind, name, ccode, off, n, tuple(shape), nbytes


def decode(buf, *, decode_to: DecodeTo = "auto", verify: bool = False, parsed: tuple | None = None,
           complex32: str = "complex64", with_key: bool = True) -> tuple[str | None, dict]:
    """Decode one item into (key, sample). ``buf`` may be bytes or a memoryview into a memory map.

    decode_to: "auto" gives back the kind that was written (torch tensor or numpy array; numpy when torch
    cannot be imported), "numpy" gives numpy arrays, "torch" gives torch tensors (numpy scalars stay scalars).
    verify: check the checksum first (compressed arrays are always checked before they are inflated).
    Batches of one layout, copied into batch tensors: see ``lmdbkit.layout``.
    parsed: what ``parse(buf)`` returned for this buffer, if the caller already has it (it is consumed).
    complex32: complex32 arrays come back as "complex64" or as their float16 "pairs" (see COMPLEX32).
    with_key: False may leave the key None (for a caller that wants only the sample: it costs less).
    """
    buf = memoryview(buf)
    start, stored, key, fields, arrays, flat = _parse(buf, with_key) if parsed is None else (*parsed, False)
    if verify and xxhash.xxh3_64_intdigest(buf[PREFIX_SIZE:]) != stored:
        raise _corrupt("checksum mismatch")
    torch = None
    if decode_to != "numpy":
        torch = _torch()
        if torch is None and decode_to == "torch":
            import torch  # noqa: F811 - imported only when tensors are asked for
    try:
        for name, kind, dname, ccode, off, n, shape, nbytes in arrays:
            # _array's common case, inline: the two calls it saves are 0.2-0.3 us of a 1 KiB item's ~3.3 us decode
            if not ccode and nbytes and dname in _PLAIN and kind != KIND_NUMPY_SCALAR:
                arr = np.ndarray(shape, _STORAGE[dname], buf, start + off).copy()  # the one copy
                want_torch = torch is not None and (decode_to == "torch" or kind == KIND_TORCH)
                fields[name] = torch.from_numpy(arr) if want_torch else arr
            else:
                fields[name] = _array(buf, start, stored, verify, kind, dname, ccode, off, n, shape, nbytes,
                                      decode_to, torch, complex32)
        if not flat:
            for name, value in fields.items():
                t = type(value)
                if t is list or t is dict or t is msgpack.ExtType:
                    fields[name] = _walk(value, _Ctx(buf, start, stored, verify, decode_to, torch, complex32), 0)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, MemoryError) as exc:
        if isinstance(exc, LmdbkitError):
            raise
        raise _corrupt(f"undecodable item ({type(exc).__name__}: {exc})"[:300]) from exc
    return key, fields


def decode_seen(buf, decode_to: DecodeTo = "auto") -> dict | None:
    """A single read's common case, in as few steps as it takes: the sample of an item laid out as lmdbkit
    writes it whose header (but for its key) the memo holds, flat and with only ``_plain`` arrays, each copied
    once out of ``buf``. None for any other item, which ``decode`` then takes (and names what is wrong with
    it). The key is not read; the checksum is not checked (``decode(verify=True)`` does that)."""
    if _MEMO.resting:  # headers do not repeat here (unique metadata): not worth a look
        return None
    head = _C.head(buf) if _C is not None else _head(buf)
    if head is None:
        return None
    entry = _MEMO.seen.get(head[3])
    if entry is None or entry[3] is None or entry[2] > len(buf) - head[0]:
        return None
    torch = None if decode_to == "numpy" else _torch()
    if torch is None and decode_to == "torch":
        return None
    start, fields = head[0], dict(entry[0])
    for name, dtype, off, shape, as_tensor in entry[3]:
        arr = np.ndarray(shape, dtype, buf, start + off).copy()  # the one copy
        fields[name] = torch.from_numpy(arr) if torch is not None and (as_tensor or decode_to == "torch") else arr
    return fields


class _Ctx:
    __slots__ = ("buf", "start", "stored", "verified", "decode_to", "torch", "complex32")

    def __init__(self, buf, start, stored, verified, decode_to, torch, complex32):
        self.buf, self.start, self.stored, self.verified = buf, start, stored, verified
        self.decode_to, self.torch, self.complex32 = decode_to, torch, complex32


def _walk(value, ctx: _Ctx, depth: int):
    """Decode arrays nested in metadata lists and dicts."""
    if depth > MAX_DEPTH:
        raise _corrupt(f"metadata nested more than {MAX_DEPTH} levels deep")
    if type(value) is msgpack.ExtType:
        return _ext_array(value, ctx)
    if type(value) is list:
        return [_walk(v, ctx, depth + 1) for v in value]
    if type(value) is dict:
        return {k: _walk(v, ctx, depth + 1) for k, v in value.items()}
    return value


_SHAPES = [struct.Struct(f"<{n}Q") for n in range(MAX_NDIM + 1)]


def _ext_array(ext, ctx: _Ctx):
    """An array nested in metadata (a msgpack extension value)."""
    code, data = ext
    if code != _EXT_ARRAY or len(data) < _ARRAY.size:
        raise _corrupt(f"unknown extension value (type {code}, {len(data)} bytes)")
    kind, dcode, ndim, ccode, off, n = _ARRAY.unpack_from(data, 0)
    if ndim >= len(_SHAPES) or len(data) != _ARRAY.size + 8 * ndim:
        raise _corrupt(f"array descriptor of {len(data)} bytes does not fit ndim={ndim}")
    shape = list(_SHAPES[ndim].unpack_from(data, _ARRAY.size))
    _, *checked = check_array("", kind, dcode, ccode, off, n, shape, len(ctx.buf) - ctx.start)
    return _array(ctx.buf, ctx.start, ctx.stored, True, *checked, ctx.decode_to, ctx.torch, ctx.complex32)


def decoded_dtype(name: str, shape: tuple, complex32: str = "complex64") -> tuple[str, tuple]:
    """(dtype name, shape) of a stored array as decode returns it."""
    if name != "complex32":
        return name, shape
    return ("complex64", shape) if complex32 == "complex64" else ("float16", (*shape, 2))


def _array(buf, start, stored, verified, kind, name, ccode, off, n, shape, nbytes, decode_to, torch,
           complex32="complex64"):
    """One array from the payload (its descriptor already checked by check_array): exactly one copy out of ``buf``."""
    dt = _STORAGE[name]
    if not ccode and name != "complex32":  # the common case: straight from buf, without slicing it first
        arr = np.ndarray(shape, dt, buf, start + off).copy() if nbytes else np.empty(shape, dt)  # the one copy
        return _finish(arr, name, kind, decode_to, torch)
    raw = buf[start + off:start + off + n]
    if ccode:
        # never inflate bytes that might be a random bomb: check the checksum first
        if not verified and xxhash.xxh3_64_intdigest(buf[PREFIX_SIZE:]) != stored:
            raise _corrupt("checksum mismatch")
        try:
            raw = _DECOMPRESS[ccode](raw, nbytes)
        except Exception as exc:
            raise _corrupt(f"cannot decompress array: {exc}") from exc
        if len(raw) != nbytes:
            raise _corrupt(f"array of shape {shape} {name} needs {nbytes} bytes, found {len(raw)}")
    if name == "complex32":
        return _complex32(raw, shape, kind, decode_to, torch, None, complex32)
    arr = np.ndarray(shape, dt, raw).copy() if nbytes else np.empty(shape, dt)  # the one copy (inflated)
    return _finish(arr, name, kind, decode_to, torch)


def _complex32(raw, shape: tuple, kind: int, decode_to: str, torch, dest, complex32: str):
    """A stored complex32 array as complex64 (the widening is the one copy) or as its float16 pairs."""
    if complex32 not in COMPLEX32:
        raise LmdbkitError(f"complex32={complex32!r} is unsupported. Supported values are {list(COMPLEX32)}")
    pairs = np.ndarray((*shape, 2), np.dtype("<f2"), raw)
    name, want = decoded_dtype("complex32", shape, complex32)
    given = dest is not None
    if not given:
        dest = np.empty(want, name)
    elif dest.shape != want or dest.dtype != np.dtype(name) or not dest.flags.c_contiguous:
        raise LmdbkitError(f"decode destination of shape {dest.shape} {dest.dtype} does not fit the stored "
                           f"complex32 array of shape {shape} read as {complex32}")
    if name == "complex64":
        wide = dest.reshape(-1).view(np.float32).reshape(pairs.shape)
        t = torch or _torch()
        if t is not None and pairs.size:  # torch widens float16 with SIMD: ~40x numpy's per-value conversion
            with warnings.catch_warnings():  # the pairs are a read-only view of the map: only read here
                warnings.simplefilter("ignore", UserWarning)
                t.from_numpy(wide).copy_(t.from_numpy(pairs))
        else:
            np.copyto(wide, pairs)
    else:
        np.copyto(dest, pairs)
    return dest if given else _finish(dest, name, kind, decode_to, torch)


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
    if _LITTLE:
        return arr  # storage dtypes are little-endian: native here
    return arr.astype(arr.dtype.newbyteorder("="))


def _numpy_bf16(arr: np.ndarray, name: str) -> np.ndarray:
    try:
        import ml_dtypes
    except ImportError as exc:
        raise LmdbkitError("a bfloat16 array decoded to numpy needs ml_dtypes (pip install ml_dtypes); "
                           "or read it with decode_to='torch'") from exc
    return arr.view(ml_dtypes.bfloat16)


# -- descriptors moved alike (used by _checked_like_last here and by lmdbkit.layout) --------------------

def _shift(arrays: list, stored0: list) -> int | None:
    """How far an item's arrays lie from the first item's, when its descriptors (as stored: not yet checked)
    equal the first's except for offsets all moved alike (by a different alignment pad, see ``_aligned``);
    None otherwise."""
    if type(arrays) is not list or any(type(a) is not list or len(a) != 7 or type(a[4]) is not int for a in arrays):
        return None
    return moved(arrays, stored0)


def moved(arrays: list, arrays0: list) -> int | None:
    """How far descriptors ``arrays`` lie from ``arrays0`` (stored or checked alike), when they are equal but for
    their offsets, all moved alike (another alignment pad); None otherwise (and for none)."""
    if len(arrays) != len(arrays0) or not arrays:
        return None
    shift = arrays[0][4] - arrays0[0][4]
    for a, a0 in zip(arrays, arrays0):
        if a[:4] != a0[:4] or a[5:] != a0[5:] or a[4] - a0[4] != shift:
            return None
    return shift


def dtype_name(code: int) -> str | None:
    """The dtype name of a descriptor's dtype code (None if unknown)."""
    return _NAME.get(code)


def peek_key(buf) -> str | None:
    """The key stored in an item's header, without decoding its arrays."""
    return parse(buf)[2]
