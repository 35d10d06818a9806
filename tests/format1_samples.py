"""The samples of tests/data/format1.lmdb, a database written by lmdbkit 0.1 (format 1, commit f59a00f) with
``python tests/format1_samples.py tests/data/format1.lmdb``: every dtype, 0-d, empty and n-d arrays, nested
metadata, small items and one large one."""

import sys

import numpy as np

DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32",
          "float64", "complex64", "complex128")
SHAPES = ((), (0,), (7,), (3, 4, 2))


def samples() -> list[tuple[str, dict]]:
    """12 small items (each with an array of every dtype, the shapes taking turns) and one large one."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(13):
        shape = SHAPES[i % len(SHAPES)]
        arrays = {d: (rng.standard_normal(shape) * 100).astype(d) if d != "bool" else rng.random(shape) > 0.5
                  for d in DTYPES}
        big = np.arange(70_000 if i == 12 else 0, dtype=np.float32)
        out.append((f"item-{i}", {**arrays, "big": big, "label": i % 3, "meta": {"shape": list(shape), "tags": ["a", "b"]}}))
    return out


if __name__ == "__main__":
    import lmdbkit
    with lmdbkit.Writer(sys.argv[1], index_fields=("label",), metadata={"written_by": "lmdbkit format 1"}) as w:
        for key, sample in samples():
            w.append(sample, key=key)
