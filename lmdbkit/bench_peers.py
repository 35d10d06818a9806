"""lmdbkit against the peers a user would pick instead, on the same items in one run (``lmdbkit bench --peers``).

The peers and how each is used are in ``lmdbkit.peers``. Measured per system and item kind: writes as
shipped (lmdbkit: its default, an fsync per commit; the peers: no fsync) and at equal durability (every
system's files synced once at the end), disk bytes per payload byte, open + len, warm random single reads
and a shuffled DataLoader epoch (plain for the peers; lmdbkit plain and ``create_data_loader``). The peers
not installed are listed and skipped.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import store
from .bench import Result, make_samples, take_turns, time_reads, warm_page_cache
from .peers import PEERS, Lmdbkit, Peer


def fsync_tree(path: Path) -> float:
    """Seconds to fsync every file under path and the folders themselves (what 'durable' means for a peer)."""
    t0 = time.perf_counter()
    paths = [Path(path)] if Path(path).is_file() else [Path(path), *Path(path).rglob("*")]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


# -- the measurements --------------------------------------------------------------------------------

def _epoch_rate(loader) -> float:
    """Items/s of one shuffled epoch, after an untimed one that starts the workers and maps their pages."""
    for _ in loader:
        pass
    items, t0 = 0, time.perf_counter()
    for batch in loader:
        items += len(batch["label"])
    return items / (time.perf_counter() - t0)


def _close(obj) -> None:
    for o in (obj, getattr(obj, "r", None), getattr(obj, "f", None)):
        if o is not None and hasattr(o, "close"):
            try:
                o.close()
            except Exception:
                pass


def bench_peers(kind: str, n: int, workdir: Path, *, peers=None, reads: int = 2000, min_seconds: float = 0.3,
                rounds: int = 3, write_rounds: int = 2, loader_rounds: int = 2, num_workers: int | None = 2,
                batch_size: int = 64, progress=None) -> list[Result]:
    """Write, open, read and load n items of one kind (bench.ITEM_KINDS) with lmdbkit and each available peer.

    Returns Results (measures prefixed ``peers_``) with method = system name: ``write`` (as shipped),
    ``write_synced`` (all files synced once at the end; lmdbkit with durable=False, whose close syncs), ``disk``
    (x payload), ``open`` (ms, the best of 5 to 50), ``read_random`` (items/s) and ``dataloader`` (items/s; lmdbkit's
    plain loader as ``lmdbkit_plain``, ``create_data_loader`` as ``lmdbkit``; num_workers=None skips it).
    Systems take turns over ``write_rounds``, ``rounds`` and ``loader_rounds`` and keep their best. Every
    system must read back what was written (item count and one item compared), else AssertionError."""
    from .bench import ITEM_KINDS
    spec = ITEM_KINDS[kind]
    field, dtype = spec["field"], np.dtype(spec["dtype"])
    systems: dict[str, Peer] = {"lmdbkit": Lmdbkit(),
                                **{p: PEERS[p] for p in (peers or PEERS) if PEERS[p].available() is None}}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    samples = make_samples(kind, n, as_torch=False)
    payload = sum(s[field].nbytes for s in samples)
    res: list[Result] = []

    def step(what):
        if progress is not None:
            progress.set_postfix_str(f"peers, {kind}: {what}")

    paths = {name: workdir / f"{kind}-{name}" for name in systems}
    try:
        res += _writes(kind, systems, paths, samples, field, write_rounds, step)
        for name in systems:
            used = store.disk_usage(paths[name])
            res.append(Result("peers_disk", kind, name, used / payload, "x payload", {"bytes": used, "payload": payload}))
        res += _reads(kind, systems, paths, samples, field, dtype, reads, min_seconds, rounds, step)
        if num_workers is not None:
            res += _loaders(kind, systems, paths, field, dtype, batch_size, num_workers, loader_rounds, step)
    finally:
        for p in paths.values():
            shutil.rmtree(p, ignore_errors=True)
    return res


def _writes(kind, systems, paths, samples, field, rounds, step) -> list[Result]:
    """Each system's writes as shipped and synced once at the end, every one after ``os.sync()`` so that no
    system pays for the writeback of the one before; systems take turns over rounds."""
    n = len(samples)

    def timed(name, **kw) -> float:
        shutil.rmtree(paths[name], ignore_errors=True)
        os.sync()
        t0 = time.perf_counter()
        systems[name].write(paths[name], samples, field, **kw)
        return time.perf_counter() - t0

    def task(name):
        if name == "lmdbkit":  # its default fsyncs every commit; durable=False syncs once, at close
            return lambda: {("peers_write", name): n / timed(name, durable=True),
                            ("peers_write_synced", name): n / timed(name, durable=False)}

        def peer():
            wrote = timed(name)
            return {("peers_write", name): n / wrote, ("peers_write_synced", name): n / (wrote + fsync_tree(paths[name]))}
        return peer
    best = take_turns(rounds, {name: task(name) for name in systems}, lambda name: step(f"write {name}"))
    fsync = {"peers_write_synced": lambda name: "once, at the end",
             "peers_write": lambda name: "per commit" if name == "lmdbkit" else "none"}
    return [Result(measure, kind, name, ips, "items/s", {"fsync": fsync[measure](name), "rounds": rounds})
            for (measure, name), ips in best.items()]


# open + len is timed OPENS times; a system whose best so far is under RACE_S (lmdbkit, lhotse, h5py: 0.2-0.5
# ms) up to RACE_OPENS times while they take under a second in all: the best of five was a race that noise
# decided (lmdbkit against lhotse's 0.23 ms flipped between two runs). Not every system: mosaic's
# StreamingDataset keeps files open after it is dropped, and 50 opens of it ran out of file descriptors.
OPENS, RACE_OPENS, RACE_S = 5, 50, 0.5e-3


def _reads(kind, systems, paths, samples, field, dtype, reads, min_seconds, rounds, step) -> list[Result]:
    """Open + len (the best of OPENS attempts, or of up to RACE_OPENS, each reader closed before the next) and warm random reads of every system, after
    checking that it holds the items that were written."""
    n, res, readers = len(samples), [], {}
    for name, system in systems.items():
        step(f"open {name}")
        warm_page_cache(paths[name])
        times = []
        while len(times) < OPENS or (min(times) < RACE_S and len(times) < RACE_OPENS and sum(times) < 1.0):
            _close(readers.pop(name, None))  # the last attempt's reader
            t0 = time.perf_counter()
            r = readers[name] = system.reader(paths[name], field, dtype)
            got = len(r)
            times.append(time.perf_counter() - t0)
            if got != n:
                raise AssertionError(f"{name} holds {got} items, {n} were written")
        res.append(Result("peers_open", kind, name, min(times) * 1e3, "ms"))
        item = r[7]
        if not np.array_equal(np.asarray(item[field]), samples[7][field]) or int(item["label"]) != samples[7]["label"]:
            raise AssertionError(f"{name} read back another item 7 than was written")
    order = np.random.default_rng(1).integers(0, n, reads).tolist()
    try:
        best = take_turns(rounds, {name: (lambda r=r, name=name: {name: time_reads(r.__getitem__, order,
                                                                                    min_seconds=min_seconds)})
                                   for name, r in readers.items()}, lambda name: step(f"random reads {name}"))
    finally:
        for r in readers.values():
            _close(r)
    return res + [Result("peers_read_random", kind, name, ips, "items/s", {"rounds": rounds})
                  for name, ips in best.items()]


def _loaders(kind, systems, paths, field, dtype, batch_size, num_workers, rounds, step) -> list[Result]:
    """Items/s of a shuffled epoch through each system's loader (lmdbkit: create_data_loader as ``lmdbkit`` and
    the plain DataLoader as ``lmdbkit_plain``); loaders take turns, a short epoch being at the mercy of the
    machine."""
    def epoch(make):
        def task():
            loader = make()
            try:
                return _epoch_rate(loader)
            finally:
                _close(getattr(loader, "dataset", None))
        return task
    makers = {"lmdbkit": lambda: systems["lmdbkit"].prebatched(paths["lmdbkit"], batch_size=batch_size,
                                                                num_workers=num_workers)}
    for name, system in systems.items():
        makers["lmdbkit_plain" if name == "lmdbkit" else name] = functools.partial(
            system.loader, paths[name], field, dtype, batch_size=batch_size, num_workers=num_workers)
    best = take_turns(rounds, {name: (lambda t=epoch(make), name=name: {name: t()}) for name, make in makers.items()},
                      lambda name: step(f"DataLoader {name}"))
    return [Result("peers_dataloader", kind, name, ips, "items/s",
                   {"num_workers": num_workers, "batch_size": batch_size, "rounds": rounds})
            for name, ips in best.items()]


# -- ratios and targets ------------------------------------------------------------------------------

# measure: (what it is called, True if more is better)
COLUMNS = {"peers_write_synced": ("writes, synced once at the end", True), "peers_write": ("writes as shipped", True),
           "peers_disk": ("disk x payload", False), "peers_open": ("open + len (ms)", False),
           "peers_read_random": ("warm random reads", True), "peers_dataloader": ("DataLoader epoch", True)}
LMDBKIT = ("lmdbkit", "lmdbkit_plain")


def best_peer(results: list[Result], measure: str, kind: str) -> tuple[str, float] | None:
    """The best peer (not lmdbkit) of one measure and kind: (name, value), or None if no peer ran."""
    more = COLUMNS[measure][1]
    vals = [(r.method, r.value) for r in results if r.measure == measure and r.kind == kind and r.method not in LMDBKIT]
    return (max if more else min)(vals, key=lambda t: t[1]) if vals else None


def ratios(results: list[Result]) -> dict[str, float]:
    """lmdbkit ÷ the best peer of each column (for disk and open, the best peer ÷ lmdbkit: above 1 is ahead)."""
    out = {}
    kinds = sorted({r.kind for r in results if r.measure.startswith("peers_")})
    v = {(r.measure, r.kind, r.method): r.value for r in results}
    for kind in kinds:
        for measure, (_, more) in COLUMNS.items():
            best = best_peer(results, measure, kind)
            if best is None:
                continue
            for method in LMDBKIT:
                lk = v.get((measure, kind, method))
                if lk:
                    out[f"{measure}/{kind}: {method} / best peer ({best[0]})"] = lk / best[1] if more else best[1] / lk
        best = best_peer(results, "peers_write_synced", kind)
        lk = v.get(("peers_write", kind, "lmdbkit"))
        if best and lk:
            out[_durable_key(results, kind)] = lk / best[1]
    return out


def _key(results, measure, kind, method="lmdbkit"):
    best = best_peer(results, measure, kind)
    return None if best is None else f"{measure}/{kind}: {method} / best peer ({best[0]})"


def _durable_key(results, kind) -> str | None:
    """The ratio key of lmdbkit's default (durable) write against the best peer synced once at the end."""
    best = best_peer(results, "peers_write_synced", kind)
    return None if best is None else f"peers_write/{kind}: lmdbkit durable (fsync per commit) / best peer synced ({best[0]})"


