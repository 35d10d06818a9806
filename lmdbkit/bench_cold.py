"""Cold reads: a database larger than the page cache, read at the speed of the disk.

The same ~256 KiB STFT items are written with lmdbkit, as pickle-in-LMDB and as per-batch ``.pt`` files
(``gb`` gigabytes each). Then, for each way of reading (one random item at a time, random batches of 64,
a shuffled DataLoader epoch with 2 workers), every method reads the same items right after all the files
were dropped from the page cache (``posix_fadvise(DONTNEED)`` with every reader closed), and then again
warm. Methods take turns within each mode. The limits are what the disk gives for the very same byte
ranges of ``data.mdb``: buffered ``os.pread`` in one thread, and in 16 threads per batch of 64.

Run it with ``python -m lmdbkit.bench --cold-gb 3`` (the default size is small enough for CI).
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import lmdb
import numpy as np

from . import store
from .bench import ITEM_KINDS, PT_BATCH, PickleLmdb, PtBatches, Result, drop_page_cache, make_samples
from .reader import Reader
from .writer import Writer

KIND = "stft256k"
MODES = ("single", "batch64", "dataloader")
PT_MAX_ITEMS = 64  # a cold .pt read loads a whole batch file per item: this many items are enough to time it


def write_cold_set(workdir: Path, gb: float, *, with_pt: bool = True, progress: bool = False) -> dict[str, Path]:
    """Write ~gb GB of STFT items with lmdbkit, as pickle-in-LMDB and (with_pt) as .pt batches, generated a
    batch at a time so that the set need not fit in memory. Returns the paths by method."""
    from .progress import tqdm
    import torch
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    item = int(np.prod(ITEM_KINDS[KIND]["shape"])) * 8
    n = max(2 * PT_BATCH, int(gb * 2**30 / item) // PT_BATCH * PT_BATCH)
    paths = {"lmdbkit": workdir / "cold.lmdb", "pickle_lmdb": workdir / "cold-pickle.lmdb"}
    if with_pt:
        paths["pt_batches"] = workdir / "cold-pt"
    for p in paths.values():
        if p.exists():
            shutil.rmtree(p)
    env = lmdb.open(str(paths["pickle_lmdb"]), map_size=int(n * item * 1.3) + (64 << 20), readahead=False)
    if with_pt:
        paths["pt_batches"].mkdir(parents=True)
    with Writer(paths["lmdbkit"], mode="overwrite", durable=False) as w, \
            tqdm(total=n, desc=f"cold set ({n * item / 2**30:.1f} GiB x {len(paths)})", disable=not progress) as bar:
        for b in range(0, n, PT_BATCH):
            samples = make_samples(KIND, PT_BATCH, seed=b)
            for i, s in enumerate(samples, start=b):
                w.append(s, key=str(i))
            with env.begin(write=True) as txn:
                for i, s in enumerate(samples, start=b):
                    txn.put(str(i).encode(), pickle.dumps(s))
            if with_pt:
                torch.save(samples, paths["pt_batches"] / f"batch_{b // PT_BATCH:06d}.pt")
            bar.update(len(samples))
    with env.begin(write=True) as txn:
        txn.put(b"__len__", str(n).encode())
    env.sync(True)
    env.close()
    return paths


def byte_ranges(path: Path) -> list[tuple[int, int]]:
    """(offset in data.mdb, length) of every item's stored bytes, in index order."""
    with Reader(path) as r, r._txn() as txn:
        cursor = txn.cursor(db=r._items)
        out = []
        for i in range(len(r)):
            cursor.set_key(store.pack_index(i))
            found = r._fetch.file_range(cursor)
            if found is None:
                raise RuntimeError(f"{path}: item {i} is not stored in overflow pages; the cold benchmark needs "
                                   "large items")
            out.append(found)
    return out


class PreadLimit:
    """The disk's limit for the same bytes: buffered os.pread of each item's byte range into a fresh buffer,
    in one thread, or a batch at a time in ``threads`` threads."""

    def __init__(self, path: Path, ranges: list[tuple[int, int]], threads: int = 1):
        self.fd = os.open(Path(path) / store.DATA_FILE, os.O_RDONLY)
        self.ranges, self.threads = ranges, threads
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def __getitem__(self, i: int):
        offset, length = self.ranges[i]
        buf = np.empty(length, np.uint8)
        os.preadv(self.fd, [buf], offset)
        return buf

    def read_many(self, indices: list[int]) -> list:
        if self.pool is None:
            return [self[i] for i in indices]
        return list(self.pool.map(self.__getitem__, indices))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        os.close(self.fd)


