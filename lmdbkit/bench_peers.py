"""lmdbkit against the peers a user would pick instead, on the same items in one run (``lmdbkit bench --peers``).

Each peer is used the way its documentation teaches, through its own writer, reader and loader:

- litdata: ``litdata.optimize`` into chunk files, ``StreamingDataset`` / ``StreamingDataLoader``;
- mosaic streaming: ``MDSWriter`` shards, ``StreamingDataset`` in a DataLoader;
- webdataset/wids: ``webdataset.ShardWriter`` tar shards, ``wids.ShardListDataset`` (indexed tar reads);
- h5py: one HDF5 file, one dataset per field, rows written one by one, read back by index;
- Hugging Face datasets: ``Dataset.from_generator`` + ``save_to_disk``, ``load_from_disk(...).with_format("torch")``;
- lhotse: its HDF5 feature storage (``NumpyHdf5Writer`` / ``NumpyHdf5Reader``), one array per key.

Measured per system and item kind: writes as shipped (lmdbkit: its default, an fsync per commit; the peers:
no fsync) and at equal durability (every system's files synced once at the end), disk bytes per payload byte,
open + len, warm random single reads and a shuffled DataLoader epoch (plain for the peers; lmdbkit plain and
``create_data_loader``). The peers are an optional extra (``pip install -e ".[peers]"``); the ones not
installed are listed and skipped. Complex arrays go to the peers that have no complex type as float32 pairs
(``[..., 2]``) and come back as views, so every system stores and returns the same bytes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np

from . import store
from .bench import Result, make_samples, time_reads, warm_page_cache

PAYLOAD_FIELDS = ("label",)  # every item: one array field (ITEM_KINDS) and an int label


def _pairs(a: np.ndarray) -> np.ndarray:
    """A complex64 array as float32 pairs (for formats without complex types); other arrays as they are."""
    return a.view(np.float32).reshape(*a.shape, 2) if a.dtype == np.complex64 else a


def _unpairs(a, dtype) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.complex64)[..., 0] if dtype == np.complex64 and a.dtype == np.float32 else a


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


class Peer:
    """One storage system: writes samples ({field: ndarray, "label": int}), opens a reader (len, [i] -> sample
    dict) and builds a shuffled DataLoader over a path."""
    name = ""
    module = ""
    label = ""

    def available(self) -> str | None:
        """None if the peer can run here, else why not."""
        try:
            importlib.import_module(self.module)
        except Exception as exc:  # an installed peer that fails to import is as absent as a missing one
            return f"{type(exc).__name__}: {exc}"
        return None

    def write(self, path: Path, samples: list[dict], field: str) -> None:
        raise NotImplementedError

    def reader(self, path: Path, field: str, dtype):
        raise NotImplementedError

    def loader(self, path: Path, field: str, dtype, *, batch_size: int, num_workers: int):
        from torch.utils.data import DataLoader
        import torch
        return DataLoader(self.dataset(path, field, dtype), batch_size=batch_size, shuffle=True,
                          num_workers=num_workers, persistent_workers=num_workers > 0,
                          generator=torch.Generator().manual_seed(0))

    def dataset(self, path: Path, field: str, dtype):
        return self.reader(path, field, dtype)


class _Lazy:
    """A map-style dataset that opens its reader in the process that reads (h5py and HDF5 handles do not
    survive a fork), the way their docs advise for DataLoader workers."""

    def __init__(self, opener, n: int):
        self.opener, self.n, self.r = opener, n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if self.r is None:
            self.r = self.opener()
        return self.r[i]

    def __getstate__(self):
        return dict(self.__dict__, r=None)


# -- the peers ---------------------------------------------------------------------------------------

class Litdata(Peer):
    name, module, label = "litdata", "litdata", "litdata (optimize, StreamingDataset)"

    def write(self, path, samples, field):
        import litdata
        global _LITDATA_SAMPLES
        _LITDATA_SAMPLES = samples  # the forked workers of optimize() see them
        litdata.optimize(fn=_litdata_item, inputs=list(range(len(samples))), output_dir=str(path),
                         chunk_bytes="64MB", num_workers=1, verbose=False, mode="overwrite", start_method="fork")
        _LITDATA_SAMPLES = None

    def reader(self, path, field, dtype):
        import litdata
        return litdata.StreamingDataset(str(path))

    def loader(self, path, field, dtype, *, batch_size, num_workers):
        import litdata
        ds = litdata.StreamingDataset(str(path), shuffle=True, seed=0)
        return litdata.StreamingDataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                           persistent_workers=num_workers > 0)


_LITDATA_SAMPLES = None


def _litdata_item(i):
    return _LITDATA_SAMPLES[i]


def _mosaic():
    """Import mosaic streaming. Its package imports its vision datasets, hence torchvision, which PyPI's wheels
    cannot load beside every torch build; where it fails, a stand-in for the two names it takes from it lets the
    core (MDSWriter, StreamingDataset) load. The vision datasets are not used here."""
    if "streaming" in sys.modules:
        return sys.modules["streaming"]
    names = ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional")
    try:
        import torchvision  # noqa: F401
    except Exception:
        import torch.utils.data
        for name in names:
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules["torchvision.datasets"].VisionDataset = torch.utils.data.Dataset
        sys.modules["torchvision.transforms.functional"].to_tensor = None
        try:
            import streaming
        finally:  # the stand-ins go again: other libraries look for a real torchvision
            for name in names:
                sys.modules.pop(name, None)
    import streaming
    return streaming


class Mosaic(Peer):
    name, module, label = "mosaic", "streaming", "mosaic streaming (MDSWriter, StreamingDataset)"

    def available(self):
        try:
            _mosaic()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def write(self, path, samples, field):
        streaming = _mosaic()
        a = _pairs(samples[0][field])
        cols = {field: f"ndarray:{a.dtype.name}:{','.join(map(str, a.shape))}", "label": "int"}
        with streaming.MDSWriter(out=str(path), columns=cols, size_limit="64mb") as w:
            for s in samples:
                w.write({field: _pairs(s[field]), "label": s["label"]})

    def _dataset(self, path, shuffle, batch_size=None):
        streaming = _mosaic()
        streaming.base.util.clean_stale_shared_memory()
        return streaming.StreamingDataset(local=str(path), shuffle=shuffle, shuffle_seed=0, batch_size=batch_size)

    def reader(self, path, field, dtype):
        return _Unpaired(self._dataset(path, False), field, dtype)

    def loader(self, path, field, dtype, *, batch_size, num_workers):
        from torch.utils.data import DataLoader
        return DataLoader(self._dataset(path, True, batch_size), batch_size=batch_size, num_workers=num_workers,
                          persistent_workers=num_workers > 0)


class _Unpaired:
    """A peer's reader whose complex field comes back as float32 pairs: the same sample, the field a view."""

    def __init__(self, r, field, dtype):
        self.r, self.field, self.dtype = r, field, dtype

    def __len__(self):
        return len(self.r)

    def __getitem__(self, i):
        s = self.r[i]
        s[self.field] = _unpairs(s[self.field], self.dtype)
        return s


