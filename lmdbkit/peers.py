"""The peers a user would pick instead of lmdbkit, each used the way its documentation teaches (for
``lmdbkit.bench_peers``): its own writer, its own reader and its own loader, behind one small interface.

- litdata: ``litdata.optimize`` into chunk files, ``StreamingDataset`` / ``StreamingDataLoader``;
- mosaic streaming: ``MDSWriter`` shards, ``StreamingDataset`` in a DataLoader;
- webdataset/wids: ``webdataset.ShardWriter`` tar shards, ``wids.ShardListDataset`` (indexed tar reads);
- h5py: one HDF5 file, one dataset per field, rows written one by one, read back by index;
- Hugging Face datasets: ``Dataset.from_generator`` + ``save_to_disk``, ``load_from_disk(...).with_format("torch")``;
- lhotse: its HDF5 feature storage (``NumpyHdf5Writer`` / ``NumpyHdf5Reader``), one array per key.

Complex arrays go to the peers that have no complex type as float32 pairs (``[..., 2]``) and come back as
views, so every system stores and returns the same bytes. The peers are an optional extra
(``pip install -e ".[peers]"``); ``available()`` says which import here, and why the others do not.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import shutil
import sys
import tarfile
import types
from pathlib import Path

import numpy as np


def _pairs(a: np.ndarray) -> np.ndarray:
    """A complex64 array as float32 pairs (for formats without complex types); other arrays as they are."""
    return a.view(np.float32).reshape(*a.shape, 2) if a.dtype == np.complex64 else a


def _unpairs(a, dtype) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.complex64)[..., 0] if dtype == np.complex64 and a.dtype == np.float32 else a


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
    survive a fork), the way their docs advise for DataLoader workers. ``opener`` pickles (a partial of a
    class), so spawned workers work too."""

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
        importlib.import_module("torchvision")
    except Exception:
        import torch.utils.data
        for name in names:
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules["torchvision.datasets"].VisionDataset = torch.utils.data.Dataset
        sys.modules["torchvision.transforms.functional"].to_tensor = None
        try:
            return importlib.import_module("streaming")
        finally:  # the stand-ins go again: other libraries look for a real torchvision
            for name in names:
                sys.modules.pop(name, None)
    return importlib.import_module("streaming")


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
        """wids' shard list: each tar with its sample count (two members a sample: the array and the class)."""
        out = []
        for p in sorted(Path(path).glob("shard-*.tar")):
            with tarfile.open(p) as t:
                out.append({"url": str(p), "nsamples": len(t.getnames()) // 2})
        return out

    def reader(self, path, field, dtype):
        import wids
        with contextlib.redirect_stdout(None), contextlib.redirect_stderr(None):  # it prints its shard list
            ds = wids.ShardListDataset(self._shards(path), transformations=[])
        return _WidsItems(ds, field)


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
        return _Lazy(functools.partial(_H5Items, path / "data.h5", field), n)


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
        return _Lazy(functools.partial(_LhotseItems, path, field), len(np.load(path / "manifest.npy")))


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
        from .bench import write_lmdbkit
        write_lmdbkit(path, samples, durable=durable)  # durable=False: one sync at close

    def reader(self, path, field, dtype):
        from .reader import Reader
        return Reader(path)

    def dataset(self, path, field, dtype):  # Peer.loader puts it in a plain DataLoader
        from .dataset import LMDBDataset
        return LMDBDataset(path)

    def prebatched(self, path, *, batch_size, num_workers):
        from .dataset import create_data_loader
        return create_data_loader(path, batch_size=batch_size, shuffle=True, num_workers=num_workers, seed=0)
