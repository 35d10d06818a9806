"""What each stored feature kind costs and loses, on real speech: bytes per audio-second, the error of each
half-precision kind (against the same kind in full precision, and for complex STFTs of the audio that their
inverse gives back), and random-read speed warm and cold (page cache dropped with posix_fadvise DONTNEED).

The corpus is spoken by espeak-ng (``demo.make_speech_corpus``) where it is installed, else the demo corpus
(tones, chirps, noise), named in the result. Each kind is computed from the same decoded audio (one item per
file) and written with ``Writer`` as precompute would. Two more ways are evaluated without a database, to
decide whether they earn a place: complex STFTs as bfloat16 pairs, and lilcom (the speech toolkits' lossy
log-mel compressor, when it is installed).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import audio, demo, store
from .bench import drop_page_cache, time_reads
from .errors import LmdbkitError
from .reader import Reader
from .stft import StftConfig, compute, inverse
from .writer import Writer

# (name, StftConfig fields, compression, the full-precision kind it is compared with)
KINDS = (
    ("complex64", dict(output="complex", dtype="complex64"), None, None),
    ("complex32", dict(output="complex", dtype="complex32"), None, "complex64"),
    ("magnitude f32", dict(output="magnitude", dtype="float32"), None, None),
    ("magnitude f16", dict(output="magnitude", dtype="float16"), None, "magnitude f32"),
    ("log_mel f32", dict(output="log_mel", dtype="float32"), None, None),
    ("log_mel f16", dict(output="log_mel", dtype="float16"), None, "log_mel f32"),
    ("log_mel bf16", dict(output="log_mel", dtype="bfloat16"), None, "log_mel f32"),
    ("log_mel f16 zstd", dict(output="log_mel", dtype="float16"), "zstd", "log_mel f32"),
    ("mfcc f32", dict(output="mfcc", dtype="float32"), None, None),
)
SAMPLE_RATE = 16000
STFT = dict(sample_rate=SAMPLE_RATE, n_fft=512, hop_length=128, n_mels=80, top_db=80.0)


def load_corpus(workdir: Path) -> tuple[str, list[np.ndarray]]:
    """(corpus name, mono float32 clips at SAMPLE_RATE): espeak-ng speech, else the demo corpus."""
    try:
        root, name = demo.make_speech_corpus(workdir / "speech"), "speech (espeak-ng)"
    except LmdbkitError:  # espeak-ng missing: the synthetic corpus still measures every kind
        root, name = demo.make_corpus(workdir / "demo", n_per_class=5, bad_files=False), "demo (synthetic)"
    clips = [audio.decode_resampled(root / s.path, sample_rate=SAMPLE_RATE, mono="mean")[0][0]
             for s in audio.discover(root)]
    return name, clips


def _available(compression: str) -> bool:
    from .codec import check_compression
    try:
        check_compression(compression)
        return True
    except Exception:
        return False


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    """10 log10(signal energy / error energy); inf when equal."""
    ref, x = np.asarray(ref), np.asarray(x)
    err = np.sum(np.abs(ref - x) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(np.abs(ref) ** 2) / err))


def _flat(items: list) -> np.ndarray:
    """Every value of several tensors in one array (complex stays complex; real as float64)."""
    return np.concatenate([(t if t.is_complex() else t.double()).numpy().ravel() for t in items])


def bench_kinds(workdir: str | Path, *, min_seconds: float = 0.3, kinds=KINDS, progress: bool = True) -> dict:
    """The table of kinds. Warm: random single reads repeated for at least min_seconds; cold: every item once
    in random order, right after the page cache was dropped."""
    from .progress import tqdm
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, clips = load_corpus(work)
    seconds = sum(len(c) for c in clips) / SAMPLE_RATE
    waves = [torch.from_numpy(c) for c in clips]
    rows, stored = [], {}
    if not _available("zstd"):
        kinds = [k for k in kinds if k[2] != "zstd"]  # pip install zstandard to measure it
    try:
        for name, fields, compression, ref in tqdm(kinds, desc="feature kinds", disable=not progress):
            row, stored[name] = _measure_kind(work, name, StftConfig(**STFT, **fields), compression, waves, clips,
                                              min_seconds=min_seconds)
            if ref is not None:
                a, b = _flat(stored[ref]), _flat(stored[name])
                row.update(compared_with=ref, snr_db=snr_db(a, b), max_abs_error=float(np.max(np.abs(a - b))))
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next((r["disk_bytes_per_audio_second"] for r in rows if r["kind"] == "complex64"), None)
    for r in rows:
        r["disk_vs_complex64"] = r["disk_bytes_per_audio_second"] / base if base else None
    return {"corpus": corpus, "files": len(clips), "audio_seconds": seconds, "stft": STFT, "rows": rows,
            "evaluated": _evaluated(waves, clips)}


def _measure_kind(work: Path, name: str, cfg: StftConfig, compression: str | None, waves: list, clips: list,
                  *, min_seconds: float) -> tuple[dict, list]:
    """(row, the items as read back) for one kind: written as precompute would, then read warm and cold."""
    path = work / f"{name.replace(' ', '_')}.lmdb"
    seconds = sum(len(c) for c in clips) / SAMPLE_RATE
    t0 = time.perf_counter()
    with Writer(path, metadata={"stft": cfg.to_dict()}, compression=compression, durable=False) as w:
        for i, x in enumerate(waves):
            w.append({"stft": compute(x, cfg), "i": i})
    write_s = time.perf_counter() - t0
    order = random.Random(0).sample(range(len(waves)), len(waves))
    with Reader(path, decode_to="torch") as r:
        back = [r[i]["stft"] for i in range(len(r))]
        warm = time_reads(r.__getitem__, order, min_seconds=min_seconds)
    # complex32 is read back as complex64: its stored payload is half of what comes back
    payload = sum(t.numel() * t.element_size() for t in back) // (2 if cfg.dtype == "complex32" else 1)
    drop_page_cache(path)
    t0 = time.perf_counter()
    with Reader(path, decode_to="torch") as r:
        for i in order:  # each item once: every read is the first since the drop
            r[i]
    cold = len(order) / (time.perf_counter() - t0)
    per_item_s, per_item_b = seconds / len(back), payload / len(back)
    row = {"kind": name, "output": cfg.output, "dtype": cfg.dtype, "compression": compression, "items": len(back),
           "disk_bytes_per_audio_second": store.disk_usage(path) / seconds,
           "payload_bytes_per_audio_second": payload / seconds, "compared_with": None,
           "write_audio_seconds_per_second": seconds / write_s,
           "warm_items_per_second": warm, "warm_audio_seconds_per_second": warm * per_item_s,
           "warm_mib_per_second": warm * per_item_b / 2**20, "cold_items_per_second": cold,
           "cold_audio_seconds_per_second": cold * per_item_s, "cold_mib_per_second": cold * per_item_b / 2**20}
    if cfg.output == "complex":
        audio_back = [inverse(x, cfg, length=len(c)).numpy() for x, c in zip(back, clips)]
        row["audio_snr_db"] = snr_db(np.concatenate(clips), np.concatenate(audio_back))
    return row, back


def _evaluated(waves: list[torch.Tensor], clips: list[np.ndarray]) -> list[dict]:
    """Ways not offered, measured so the choice is on record: bfloat16 complex pairs, lilcom on log-mel."""
    out = []
    cfg = StftConfig(**STFT)
    full = [compute(x, cfg) for x in waves]
    bf = [torch.view_as_complex(torch.view_as_real(s).bfloat16().float()) for s in full]
    half = [torch.view_as_complex(torch.view_as_real(s).half().float()) for s in full]
    out.append({"kind": "complex bf16 pairs", "bytes_vs_complex64": 0.5, "snr_db": snr_db(_flat(full), _flat(bf)),
                "complex32_snr_db": snr_db(_flat(full), _flat(half)),
                "audio_snr_db": snr_db(np.concatenate(clips), np.concatenate(
                    [inverse(s, cfg, length=len(c)).numpy() for s, c in zip(bf, clips)])),
                "verdict": "not offered: complex STFTs of audio in [-1, 1] stay far inside float16's range "
                           "(|X| <= the window's sum), where float16 keeps 3 more bits"})
    try:
        import lilcom
    except ImportError:
        return out
    lm_cfg = StftConfig(**STFT, output="log_mel")
    lm = [compute(x, lm_cfg).numpy() for x in waves]
    for tick in (-6, -4):
        packed = [lilcom.compress(x.copy(), tick_power=tick) for x in lm]  # it rounds its input in place
        t0 = time.perf_counter()
        back = [lilcom.decompress(p) for p in packed]
        dt = time.perf_counter() - t0
        raw = sum(x.nbytes for x in lm)
        out.append({"kind": f"log_mel lilcom 2^{tick}", "bytes_vs_float32": sum(map(len, packed)) / raw,
                    "max_abs_error": float(max(np.abs(b - x).max() for b, x in zip(back, lm))),
                    "decode_mib_per_second": raw / dt / 2**20,
                    "verdict": "not in the codec: lossy, a compiled dependency, and about the size of float16 "
                               "with zstd at the same error"})
    return out


def table(result: dict) -> str:
    cols = [("kind", "{:<18}"), ("disk_bytes_per_audio_second", "{:>10.0f}"), ("disk_vs_complex64", "{:>10.3f}"),
            ("snr_db", "{:>10.1f}"), ("max_abs_error", "{:>10.2g}"), ("audio_snr_db", "{:>10.1f}"),
            ("warm_audio_seconds_per_second", "{:>10.0f}"), ("cold_audio_seconds_per_second", "{:>10.0f}")]
    head = ["kind", "B/audio-s", "vs c64", "SNR dB", "max err", "audio SNR", "warm a-s/s", "cold a-s/s"]
    lines = [" ".join(f"{h:>10}" if i else f"{h:<18}" for i, h in enumerate(head))]
    for r in result["rows"]:
        cells = []
        for (k, fmt), h in zip(cols, head):
            v = r.get(k)
            cells.append(fmt.format(v) if v is not None else " " * 10)
        lines.append(" ".join(cells))
    return "\n".join(lines)
