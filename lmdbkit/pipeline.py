"""What precompute's decode workers and its main process each do to a batch of audio files.

A DataLoader worker decodes, mixes, resamples and segments each file (``Files``). On the CPU, the worker's
collate (``Features``) also computes the batch's features (STFT, mel, ...), batched by shape across its
files, into one storage: a segment the worker reuses (``segments``, as the reading DataLoader's batches), so
the batch reaches the main process without a copy, and the main process only writes. Why: the main process
is the one part of the pipeline that does not grow with ``num_workers``. With the STFT in it, it spent
0.91-1.00 ms of CPU an item of the demo corpus (~1 s clips, 253 KiB complex64 items), a ceiling of ~1,000
items/s however many cores decode; see the README's "Precompute your own audio".

On CUDA the main process computes the features of each batch on the GPU (``LazyFeatures``), a chunk of
segments at a time, as it does for a file whose features would exceed ``FILE_BUDGET`` (a long recording cut into
many segments: its features never all exist at once), for what of a batch exceeds ``BATCH_BUDGET``, and for a
batch whose features a worker failed to compute (the main process computes them again and reports what went
wrong, as before).
"""

from __future__ import annotations

import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from . import audio, batch as batches, handoff
from .errors import AudioDecodeError
from .stft import StftConfig, compute

FILE_BUDGET = 64 << 20  # bytes: a file's features up to this size are computed in a worker
BATCH_BUDGET = 64 << 20  # bytes: a worker's batch holds at most this much of them (the rest: the main process)


class Files(Dataset):
    """Decoded, mixed, resampled and segmented files; a bad file comes back as its reason, never raises."""

    def __init__(self, root: Path, sources: list[audio.Source], cfg):
        self.root, self.sources, self.cfg = root, sources, cfg

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        s = self.sources[i]
        c = self.cfg
        try:
            segs, spans, sr, dur = audio.load_segments(self.root / s.path, sample_rate=c.sample_rate, mono=c.mono,
                                                       segment_seconds=c.segment_seconds,
                                                       hop_seconds=c.segment_hop_seconds, pad_last=c.pad_last,
                                                       keep_short=c.short_files == "pad")
        except AudioDecodeError as exc:
            return {"source": s, "error": str(exc), "short": isinstance(exc, audio.TooShortError)}
        except Exception as exc:  # anything else a broken file provokes in a decoder
            return {"source": s, "error": f"{self.root / s.path}: {type(exc).__name__}: {exc}"}
        return {"source": s, "segments": segs, "spans": spans, "orig_sample_rate": sr, "duration_s": dur}


def as_list(batch: list) -> list:
    """The collate of the decode stage alone (``decode_only``) and of a worker that leaves features to the main
    process: the batch's records as they are."""
    return batch


class Decoded(dict):
    """A worker's batch: ``files`` (the records; each that the worker computed names its features in
    ``features``), ``stft_seconds`` (the worker's time on them) and each feature tensor under its name, all views
    of one storage, so that the batch travels in a reused segment (``handoff``)."""


ForkingPickler.register(Decoded, handoff.reducer(Decoded))


class Features:
    """The decode workers' collate: on the CPU, computes the features of a batch's files in the worker (see the
    module's doc); with ``cfg`` None (CUDA), or in the main process (``num_workers=0``), the batch as it is."""

    def __init__(self, cfg: StftConfig | None):
        self.cfg, self.file_budget, self.batch_budget = cfg, FILE_BUDGET, BATCH_BUDGET

    def __call__(self, recs: list) -> list | Decoded:
        if self.cfg is None or get_worker_info() is None:
            return recs
        t0 = time.perf_counter()
        chosen, total = [], 0
        for rec in recs:
            if "error" in rec:
                continue
            need = sum(feature_bytes(seg.shape, self.cfg) for seg in rec["segments"])
            if need <= self.file_budget and total + need <= self.batch_budget:
                chosen.append(rec)
                total += need
        if not chosen:
            return recs
        try:
            specs = batched_features([seg for rec in chosen for seg in rec["segments"]], self.cfg,
                                     torch.device("cpu"), contiguous=False)
            shapes = {str(i): (s.dtype, tuple(s.shape)) for i, s in enumerate(specs)}
            views = batches.storage_views(shapes, shared=True)[0]
            for i, s in enumerate(specs):
                views[str(i)].copy_(s)  # (the one copy: the STFT's frames-first layout into the item's)
        except Exception:  # (a value beyond float16's range, no room): the main process computes and reports it
            return recs
        k = 0
        for rec in chosen:
            n = len(rec["segments"])
            rec["features"], rec["segments"] = [str(i) for i in range(k, k + n)], None
            k += n
        return Decoded(views, files=recs, stft_seconds=time.perf_counter() - t0)