def _loader(method: str, paths: dict[str, Path], indices: list[int], workers: int, batch: int):
    """A shuffled DataLoader over the items ``indices``: lmdbkit's as a user makes it (create_data_loader over its
    Dataset, prebatched) or the older way's (pickle-in-LMDB's Dataset, a plain DataLoader, default collate)."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from .dataset import LMDBDataset, create_data_loader
    if method == "lmdbkit":
        return create_data_loader(Subset(LMDBDataset(paths["lmdbkit"], prebatch=True), indices), batch_size=batch,
                                  shuffle=True, num_workers=workers, persistent_workers=False)
    return DataLoader(Subset(PickleLmdb(paths["pickle_lmdb"]), indices), batch_size=batch, shuffle=True,
                      num_workers=workers, generator=torch.Generator().manual_seed(0))


def _epoch(loader) -> float:
    """Items/s of an epoch after its first batch (which also waits for the workers to start); then the
    loader's dataset is closed, so that nothing maps the files when they are dropped next."""
    it = iter(loader)
    next(it)
    items, t0 = 0, time.perf_counter()
    for b in it:
        items += len(next(iter(b.values())))
    dt = time.perf_counter() - t0
    del it
    loader.dataset.dataset.close()  # the Subset's dataset
    return items / dt


def _timed(mode: str, make: Callable, order: list[int], batch: int, drop: Callable) -> tuple[float, float]:
    """(cold items/s, warm items/s) of one method: read ``order`` right after a drop, then again. The drop
    comes after the reader is made, since the older .pt reader loads every file to count the items."""
    out = []
    for temp in ("cold", "warm"):
        r = make()
        if temp == "cold":
            drop()
        t0 = time.perf_counter()
        if mode == "single":
            for i in order:
                r[i]
        else:
            for k in range(0, len(order), batch):
                r.read_many(order[k:k + batch])
        out.append(len(order) / (time.perf_counter() - t0))
        r.close()
    return out[0], out[1]


