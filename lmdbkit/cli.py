"""The ``lmdbkit`` command line (also ``python -m lmdbkit``)."""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import sys
from pathlib import Path

import lmdb

from .errors import CorruptItemError, DamagedDatabaseError, DiskFullError, LmdbkitError

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with the default where there is one worth saying (not None, True or False)."""

    def _get_help_string(self, action):
        if action.default in (None, True, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


EPILOG = """examples:
  lmdbkit info runs/demo/data/train.lmdb
  lmdbkit verify runs/demo/data/train.lmdb
  lmdbkit query runs/demo/data/train.lmdb label_name=chirp_up --limit 5
  lmdbkit verify runs/demo/data
  lmdbkit convert hdf5 features.h5 out/features.lmdb --index-fields label
  lmdbkit compact out/features.lmdb out/features-compact.lmdb
  lmdbkit precompute --audio-dir my_audio --output log_mel --dtype float16
  lmdbkit train --train-db runs/my_audio/data/train.lmdb --val-db runs/my_audio/data/val.lmdb
  lmdbkit bench --output-dir runs/bench
  lmdbkit demo
"""


def cmd_info(a) -> int:
    from . import store
    from .reader import Reader
    out = []
    for p in store.resolve_paths(a.path):
        with Reader(p, allow_pickle=a.allow_pickle) as r:
            m = r.meta
            info = {"path": str(p), "items": len(r), "bytes_on_disk": store.disk_usage(p), "format": m.get("format"),
                    "version": m.get("version"), "complete": m.get("complete"), "schema": m.get("schema"),
                    "index_fields": r.index_fields, "stft": r.metadata.get("stft"),
                    "labels": r.metadata.get("labels"), "created": m.get("created"), "updated": m.get("updated"),
                    "writer_version": m.get("writer_version")}
            info["index_values"] = {f: len(r.value_counts(f)) for f in r.index_fields}
        out.append(info)
    if a.json:
        print(json.dumps(out if len(out) > 1 else out[0], indent=2))
        return 0
    for info in out:
        print(f"{info['path']}: {info['items']} items, {info['bytes_on_disk'] / 2**20:.1f} MiB on disk, "
              f"format {info['format']} v{info['version']}, {'complete' if info['complete'] else 'INCOMPLETE'}")
        for field, d in (info["schema"] or {}).items():
            desc = f"{d['kind']} {d.get('dtype', d.get('type', ''))}" + (f", {d['ndim']}-d" if "ndim" in d else "")
            print(f"  field {field}: {desc}")
        for f in info["index_fields"]:
            print(f"  index on {f}: {info['index_values'][f]} distinct values")
        if info["stft"]:
            s = info["stft"]
            print(f"  stft: {s['output']} {s['dtype']}, n_fft {s['n_fft']}, hop {s['hop_length']}, "
                  f"{s['sample_rate']} Hz, window {s['window']}")
        if info["labels"]:
            print(f"  labels: {len(info['labels'])} ({', '.join(list(info['labels'])[:8])}{', ...' if len(info['labels']) > 8 else ''})")
    return 0


def cmd_verify(a) -> int:
    from . import store
    from .integrity import verify
    reports = [verify(p, progress=not a.json) for p in store.resolve_paths(a.path)]
    if a.json:
        out = [r.to_dict() for r in reports]
        print(json.dumps(out if len(out) > 1 else out[0], indent=2))
    else:
        print("\n".join(str(r) for r in reports))
    return 0 if all(r.ok for r in reports) else 1


def cmd_convert(a) -> int:
    from .convert import convert
    kw = {"index_fields": a.index_fields, "mode": a.mode, "progress": not a.json}
    if a.format in ("pt", "legacy"):
        kw["allow_pickle"] = a.allow_pickle
    if a.format == "numpy":
        kw["field"] = a.field
    res = convert(a.format, a.src, a.dest, **kw)
    print(json.dumps(res, indent=2) if a.json else f"wrote {res['items']} items to {res['destination']}"
          + (f" ({res['chunks_resumed']} chunks were already there)" if res["chunks_resumed"] else ""))
    return 0


def cmd_compact(a) -> int:
    from . import store
    from .reader import Reader
    src, dest = Path(a.src), Path(a.dest)
    if dest.exists() and any(dest.iterdir()):
        raise LmdbkitError(f"{dest} exists and is not empty; give a new path for the compacted copy")
    with Reader(src) as r:
        if not r.meta.get("complete"):
            raise LmdbkitError(f"{src} is not marked complete (a writer may still be running); finish it first")
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        try:
            r._handle().env.copy(str(dest), compact=True)
            if (src / store.METADATA_JSON).exists():
                shutil.copy2(src / store.METADATA_JSON, dest / store.METADATA_JSON)
        except (lmdb.Error, OSError) as exc:
            # never leave a partial copy that looks like a database
            if created:
                shutil.rmtree(dest)
            else:
                for q in dest.iterdir():
                    q.unlink()
            free = shutil.disk_usage(dest.parent if created else dest).free
            if free < store.disk_usage(src) or isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise DiskFullError(f"disk full at {dest}: the compacted copy did not fit ({exc}); the partial copy "
                                    f"was removed and {src} is untouched. Free space, then run compact again") from exc
            raise LmdbkitError(f"cannot write the compacted copy to {dest} ({exc}); the partial copy was removed "
                               f"and {src} is untouched") from exc
    before, after = store.disk_usage(src), store.disk_usage(dest)
    print(f"compacted {src} ({before / 2**20:.1f} MiB) into {dest} ({after / 2**20:.1f} MiB)")
    return 0


def _parse_value(text: str):
    try:
        v = json.loads(text)
        if isinstance(v, (int, bool, str)):
            return v
    except ValueError:
        pass
    return text


def cmd_query(a) -> int:
    from .reader import MultiReader
    conditions = {}
    for c in a.conditions:
        if "=" not in c:
            raise LmdbkitError(f"condition {c!r}: write field=value, e.g. label=3 or label_name=dog")
        k, v = c.split("=", 1)
        conditions[k] = _parse_value(v)
    with MultiReader(a.path) as r:  # a database, a folder of them (a split folder's shards) or a glob
        idx = r.query(**conditions)
        shown = idx[: a.limit] if a.limit else idx
        rows = [{"index": i, "key": r.key_of(i)} for i in shown]
        if len(r.paths) > 1:
            for row in rows:
                row["database"] = str(r.locate(row["index"])[0].path)
        existing = {} if idx else {f: [v for v, _ in r.value_counts(f)] for f in conditions}
    if a.json:
        print(json.dumps({"count": len(idx), "items": rows, **({"values": existing} if existing else {})}, indent=2,
                         default=str))
        return 0
    print(f"{len(idx)} items match {conditions}")
    for row in rows:
        print(f"{row['index']:>10}  {row['key']}" + (f"  ({row['database']})" if "database" in row else ""))
    if len(shown) < len(idx):
        print(f"... {len(idx) - len(shown)} more (--limit)")
    for f, values in existing.items():  # no match: what would have matched
        listed = ", ".join(repr(v) for v in values[:30]) + (f", ... ({len(values)} in all)" if len(values) > 30 else "")
        print(f"values of {f}: {listed}")
    return 0


def cmd_index(a) -> int:
    from . import store
    from .index import build_index
    for p in store.resolve_paths(a.path):  # a database, a folder of them or a glob: each gets the index
        n = build_index(p, a.field, progress=True)
        print(f"indexed {a.field!r} of {n} items in {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lmdbkit", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Inspect, check, convert and measure lmdbkit databases "
                                             "(precomputed ML features in LMDB).", epilog=EPILOG)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="count, size on disk, schema, STFT config, indexes, complete flag")
    p.add_argument("path", help="a database, a folder of databases or a glob")
    p.add_argument("--allow-pickle", action="store_true", help="also describe legacy pickle databases")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("verify", help="decode every item, check checksums, count, keys and indexes "
                       "(exit 0: clean, 1: damage found, 2: usage error)")
    p.add_argument("path", help="a database, a folder of databases or a glob")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_verify)

    from .convert import FORMATS
    p = sub.add_parser("convert", help=f"convert from another format ({', '.join(FORMATS)}) to an lmdbkit database")
    p.add_argument("format", choices=FORMATS, help="pt: folder of per-batch .pt files; zarr: a Zarr group (v2/v3); "
                   "hdf5: an HDF5 file; numpy: folder of .npy or an .npz; legacy: pickle-in-LMDB")
    p.add_argument("src", help="what to convert: a folder, file or legacy database, per FORMAT")
    p.add_argument("dest", help="the new database (a <name>.lmdb folder)")
    p.add_argument("--index-fields", nargs="*", default=[], help="fields to index (e.g. label category)")
    p.add_argument("--mode", default="append", choices=("append", "overwrite", "create"),
                   help="append (default) also resumes an interrupted conversion")
    p.add_argument("--allow-pickle", action="store_true", help="legacy and pickled .pt sources only: trust the file")
    p.add_argument("--field", default="array", help="numpy .npy folders: the field name of each array")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("compact", help="write a compacted copy (free pages dropped)")
    p.add_argument("src", help="one database (a <name>.lmdb folder), marked complete")
    p.add_argument("dest", help="a new, empty path for the copy")
    p.set_defaults(fn=cmd_compact)

    p = sub.add_parser("query", help="items whose indexed fields equal the given values (none: the values there are)")
    p.add_argument("path", help="a database, a folder of databases (e.g. a split's shards) or a glob")
    p.add_argument("conditions", nargs="+", metavar="FIELD=VALUE", help="e.g. label=3 category=A (values as JSON or text)")
    p.add_argument("--limit", type=int, default=20, help="items to list (0: all; default 20)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_query)

    p = sub.add_parser("index", help="build a secondary index on a field of existing databases")
    p.add_argument("path", help="a database, a folder of databases or a glob (each is indexed)")
    p.add_argument("field", help="the field, e.g. label or metadata.category")
    p.set_defaults(fn=cmd_index)

    p = sub.add_parser("bench", help="benchmarks (python -m lmdbkit.bench); arguments pass through",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=lambda a: __import__("lmdbkit.bench", fromlist=["main"]).main(a.args))

    for name, what in (("precompute", "audio folder -> train/val/test databases of spectrograms"),
                       ("train", "train a small CNN from the databases (the smoke test)")):
        p = sub.add_parser(name, help=f"{what} (python -m lmdbkit.{name}); see lmdbkit {name} --help",
                           add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("demo", help="run the notebooks on the embedded demo corpus (as `make demo`)")
    p.add_argument("--runs", default="runs/demo", help="folder for the executed notebooks (default runs/demo)")
    p.set_defaults(fn=lambda a: __import__("lmdbkit.notebooks", fromlist=["main"]).main(["demo", "--runs", a.runs]))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["bench"], ["precompute"], ["train"]):  # their own parsers take every argument, --help too
        import importlib
        return importlib.import_module(f"lmdbkit.{argv[0]}").main(argv[1:])
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (DamagedDatabaseError, CorruptItemError) as exc:  # damage found: as verify's exit status
        print(f"lmdbkit {a.command}: error: {exc}", file=sys.stderr)
        return 1
    except (LmdbkitError, FileNotFoundError, PermissionError) as exc:
        print(f"lmdbkit {a.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmdbkit {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
