"""The benchmark's verdict on itself: the ratios its targets are stated in, the targets (each measured value
against what it needs), and the tables and closing summary that report them (``lmdbkit.bench`` re-exports
them). Computed from the Results of one run; every section's own ratios (cold reads, the peers) join in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bench import Result


def ratios(results: list[Result]) -> dict[str, float]:
    """The ratios the targets are stated in, computed from results of one run."""
    from .bench import ITEM_KINDS
    v = {(r.measure, r.kind, r.method, r.extra.get("num_workers")): r.value for r in results}

    def get(measure, kind, method, nw=None):
        return v.get((measure, kind, method, nw))
    out = {}
    for kind in ITEM_KINDS:
        for order in ("random", "sequential"):
            m = f"read_{order}"
            lk = get(m, kind, "lmdbkit")
            for base in ("pickle_lmdb", "bare_txn_get", "memcpy", "pt_batches"):
                b = get(m, kind, base)
                if lk and b:
                    out[f"{m}/{kind}: lmdbkit / {base}"] = lk / b
        for way in ("lmdbkit", "lmdbkit_prebatch"):
            lk = get("read_batched", kind, way)
            for base in ("lmdbkit_singles", "bare_txn_get"):
                b = get("read_batched", kind, base)
                if lk and b:
                    out[f"read_batched/{kind}: {way} / {base}"] = lk / b
        w = get("write", kind, "lmdbkit")
        for base in ("pickle_lmdb", "raw_put", "pt_batches"):
            if w and get("write", kind, base):
                out[f"write/{kind}: lmdbkit / {base}"] = w / get("write", kind, base)
        if get("disk", kind, "lmdbkit"):
            out[f"disk/{kind}: lmdbkit bytes / payload"] = get("disk", kind, "lmdbkit")
        for nw in (0, 1, 2, 4, 8):
            a, b = get("dataloader", kind, "lmdbkit", nw), get("dataloader", kind, "pickle_lmdb", nw)
            if a and b:
                out[f"dataloader/{kind}/workers={nw}: lmdbkit / pickle_lmdb"] = a / b
            c = get("dataloader", kind, "lmdbkit_plain", nw)
            if c and b:
                out[f"dataloader/{kind}/workers={nw}: lmdbkit_plain / pickle_lmdb"] = c / b
            if c and a:
                out[f"dataloader/{kind}/workers={nw}: lmdbkit_plain / lmdbkit"] = c / a
    opens = sorted((int(r.kind), r.value) for r in results if r.measure == "open" and r.method == "lmdbkit")
    if opens:
        upto = [ms for n, ms in opens if n <= 100_000] or [opens[0][1]]
        out["open: lmdbkit slowest / fastest, 1k-100k items"] = max(upto) / min(upto)
        if opens[-1][0] > 100_000:
            out[f"open: lmdbkit {opens[-1][0]} items / {opens[0][0]} items"] = opens[-1][1] / opens[0][1]
        pt = {int(r.kind): r.value for r in results if r.measure == "open" and r.method == "pt_batches"}
        for n, ms in opens:
            if n in pt:
                out[f"open/{n}: pt_batches / lmdbkit"] = pt[n] / ms
    from . import bench_cold, bench_peers
    out.update(bench_cold.ratios(results))
    out.update(bench_peers.ratios(results))
    return out


TARGETS = [
    # (name, ratio key, comparison, threshold)
    ("random read ~256 KiB: >= 3x pickle-in-LMDB", "read_random/stft256k: lmdbkit / pickle_lmdb", ">=", 3.0),
    ("random read ~256 KiB: >= 0.85x memory copy", "read_random/stft256k: lmdbkit / memcpy", ">=", 0.85),
    ("random read ~1 KiB: >= 10x pickle-in-LMDB", "read_random/small1k: lmdbkit / pickle_lmdb", ">=", 10.0),
    ("random read ~1 KiB: >= 0.25x bare txn.get", "read_random/small1k: lmdbkit / bare_txn_get", ">=", 0.25),
    ("batched read, 64 x ~256 KiB: >= 1.0x the same items read one by one",
     "read_batched/stft256k: lmdbkit / lmdbkit_singles", ">=", 1.0),
    ("batched read, 256 x ~1 KiB: >= 1.0x the same items read one by one",
     "read_batched/small1k: lmdbkit / lmdbkit_singles", ">=", 1.0),
    ("batched read, 256 x ~1 KiB: >= 0.3x bare txn.get", "read_batched/small1k: lmdbkit / bare_txn_get", ">=", 0.3),
    ("open + len: flat (within 2x) from 1k to 100k items", "open: lmdbkit slowest / fastest, 1k-100k items", "<=", 2.0),
    ("DataLoader, 2 workers, ~256 KiB: >= 2x pickle-in-LMDB",
     "dataloader/stft256k/workers=2: lmdbkit / pickle_lmdb", ">=", 2.0),
    ("DataLoader, 2 workers, ~1 KiB: >= 2x pickle-in-LMDB", "dataloader/small1k/workers=2: lmdbkit / pickle_lmdb", ">=", 2.0),
    ("plain DataLoader(LMDBDataset), 2 workers, ~256 KiB: >= 0.95x create_data_loader",
     "dataloader/stft256k/workers=2: lmdbkit_plain / lmdbkit", ">=", 0.95),
    ("plain DataLoader(LMDBDataset), 2 workers, ~1 KiB: >= 0.95x create_data_loader",
     "dataloader/small1k/workers=2: lmdbkit_plain / lmdbkit", ">=", 0.95),
    ("write ~256 KiB: >= 0.8x raw txn.put", "write/stft256k: lmdbkit / raw_put", ">=", 0.8),
    ("write ~1 KiB: >= 0.8x raw txn.put", "write/small1k: lmdbkit / raw_put", ">=", 0.8),
    ("disk ~256 KiB: <= 1.05x payload", "disk/stft256k: lmdbkit bytes / payload", "<=", 1.05),
    ("disk ~1 KiB: <= 1.10x payload", "disk/small1k: lmdbkit bytes / payload", "<=", 1.10),
]


def targets(results: list[Result]) -> list[dict]:
    """Each target of the benchmark issue, with the measured value and whether it holds."""
    from . import bench_cold, bench_peers
    r = ratios(results)
    out = []
    for name, key, op, thr in TARGETS + bench_cold.TARGETS:
        val = r.get(key)
        holds = None if val is None else (val >= thr if op == ">=" else val <= thr)
        out.append({"target": name, "ratio": key, "value": val, "threshold": f"{op} {thr}", "holds": holds})
    opens = [x for x in results if x.measure == "open" and x.method == "lmdbkit"]
    if opens:
        worst = max(x.value for x in opens)
        out.append({"target": "open + len: under 10 ms", "ratio": "open ms (largest)", "value": worst,
                    "threshold": "<= 10", "holds": worst <= 10})
    if any(x.measure.startswith("peers_") for x in results):
        out += bench_peers.targets(results)
    return out


def table(results: list[Result]) -> str:
    rows = [f"{'measure':<16}{'items':<10}{'method':<14}{'workers':>8}{'value':>14}  unit"]
    for r in results:
        nw = r.extra.get("num_workers", "")
        rows.append(f"{r.measure:<16}{r.kind:<10}{r.method:<14}{nw!s:>8}{r.value:>14.4g}  {r.unit}")
    return "\n".join(rows)


def shown(t: dict) -> str:
    """A target's measured value in three significant digits, or more where three would print the threshold
    itself (1.996 missing ">= 2" is shown as 1.996, not 2)."""
    v = t["value"]
    if v is None:
        return "-"
    thr = float(t["threshold"].split()[-1])
    for digits in (3, 4, 5, 6):
        text = f"{v:.{digits}g}"
        if float(text) != thr or v == thr:
            return text
    return text


def targets_table(tg: list[dict]) -> str:
    rows = []
    for t in tg:
        mark = {True: "holds", False: "MISSED", None: "not measured"}[t["holds"]]
        val = shown(t)
        rows.append(f"{mark:<13}{val:>9} {t['threshold']:<8} {t['target']}")
    return "\n".join(rows)


def report(summary: dict):
    """The targets as a table (target, measured ratio, what it needs, holds or missed): the benchmark's report."""
    from .verdict import Table
    mark = {True: "holds", False: "**missed**", None: "not measured"}
    rows = [[t["target"], shown(t), t["threshold"], mark[t["holds"]]]
            for t in summary["targets"]]
    return Table(["target", "measured", "needs", ""], rows, title="Targets: ratios measured in this run")