def targets(results: list[Result]) -> list[dict]:
    """The peer targets of the benchmark issue, each with its measured ratio and whether it holds."""
    r = ratios(results)
    rows = []
    for kind, what in (("stft256k", "~256 KiB"), ("small1k", "~1 KiB")):
        specs = [(f"DataLoader, 2 workers, {what}: create_data_loader >= 1.1x the best peer", "peers_dataloader",
                  "lmdbkit", 1.1),
                 (f"DataLoader, 2 workers, {what}: plain DataLoader(LMDBDataset) >= 1.1x the best peer",
                  "peers_dataloader", "lmdbkit_plain", 1.1),
                 (f"warm random reads, {what}: ahead of every peer", "peers_read_random", "lmdbkit", 1.0),
                 (f"open + len, {what}: fastest", "peers_open", "lmdbkit", 1.0)]
        if kind == "stft256k":
            specs.append((f"writes, {what}, synced once at the end: >= 1.0x the best peer", "peers_write_synced",
                          "lmdbkit", 1.0))
        for name, measure, method, thr in specs:
            key = _key(results, measure, kind, method)
            val = r.get(key) if key else None
            rows.append({"target": name, "ratio": key, "value": val, "threshold": f">= {thr}",
                         "holds": None if val is None else val >= thr})
        if kind == "stft256k":
            key = _durable_key(results, kind)
            val = r.get(key) if key else None
            rows.append({"target": f"writes, {what}, lmdbkit's default (fsync per commit): >= 0.8x the best peer "
                                   "synced once", "ratio": key, "value": val, "threshold": ">= 0.8",
                         "holds": None if val is None else val >= 0.8})
    return rows