def bench_cold(workdir: Path, *, gb: float = 0.25, reads: int = 512, epoch_items: int = 4096, workers: int = 2,
               batch: int = 64, rounds: int = 1, with_pt: bool = True, progress: bool = False) -> list[Result]:
    """Cold and warm items/s of every method in every mode (see the module's text); the median of rounds."""
    paths = write_cold_set(Path(workdir), gb, with_pt=with_pt, progress=progress)
    ranges = byte_ranges(paths["lmdbkit"])
    n = len(ranges)
    item_mib = float(np.mean([length for _, length in ranges])) / 2**20
    rng = np.random.default_rng(11)
    single = rng.integers(0, n, reads).tolist()
    batched = rng.integers(0, n, max(batch, reads // batch * batch)).tolist()
    epoch = rng.permutation(n)[:min(n, epoch_items)].tolist()

    dropped = []

    def drop():  # every file of every method, so no method reads another's leftovers from the cache
        dropped.append(all([drop_page_cache(p) for p in paths.values()]))

    readers = {
        "lmdbkit": lambda: Reader(paths["lmdbkit"], decode_to="torch"),
        "pread_1thread": lambda: PreadLimit(paths["lmdbkit"], ranges),
        "pread_16threads": lambda: PreadLimit(paths["lmdbkit"], ranges, threads=16),
        "pickle_lmdb": lambda: _Batched(PickleLmdb(paths["pickle_lmdb"])),
    }
    if with_pt:
        readers["pt_batches"] = lambda: _Batched(PtBatches(paths["pt_batches"]))
    plan = [("single", m, single) for m in ("lmdbkit", "pread_1thread", "pickle_lmdb", "pt_batches")]
    plan += [("batch64", m, batched) for m in ("lmdbkit", "pread_16threads", "pread_1thread", "pickle_lmdb",
                                                "pt_batches")]
    plan = [(mode, m, order[:PT_MAX_ITEMS] if m == "pt_batches" else order) for mode, m, order in plan if m in readers]
    got: dict[tuple[str, str], list] = {}
    for _ in range(rounds):
        for mode, method, order in plan:
            got.setdefault((mode, method), []).append(_timed(mode, readers[method], order, batch, drop))
        # the DataLoader's limit: the same items, 16 threads reading each batch
        got.setdefault(("dataloader", "pread_16threads"), []).append(
            _timed("batch64", readers["pread_16threads"], epoch, batch, drop))
        for method in ("lmdbkit", "pickle_lmdb"):
            drop()
            got.setdefault(("dataloader", method), []).append(
                tuple(_epoch(_loader(method, paths, epoch, workers, batch)) for _ in ("cold", "warm")))
    res = []
    for (mode, method), runs in got.items():
        for i, temp in enumerate(("cold", "warm")):
            ips = float(np.median([r[i] for r in runs]))
            extra = {"MiB/s": ips * item_mib, "items": n, "item_MiB": item_mib, "rounds": rounds,
                     "fadvise_dontneed": all(dropped)}
            if mode == "dataloader":
                extra.update(num_workers=workers if method != "pread_16threads" else 0, batch_size=batch)
            res.append(Result(f"{temp}_{mode}", KIND, method, ips, "items/s", extra))
    shutil.rmtree(workdir, ignore_errors=True)
    return res


SMALL = "small1k"
SMALL_BATCH = 256


def bench_cold_small(workdir: Path, *, n: int, reads: int = 2048, rounds: int = 3) -> list[Result]:
    """Cold and warm items/s of ~1 KiB items packed in runs (format 2, what a Writer makes of them:
    ``lmdbkit_packed``) against the same items one per LMDB value (``pack=False``: ``lmdbkit_format1``), read
    by a Reader one at a time and in batches of SMALL_BATCH, both databases dropped from the page cache before
    each cold timing; the median of rounds. What packing costs a cold read: its run's pages, not one page."""
    from .bench import write_lmdbkit
    workdir = Path(workdir)
    samples = make_samples(SMALL, n)
    paths = {"lmdbkit_packed": workdir / "small-packed.lmdb", "lmdbkit_format1": workdir / "small-format1.lmdb"}
    for method, p in paths.items():
        write_lmdbkit(p, samples, pack=method == "lmdbkit_packed", durable=False)
    item_mib = samples[0][ITEM_KINDS[SMALL]["field"]].nbytes / 2**20
    order = np.random.default_rng(12).permutation(n)[:reads].tolist()
    dropped = []

    def drop():
        dropped.append(all([drop_page_cache(p) for p in paths.values()]))
    got: dict[tuple[str, str], list] = {}
    for _ in range(rounds):
        for mode in ("single", f"batch{SMALL_BATCH}"):
            for method, p in paths.items():
                got.setdefault((mode, method), []).append(
                    _timed(mode, lambda p=p: Reader(p, decode_to="torch"), order, SMALL_BATCH, drop))
    field = ITEM_KINDS[SMALL]["field"]
    for p in paths.values():  # both hold the same items
        with Reader(p, decode_to="torch") as r:
            if not all(r[i][field].equal(samples[i][field]) for i in order[:16]):
                raise AssertionError(f"{p}: items read back differ from those written")
    res = []
    for (mode, method), timings in got.items():
        for i, temp in enumerate(("cold", "warm")):
            ips = float(np.median([t[i] for t in timings]))
            res.append(Result(f"{temp}_{mode}", SMALL, method, ips, "items/s",
                              {"MiB/s": ips * item_mib, "items": n, "rounds": rounds, "fadvise_dontneed": all(dropped)}))
    shutil.rmtree(workdir, ignore_errors=True)
    return res


class _Batched:
    """A reader with read_many for the baselines that have none (one item after another)."""

    def __init__(self, reader):
        self.reader = reader

    def __getitem__(self, i: int):
        return self.reader[i]

    def read_many(self, indices: list[int]) -> list:
        return [self.reader[i] for i in indices]

    def close(self) -> None:
        self.reader.close()


def ratios(results: list[Result]) -> dict[str, float]:
    """lmdbkit against the limits and the older ways, cold and warm, per mode."""
    v = {(r.measure, r.method): r.value for r in results if r.kind == KIND}
    out = {}
    for temp in ("cold", "warm"):
        for mode in MODES:
            lk = v.get((f"{temp}_{mode}", "lmdbkit"))
            for base in ("pread_1thread", "pread_16threads", "pickle_lmdb", "pt_batches"):
                b = v.get((f"{temp}_{mode}", base))
                if lk and b:
                    out[f"{temp}_{mode}/{KIND}: lmdbkit / {base}"] = lk / b
        small = {(r.measure, r.method): r.value for r in results if r.kind == SMALL}
        for mode in ("single", f"batch{SMALL_BATCH}"):
            a, b = small.get((f"{temp}_{mode}", "lmdbkit_packed")), small.get((f"{temp}_{mode}", "lmdbkit_format1"))
            if a and b:
                out[f"{temp}_{mode}/{SMALL}: lmdbkit_packed / lmdbkit_format1"] = a / b
    return out


TARGETS = [
    ("cold single-item ~256 KiB: >= 0.8x one-thread pread of the same bytes",
     f"cold_single/{KIND}: lmdbkit / pread_1thread", ">=", 0.8),
    ("cold batch of 64: >= 0.7x 16-thread pread of the same bytes",
     f"cold_batch64/{KIND}: lmdbkit / pread_16threads", ">=", 0.7),
    ("cold DataLoader epoch, 2 workers, batch 64: >= 0.6x 16-thread pread",
     f"cold_dataloader/{KIND}: lmdbkit / pread_16threads", ">=", 0.6),
]
