"""Benchmarks: lmdbkit against the older ways and against the limits, measured in one run on the same items.

Every figure is reported with its ratio to a baseline measured in the same run (absolute numbers vary
between machines; ratios travel). Baselines:

- pickle-in-LMDB, the older way: ``str(idx)`` keys in the main database, ``pickle.dumps`` of sample dicts
  holding CPU tensors, one transaction per read;
- per-batch ``.pt`` files (lists of 64 sample dicts written with ``torch.save``), whose item count is found
  by loading every file at start-up, and whose random reads load a whole batch file for one item;
- the limits: bare ``txn.get`` of the same keys (bytes out of the map, nothing decoded) and a plain memory
  copy of the same byte counts from a buffer larger than the CPU caches.

The ratios, the targets and their report are ``lmdbkit.bench_targets`` (re-exported here); the sections:
``bench_cold`` (cold reads), ``bench_kinds`` (feature kinds), ``bench_peers`` (the peers).

Run ``python -m lmdbkit.bench --help``; tests call the functions on tiny sizes and never assert timings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import lmdb
import numpy as np

from . import codec, store
from .bench_targets import TARGETS, ratios, report, shown, table, targets, targets_table, verdict  # noqa: F401
from .reader import Reader
from .writer import Writer

KIB = 1024
# item shapes: ~256 KiB complex64 STFT (257 bins x 128 frames) and ~1 KiB float32 features
ITEM_KINDS = {
    "stft256k": {"field": "stft", "shape": (257, 128), "dtype": "complex64"},
    "small1k": {"field": "x", "shape": (256,), "dtype": "float32"},
}
PT_BATCH = 64
# items per batch of the batched reads: a DataLoader batch of STFT items; 256 small items
READ_BATCH = {"stft256k": 64, "small1k": 256}


def make_samples(kind: str, n: int, *, seed: int = 0, as_torch: bool = True) -> list[dict]:
    """n deterministic samples of one item kind (see ITEM_KINDS), tensors by default."""
    if kind not in ITEM_KINDS:
        raise ValueError(f"item kind {kind!r} is unsupported. Supported kinds are {sorted(ITEM_KINDS)}")
    spec = ITEM_KINDS[kind]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = rng.standard_normal(int(np.prod(spec["shape"])) * (2 if spec["dtype"].startswith("complex") else 1),
                                dtype=np.float32)
        a = a.view(np.complex64) if spec["dtype"] == "complex64" else a
        a = a.reshape(spec["shape"])
        if as_torch:
            import torch
            a = torch.from_numpy(a)
        out.append({spec["field"]: a, "label": i % 10})
    return out


# -- writers: lmdbkit and the baselines -------------------------------------------------------------

def write_lmdbkit(path: Path, samples: list[dict], **kw) -> float:
    """Seconds to write samples with lmdbkit.Writer (default options unless given)."""
    t0 = time.perf_counter()
    with Writer(path, mode="overwrite", **kw) as w:
        for i, s in enumerate(samples):
            w.append(s, key=str(i))
    return time.perf_counter() - t0


def _timed_puts(path: Path, nbytes: int, puts: Iterable[tuple[bytes, bytes]], *, append: bool,
                commit_every: int = 1000) -> float:
    """Seconds to txn.put every (key, value) into a fresh environment with a map big enough from the start,
    committing every ``commit_every`` items (lmdbkit's default cadence), synced at the end."""
    if path.exists():
        shutil.rmtree(path)
    # address space only (the file grows as written): pickled tensors and random-order puts take ~4x the payload
    env = lmdb.open(str(path), map_size=8 * nbytes + (256 << 20), readahead=False, meminit=False)
    t0 = time.perf_counter()
    txn = env.begin(write=True)
    for i, (k, v) in enumerate(puts):
        txn.put(k, v, append=append)
        if (i + 1) % commit_every == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.sync(True)
    dt = time.perf_counter() - t0
    env.close()
    return dt


def write_pickle_lmdb(path: Path, samples: list[dict]) -> float:
    """Seconds to write samples the older way: str(idx) keys, pickle.dumps of each dict, a big fixed map."""
    puts = ((str(i).encode(), pickle.dumps(s)) for i, s in enumerate(samples))
    return _timed_puts(path, sum(_payload_bytes(s) for s in samples),
                       itertools.chain(puts, [(b"__len__", str(len(samples)).encode())]), append=False)


def write_raw(path: Path, blobs: list[bytes]) -> float:
    """Seconds for raw txn.put of pre-encoded bytes (the write limit), same commit cadence as lmdbkit."""
    return _timed_puts(path, sum(map(len, blobs)), ((store.pack_index(i), b) for i, b in enumerate(blobs)),
                       append=True)


def write_pt_batches(path: Path, samples: list[dict], batch: int = PT_BATCH) -> float:
    """Seconds to write per-batch .pt files (lists of sample dicts), as older scripts do."""
    import torch
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    t0 = time.perf_counter()
    for b in range(0, len(samples), batch):
        torch.save(samples[b:b + batch], path / f"batch_{b // batch:06d}.pt")
    return time.perf_counter() - t0


def _payload_bytes(sample: dict) -> int:
    return sum(getattr(v, "nbytes", 0) for v in sample.values())


# -- readers ----------------------------------------------------------------------------------------

class PtBatches:
    """The older reader of per-batch .pt files: every file is loaded at start-up to count its items."""

    def __init__(self, path: Path):
        import torch
        self.files = sorted(Path(path).glob("*.pt"))
        self.counts = [len(torch.load(f, weights_only=False)) for f in self.files]
        self.offsets = np.cumsum([0] + self.counts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        import torch
        b = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return torch.load(self.files[b], weights_only=False)[i - int(self.offsets[b])]

    def close(self) -> None:
        pass


class BareGet:
    """The read limit inside LMDB: txn.get of the same items' encoded bytes, one per key (``write_raw``'s copy:
    a packed database holds several per value), bytes copied out, nothing decoded."""

    def __init__(self, path: Path):
        self.h = store.acquire(path, lock=False)  # shares the process's environment for this path
        self.env, self.db = self.h.env, self.h.db(store.ITEMS)  # write_raw's puts are in the main database

    def __getitem__(self, i: int):
        with self.env.begin() as txn:
            return txn.get(store.pack_index(i), db=self.db)

    def get_many(self, indices: list[int]) -> list:
        with self.env.begin() as txn:
            return [txn.get(store.pack_index(i), db=self.db) for i in indices]

    def close(self) -> None:
        store.release(self.h)


class MemcpyLimit:
    """The memory limit: copy the same byte counts into a fresh array from a buffer larger than the caches."""

    def __init__(self, nbytes_per_item: list[int], buffer_bytes: int = 512 << 20):
        self.sizes = nbytes_per_item
        self.src = np.ones(max(buffer_bytes, 4 * max(nbytes_per_item)), np.uint8)
        self.rng = np.random.default_rng(0)
        span = len(self.src) - max(nbytes_per_item)
        self.offsets = self.rng.integers(0, span, 4096) & ~63

    def __getitem__(self, i: int):
        n = self.sizes[i % len(self.sizes)]
        o = int(self.offsets[i % len(self.offsets)])
        dst = np.empty(n, np.uint8)
        dst[:] = self.src[o:o + n]
        return dst

    def close(self) -> None:
        self.src = None


def time_reads(get: Callable[[int], object], order: list[int], *, min_seconds: float = 0.3) -> float:
    """Items per second for reading ``order`` (repeated until at least min_seconds have passed)."""
    def one_pass():
        for i in order:
            get(i)
    return _rate(one_pass, len(order), min_seconds)


def time_batches(get_many: Callable[[list[int]], object], batches: list[list[int]], *,
                 min_seconds: float = 0.3) -> float:
    """Items per second for reading each batch of indices with one call (repeated until min_seconds passed)."""
    def one_pass():
        for b in batches:
            get_many(b)
    return _rate(one_pass, sum(map(len, batches)), min_seconds)


def _rate(one_pass: Callable[[], object], items: int, min_seconds: float) -> float:
    """Items per second of ``one_pass`` (reading ``items``), after one untimed pass: it maps every page the
    reads touch (first-touch faults are not reads)."""
    one_pass()
    done, t0 = 0, time.perf_counter()
    while True:
        one_pass()
        done += items
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return done / dt


def take_turns(rounds: int, tasks: dict[str, Callable[[], dict]], step: Callable[[str], object] = lambda _: None
               ) -> dict:
    """Run every task once a round, the tasks taking turns, and keep each figure's best (largest) value. A task
    returns {key: figure}. Background load on a shared machine then hits every method alike instead of
    whichever happened to run during it. ``step(name)`` is called before each task (for progress)."""
    best: dict = {}
    for _ in range(rounds):
        for name, task in tasks.items():
            step(name)
            for key, value in task().items():
                best[key] = max(best.get(key, 0.0), value)
    return best


def warm_page_cache(path: Path) -> None:
    """Read every file of a database once so that the reads below hit the page cache."""
    for p in ([path] if Path(path).is_file() else sorted(Path(path).rglob("*"))):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(16 << 20):
                    pass


# -- DataLoader, worker memory, cold reads ---------------------------------------------------------

class PickleLmdb:
    """The older reader (also its torch Dataset): str(idx) keys, pickle.loads per item, a transaction per
    read, the environment opened lazily in the process that reads (so DataLoader workers open their own)."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.env = None
        with lmdb.open(self.path, readonly=True, lock=False) as env, env.begin() as txn:
            self.n = int(txn.get(b"__len__"))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.env is None:
            self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
        with self.env.begin() as txn:
            return pickle.loads(txn.get(str(i).encode()))

    def __getstate__(self):
        return dict(self.__dict__, env=None)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


def _worker_memory(it) -> list[dict]:
    """USS and PSS (bytes) of each live worker process of a DataLoader iterator."""
    import psutil
    out = []
    for w in getattr(it, "_workers", []):
        try:
            m = psutil.Process(w.pid).memory_full_info()
            out.append({"pid": w.pid, "uss": m.uss, "pss": getattr(m, "pss", None), "rss": m.rss})
        except (psutil.Error, AttributeError):
            pass
    return out


def bench_dataloader(kind: str, paths: dict[str, Path], *, workers=(0, 1, 2, 4), batch_size: int = 64,
                     rounds: int = 3, min_seconds: float = 0.5) -> list[Result]:
    """Steady-state items/s through a shuffled DataLoader (collate included) for each worker count: lmdbkit's
    loader (create_data_loader) and a plain ``DataLoader(LMDBDataset(path))`` against pickle-in-LMDB's Dataset in
    a plain DataLoader with default collate, plus the USS/PSS of each worker at the end.

    For each worker count the three loaders are made together, each runs one untimed epoch (it starts the
    persistent workers and maps the pages each one touches), then they take turns over ``rounds``, each turn
    timing whole epochs until ``min_seconds`` have passed, and each keeps its best turn. A demo's epoch lasts a
    tenth of a second, so one epoch each, one loader after another, compared whatever the machine was doing
    at those moments."""
    import torch
    from torch.utils.data import DataLoader
    from .dataset import LMDBDataset, create_data_loader
    res = []

    def lmdbkit_loader(nw):  # lmdbkit's own loader (items go straight from the map into the batch tensors)
        return create_data_loader(paths["lmdbkit"], batch_size=batch_size, shuffle=True, num_workers=nw, seed=0)

    def plain_loader(nw):  # what a user writes first: torch's DataLoader over LMDBDataset, default collate
        return DataLoader(LMDBDataset(paths["lmdbkit"]), batch_size=batch_size, shuffle=True, num_workers=nw,
                          generator=torch.Generator().manual_seed(0), persistent_workers=nw > 0)

    def pickle_loader(nw):  # the older way: its Dataset, a plain DataLoader, default collate
        return DataLoader(PickleLmdb(paths["pickle_lmdb"]), batch_size=batch_size, shuffle=True,
                          num_workers=nw, generator=torch.Generator().manual_seed(0), persistent_workers=nw > 0)
    makers = {"lmdbkit": lmdbkit_loader, "lmdbkit_plain": plain_loader, "pickle_lmdb": pickle_loader}
    for nw in workers:
        loaders, mem = {}, {}
        try:
            for method, make in makers.items():
                loaders[method] = make(nw)
                for _ in iter(loaders[method]):  # the untimed epoch
                    pass

            def turn(method):
                def task():
                    items, t0 = 0, time.perf_counter()
                    while True:
                        it = iter(loaders[method])
                        for batch in it:
                            items += len(next(iter(batch.values())))
                        dt = time.perf_counter() - t0
                        if dt >= min_seconds:
                            mem[method] = _worker_memory(it) or mem.get(method, [])  # untimed
                            return {method: items / dt}
                return task
            best = take_turns(rounds, {method: turn(method) for method in makers})
        finally:
            for loader in loaders.values():
                if hasattr(loader.dataset, "close"):
                    loader.dataset.close()
            loaders.clear()
        for method, ips in best.items():
            m = mem.get(method)
            extra = {"workers_memory": m} if m else {}
            res.append(Result("dataloader", kind, method, ips, "items/s",
                              dict(extra, num_workers=nw, rounds=rounds, min_seconds=min_seconds)))
            if m:
                res.append(Result("worker_uss", kind, method, max(x["uss"] for x in m) / 2**20, "MiB",
                                  {"num_workers": nw}))
                if m[0]["pss"] is not None:
                    res.append(Result("worker_pss", kind, method, max(x["pss"] for x in m) / 2**20, "MiB",
                                      {"num_workers": nw}))
    return res


def drop_page_cache(path: Path) -> bool:
    """Ask the kernel to drop a database's files from the page cache (posix_fadvise DONTNEED).

    Only pages no process maps can go, so close every reader of the path first. Returns False where the
    call is not available. Root's ``echo 1 > /proc/sys/vm/drop_caches`` is the stronger tool, not used here.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in Path(path).rglob("*") if Path(path).is_dir() else [Path(path)]:
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def benchmark_lmdb_performance(db_path: str | os.PathLike, num_samples: int = 1000, *, seed: int = 0) -> dict:
    """Average random and sequential access time of a database, in ms per sample, and samples per second."""
    r = Reader(db_path)
    n = len(r)
    if n == 0:
        raise ValueError(f"{db_path} is empty; nothing to measure")
    rng = np.random.default_rng(seed)
    random_order = rng.integers(0, n, num_samples).tolist()
    seq = [i % n for i in range(num_samples)]
    out = {"path": str(db_path), "items": n, "num_samples": num_samples}
    for name, order in (("random", random_order), ("sequential", seq)):
        for i in order[:min(64, len(order))]:
            r[i]
        t0 = time.perf_counter()
        for i in order:
            r[i]
        dt = time.perf_counter() - t0
        out[f"{name}_ms_per_sample"] = dt / len(order) * 1e3
        out[f"{name}_samples_per_second"] = len(order) / dt
        # the keys the older storage class's benchmark returned, so code written against it runs
        out[f"avg_{name}_access_time_ms"] = out[f"{name}_ms_per_sample"]
        out[f"samples_per_second_{name}"] = out[f"{name}_samples_per_second"]
    r.close()
    return out


# -- the suites -------------------------------------------------------------------------------------

@dataclass
class Result:
    measure: str
    kind: str
    method: str
    value: float
    unit: str
    extra: dict = field(default_factory=dict)


def bench_paths(kind: str, workdir: Path) -> dict[str, Path]:
    """Where bench_kind writes each method's copy of the items."""
    workdir = Path(workdir)
    return {"lmdbkit": workdir / f"{kind}.lmdb", "pickle_lmdb": workdir / f"{kind}-pickle.lmdb",
            "raw_put": workdir / f"{kind}-raw.lmdb", "pt_batches": workdir / f"{kind}-pt"}


def bench_kind(kind: str, n: int, workdir: Path, *, reads: int = 2000, min_seconds: float = 0.3,
               with_pt: bool = True, rounds: int = 3) -> list[Result]:
    """Write and read n items of one kind with every method; returns the raw results."""
    import torch  # noqa: F401 - the baselines store tensors, as older scripts do
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    samples = make_samples(kind, n)
    payload = sum(_payload_bytes(s) for s in samples)
    res: list[Result] = []
    paths = bench_paths(kind, workdir)

    t = write_lmdbkit(paths["lmdbkit"], samples)
    res.append(Result("write", kind, "lmdbkit", n / t, "items/s"))
    t = write_pickle_lmdb(paths["pickle_lmdb"], samples)
    res.append(Result("write", kind, "pickle_lmdb", n / t, "items/s"))
    blobs = [codec.encode(s, str(i)) for i, s in enumerate(samples)]
    t = write_raw(paths["raw_put"], blobs)
    res.append(Result("write", kind, "raw_put", n / t, "items/s"))
    if with_pt:
        t = write_pt_batches(paths["pt_batches"], samples)
        res.append(Result("write", kind, "pt_batches", n / t, "items/s"))
    del blobs
    for m, p in paths.items():
        if p.exists():
            used = store.disk_usage(p)
            res.append(Result("disk", kind, m, used / payload, "x payload", {"bytes": used, "payload": payload}))

    rng = np.random.default_rng(1)
    random_order = rng.integers(0, n, reads).tolist()
    seq_order = list(range(min(n, reads)))
    sizes = [len(codec.encode(s)) for s in samples[:64]]
    readers: dict[str, object] = {
        "lmdbkit": Reader(paths["lmdbkit"], decode_to="torch"),
        "pickle_lmdb": PickleLmdb(paths["pickle_lmdb"]),
        "bare_txn_get": BareGet(paths["raw_put"]),
        "memcpy": MemcpyLimit(sizes),
    }
    if with_pt:
        readers["pt_batches"] = PtBatches(paths["pt_batches"])
    for p in paths.values():
        if p.exists():
            warm_page_cache(p)
    def reads_of(name, r):
        def task():
            out = {}
            for order_name, order in (("random", random_order), ("sequential", seq_order)):
                o = order[: max(64, len(order) // 8)] if name == "pt_batches" else order
                out[name, order_name] = time_reads(r.__getitem__, o, min_seconds=min_seconds)
            return out
        return task
    tasks = {name: reads_of(name, r) for name, r in readers.items()}
    batched, datasets = _batched_reads(kind, paths["lmdbkit"], readers, random_order, min_seconds)
    tasks.update(batched)
    best = take_turns(rounds, tasks)
    for (name, order_name), ips in best.items():
        res.append(Result(f"read_{order_name}", kind, name, ips, "items/s",
                          {"rounds": rounds, **({"batch": READ_BATCH[kind]} if order_name == "batched" else {})}))
    for r in [*readers.values(), *datasets]:
        r.close()
    return res


def _batched_reads(kind: str, path: Path, readers: dict, order: list[int], min_seconds: float
                   ) -> tuple[dict, list]:
    """Tasks reading random batches of READ_BATCH[kind] items in one process: LMDBDataset.__getitems__ (what a
    DataLoader calls; verify off, as the Reader's single reads), plain (a list of items) and prebatched (the
    collated batch, as create_data_loader's), the same items read one by one into a list, and bare txn.get
    of their keys in one transaction. Returns the tasks and the datasets they read (to close)."""
    from .batch import Batch, block_of
    from .dataset import LMDBDataset
    size = READ_BATCH[kind]
    batches = [order[b:b + size] for b in range(0, len(order) - size + 1, size)] or [order]
    plain, prebatched = LMDBDataset(path, verify=False), LMDBDataset(path, verify=False, prebatch=True)
    # these items share one layout: a batch read item by item would time the wrong path, silently
    if block_of(plain.__getitems__(batches[0])) is None or type(prebatched.__getitems__(batches[0])) is not Batch:
        raise RuntimeError(f"{path}: a batch of items of one layout was read item by item, not as one block")
    single = readers["lmdbkit"].__getitem__
    ways = {"lmdbkit": plain.__getitems__, "lmdbkit_prebatch": prebatched.__getitems__,
            "lmdbkit_singles": lambda b: [single(i) for i in b], "bare_txn_get": readers["bare_txn_get"].get_many}
    tasks = {f"{name} batched": (lambda name=name, f=f: {(name, "batched"): time_batches(f, batches,
                                                                                        min_seconds=min_seconds)})
             for name, f in ways.items()}
    return tasks, [plain, prebatched]


def bench_open(counts: list[int], workdir: Path, *, repeat: int = 100, with_pt: bool = True) -> list[Result]:
    """Construct + len, in ms, for databases of each size (tiny items), against a .pt batch directory."""
    res = []
    for n in counts:
        p = Path(workdir) / f"open-{n}.lmdb"
        with Writer(p, mode="overwrite", commit_items=50_000, durable=False) as w:
            for i in range(n):
                w.append({"i": i})
        best = min(_timed(lambda: len(Reader(p))) for _ in range(repeat))
        res.append(Result("open", f"{n}", "lmdbkit", best * 1e3, "ms"))
        if with_pt:
            import torch
            d = Path(workdir) / f"open-{n}-pt"
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            for b in range(0, n, PT_BATCH):
                torch.save([{"i": torch.tensor(i)} for i in range(b, min(n, b + PT_BATCH))], d / f"b{b // PT_BATCH:07d}.pt")
            best = min(_timed(lambda: len(PtBatches(d))) for _ in range(max(1, repeat // 10)))
            res.append(Result("open", f"{n}", "pt_batches", best * 1e3, "ms"))
    return res


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def default_worker_counts() -> tuple[int, ...]:
    """DataLoader worker counts timed when none are given: 0, 1, 2, 4, 8 up to the cores here."""
    from .dataset import cores  # the DataLoader benchmark needs torch anyway
    return tuple(w for w in (0, 1, 2, 4, 8) if w <= max(cores(), 2))


def run(output_dir: str | os.PathLike, *, n_stft: int = 2000, n_small: int = 20000,
        open_counts=(1000, 10_000, 100_000), reads: int = 2000, min_seconds: float = 0.3, with_pt: bool = True,
        workers=None, cold: bool = True, cold_gb: float = 0.25, cold_reads: int = 512, cold_rounds: int = 3,
        kinds: bool = True, peers=False, plots: bool = True, progress: bool = True) -> dict:
    """The whole suite on generated items; writes summary.json (and PNG plots) into output_dir, returns it.

    cold: also read a ``cold_gb`` GB database with the page cache dropped (``bench_cold``), ``cold_reads``
    items per single/batch timing, the median of ``cold_rounds`` rounds. kinds: also compare the stored
    feature kinds and dtypes on real speech (``bench_kinds``: bytes per audio-second, error, read speed).
    peers: also run the same items through the peers installed here (``bench_peers``; True for all of them,
    or a list of names), with a 2-worker DataLoader."""
    from .progress import tqdm
    if workers is None:
        workers = default_worker_counts()
    out = Path(output_dir)
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    steps = [(kind, n) for kind, n in (("stft256k", n_stft), ("small1k", n_small)) if n]
    if peers:
        from . import bench_peers
        peer_names = list(bench_peers.PEERS if peers is True else peers)
        unknown = sorted(set(peer_names) - set(bench_peers.PEERS))
        if unknown:
            raise ValueError(f"peers={unknown}: unknown. The peers are {sorted(bench_peers.PEERS)}")
    bar = tqdm(total=len(steps) * (2 + bool(peers)) + 1 + cold + kinds, desc="benchmark", disable=not progress)
    kinds_result = None
    try:
        for kind, n in steps:
            bar.set_postfix_str(f"{kind}: write + read")
            results += bench_kind(kind, n, work, reads=reads, min_seconds=min_seconds, with_pt=with_pt)
            bar.update()
            bar.set_postfix_str(f"{kind}: DataLoader")
            if workers:
                results += bench_dataloader(kind, bench_paths(kind, work), workers=tuple(workers),
                                            min_seconds=min(0.5, 5 * min_seconds))
            bar.update()
            if peers:
                results += bench_peers.bench_peers(kind, n, work / "peers", peers=peer_names, reads=reads,
                                                   min_seconds=min_seconds, progress=bar)
                bar.update()
        if cold:
            from .bench_cold import bench_cold
            bar.set_postfix_str(f"cold reads ({cold_gb:g} GB)")
            results += bench_cold(work / "cold", gb=cold_gb, reads=cold_reads, rounds=cold_rounds, with_pt=with_pt)
            if n_small:
                from .bench_cold import bench_cold_small
                bar.set_postfix_str("cold reads, small items packed and not")
                results += bench_cold_small(work / "cold-small", n=n_small, reads=min(n_small, 4 * cold_reads),
                                            rounds=cold_rounds)
            bar.update()
        bar.set_postfix_str("open")
        results += bench_open(list(open_counts), work, with_pt=with_pt)
        bar.update()
        if kinds:
            from .bench_kinds import bench_kinds
            bar.set_postfix_str("feature kinds")
            kinds_result = bench_kinds(work / "kinds", min_seconds=min_seconds, progress=False)
            bar.update()
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = {"results": [asdict(r) for r in results], "ratios": ratios(results), "targets": targets(results),
               "kinds": kinds_result, "machine": _machine()}
    if peers:
        summary["peers"] = bench_peers.summary(results, peer_names)
    if plots:
        from . import plot_bench
        summary["figures"] = plot_bench.save_bench_figures(summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _machine() -> dict:
    import platform
    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lmdbkit bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="runs/bench", help="where summary.json and the plots go (default: runs/bench)")
    ap.add_argument("--n-stft", type=int, default=2000, help="number of ~256 KiB complex64 items")
    ap.add_argument("--n-small", type=int, default=20000, help="number of ~1 KiB items")
    ap.add_argument("--workers", help="DataLoader worker counts, comma-separated ('' to skip; default: 0,1,2,4,8 up "
                                      "to the cores here)")
    ap.add_argument("--full", action="store_true", help="also time open for 1M items")
    ap.add_argument("--no-pt", action="store_true", help="skip the per-batch .pt baseline")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache reads")
    ap.add_argument("--cold-gb", type=float, default=0.25,
                    help="size of each copy of the cold-read database in GB (default 0.25; use more than RAM "
                         "holds free to see the disk, e.g. 3 or more)")
    ap.add_argument("--cold-rounds", type=int, default=3, help="cold-read rounds (the median is reported; one short round swings with the disk)")
    ap.add_argument("--no-kinds", action="store_true", help="skip the feature kinds (bytes, error and read speed "
                                                           "of each stored kind and dtype on speech)")
    ap.add_argument("--peers", nargs="?", const="all", default=None,
                    help="also compare with the peers installed here (pip install -e '.[peers]'): all of them, or "
                         "a comma-separated list of litdata,mosaic,wids,h5py,hf_datasets,lhotse")
    ap.add_argument("--db", help="also time random and sequential reads of this existing database")
    a = ap.parse_args(argv)
    counts = (1000, 10_000, 100_000, 1_000_000) if a.full else (1000, 10_000, 100_000)
    workers = None if a.workers is None else tuple(int(w) for w in a.workers.split(",") if w.strip())
    s = run(a.output_dir, n_stft=a.n_stft, n_small=a.n_small, open_counts=counts, with_pt=not a.no_pt,
            workers=workers, cold=not a.no_cold, cold_gb=a.cold_gb, cold_rounds=a.cold_rounds, kinds=not a.no_kinds,
            peers=a.peers == "all" or (a.peers.split(",") if a.peers else False))
    if a.db:
        s["database"] = benchmark_lmdb_performance(a.db)
        Path(a.output_dir, "summary.json").write_text(json.dumps(s, indent=2))
        print(json.dumps(s["database"], indent=2))
    print(table([Result(**r) for r in s["results"]]))
    print()
    for k, v in s["ratios"].items():
        print(f"{k:<60}{v:9.3f}")
    print()
    print(targets_table(s["targets"]))
    if s.get("peers"):
        from .bench_peers import text_tables
        print(text_tables(s))
    if s["kinds"]:
        from .bench_kinds import table as kinds_table
        print(f"\nfeature kinds on {s['kinds']['corpus']}, {s['kinds']['audio_seconds']:.0f} audio-seconds:")
        print(kinds_table(s["kinds"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