def table(results: list[Result], kind: str):
    """A verdict.Table of one item kind: a row per system, a column per measure, the best of each column in bold."""
    from .plot_bench import KIND_LABELS
    from .verdict import Table
    systems = list(dict.fromkeys(r.method for r in results if r.kind == kind and r.measure.startswith("peers_")))
    v = {(r.measure, r.method): r.value for r in results if r.kind == kind}
    rows = []
    for s in systems:
        row = [PEERS[s].label if s in PEERS else ("lmdbkit, plain DataLoader" if s == "lmdbkit_plain" else
                                                  "lmdbkit (create_data_loader for the DataLoader)")]
        for m, (_, more) in COLUMNS.items():
            x = v.get((m, s))
            col = [y for (mm, _), y in v.items() if mm == m]
            cell = "" if x is None else (f"{x:.3g}" if m in ("peers_disk", "peers_open") else f"{x:,.0f}")
            row.append(f"**{cell}**" if x is not None and x == (max if more else min)(col) else cell)
        rows.append(row)
    return Table(["system", *(COLUMNS[m][0] for m in COLUMNS)], rows,
                 title=f"lmdbkit and the peers, {KIND_LABELS.get(kind, kind)} (items/s unless named; best in bold)")


def summary(results: list[Result], asked) -> dict:
    """What the run says about the peers: which ran, which were asked for but are not installed (and why)."""
    ran = sorted({r.method for r in results if r.measure.startswith("peers_")} - set(LMDBKIT))
    missing = {p: PEERS[p].available() for p in asked if p not in ran}
    return {"ran": ran, "not_installed": missing,
            "kinds": sorted({r.kind for r in results if r.measure.startswith("peers_")}, reverse=True)}


def peer_tables(summary_: dict) -> list:
    """The peer tables of a benchmark summary, one per item kind (verdict.Table: Markdown in JupyterLab)."""
    results = [Result(**r) for r in summary_["results"]]
    return [table(results, kind) for kind in summary_["peers"]["kinds"]]


def text_tables(summary_: dict) -> str:
    """The peer tables as plain text (for the terminal), with the peers that did not run and why."""
    out = [str(t) for t in peer_tables(summary_)]
    out += [f"not run: {p} ({why})" for p, why in summary_["peers"]["not_installed"].items()]
    return "\n\n".join(out)
