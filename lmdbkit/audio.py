"""Audio in: find files, label them, split and shard them by stable hashes, decode, mix down, resample, segment.

Decoding uses soundfile (libsndfile: wav of every bit depth, flac, ogg/vorbis/opus, mp3, aiff, ...); when
it cannot read a file and torchaudio imports, torchaudio is tried. Resampling uses soxr. No torch here.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import xxhash

from .errors import AudioDecodeError, LmdbkitError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64")
MONO_POLICIES = ("mean", "first", "keep")
DEFAULT_SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass(frozen=True)
class Source:
    """One audio file to process: its path relative to the audio folder, label name and split."""

    path: str          # relative, with forward slashes: the file's stable id
    label_name: str
    split: str | None = None


log = logging.getLogger("lmdbkit.audio")


def discover(audio_dir: str | os.PathLike, *, manifest: str | os.PathLike | None = None,
             extensions: Iterable[str] = AUDIO_EXTENSIONS, label_depth: int = 0) -> list[Source]:
    """The audio files under ``audio_dir``, sorted by relative path.

    Labels come from the manifest (CSV with ``path,label[,split]``, paths relative to audio_dir) or from a
    folder of each file's path, chosen by ``label_depth``: 0 the first folder below audio_dir (as
    torchvision's ImageFolder), 1 the folder below that (``speech/en/x.wav`` -> ``en``), -1 the file's own
    folder. A file not that deep takes its own folder; files directly in audio_dir take audio_dir's name
    (both are logged). Hidden files and folders are ignored.
    """
    root = Path(audio_dir)
    if not root.is_dir():
        from .store import where
        raise LmdbkitError(f"audio_dir={str(audio_dir)!r} is not a folder (looked for {where(root)}). Point it at "
                           "the folder that holds "
                           "your audio (one subfolder per class), or leave it None for the demo corpus")
    if not isinstance(label_depth, int) or isinstance(label_depth, bool) or label_depth < -1:
        raise LmdbkitError(f"label_depth={label_depth!r}: give 0 (the first folder below audio_dir), 1 (the folder "
                           "below that), ... or -1 (each file's own folder)")
    if manifest is not None:
        return _read_manifest(root, Path(manifest))
    exts = tuple(e.lower() for e in extensions)
    top = root.resolve().name or "audio"
    out, at_top, shallow = [], 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(exts):
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            folders = rel.split("/")[:-1]
            if not folders:
                at_top += 1
                label = top
            elif label_depth == -1 or label_depth >= len(folders):
                shallow += label_depth >= len(folders)
                label = folders[-1]
            else:
                label = folders[label_depth]
            out.append(Source(rel, label))
    if at_top:
        log.warning("%d audio files lie directly in %s, not in a class folder: they are labelled %r. Put each "
                    "class in its own folder (or give a manifest) to label them", at_top, root, top)
    if shallow:
        log.warning("%d audio files are not %d folders deep (label_depth=%d): each is labelled by its own folder",
                    shallow, label_depth + 1, label_depth)
    out.sort(key=lambda s: s.path)
    return out


def _read_manifest(root: Path, manifest: Path) -> list[Source]:
    if not manifest.is_file():
        raise LmdbkitError(f"manifest={str(manifest)!r} does not exist; give a CSV with columns path,label[,split]")
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "path" not in cols or "label" not in cols:
            raise LmdbkitError(f"manifest {manifest} has columns {cols}; it needs path,label and optionally split")
        out = []
        for line, row in enumerate(reader, start=2):
            rel = Path(row["path"]).as_posix()
            if Path(rel).is_absolute():
                try:
                    rel = Path(rel).relative_to(root.resolve()).as_posix()
                except ValueError:
                    raise LmdbkitError(f"manifest {manifest} line {line}: {rel} is not under audio_dir {root}") from None
            out.append(Source(rel, str(row["label"]), (row.get("split") or None)))
    return sorted(out, key=lambda s: s.path)


def label_map(names: Iterable[str], existing: dict[str, int] | None = None) -> dict[str, int]:
    """label name -> int: the existing map kept as is, new names appended in sorted order (stable across runs)."""
    out = dict(existing or {})
    for name in sorted(set(names) - set(out)):
        out[name] = len(out)
    return out


def _unit_hash(text: str) -> float:
    return xxhash.xxh64_intdigest(text.encode()) / 2.0**64


def assign_split(path: str, splits: dict[str, float], seed: int = 0) -> str:
    """The split of a source by a stable hash of its relative path and the seed: adding files never moves one."""
    u = _unit_hash(f"split:{seed}:{path}")
    total = sum(splits.values())
    acc = 0.0
    for name, frac in splits.items():
        acc += frac / total
        if u < acc:
            return name
    return list(splits)[-1]


def shard_of(path: str, num_shards: int) -> int:
    """The shard of a source by a stable hash of its relative path."""
    return xxhash.xxh64_intdigest(f"shard:{path}".encode()) % num_shards


def check_splits(splits: dict[str, float]) -> dict[str, float]:
    if not isinstance(splits, dict) or not splits:
        raise LmdbkitError(f"splits={splits!r}: give a mapping like {DEFAULT_SPLITS}")
    for name, frac in splits.items():
        if not isinstance(name, str) or not name or "/" in name or not isinstance(frac, (int, float)) or frac < 0:
            raise LmdbkitError(f"splits={splits!r}: split names are plain strings and fractions are >= 0")
    if sum(splits.values()) <= 0:
        raise LmdbkitError(f"splits={splits!r}: the fractions add up to 0")
    return dict(splits)


# -- decoding ---------------------------------------------------------------------------------------

def _nonempty_file(path: str | os.PathLike) -> Path:
    """The path, or AudioDecodeError if it cannot be read or is empty."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise AudioDecodeError(f"{p}: cannot read the file ({exc.strerror})") from exc
    if size == 0:
        raise AudioDecodeError(f"{p}: empty file (0 bytes)")
    return p


