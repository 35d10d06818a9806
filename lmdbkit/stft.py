"""STFT and mel features: a frozen config that travels from the parameters cell into the database's metadata
and back, batched ``torch.stft`` (and mel filterbank, log, DCT) on CPU or CUDA, the narrowing to the stored
dtype (refused, never inf, where a value is out of its range), and the inverse (``torch.istft``) for listening
to an item."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from . import mel as melbank
from .errors import LmdbkitError, ValueRangeError

WINDOWS = {
    "hann": torch.hann_window,
    "hamming": torch.hamming_window,
    "blackman": torch.blackman_window,
    "bartlett": torch.bartlett_window,
    "rectangular": lambda n, **kw: torch.ones(n, **kw),
}
OUTPUTS = ("complex", "magnitude", "power", "db", "mel", "log_mel", "mfcc")
MEL_OUTPUTS = ("mel", "log_mel", "mfcc")
COMPLEX_DTYPES = ("complex64", "complex32", "complex128")   # complex32: float16 real and imaginary parts
REAL_DTYPES = ("float16", "bfloat16", "float32", "float64")
# fields that older databases' configs lack: recorded only where they matter, so those still resume
_MEL_FIELDS = ("n_mels", "f_min", "f_max", "mel_scale", "mel_norm")
_FINITE_MAX = {"float16": 65504.0, "complex32": 65504.0}
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class StftConfig:
    """How spectrograms are computed. Saved in each database's metadata; resume refuses a different one."""

    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 128
    win_length: int | None = None   # None: n_fft
    window: str = "hann"
    center: bool = True
    output: str = "complex"         # complex | magnitude | power | db | mel | log_mel | mfcc
    dtype: str | None = None        # complex64 (default)/complex32/complex128 for complex output, else float32
                                    # (default)/float16/bfloat16/float64
    db_floor: float = 1e-10         # power floor before log10 (db, log_mel, mfcc: torchaudio's AmplitudeToDB amin)
    top_db: float | None = None     # log outputs: clip each item at its max - top_db (None: no clip; mfcc: 80)
    n_mels: int = 80                # mel outputs: bands, from f_min to f_max (None: sample_rate / 2)
    f_min: float = 0.0
    f_max: float | None = None
    mel_scale: str = "slaney"       # "slaney" (librosa's default) or "htk" (torchaudio's default)
    mel_norm: str | None = "slaney"  # "slaney": each band's area is 1; None: peak 1
    n_mfcc: int = 40                # mfcc: coefficients kept (orthonormal DCT-II of the log-mel)

    def __post_init__(self):
        def bad(name, remedy):
            raise LmdbkitError(f"{name}={getattr(self, name)!r}: {remedy}")
        for name in ("sample_rate", "n_fft", "hop_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "give a positive integer")
        if self.win_length is not None and (not isinstance(self.win_length, int) or not 0 < self.win_length <= self.n_fft):
            bad("win_length", f"give an integer in 1..n_fft ({self.n_fft}), or None for n_fft")
        if self.window not in WINDOWS:
            bad("window", f"unsupported. Supported windows are {sorted(WINDOWS)}")
        if self.output not in OUTPUTS:
            bad("output", f"unsupported. Supported outputs are {list(OUTPUTS)}")
        allowed = COMPLEX_DTYPES if self.output == "complex" else REAL_DTYPES
        if self.dtype is None:
            object.__setattr__(self, "dtype", "complex64" if self.output == "complex" else "float32")
        if self.dtype not in allowed:
            bad("dtype", f"output={self.output!r} is stored as one of {list(allowed)}")
        if not isinstance(self.db_floor, (int, float)) or not self.db_floor > 0:
            bad("db_floor", "give a positive power floor, e.g. 1e-10")
        if self.top_db is not None and (not isinstance(self.top_db, (int, float)) or not self.top_db > 0):
            bad("top_db", "give a positive number of dB, or None for no clipping")
        if self.output == "mfcc" and self.top_db is None:
            object.__setattr__(self, "top_db", 80.0)  # as torchaudio's MFCC and librosa's mfcc
        if self.output in MEL_OUTPUTS:
            self._check_mel(bad)

    def _check_mel(self, bad) -> None:
        nyquist = self.sample_rate / 2
        if self.f_max is None:
            object.__setattr__(self, "f_max", float(nyquist))
        if not isinstance(self.n_mels, int) or isinstance(self.n_mels, bool) or self.n_mels < 1:
            bad("n_mels", "give a positive integer number of mel bands")
        if not isinstance(self.f_min, (int, float)) or not isinstance(self.f_max, (int, float)) \
                or not 0 <= self.f_min < self.f_max <= nyquist:
            raise LmdbkitError(f"f_min={self.f_min!r}, f_max={self.f_max!r}: give 0 <= f_min < f_max <= "
                               f"sample_rate / 2 ({nyquist:g} Hz)")
        if self.mel_scale not in melbank.MEL_SCALES:
            bad("mel_scale", f"unsupported. Supported scales are {list(melbank.MEL_SCALES)}")
        if self.mel_norm not in melbank.MEL_NORMS:
            bad("mel_norm", f"unsupported. Supported norms are {list(melbank.MEL_NORMS)}")
        if self.output == "mfcc" and (not isinstance(self.n_mfcc, int) or not 1 <= self.n_mfcc <= self.n_mels):
            bad("n_mfcc", f"give an integer in 1..n_mels ({self.n_mels})")
        mel_weights(self)  # refuses bands without a frequency bin

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    def num_frames(self, n_samples: int) -> int:
        """Frames that torch.stft makes from n_samples samples."""
        if self.center:
            return 1 + n_samples // self.hop_length
        return 1 + max(0, n_samples - self.n_fft) // self.hop_length

    @property
    def is_mel(self) -> bool:
        return self.output in MEL_OUTPUTS

    @property
    def n_bins(self) -> int:
        """Rows of a stored item: frequency bins, mel bands or MFCCs."""
        return {"mel": self.n_mels, "log_mel": self.n_mels, "mfcc": self.n_mfcc}.get(self.output, self.n_freqs)

    def frequencies(self) -> np.ndarray:
        """Centre frequency of each row in Hz: of each STFT bin, or each mel band's peak (mfcc: none)."""
        if self.is_mel:
            return melbank.band_edges(self.sample_rate, self.n_mels, self.f_min, self.f_max, self.mel_scale)[1:-1]
        return np.fft.rfftfreq(self.n_fft, 1 / self.sample_rate)

    def times(self, n_frames: int) -> np.ndarray:
        """Centre time of each frame, in seconds."""
        offset = 0 if self.center else self.n_fft / 2
        return (np.arange(n_frames) * self.hop_length + offset) / self.sample_rate

    def to_dict(self) -> dict[str, Any]:
        """The fields that matter for this output (an STFT's dict is what databases before mel features
        stored, so their runs still resume)."""
        d = asdict(self)
        if not self.is_mel:
            for name in _MEL_FIELDS:
                del d[name]
        if self.output != "mfcc":
            del d["n_mfcc"]
        if self.top_db is None:
            del d["top_db"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StftConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LmdbkitError(f"unknown StftConfig fields {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)


def resolve_device(device: str) -> torch.device:
    """"auto" picks CUDA when it is available, else the CPU."""
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise LmdbkitError(f"device={device!r} is unsupported. Supported devices are {list(DEVICES)} (or 'cuda:N')")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LmdbkitError(f"device={device!r} but torch sees no CUDA device (torch {torch.__version__}); "
                           "use device='cpu' or 'auto', or install a CUDA build of torch")
    return torch.device(device)


_windows: dict = {}


def window(cfg: StftConfig, device: torch.device) -> torch.Tensor:
    key = (cfg.window, cfg.win_length or cfg.n_fft, str(device))
    w = _windows.get(key)
    if w is None:
        w = _windows[key] = WINDOWS[cfg.window](cfg.win_length or cfg.n_fft, device=device, dtype=torch.float32)
    return w


_mel_cache: dict = {}


def _mel_key(cfg: StftConfig) -> tuple:
    return cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max, cfg.mel_scale, cfg.mel_norm


def mel_weights(cfg: StftConfig) -> np.ndarray:
    """The config's [n_mels, freqs] filterbank (float64, cached)."""
    key = _mel_key(cfg)
    w = _mel_cache.get(key)
    if w is None:
        w = _mel_cache[key] = melbank.filterbank(*key)
    return w


def _on(device: torch.device, name: str, make) -> torch.Tensor:
    key = (name, str(device))
    t = _windows.get(key)
    if t is None:
        t = _windows[key] = torch.as_tensor(make(), dtype=torch.float32, device=device)
    return t


def compute(waves: torch.Tensor, cfg: StftConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Features of a batch: waves [..., samples] float -> [..., rows, frames] in cfg.output and cfg.dtype
    (rows: frequency bins, mel bands or MFCCs).

    Runs on ``device`` (the batch is moved there, the window and filterbank are made there) and returns the
    result there. A value beyond the stored dtype's range (float16, complex32) raises LmdbkitError.
    """
    device = torch.device(device)
    x = waves.to(device, torch.float32, non_blocking=True)
    lead = x.shape[:-1]
    spec = torch.stft(x.reshape(-1, x.shape[-1]), cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                      window=window(cfg, device), center=cfg.center, pad_mode="reflect", return_complex=True)
    spec = spec.reshape(*lead, *spec.shape[-2:])
    if cfg.output == "complex":
        return narrow(spec, cfg)
    power = spec.real.square() + spec.imag.square()
    if cfg.output == "magnitude":
        out = power.sqrt()
    elif cfg.output == "power":
        out = power
    elif cfg.output == "db":
        out = _log(power, cfg)
    else:
        out = torch.matmul(_on(device, f"mel{_mel_key(cfg)}", lambda: mel_weights(cfg)), power)
        if cfg.output != "mel":
            out = _log(out, cfg)
        if cfg.output == "mfcc":
            out = torch.matmul(_on(device, f"dct{cfg.n_mfcc}x{cfg.n_mels}",
                                   lambda: melbank.dct_matrix(cfg.n_mfcc, cfg.n_mels)), out)
    return narrow(out, cfg)


def _log(power: torch.Tensor, cfg: StftConfig) -> torch.Tensor:
    """10 log10(max(power, db_floor)), each item clipped at its max - top_db: torchaudio's AmplitudeToDB
    (stype "power", ref 1) and librosa's power_to_db."""
    db = 10.0 * torch.log10(power.clamp_min(cfg.db_floor))
    if cfg.top_db is not None and db.numel():
        db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - cfg.top_db)
    return db


def narrow(x: torch.Tensor, cfg: StftConfig) -> torch.Tensor:
    """``x`` in the stored dtype; ValueRangeError where a finite value would become inf."""
    with warnings.catch_warnings():  # torch calls ComplexHalf "experimental": only the cast and view are used
        warnings.filterwarnings("ignore", "ComplexHalf support is experimental")
        y = x.to(getattr(torch, cfg.dtype))
    limit = _FINITE_MAX.get(cfg.dtype)
    if limit is not None and y.numel():
        parts = torch.view_as_real(y) if y.is_complex() else y
        if not bool(torch.isfinite(parts).all()):
            src = torch.view_as_real(x) if x.is_complex() else x
            big = src[torch.isfinite(src)].abs().max().item() if bool(torch.isfinite(src).any()) else float("inf")
            if big > limit:
                raise ValueRangeError(
                    f"output={cfg.output!r} reaches {big:.4g}, beyond {cfg.dtype}'s range (+-{limit:g}): store "
                    f"dtype={'complex64' if x.is_complex() else 'float32'!r}"
                    + ("" if x.is_complex() else ", 'bfloat16', or a log output (db, log_mel)")
                    + ", or lower the input level")
    return y


def inverse(spec: torch.Tensor, cfg: StftConfig, length: int | None = None) -> torch.Tensor:
    """Audio from a complex STFT item ([..., freqs, frames], or complex32's float16 pairs) with torch.istft."""
    if not (torch.is_complex(spec) or is_pairs(spec)):
        raise LmdbkitError(f"inverse needs a complex STFT (output='complex'); this item is {spec.dtype} "
                           f"(output={cfg.output!r}), which has no phase")
    z = as_complex64(spec)
    lead = z.shape[:-2]
    x = z.reshape(-1, *z.shape[-2:])
    y = torch.istft(x, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                    window=window(cfg, x.device), center=cfg.center, length=length)
    return y.reshape(*lead, y.shape[-1])


def is_pairs(spec: torch.Tensor) -> bool:
    """complex32 read with complex32="pairs": float16 real and imaginary parts in a last axis of 2."""
    return spec.dtype == torch.float16 and spec.shape[-1:] == (2,)


def as_complex64(spec: torch.Tensor) -> torch.Tensor:
    """A complex item as complex64, also from complex32 or its stored float16 pairs ([..., 2])."""
    if is_pairs(spec):
        return torch.view_as_complex(spec.float())
    if spec.dtype == torch.complex32:
        return torch.view_as_complex(torch.view_as_real(spec).float())
    return spec.to(torch.complex64)


def to_db(spec: torch.Tensor | np.ndarray, cfg: StftConfig) -> np.ndarray:
    """Any stored output kind, as dB (for plots); MFCCs are returned as they are."""
    s = torch.as_tensor(spec)
    if cfg.output == "complex":
        s = as_complex64(s)
    if cfg.output in ("db", "log_mel", "mfcc"):
        return s.float().numpy()
    if torch.is_complex(s):
        p = s.real.double().square() + s.imag.double().square()
    elif cfg.output == "magnitude":
        p = s.double().square()
    else:
        p = s.double()
    return (10.0 * torch.log10(p.clamp_min(cfg.db_floor))).float().numpy()
