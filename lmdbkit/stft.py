"""STFT: a frozen config that travels from the parameters cell into the database's metadata and back,
batched ``torch.stft`` on CPU or CUDA, and the inverse (``torch.istft``) for listening to an item."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from .errors import LmdbkitError

WINDOWS = {
    "hann": torch.hann_window,
    "hamming": torch.hamming_window,
    "blackman": torch.blackman_window,
    "bartlett": torch.bartlett_window,
    "rectangular": lambda n, **kw: torch.ones(n, **kw),
}
OUTPUTS = ("complex", "magnitude", "power", "db")
COMPLEX_DTYPES = ("complex64", "complex128")
REAL_DTYPES = ("float16", "bfloat16", "float32", "float64")
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
    output: str = "complex"         # complex | magnitude | power | db
    dtype: str = "complex64"        # complex64/128 for complex output, float16/bfloat16/float32/float64 otherwise
    db_floor: float = 1e-10         # power floor before log10 (output="db")

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
        if self.dtype not in allowed:
            bad("dtype", f"output={self.output!r} is stored as one of {list(allowed)}")

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    def num_frames(self, n_samples: int) -> int:
        """Frames that torch.stft makes from n_samples samples."""
        if self.center:
            return 1 + n_samples // self.hop_length
        return 1 + max(0, n_samples - self.n_fft) // self.hop_length

    def frequencies(self) -> np.ndarray:
        """Centre frequency of each bin, in Hz."""
        return np.fft.rfftfreq(self.n_fft, 1 / self.sample_rate)

    def times(self, n_frames: int) -> np.ndarray:
        """Centre time of each frame, in seconds."""
        offset = 0 if self.center else self.n_fft / 2
        return (np.arange(n_frames) * self.hop_length + offset) / self.sample_rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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


def compute(waves: torch.Tensor, cfg: StftConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """STFT of a batch: waves [..., samples] float -> [..., freqs, frames] in cfg.output and cfg.dtype.

    Runs on ``device`` (the batch is moved there, the window is made there) and returns the result there.
    """
    device = torch.device(device)
    x = waves.to(device, torch.float32, non_blocking=True)
    lead = x.shape[:-1]
    spec = torch.stft(x.reshape(-1, x.shape[-1]), cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                      window=window(cfg, device), center=cfg.center, pad_mode="reflect", return_complex=True)
    spec = spec.reshape(*lead, *spec.shape[-2:])
    if cfg.output == "complex":
        return spec.to(getattr(torch, cfg.dtype))
    power = spec.real.square() + spec.imag.square()
    if cfg.output == "magnitude":
        out = power.sqrt()
    elif cfg.output == "power":
        out = power
    else:
        out = 10.0 * torch.log10(power.clamp_min(cfg.db_floor))
    return out.to(getattr(torch, cfg.dtype))


def inverse(spec: torch.Tensor, cfg: StftConfig, length: int | None = None) -> torch.Tensor:
    """Audio from a complex STFT item ([..., freqs, frames]) with torch.istft."""
    if not torch.is_complex(spec):
        raise LmdbkitError(f"inverse needs a complex STFT (output='complex'); this item is {spec.dtype} "
                           f"(output={cfg.output!r}), which has no phase")
    lead = spec.shape[:-2]
    x = spec.reshape(-1, *spec.shape[-2:]).to(torch.complex64)
    y = torch.istft(x, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                    window=window(cfg, x.device), center=cfg.center, length=length)
    return y.reshape(*lead, y.shape[-1])


def to_db(spec: torch.Tensor | np.ndarray, cfg: StftConfig) -> np.ndarray:
    """Any stored output kind, as dB (for plots)."""
    s = torch.as_tensor(spec)
    if cfg.output == "db":
        return s.float().numpy()
    if torch.is_complex(s):
        p = s.real.double().square() + s.imag.double().square()
    elif cfg.output == "magnitude":
        p = s.double().square()
    else:
        p = s.double()
    return (10.0 * torch.log10(p.clamp_min(cfg.db_floor))).float().numpy()