def received(batch: list | Decoded) -> tuple[list, float]:
    """(the batch's records, the worker's seconds on their features) in the main process: each record the worker
    computed holds its features in ``specs``."""
    if type(batch) is not Decoded:
        return batch, 0.0
    recs = batch.pop("files")
    for rec in recs:
        names = rec.pop("features", None)
        if names is not None:
            rec["specs"] = [batch.pop(name) for name in names]
    return recs, batch.pop("stft_seconds")


def feature_bytes(shape: tuple, cfg: StftConfig) -> int:
    """The bytes of the features of one segment ([channels, samples]) in ``cfg``."""
    itemsize = getattr(torch, cfg.dtype).itemsize
    return shape[0] * cfg.n_bins * cfg.num_frames(shape[-1]) * itemsize


class LazyFeatures:
    """The features of every segment of ``recs``, in order: a worker's (``specs``), else computed ``chunk``
    segments at a time (batched by shape within a chunk), so at most one chunk of them exists before the writer
    has encoded them. Counts its own seconds."""

    def __init__(self, recs: list[dict], cfg: StftConfig, dev: torch.device, chunk: int):
        self.order = []  # each segment's features, or None: the next one computed from ``segs``
        self.segs = []
        for rec in recs:
            made = rec.pop("specs", None)
            self.order += made if made is not None else [None] * len(rec["segments"])
            if made is None:
                self.segs += rec["segments"]
        self.cfg, self.dev, self.chunk = cfg, dev, max(1, chunk)
        self.at, self.pos, self.ready, self.seconds = 0, 0, [], 0.0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.at >= len(self.order):
            raise StopIteration
        made, self.order[self.at] = self.order[self.at], None
        self.at += 1
        if made is not None:
            return made
        if not self.ready:
            t = time.perf_counter()
            part = self.segs[self.pos:self.pos + self.chunk]
            self.ready = batched_features(part, self.cfg, self.dev)[::-1]
            self.segs[self.pos:self.pos + len(part)] = [None] * len(part)
            self.pos += len(part)
            self.seconds += time.perf_counter() - t
        return self.ready.pop()


def batched_features(segs: list[np.ndarray], cfg: StftConfig, dev: torch.device, *,
                     contiguous: bool = True) -> list[torch.Tensor]:
    """Features of every segment, batched by length (so each item equals its own STFT); CPU tensors out, each
    contiguous unless not ``contiguous`` (for a caller that copies them into place itself)."""
    out: list[torch.Tensor | None] = [None] * len(segs)
    by_len: dict[tuple, list[int]] = {}
    for i, s in enumerate(segs):
        by_len.setdefault(s.shape, []).append(i)
    for shape, idx in by_len.items():
        x = torch.from_numpy(np.stack([segs[i] for i in idx]))
        if dev.type == "cuda":
            x = x.pin_memory()
        spec = compute(x, cfg, dev)
        # made contiguous once for the batch (on the device): each item is then a contiguous view the encoder
        # copies straight into the database (a strided item cost a clone and then a second copy to encode)
        spec = spec.contiguous().cpu() if contiguous or dev.type != "cpu" else spec
        if shape[0] == 1:
            spec = spec[:, 0]  # one channel: items are [freqs, frames]
        for j, i in enumerate(idx):
            out[i] = spec[j]
    return out