def decode(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(float32 samples shaped [channels, frames], sample rate). Raises AudioDecodeError with the reason."""
    import soundfile as sf
    p = _nonempty_file(path)
    try:
        with sf.SoundFile(str(p)) as f:
            _check_not_truncated(p, f.extra_info)
            sr = f.samplerate
            data = f.read(dtype="float32", always_2d=True)
    except AudioDecodeError:
        raise
    except Exception as exc:  # libsndfile's errors are RuntimeError/LibsndfileError/TypeError
        data, sr = _torchaudio_decode(p, exc)
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{p}: no audio frames (zero-length audio)")
    if not np.isfinite(data).all():
        raise AudioDecodeError(f"{p}: the decoded audio holds NaN or infinite samples")
    return np.ascontiguousarray(data.T), int(sr)


_SHOULD_BE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)
_UNKNOWN_SIZES = {0, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF}


def _check_not_truncated(p: Path, log: str) -> None:
    """libsndfile reads what is left of a cut WAV/AIFF without an error, but logs the shortfall; refuse it."""
    m = _SHOULD_BE.search(log)
    if m:
        declared, present = int(m.group(1)), int(m.group(2))
        if declared > present and declared not in _UNKNOWN_SIZES:
            raise AudioDecodeError(f"{p}: truncated file (its header declares {declared} bytes of audio, "
                                   f"the file holds {present})")


def _torchaudio_decode(p: Path, first: Exception) -> tuple[np.ndarray, int]:
    try:
        import torchaudio  # optional: only used when it imports
        wav, sr = torchaudio.load(str(p))
        return wav.numpy().T.astype(np.float32), int(sr)
    except Exception:
        reason = str(first).strip().splitlines()[-1] if str(first).strip() else type(first).__name__
        raise AudioDecodeError(f"{p}: not decodable audio ({reason})") from first


def mix(x: np.ndarray, policy: str) -> np.ndarray:
    """Apply the channel policy to [channels, frames]: "mean" and "first" give one channel, "keep" keeps all."""
    if policy == "mean":
        return x.mean(axis=0, keepdims=True, dtype=np.float32) if x.shape[0] > 1 else x
    if policy == "first":
        return x[:1]
    if policy == "keep":
        return x
    raise LmdbkitError(f"mono={policy!r} is unsupported. Supported policies are {list(MONO_POLICIES)}")


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample [channels, frames] with soxr (high quality); a no-op when the rates match."""
    if sr_in == sr_out:
        return x
    import soxr
    y = soxr.resample(x.T, sr_in, sr_out, quality="HQ")
    return np.ascontiguousarray(np.asarray(y, dtype=np.float32).reshape(-1, x.shape[0]).T)


def segments(n_frames: int, sr: int, segment_seconds: float | None, hop_seconds: float | None,
             pad_last: bool, keep_short: bool = False) -> list[tuple[int, int]]:
    """(start, length) in samples of each segment; one whole-file segment when segment_seconds is None.
    A file shorter than one segment gives one zero-padded segment with keep_short, none without."""
    if segment_seconds is None:
        return [(0, n_frames)]
    seg = int(round(segment_seconds * sr))
    hop = int(round((hop_seconds or segment_seconds) * sr))
    if seg <= 0 or hop <= 0:
        raise LmdbkitError(f"segment_seconds={segment_seconds}, segment_hop_seconds={hop_seconds} give "
                           f"{seg} and {hop} samples at {sr} Hz; give positive durations")
    out = []
    start = 0
    while start + seg <= n_frames:
        out.append((start, seg))
        start += hop
    if (pad_last or (keep_short and not out)) and start < n_frames:
        out.append((start, seg))  # the tail, zero-padded to a full segment
    return out


class TooShortError(AudioDecodeError):
    """A file shorter than one segment, dropped as asked (short_files="drop")."""


BLOCK_SECONDS = 10.0  # decode, mix and resample this much audio at a time


def decode_resampled(path: str | os.PathLike, *, sample_rate: int, mono: str) -> tuple[np.ndarray, int]:
    """(float32 [channels, frames] at ``sample_rate`` after the channel policy, original rate), decoded in blocks.

    Peak memory is the output at the target rate plus one block, not the whole file at its original rate
    and channel count (an hour of 44.1 kHz stereo is 1.3 GB as float32; its 16 kHz mono output 230 MB).
    Files soundfile cannot read go through ``decode`` (torchaudio, whole file) as before.
    """
    import soundfile as sf
    p = _nonempty_file(path)
    try:
        f = sf.SoundFile(str(p))
    except Exception:
        x, sr = decode(p)  # torchaudio, or the precise reason
        return resample(mix(x, mono), sr, sample_rate), sr
    with f:
        _check_not_truncated(p, f.extra_info)
        sr, channels = f.samplerate, f.channels
        out_ch = channels if mono == "keep" else 1
        stream = None
        if sr != sample_rate:
            import soxr
            stream = soxr.ResampleStream(sr, sample_rate, out_ch, dtype="float32", quality="HQ")
        expect = int(math.ceil(max(f.frames, 0) * sample_rate / sr)) + 64 if f.frames > 0 else 0
        out = _Growing(out_ch, expect)
        block = max(1, int(BLOCK_SECONDS * sr))
        try:
            while True:
                x = f.read(block, dtype="float32", always_2d=True)  # [frames, channels]
                last = x.shape[0] < block
                if x.shape[0] and not np.isfinite(x).all():
                    raise AudioDecodeError(f"{p}: the decoded audio holds NaN or infinite samples")
                y = mix(np.ascontiguousarray(x.T), mono)
                if stream is not None:
                    y = stream.resample_chunk(np.ascontiguousarray(y.T), last=last).T
                out.add(y)
                if last:
                    break
        except AudioDecodeError:
            raise
        except Exception as exc:  # libsndfile's errors mid-file
            raise AudioDecodeError(f"{p}: not decodable audio ({exc})") from exc
    if out.n == 0:
        raise AudioDecodeError(f"{p}: no audio frames (zero-length audio)")
    return out.array(), int(sr)


class _Growing:
    """A [channels, frames] float32 buffer filled block by block; grows by doubling if the estimate was short."""

    def __init__(self, channels: int, capacity: int):
        self.buf = np.empty((channels, max(capacity, 1)), np.float32)
        self.n = 0

    def add(self, y: np.ndarray) -> None:
        m = y.shape[1]
        if self.n + m > self.buf.shape[1]:
            bigger = np.empty((self.buf.shape[0], max(2 * self.buf.shape[1], self.n + m)), np.float32)
            bigger[:, :self.n] = self.buf[:, :self.n]
            self.buf = bigger
        self.buf[:, self.n:self.n + m] = y
        self.n += m

    def array(self) -> np.ndarray:
        return self.buf[:, :self.n]  # a view: no copy of the whole file


def load_segments(path: str | os.PathLike, *, sample_rate: int, mono: str, segment_seconds: float | None,
                  hop_seconds: float | None, pad_last: bool,
                  keep_short: bool = False) -> tuple[list[np.ndarray], list[tuple[int, int]], int, float]:
    """Decode (in blocks), mix, resample and cut one file: (segments [C, L] float32, their (start, valid length),
    original rate, duration in seconds). Raises AudioDecodeError if nothing usable comes out (TooShortError
    for a file shorter than one segment, unless keep_short)."""
    x, sr = decode_resampled(path, sample_rate=sample_rate, mono=mono)
    n = x.shape[1]
    spans = segments(n, sample_rate, segment_seconds, hop_seconds, pad_last, keep_short)
    if not spans:
        raise TooShortError(f"{path}: {n / sample_rate:.3f} s is shorter than one segment of {segment_seconds} s "
                            "(short_files='pad' keeps it, zero-padded, with its true duration)")
    out, valid = [], []
    for start, length in spans:
        seg = x[:, start:start + length]
        if seg.shape[1] < length:
            seg = np.pad(seg, ((0, 0), (0, length - seg.shape[1])))
        out.append(np.ascontiguousarray(seg))
        valid.append((start, min(length, n - start)))
    return out, valid, sr, n / sample_rate


def utf8_name_problem(rel: str) -> str | None:
    """Why a relative path cannot be a key (file names with non-UTF-8 bytes arrive as lone surrogates), or None."""
    try:
        rel.encode("utf-8")
        return None
    except UnicodeEncodeError:
        raw = os.fsencode(rel)
        return (f"the file name is not valid UTF-8 ({raw!r}); rename it (e.g. `convmv -f latin1 -t utf8`) "
                "to include it")


def seconds(n_samples: int, sr: int) -> float:
    return math.floor(n_samples / sr * 1e6) / 1e6