class Wids(Peer):
    name, module, label = "wids", "wids", "webdataset/wids (ShardWriter, ShardListDataset)"
    shard_bytes = 64 << 20

    def write(self, path, samples, field):
        import webdataset as wds
        path.mkdir(parents=True, exist_ok=True)
        with wds.ShardWriter(str(path / "shard-%06d.tar"), maxsize=self.shard_bytes, verbose=0) as w:
            for i, s in enumerate(samples):
                w.write({"__key__": f"{i:09d}", f"{field}.npy": s[field], "cls": s["label"]})

    def _shards(self, path):
        import webdataset as wds  # noqa: F401
        out = []
        for p in sorted(Path(path).glob("shard-*.tar")):
            import tarfile
            with tarfile.open(p) as t:
                out.append({"url": str(p), "nsamples": len(t.getnames()) // 2})
        return out

    def reader(self, path, field, dtype):
        import wids
        with contextlib.redirect_stdout(None), contextlib.redirect_stderr(None):  # it prints its shard list
            ds = wids.ShardListDataset(self._shards(path), transformations=[])
        return _WidsItems(ds, field)

    def dataset(self, path, field, dtype):
        return self.reader(path, field, dtype)


class _WidsItems:
    """wids' samples as {field, label}: its default decoding of .npy and .cls, the names without extensions."""

    def __init__(self, ds, field):
        self.ds, self.field = ds, field

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        import wids
        s = wids.wids.default_decoder(self.ds[i], format="numpy")
        return {self.field: s[f".{self.field}.npy"], "label": s[".cls"]}


class H5py(Peer):
    name, module, label = "h5py", "h5py", "h5py (one dataset per field)"

    def write(self, path, samples, field):
        import h5py
        a = samples[0][field]
        path.mkdir(parents=True, exist_ok=True)
        with h5py.File(path / "data.h5", "w") as f:
            d = f.create_dataset(field, (len(samples), *a.shape), a.dtype)
            lab = f.create_dataset("label", (len(samples),), np.int64)
            for i, s in enumerate(samples):
                d[i] = s[field]
                lab[i] = s["label"]

    def reader(self, path, field, dtype):
        return _H5Items(path / "data.h5", field)

    def dataset(self, path, field, dtype):
        import h5py
        with h5py.File(path / "data.h5", "r") as f:
            n = len(f[field])
        return _Lazy(lambda: _H5Items(path / "data.h5", field), n)


class _H5Items:
    def __init__(self, file, field):
        import h5py
        self.f = h5py.File(file, "r")
        self.d, self.lab, self.field = self.f[field], self.f["label"], field

    def __len__(self):
        return len(self.d)

    def __getitem__(self, i):
        return {self.field: self.d[i], "label": int(self.lab[i])}


class HfDatasets(Peer):
    name, module, label = "hf_datasets", "datasets", "Hugging Face datasets (Arrow, with_format('torch'))"

    def write(self, path, samples, field):
        import datasets
        a = _pairs(samples[0][field])
        arr = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D}.get(a.ndim)
        ft = arr(a.shape, a.dtype.name) if arr else datasets.Sequence(datasets.Value(a.dtype.name), length=a.size)
        features = datasets.Features({field: ft, "label": datasets.Value("int64")})

        def gen():
            for s in samples:
                yield {field: _pairs(s[field]), "label": s["label"]}
        cache = Path(str(path) + "-cache")
        ds = datasets.Dataset.from_generator(gen, features=features, cache_dir=str(cache))
        ds.save_to_disk(str(path))
        del ds
        shutil.rmtree(cache, ignore_errors=True)

    def reader(self, path, field, dtype):
        import datasets
        datasets.disable_progress_bars()
        return _Unpaired(datasets.load_from_disk(str(path)).with_format("numpy"), field, dtype)

    def dataset(self, path, field, dtype):
        import datasets
        datasets.disable_progress_bars()
        return datasets.load_from_disk(str(path)).with_format("torch")


class Lhotse(Peer):
    name, module, label = "lhotse", "lhotse", "lhotse (NumpyHdf5Writer storage)"

    def write(self, path, samples, field):
        from lhotse.features.io import NumpyHdf5Writer
        path.mkdir(parents=True, exist_ok=True)
        with NumpyHdf5Writer(path / "feats") as w:
            keys = [w.write(f"{i:09d}", s[field]) for i, s in enumerate(samples)]
        # lhotse keeps the storage key and the label in its manifest (a CutSet); here, a plain list beside it
        np.save(path / "manifest.npy", np.array([[int(k), s["label"]] for k, s in zip(keys, samples)]))

    def reader(self, path, field, dtype):
        return _LhotseItems(path, field)

    def dataset(self, path, field, dtype):
        return _Lazy(lambda: _LhotseItems(path, field), len(np.load(path / "manifest.npy")))


class _LhotseItems:
    def __init__(self, path, field):
        from lhotse.features.io import NumpyHdf5Reader
        self.r = NumpyHdf5Reader(str(Path(path) / "feats.h5"))
        self.manifest = np.load(Path(path) / "manifest.npy")
        self.field = field

    def __len__(self):
        return len(self.manifest)

    def __getitem__(self, i):
        k, label = self.manifest[i]
        return {self.field: self.r.read(f"{k:09d}"), "label": int(label)}

    def close(self):
        """lhotse keeps every HDF5 file it opened in a process-wide cache; clearing it closes them, so that the
        next open opens the file again, as every other system's does."""
        from lhotse.features.io import close_cached_file_handles
        close_cached_file_handles()


PEERS: dict[str, Peer] = {p.name: p for p in (Litdata(), Mosaic(), Wids(), H5py(), HfDatasets(), Lhotse())}


def available() -> dict[str, str | None]:
    """{peer: None if it runs here, else why not}."""
    return {name: p.available() for name, p in PEERS.items()}


class Lmdbkit(Peer):
    name, module, label = "lmdbkit", "lmdbkit", "lmdbkit"

    def write(self, path, samples, field, *, durable=True):
        from .writer import Writer
        with Writer(path, mode="overwrite", durable=durable) as w:  # durable=False: one sync at close
            for i, s in enumerate(samples):
                w.append(s, key=str(i))

    def reader(self, path, field, dtype):
        from .reader import Reader
        return Reader(path)

    def loader(self, path, field, dtype, *, batch_size, num_workers):
        return super().loader(path, field, dtype, batch_size=batch_size, num_workers=num_workers)

    def dataset(self, path, field, dtype):
        from .dataset import LMDBDataset
        return LMDBDataset(path)

    def prebatched(self, path, *, batch_size, num_workers):
        from .dataset import create_data_loader
        return create_data_loader(path, batch_size=batch_size, shuffle=True, num_workers=num_workers, seed=0)


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

    Returns Results (measures prefixed ``peers_``) with method = system name: ``write`` (as shipped), ``write_synced`` (all files synced once
    at the end; lmdbkit with durable=False, whose close syncs), ``disk`` (x payload), ``open`` (ms, best of 5),
    ``read_random`` (items/s, best of ``rounds``, systems taking turns; writes and loaders take turns as well,
    over ``write_rounds`` and ``loader_rounds``) and ``dataloader`` (items/s; lmdbkit's
    plain loader as ``lmdbkit_plain``, ``create_data_loader`` as ``lmdbkit``; num_workers=None skips it). Every
    system must read back what was written (item count and one item compared), else AssertionError."""
    from .bench import ITEM_KINDS
    spec = ITEM_KINDS[kind]
    field, dtype = spec["field"], np.dtype(spec["dtype"])
    names = ["lmdbkit", *(p for p in (peers or PEERS) if PEERS[p].available() is None)]
    systems: dict[str, Peer] = {"lmdbkit": Lmdbkit(), **{p: PEERS[p] for p in names[1:]}}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    samples = make_samples(kind, n, as_torch=False)
    payload = sum(s[field].nbytes for s in samples)
    res: list[Result] = []

    def step(what):
        if progress is not None:
            progress.set_postfix_str(f"peers, {kind}: {what}")

    paths = {name: workdir / f"{kind}-{name}" for name in systems}

    def timed_write(name, **kw) -> float:
        p = paths[name]
        shutil.rmtree(p, ignore_errors=True)
        # every timed write starts with nothing dirty in the page cache: no system pays for the writeback of
        # what ran before it
        os.sync()
        t0 = time.perf_counter()
        systems[name].write(p, samples, field, **kw)
        return time.perf_counter() - t0

    best_writes: dict[tuple[str, str], float] = {}  # systems take turns, each keeps its best round

    def keep(measure, name, seconds):
        best_writes[measure, name] = max(best_writes.get((measure, name), 0.0), n / seconds)
    for _ in range(write_rounds):
        for name in systems:
            step(f"write {name}")
            if name == "lmdbkit":
                keep("peers_write", name, timed_write(name, durable=True))
                keep("peers_write_synced", name, timed_write(name, durable=False))  # its close syncs once
            else:
                wrote = timed_write(name)
                keep("peers_write", name, wrote)
                keep("peers_write_synced", name, wrote + fsync_tree(paths[name]))
    for (measure, name), ips in best_writes.items():
        fsync = {"peers_write_synced": "once, at the end", "peers_write": "per commit" if name == "lmdbkit" else "none"}
        res.append(Result(measure, kind, name, ips, "items/s", {"fsync": fsync[measure], "rounds": write_rounds}))
    for name in systems:
        used = store.disk_usage(paths[name])
        res.append(Result("peers_disk", kind, name, used / payload, "x payload", {"bytes": used, "payload": payload}))

    rng = np.random.default_rng(1)
    order = rng.integers(0, n, reads).tolist()
    readers = {}
    for name, sysm in systems.items():
        step(f"open {name}")
        warm_page_cache(paths[name])
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            r = sysm.reader(paths[name], field, dtype)
            if len(r) != n:
                raise AssertionError(f"{name} holds {len(r)} items, {n} were written")
            best = min(best, time.perf_counter() - t0)
            if _ != 4:
                _close(r)
        res.append(Result("peers_open", kind, name, best * 1e3, "ms"))
        got = r[7]
        if not np.array_equal(np.asarray(got[field]), samples[7][field]) or int(got["label"]) != samples[7]["label"]:
            raise AssertionError(f"{name} read back another item 7 than was written")
        readers[name] = r
    best_reads: dict[str, float] = {}
    for _ in range(rounds):
        for name, r in readers.items():
            step(f"random reads {name}")
            best_reads[name] = max(best_reads.get(name, 0.0), time_reads(r.__getitem__, order, min_seconds=min_seconds))
    for name, ips in best_reads.items():
        res.append(Result("peers_read_random", kind, name, ips, "items/s", {"rounds": rounds}))
    for r in readers.values():
        _close(r)

    if num_workers is not None:
        loaders = {name: (lambda s=sysm, name=name: s.loader(paths[name], field, dtype, batch_size=batch_size,
                                                              num_workers=num_workers))
                   for name, sysm in systems.items()}
        loaders["lmdbkit_plain"] = loaders.pop("lmdbkit")
        loaders = {"lmdbkit": lambda: systems["lmdbkit"].prebatched(paths["lmdbkit"], batch_size=batch_size,
                                                                     num_workers=num_workers), **loaders}
        best_epochs: dict[str, float] = {}
        for _ in range(loader_rounds):  # loaders take turns too: a short epoch is at the mercy of the machine
            for name, make in loaders.items():
                step(f"DataLoader {name}")
                loader = make()
                best_epochs[name] = max(best_epochs.get(name, 0.0), _epoch_rate(loader))
                _close(getattr(loader, "dataset", None))
                del loader
        for name, ips in best_epochs.items():
            res.append(Result("peers_dataloader", kind, name, ips, "items/s",
                              {"num_workers": num_workers, "batch_size": batch_size, "rounds": loader_rounds}))
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
    return res


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
            out[f"peers_write/{kind}: lmdbkit durable (fsync per commit) / best peer synced ({best[0]})"] = lk / best[1]
    return out


def _key(results, measure, kind, method="lmdbkit", tail=None):
    best = best_peer(results, measure, kind)
    if best is None:
        return None
    return tail or f"{measure}/{kind}: {method} / best peer ({best[0]})"


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
            best = best_peer(results, "peers_write_synced", kind)
            key = best and f"peers_write/{kind}: lmdbkit durable (fsync per commit) / best peer synced ({best[0]})"
            val = r.get(key) if key else None
            rows.append({"target": f"writes, {what}, lmdbkit's default (fsync per commit): >= 0.8x the best peer "
                                   "synced once", "ratio": key, "value": val, "threshold": ">= 0.8",
                         "holds": None if val is None else val >= 0.8})
    return rows


def table(results: list[Result], kind: str):
    """A verdict.Table of one item kind: a row per system, a column per measure, the best of each column in bold."""
    from .plot import KIND_LABELS
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