def verdict(summary: dict, *, require_targets: bool = False):
    """The benchmark's closing summary (see lmdbkit.verdict): how many targets hold, the headline ratios, and each
    missed target in one line. Missed targets fail the run only with ``require_targets``."""
    from .verdict import Verdict
    tg = summary["targets"]
    held = [t for t in tg if t["holds"]]
    missed = [t for t in tg if t["holds"] is False]
    r = summary["ratios"]
    facts = [("targets", f"{len(held)} of {sum(t['holds'] is not None for t in tg)} hold on this machine")]
    for name, key in (("random reads, ~256 KiB", "read_random/stft256k: lmdbkit / pickle_lmdb"),
                      ("random reads, ~1 KiB", "read_random/small1k: lmdbkit / pickle_lmdb"),
                      ("DataLoader, 2 workers, ~256 KiB", "dataloader/stft256k/workers=2: lmdbkit_plain / pickle_lmdb"),
                      ("DataLoader, 2 workers, ~1 KiB", "dataloader/small1k/workers=2: lmdbkit_plain / pickle_lmdb")):
        if r.get(key):
            facts.append((name, f"{r[key]:.2f}x pickle-in-LMDB"))
    cold = r.get("cold_single/stft256k: lmdbkit / pread_1thread")
    if cold:
        facts.append(("cold single reads", f"{cold:.2f}x what the disk gives (pread of the same bytes)"))
    problems = [f"{t['target']} (measured {shown(t)})" for t in missed]
    return Verdict("benchmark", facts, problems, strict=require_targets, missed=f"{len(missed)} TARGETS MISSED")
