"""Precompute: a folder of audio becomes ``train``/``val``/``test`` LMDB databases of STFT items.

Decoding (soundfile), mixing and resampling (soxr) run in DataLoader worker processes, one file per
worker task. On the CPU the workers compute the features too, and the main process only writes; on CUDA
the main process computes the STFT of whole batches on the GPU (``pipeline``). The Writer commits file by
file. A commit never splits a file, so a run killed at any moment and started again with the same
parameters skips the files already written and finishes with every file present exactly once. Bad files
are skipped and reported with their reasons (``strict=True`` stops at the first).
``shard_index``/``num_shards`` (from torchrun's RANK/WORLD_SIZE when set) split the file list by
a stable hash into ``<split>-<i>-of-<n>.lmdb``.

Run it from ``notebooks/precompute.ipynb``, from Python (``lmdbkit.precompute.precompute(...)``) or
from the command line (``python -m lmdbkit.precompute --help``; also under ``torchrun``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader

from . import audio, demo, pipeline, store
from .errors import AudioDecodeError, ConfigMismatchError, LmdbkitError, ValueRangeError
from .mel import MEL_NORMS, MEL_SCALES
from .progress import tqdm
from .reader import Reader
from .stft import OUTPUTS, StftConfig, resolve_device
from .writer import MODES, Writer

DEFAULT_DEMO_DIR = "runs/demo/corpus"


SHORT_FILES = ("pad", "drop")


@dataclass(frozen=True)
class AudioConfig:
    """How audio becomes the STFT's input; compared on resume like the StftConfig."""

    sample_rate: int = 16000
    mono: str = "mean"
    segment_seconds: float | None = None
    segment_hop_seconds: float | None = None
    pad_last: bool = False
    short_files: str = "pad"  # a file shorter than one segment: "pad" (one zero-padded item) or "drop"

    def __post_init__(self):
        if self.short_files not in SHORT_FILES:
            raise LmdbkitError(f"short_files={self.short_files!r} is unsupported. Supported policies are "
                               f"{list(SHORT_FILES)}: 'pad' keeps a file shorter than one segment as one zero-padded "
                               "item (its true duration in duration_s), 'drop' skips it with its reason")
        if self.mono not in audio.MONO_POLICIES:
            raise LmdbkitError(f"mono={self.mono!r} is unsupported. Supported policies are {list(audio.MONO_POLICIES)}")
        for name in ("segment_seconds", "segment_hop_seconds"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise LmdbkitError(f"{name}={v!r}: give a positive number of seconds, or None")
        if self.segment_hop_seconds is not None and self.segment_seconds is None:
            raise LmdbkitError("segment_hop_seconds is set but segment_seconds is None; set both, or neither")


def _shard_from_env(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    if shard_index is None and num_shards is None and "WORLD_SIZE" in os.environ:
        shard_index, num_shards = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    num_shards = 1 if num_shards is None else num_shards
    shard_index = 0 if shard_index is None else shard_index
    if not isinstance(num_shards, int) or num_shards < 1 or not 0 <= shard_index < num_shards:
        raise LmdbkitError(f"shard_index={shard_index}, num_shards={num_shards}: give 0 <= shard_index < num_shards")
    return shard_index, num_shards


def default_output_dir(audio_dir: str | os.PathLike | None) -> Path:
    """Where outputs go when no output_dir is given: runs/demo/data, or runs/<audio folder's name>/data."""
    if audio_dir is None:
        return Path("runs/demo/data")
    return Path("runs") / (Path(audio_dir).resolve().name or "audio") / "data"


def _check_origin(out: Path, origin: dict, names: list[str]) -> None:
    """ConfigMismatchError if an existing database in ``out`` was written from another audio folder or
    manifest (databases from before this record existed are accepted, and get it)."""
    for name in names:
        p = out / name
        if not (p / "data.mdb").is_file():
            continue
        with Reader(p) as r:
            before = r.metadata.get("origin")
        if before is not None and before != origin:
            raise ConfigMismatchError(str(p), before, origin, "These databases hold another corpus's files: give "
                                      "another output_dir (with an audio_dir and no output_dir it is derived from "
                                      "the audio folder's name), or mode='overwrite' to start over. Nothing was written.")


def db_name(split: str, shard_index: int, num_shards: int) -> str:
    return f"{split}.lmdb" if num_shards == 1 else f"{split}-{shard_index}-of-{num_shards}.lmdb"


def _existing_labels(out: Path) -> dict[str, int]:
    """The label map stored by an earlier run in this output folder (any split, any shard)."""
    if not out.is_dir():
        return {}
    for p in sorted(out.glob("*.lmdb")):
        try:
            with Reader(p) as r:
                labels = r.metadata.get("labels")
        except LmdbkitError:
            continue
        if labels:
            return labels
    return {}


def precompute(audio_dir: str | os.PathLike | None = None, *, output_dir: str | os.PathLike | None = None,
               manifest: str | os.PathLike | None = None, demo_dir: str | os.PathLike = DEFAULT_DEMO_DIR,
               map_size_gb: float | None = None, max_size_gb: float | None = None,
               sample_rate: int = 16000, mono: str = "mean", segment_seconds: float | None = None,
               segment_hop_seconds: float | None = None, pad_last: bool = False, short_files: str = "pad",
               label_depth: int = 0, n_fft: int = 512, hop_length: int = 128, win_length: int | None = None, window: str = "hann",
               center: bool = True, output: str = "complex", dtype: str | None = None, n_mels: int = 80,
               f_min: float = 0.0, f_max: float | None = None, mel_scale: str = "slaney",
               mel_norm: str | None = "slaney", n_mfcc: int = 40, top_db: float | None = None,
               splits: dict[str, float] | None = None, split_seed: int = 0, num_workers: int = 2,
               batch_size: int = 16, device: str = "auto", limit: int | None = None, strict: bool = False,
               mode: str = "append", shard_index: int | None = None, num_shards: int | None = None,
               index_fields: Iterable[str] = ("label", "label_name"), durable: bool = True,
               commit_items: int = 1000, demo_clips_per_class: int = 40, progress: bool = True) -> dict[str, Any]:
    """Audio folder -> ``<output_dir>/<split>.lmdb``. Returns the run's summary (also stored in each database).

    With no ``audio_dir`` the embedded demo corpus is generated into ``demo_dir`` and used. With no
    ``output_dir``, outputs go to ``runs/demo/data`` for the demo and to ``runs/<audio folder's name>/data``
    otherwise; appending to databases written from another audio folder or manifest is refused. ``mode``:
    "append" (default: create, or resume an earlier run with the same settings), "overwrite" (start over)
    or "create" (refuse existing databases). Files are committed whole, at least every ``commit_items``
    items (or 64 MiB): a run killed at any moment loses at most that much work and resumes where it stopped.
    See the parameters cell of notebooks/precompute.ipynb.
    """
    t_start = time.perf_counter()
    stft_cfg = StftConfig(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, win_length=win_length,
                          window=window, center=center, output=output, dtype=dtype, n_mels=n_mels, f_min=f_min,
                          f_max=f_max, mel_scale=mel_scale, mel_norm=mel_norm, n_mfcc=n_mfcc, top_db=top_db)
    audio_cfg = AudioConfig(sample_rate=sample_rate, mono=mono, segment_seconds=segment_seconds,
                            segment_hop_seconds=segment_hop_seconds, pad_last=pad_last, short_files=short_files)
    splits = audio.check_splits(splits or audio.DEFAULT_SPLITS)
    if mode not in MODES:
        raise LmdbkitError(f"mode={mode!r} is unsupported. Supported modes are {list(MODES)}")
    for name, v, lo in (("num_workers", num_workers, 0), ("batch_size", batch_size, 1)):
        if not isinstance(v, int) or v < lo:
            raise LmdbkitError(f"{name}={v!r}: give an integer >= {lo}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise LmdbkitError(f"limit={limit!r}: give a positive number of files, or None for all")
    dev = resolve_device(device)
    shard_index, num_shards = _shard_from_env(shard_index, num_shards)

    root = Path(audio_dir) if audio_dir is not None else demo.make_corpus(demo_dir, n_per_class=demo_clips_per_class)
    sources = audio.discover(root, manifest=manifest, label_depth=label_depth)
    if limit is not None:
        sources = sources[:limit]
    # a file whose name is not UTF-8 cannot be a key: skipped with its reason, like any bad file
    bad_names, good = [], []
    for s in sources:
        why = audio.utf8_name_problem(s.path)
        if why is None:
            good.append(s)
        else:
            bad_names.append({"path": s.path.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                              "reason": why})
    sources = good
    if not sources and not bad_names:
        raise LmdbkitError(f"no audio files under {root} (looked for {', '.join(audio.AUDIO_EXTENSIONS)}); "
                           "check audio_dir, or give a manifest")
    for s in sources:
        if s.split is not None and s.split not in splits:
            raise LmdbkitError(f"manifest split {s.split!r} for {s.path} is not one of splits={list(splits)}")
    out = Path(output_dir) if output_dir is not None else default_output_dir(audio_dir)
    origin = {"audio_dir": str(root.resolve()), "manifest": str(Path(manifest).resolve()) if manifest else None}
    if mode == "append":
        _check_origin(out, origin, [db_name(split, shard_index, num_shards) for split in splits])
    out.mkdir(parents=True, exist_ok=True)
    labels = audio.label_map((s.label_name for s in sources), {} if mode == "overwrite" else _existing_labels(out))
    split_of = {s.path: s.split or audio.assign_split(s.path, splits, split_seed) for s in sources}
    mine = [s for s in sources if num_shards == 1 or audio.shard_of(s.path, num_shards) == shard_index]

    settings = {"kind": "stft", "stft": stft_cfg.to_dict(), "audio": audio_cfg.__dict__.copy(),
                "splits": splits, "split_seed": split_seed, "label_depth": label_depth}
    # databases written before these settings existed labelled by the first folder and dropped short files:
    # recorded only when they differ from that, such a run still resumes with the same behaviour asked for
    if label_depth == 0:
        del settings["label_depth"]
    if short_files == "drop":
        del settings["audio"]["short_files"]
    writers: dict[str, Writer] = {}
    try:
        for split in splits:
            w = Writer(out / db_name(split, shard_index, num_shards), mode=mode, map_size_gb=map_size_gb,
                       max_size_gb=max_size_gb, metadata=settings, index_fields=tuple(index_fields), durable=durable,
                       commit_items=commit_items)
            writers[split] = w
            w.set_metadata(labels=labels, shard={"index": shard_index, "count": num_shards}, origin=origin)
        pending = [s for s in mine if not writers[split_of[s.path]].has_source(s.path)]
        done = {s.path: n for s in pending if (n := writers[split_of[s.path]].source_progress(s.path))}
        if strict and bad_names:
            raise AudioDecodeError(f"{bad_names[0]['path']}: {bad_names[0]['reason']} (strict=True stops at the "
                                   "first bad file; strict=False skips and reports bad files)")
        stats = _run(root, pending, split_of, labels, writers, stft_cfg, audio_cfg, dev, num_workers=num_workers,
                     batch_size=batch_size, strict=strict, progress=progress, done=done)
        stats["skipped"][:0] = bad_names
        summary = _summary(writers, root, out, stats, len(mine) - len(pending), time.perf_counter() - t_start,
                           stft_cfg, dev, shard_index, num_shards, num_workers)
        summary.update(_label_counts(writers, mine, labels), label_depth=label_depth,
                       short_files={"policy": short_files, "padded": stats["short_padded"],
                                    "dropped": stats["short_dropped"]})
        summary["summary_json"] = str(summary_path(out, shard_index, num_shards))
        for w in writers.values():
            w.set_metadata(summary=stored_summary(summary))
    except BaseException:
        for w in writers.values():
            w.abort()  # keeps what was committed; a rerun resumes from there
        raise
    for w in writers.values():
        w.close()
    save_summary(summary)
    return summary


def summary_path(out: Path, shard_index: int, num_shards: int) -> Path:
    """Where a run's whole summary goes, beside its databases: ``summary.json``, or ``summary-<i>-of-<n>.json``
    for a shard."""
    return out / ("summary.json" if num_shards == 1 else f"summary-{shard_index}-of-{num_shards}.json")


def save_summary(summary: dict) -> None:
    """Write the whole summary (every skipped file) to its ``summary_json``; precompute does at its end, the
    notebook again once it has added the decode stage's speed."""
    path = Path(summary["summary_json"])
    out = path.parent
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LmdbkitError(f"the databases in {out} are complete, but the run's summary could not be written to "
                           f"{path} ({exc}); free space or fix permissions, then run again to write it") from exc


def _run(root, pending, split_of, labels, writers, stft_cfg, audio_cfg, dev, *, num_workers, batch_size,
         strict, progress, done=None) -> dict:
    stats = {"files": 0, "items": 0, "audio_seconds": 0.0, "skipped": [], "stft_seconds": 0.0,
             "worker_stft_seconds": 0.0, "write_seconds": 0.0, "wait_seconds": 0.0, "short_padded": 0,
             "short_dropped": 0}
    if not pending:
        return stats
    done = done or {}
    # on the CPU the workers compute the features too (pipeline.Features), so the main process only writes
    collate = pipeline.Features(stft_cfg if dev.type == "cpu" else None)
    loader = DataLoader(pipeline.Files(root, pending, audio_cfg), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate, persistent_workers=False, worker_init_fn=die_with_parent,
                        prefetch_factor=4 if num_workers else None)
    bar = tqdm(total=len(pending), unit="file", desc="precompute", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    t_wait = time.perf_counter()
    threads = torch.get_num_threads()
    if dev.type == "cpu" and num_workers:  # leave the decode workers their cores: oversubscribed, the STFT crawls
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - num_workers)))
    try:
        for batch in loader:
            stats["wait_seconds"] += time.perf_counter() - t_wait
            batch, worker_seconds = pipeline.received(batch)
            stats["worker_stft_seconds"] += worker_seconds
            good = []
            for rec in batch:
                if "error" in rec:
                    if strict:
                        raise AudioDecodeError(f"{rec['error']} (strict=True stops at the first bad file; "
                                               "strict=False skips and reports bad files)")
                    reason = rec["error"].removeprefix(f"{root / rec['source'].path}: ")
                    stats["skipped"].append({"path": rec["source"].path, "reason": reason})
                    stats["short_dropped"] += rec.get("short", False)
                else:
                    good.append(rec)
            ts = time.perf_counter()
            # the features a worker did not compute are computed a chunk of segments at a time, as the writer
            # takes them (a long file never holds all its spectrograms in memory), batched across the short files
            specs = pipeline.LazyFeatures(good, stft_cfg, dev, batch_size)
            try:
                _write_batch(good, specs, writers, split_of, labels, audio_cfg, done, stats)
            except ValueRangeError as exc:
                names = ", ".join(rec["source"].path for rec in good[:4]) + (" ..." if len(good) > 4 else "")
                raise ValueRangeError(f"{exc} (in the batch of {names})") from exc
            elapsed = time.perf_counter() - ts
            stats["stft_seconds"] += specs.seconds
            stats["write_seconds"] += elapsed - specs.seconds
            bar.update(len(batch))
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(audio_s_per_s=f"{stats['audio_seconds'] / dt:.0f}", skipped=len(stats["skipped"]))
            t_wait = time.perf_counter()
    finally:
        bar.close()
        torch.set_num_threads(threads)
    stats["loop_seconds"] = time.perf_counter() - t0
    return stats


def _write_batch(good: list[dict], specs: pipeline.LazyFeatures, writers: dict, split_of: dict, labels: dict,
                 audio_cfg: AudioConfig, done: dict, stats: dict) -> None:
    """Append each decoded file of a batch to its split's writer, its items' features drawn from ``specs``."""
    for rec in good:
        s: audio.Source = rec["source"]
        n = len(rec["spans"])
        w = writers[split_of[s.path]]
        w.append_source(s.path, _file_samples(rec, specs, labels, audio_cfg, skip=done.get(s.path, 0)),
                        info={"duration_s": rec["duration_s"], "orig_sample_rate": rec["orig_sample_rate"]})
        stats["files"] += 1
        stats["items"] += n - done.get(s.path, 0)
        seg = audio_cfg.segment_seconds
        stats["short_padded"] += seg is not None and rec["duration_s"] < seg
        stats["audio_seconds"] += rec["duration_s"]
        rec["segments"] = None  # the decoded audio of a finished file can go


def _file_samples(rec: dict, specs: pipeline.LazyFeatures, labels: dict, audio_cfg: AudioConfig, *, skip: int = 0):
    """(key, item) of each segment of one decoded file, in order; the first ``skip`` were written by an earlier,
    interrupted run (their STFTs are still drawn from ``specs``, which yields every segment in order)."""
    s: audio.Source = rec["source"]
    sr = audio_cfg.sample_rate
    for j, (start, valid) in enumerate(rec["spans"]):
        spec = next(specs)
        if j < skip:
            continue
        yield f"{s.path}#{j}", {
            "stft": spec, "label": labels[s.label_name], "label_name": s.label_name, "path": s.path, "segment": j,
            "offset_s": start / sr, "duration_s": valid / sr, "sample_rate": sr,
            "orig_sample_rate": rec["orig_sample_rate"]}


def die_with_parent(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: end this worker when its parent dies (Linux: PR_SET_PDEATHSIG).

    A worker blocked on a full pipe to a parent that was killed would otherwise wait forever; torch's own
    watchdog only runs between tasks.
    """
    parent = os.getppid()
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: torch's watchdog still ends idle workers
    if os.getppid() != parent or parent == 1:  # the parent died before the call: nobody will signal us
        os._exit(1)


def _summary(writers, root, out, stats, resumed_files, elapsed, stft_cfg, dev, shard_index, num_shards,
             num_workers) -> dict:
    splits = {}
    for split, w in writers.items():
        w.commit()  # so that sources() lists this run's files too
        srcs = {k: v for k, v in w.sources().items() if not v.get("partial")}
        splits[split] = {"database": str(w.path), "items": len(w), "files": len(srcs),
                         "audio_hours": sum(v.get("duration_s", 0.0) for v in srcs.values()) / 3600,
                         "bytes": store.disk_usage(w.path)}  # after the last data commit; closing adds only meta
    loop = stats.get("loop_seconds") or 0.0
    return {
        "audio_dir": str(root), "output_dir": str(out), "device": str(dev), "num_workers": num_workers,
        "shard": {"index": shard_index, "count": num_shards},
        "stft": stft_cfg.to_dict(), "splits": splits,
        "files_processed": stats["files"], "files_resumed": resumed_files, "items_written": stats["items"],
        "audio_seconds": stats["audio_seconds"], "skipped": stats["skipped"], "elapsed_seconds": elapsed,
        "audio_seconds_per_second": stats["audio_seconds"] / loop if loop else None,
        "files_per_second": stats["files"] / loop if loop else None,
        "time_split": {k: stats[k] for k in ("wait_seconds", "stft_seconds", "write_seconds", "worker_stft_seconds")} | {"loop_seconds": loop},
    }


SKIPPED_STORED = 20  # skipped files a database's copy of the summary lists (the returned summary lists all)
SHOWN = 20  # skipped files and labels the end-of-run table names (summary.json has every one)


def stored_summary(summary: dict) -> dict:
    """The summary as each database keeps it: the first SKIPPED_STORED skipped files and their count. Every
    commit rewrites a database's format record, and every open parses it and metadata.json: with 20,000 skipped
    files listed (a 2.2 MB metadata.json) open + len took 14-21 ms, with 20 of them 0.36-0.41 ms."""
    skipped = summary["skipped"]
    if len(skipped) <= SKIPPED_STORED:
        return summary
    return dict(summary, skipped=skipped[:SKIPPED_STORED], skipped_count=len(skipped))


def _label_counts(writers, sources: list[audio.Source], labels: dict[str, int]) -> dict:
    """Files and items per label over every split (this run's and earlier runs'), and the labels of the map
    that have no item (e.g. a folder of files that all failed to decode)."""
    label_of = {s.path: s.label_name for s in sources}
    counts = {name: {"files": 0, "items": 0} for name in labels}
    for s in sources:
        counts.setdefault(s.label_name, {"files": 0, "items": 0})["files"] += 1
    for w in writers.values():
        for path, rec in w.sources().items():
            if path in label_of and not rec.get("partial"):
                counts[label_of[path]]["items"] += len(rec.get("items", []))
    return {"labels": counts, "empty_labels": sorted(name for name, c in counts.items() if not c["items"])}


def format_summary(summary: dict) -> str:
    """The end-of-run table: items, files, audio hours and bytes per split, and files skipped."""
    rows = [f"{'split':<10}{'files':>7}{'items':>8}{'audio h':>10}{'MiB':>10}"]
    for split, d in summary["splits"].items():
        mib = d["bytes"] / 2**20
        rows.append(f"{split:<10}{d['files']:>7}{d['items']:>8}{d['audio_hours']:>10.3f}{mib:>10.1f}")
    rate = summary.get("audio_seconds_per_second")
    rows.append(f"processed {summary['files_processed']} files this run ({summary['files_resumed']} already done)"
                + (f", {rate:.0f} audio-seconds/s on {summary['device']}" if rate else ""))
    if summary.get("labels"):
        counts = list(summary["labels"].items())
        found = ", ".join(f"{name} ({c['files']} files, {c['items']} items)" for name, c in counts[:SHOWN])
        more = f", and {len(counts) - SHOWN} more" if len(counts) > SHOWN else ""
        rows.append(f"labels (label_depth={summary.get('label_depth', 0)}): {found}{more}")
    if summary.get("empty_labels"):
        rows.append(f"labels with no items (every file skipped): {', '.join(summary['empty_labels'])}")
    short = summary.get("short_files")
    if short and (short["padded"] or short["dropped"]):
        rows.append(f"files shorter than one segment: {short['padded']} kept zero-padded, {short['dropped']} dropped "
                    f"(short_files={short['policy']!r})")
    skipped = summary["skipped"]
    rows.append(f"skipped {len(skipped)} files" + (":" if skipped else ""))
    rows += [f"  {s['path']}: {s['reason']}" for s in skipped[:SHOWN]]
    if len(skipped) > SHOWN:
        rows.append(f"  ... and {len(skipped) - SHOWN} more"
                    + (f": every one is in {summary['summary_json']}" if summary.get("summary_json") else ""))
    return "\n".join(rows)


def decode_only(audio_dir: str | os.PathLike | None = None, *, demo_dir: str | os.PathLike = DEFAULT_DEMO_DIR,
                demo_clips_per_class: int = 40, manifest=None, sample_rate: int = 16000, mono: str = "mean", segment_seconds: float | None = None,
                segment_hop_seconds: float | None = None, pad_last: bool = False, short_files: str = "pad",
                label_depth: int = 0, num_workers: int = 2, batch_size: int = 16, limit: int | None = None,
                progress: bool = True) -> dict:
    """The decode stage alone (same loader, same workers, no STFT, no writing): audio-seconds per second.

    The ceiling for precompute on this machine; compare with a precompute summary's audio_seconds_per_second.
    """
    cfg = AudioConfig(sample_rate=sample_rate, mono=mono, segment_seconds=segment_seconds,
                      segment_hop_seconds=segment_hop_seconds, pad_last=pad_last, short_files=short_files)
    # the same demo corpus as precompute's (another size would regenerate it in place)
    root = Path(audio_dir) if audio_dir is not None else demo.make_corpus(demo_dir, n_per_class=demo_clips_per_class)
    sources = audio.discover(root, manifest=manifest, label_depth=label_depth)[:limit]
    loader = DataLoader(pipeline.Files(root, sources, cfg), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=pipeline.as_list, worker_init_fn=die_with_parent,
                        prefetch_factor=4 if num_workers else None)
    t0 = time.perf_counter()
    secs = 0.0
    with tqdm(total=len(sources), unit="file", desc="decode only", disable=not progress) as bar:
        for batch in loader:
            secs += sum(rec.get("duration_s", 0.0) for rec in batch)
            bar.update(len(batch))
    dt = time.perf_counter() - t0
    return {"files": len(sources), "audio_seconds": secs, "seconds": dt, "audio_seconds_per_second": secs / dt,
            "num_workers": num_workers}


def build_parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter
    """The options of precompute(), each with its help and default (``lmdbkit precompute --help``)."""
    ap = argparse.ArgumentParser(prog="lmdbkit precompute", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add = ap.add_argument
    add("--audio-dir", help="folder of audio, one subfolder per class; none: the embedded demo corpus")
    add("--output-dir", help="where <split>.lmdb go; none: runs/demo/data for the demo, runs/<audio folder's "
                             "name>/data for --audio-dir")
    add("--manifest", help="CSV with columns path,label[,split] (paths relative to --audio-dir)")
    add("--demo-dir", default=DEFAULT_DEMO_DIR, help="where the demo corpus is generated without --audio-dir")
    add("--demo-clips-per-class", type=int, default=40, help="size of the demo corpus (8 classes)")
    add("--map-size-gb", type=float, help="initial LMDB map in GiB; none: start small and grow by doubling")
    add("--max-size-gb", type=float, help="refuse to grow a database past this many GiB; none: no limit")
    add("--sample-rate", type=int, default=16000, help="every file is resampled to this rate (Hz)")
    add("--mono", default="mean", choices=audio.MONO_POLICIES, help="channels: downmix, first, or keep them all")
    add("--segment-seconds", type=float, help="cut files into segments of this length; none: one item per file")
    add("--segment-hop-seconds", type=float, help="step between segment starts; none: --segment-seconds")
    add("--pad-last", action="store_true", help="keep the last partial segment, zero-padded")
    add("--short-files", default="pad", choices=SHORT_FILES,
        help="a file shorter than one segment: one zero-padded item, or dropped with its reason")
    add("--label-depth", type=int, default=0,
        help="which folder labels a file: 0 the first below --audio-dir, 1 the next, -1 the file's own")
    add("--n-fft", type=int, default=512, help="FFT size")
    add("--hop-length", type=int, default=128, help="samples between frames")
    add("--win-length", type=int, help="window length; none: --n-fft")
    add("--window", default="hann", help="hann, hamming, blackman, bartlett or rectangular")
    add("--no-center", dest="center", action="store_false",
        help="do not pad so that frame t is centred on sample t * hop_length")
    add("--output", default="complex", choices=OUTPUTS, help="what is stored")
    add("--dtype", help="complex64 (complex output) or float32 (others) when not given; complex32 and float16 "
                        "halve the bytes; also complex128, bfloat16, float64")
    add("--n-mels", type=int, default=80, help="mel outputs: number of mel bands")
    add("--f-min", type=float, default=0.0, help="mel outputs: lowest band edge (Hz)")
    add("--f-max", type=float, help="mel outputs: highest band edge (Hz); none: sample_rate / 2")
    add("--mel-scale", default="slaney", choices=MEL_SCALES, help="mel scale (slaney: librosa's; htk: torchaudio's)")
    add("--mel-norm", default="slaney", type=lambda v: None if v == "none" else v, choices=MEL_NORMS,
        metavar="{slaney,none}", help="slaney: each band's area is 1; none: peak 1")
    add("--n-mfcc", type=int, default=40, help="mfcc: coefficients kept")
    add("--top-db", type=float, help="log outputs: clip each item at its max minus this many dB; none: no "
                                     "clipping (mfcc: 80)")
    add("--splits", type=json.loads, help='split fractions as JSON, e.g. \'{"train": 0.8, "val": 0.1, "test": 0.1}\'; '
                                          "none: 0.8/0.1/0.1")
    add("--split-seed", type=int, default=0, help="changes the hash-based split assignment")
    add("--index-fields", nargs="*", default=["label", "label_name"], help="fields with a secondary index")
    add("--num-workers", type=int, default=2, help="DataLoader worker processes that decode audio")
    add("--batch-size", type=int, default=16, help="files per STFT batch")
    add("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    add("--limit", type=int, help="process only the first N files (sorted by path); none: all")
    add("--strict", action="store_true", help="stop at the first bad file instead of skipping and reporting it")
    add("--mode", default="append", choices=MODES, help="append: create or resume; overwrite: start over; "
                                                        "create: refuse existing databases")
    add("--shard-index", type=int, help="this shard; none: torchrun's RANK, else 0")
    add("--num-shards", type=int, help="number of shards; none: torchrun's WORLD_SIZE, else 1")
    add("--commit-items", type=int, default=1000, help="commit at least every N items: a killed run loses at "
                                                       "most this much work")
    add("--no-durable", dest="durable", action="store_false",
        help="skip the fsync per commit (an OS crash may then lose the last commits; a killed run does not)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Command line (also under torchrun: each rank writes its shard)."""
    ap = build_parser()
    a = vars(ap.parse_args(argv))
    try:
        summary = precompute(a.pop("audio_dir"), **a)
    except LmdbkitError as exc:
        ap.exit(2, f"error: {exc}\n")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def check_outputs(summary: dict) -> None:
    """Fail loudly (LmdbkitError) if a split is empty or the databases disagree with the summary."""
    problems = output_problems(summary)
    if problems:
        raise LmdbkitError("precompute output check failed:\n  " + "\n  ".join(problems))


def verdict(summary: dict):
    """The run's closing summary (see lmdbkit.verdict): the databases made, the speed, what was skipped, and the
    output check's problems."""
    from .verdict import Verdict
    splits = summary["splits"]
    made = ", ".join(f"{split} {d['items']} items" for split, d in splits.items())
    mib = sum(d["bytes"] for d in splits.values()) / 2**20
    facts = [("made", f"{made} ({mib:.1f} MiB) in {Path(summary['output_dir']).resolve()}"),
             ("from", f"{summary['files_processed']} files this run, {summary['files_resumed']} already done"
                      + (f"; {len(summary['labels'])} labels" if summary.get("labels") else ""))]
    rate, dec = summary.get("audio_seconds_per_second"), (summary.get("decode_only") or {}).get("audio_seconds_per_second")
    if rate:
        facts.append(("speed", f"{rate:.0f} audio-seconds/s on {summary['device']}"
                               + (f", {rate / dec:.2f}x decoding alone ({dec:.0f}/s)" if dec else "")))
    skipped = summary["skipped"]
    facts.append(("skipped", f"{len(skipped)} files" + (f" (first: {skipped[0]['path']}: {skipped[0]['reason']})"
                                                        if skipped else "")))
    return Verdict("precompute", facts, output_problems(summary))


def output_problems(summary: dict) -> list[str]:
    """What is wrong with a run's databases: an empty split, or counts that disagree with the summary."""
    problems = []
    for split, d in summary["splits"].items():
        with Reader(d["database"]) as r:
            n, files = len(r), r.metadata.get("summary", {}).get("splits", {}).get(split, {}).get("files")
            if not r.meta.get("complete"):
                problems.append(f"{d['database']} is not marked complete")
            keys = r.keys()
        if n == 0:
            problems.append(f"split {split!r} is empty ({d['database']}); add audio or change splits")
        if n != d["items"] or len(keys) != n:
            problems.append(f"split {split!r}: the summary says {d['items']} items, {d['database']} holds {n} "
                            f"({len(keys)} keys)")
        if files != d["files"]:
            problems.append(f"split {split!r}: the summary says {d['files']} files, the database's record {files}")
    return problems
