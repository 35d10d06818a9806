"""Mel filterbank and DCT matrices, in numpy (float64, cast by the caller).

The filterbank is the standard triangular one: the same formulas as ``librosa.filters.mel`` and torchaudio's
``melscale_fbanks`` (tests compare it with librosa to 1e-5), for the HTK and Slaney mel scales, with or
without Slaney's area normalisation. It is computed here rather than imported because librosa brings numba,
llvmlite and scipy (~150 MB) for ~20 lines of arithmetic, and torchaudio's wheels no longer load beside
current torch; a filterbank is made once per config and cached.
"""

from __future__ import annotations

import numpy as np

from .errors import LmdbkitError

MEL_SCALES = ("htk", "slaney")
MEL_NORMS = (None, "slaney")

# Slaney's scale (the Auditory Toolbox): linear below 1 kHz, logarithmic above
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(hz, scale: str = "slaney") -> np.ndarray:
    f = np.asarray(hz, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    mel = f / _F_SP
    log = f >= _MIN_LOG_HZ
    return np.where(log, _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP, mel)


def mel_to_hz(mel, scale: str = "slaney") -> np.ndarray:
    m = np.asarray(mel, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    log = m >= _MIN_LOG_MEL
    return np.where(log, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)), _F_SP * m)


def band_edges(sample_rate: int, n_mels: int, f_min: float, f_max: float, scale: str) -> np.ndarray:
    """The n_mels + 2 band edges in Hz: band i rises from edge i, peaks at edge i+1, falls to edge i+2."""
    lo, hi = hz_to_mel([f_min, f_max], scale)
    return mel_to_hz(np.linspace(lo, hi, n_mels + 2), scale)


def filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float,
               scale: str = "slaney", norm: str | None = "slaney") -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] weights: mel power = filterbank @ power spectrum."""
    if scale not in MEL_SCALES:
        raise LmdbkitError(f"mel_scale={scale!r} is unsupported. Supported scales are {list(MEL_SCALES)}")
    if norm not in MEL_NORMS:
        raise LmdbkitError(f"mel_norm={norm!r} is unsupported. Supported norms are {list(MEL_NORMS)}")
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = band_edges(sample_rate, n_mels, f_min, f_max, scale)
    widths = np.diff(edges)
    ramps = edges[:, None] - freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if norm == "slaney":  # each band's area is 1 (in Hz), so wide high bands do not dominate
        weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    empty = np.flatnonzero(weights.max(axis=1) == 0)
    if len(empty):
        raise LmdbkitError(f"n_mels={n_mels} with n_fft={n_fft} at {sample_rate} Hz leaves mel band(s) "
                           f"{empty.tolist()[:8]} without a frequency bin: lower n_mels or raise n_fft")
    return weights


def dct_matrix(n_mfcc: int, n_mels: int) -> np.ndarray:
    """[n_mfcc, n_mels] orthonormal DCT-II (as torchaudio's create_dct(norm="ortho") transposed, and
    scipy.fft.dct(type=2, norm="ortho"), which librosa's mfcc uses)."""
    n = np.arange(n_mels)
    k = np.arange(n_mfcc)[:, None]
    d = np.cos(np.pi / n_mels * (n + 0.5) * k) * np.sqrt(2.0 / n_mels)
    d[0] *= np.sqrt(0.5)
    return d
