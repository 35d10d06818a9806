"""The embedded demo corpus: short labelled clips generated deterministically, written as real audio files.

Eight classes that a small CNN tells apart by their spectrograms (low and high tones, rising and falling
chirps, low and high noise bands, slow and fast click trains), with random pitch, level, timing and
background noise; written in mixed formats (wav 16/24-bit and float, flac, ogg/vorbis, mp3) and sample
rates (8 to 48 kHz), so the demo decodes and resamples for real. A few deliberately bad files (empty, not
audio, zero-length) show how precompute skips and reports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASSES = ("tone_low", "tone_high", "chirp_up", "chirp_down", "noise_low", "noise_high", "clicks_slow", "clicks_fast")
# (extension, soundfile subtype) pairs and sample rates, cycled through deterministically
FORMATS = (("wav", "PCM_16"), ("flac", "PCM_16"), ("wav", "PCM_24"), ("ogg", "VORBIS"), ("wav", "FLOAT"),
           ("mp3", "MPEG_LAYER_III"), ("wav", "PCM_32"), ("flac", "PCM_24"))
RATES = (16000, 22050, 8000, 44100, 48000, 16000, 32000, 24000)
BAD_FILES = {"tone_low/empty.wav": b"", "chirp_up/not_audio.flac": b"this is a text file, not FLAC\n"}


def _band_noise(rng, n, sr, lo, hi):
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sr)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9)


def clip(cls: str, sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """One clip of a class, float32 in [-1, 1]."""
    n = int(sr * seconds)
    t = np.arange(n) / sr
    nyq = sr / 2
    if cls == "tone_low":
        x = np.sin(2 * np.pi * rng.uniform(200, 450) * t)
    elif cls == "tone_high":
        f = min(rng.uniform(1800, 3200), 0.8 * nyq)
        x = np.sin(2 * np.pi * f * t)
    elif cls in ("chirp_up", "chirp_down"):
        f0, f1 = rng.uniform(200, 500), min(rng.uniform(2500, 3500), 0.8 * nyq)
        if cls == "chirp_down":
            f0, f1 = f1, f0
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
        x = np.sin(phase)
    elif cls == "noise_low":
        x = _band_noise(rng, n, sr, 300, 900)
    elif cls == "noise_high":
        x = _band_noise(rng, n, sr, 2200, min(3600, 0.9 * nyq))
    elif cls in ("clicks_slow", "clicks_fast"):
        rate = rng.uniform(4, 8) if cls == "clicks_slow" else rng.uniform(25, 40)
        x = np.zeros(n)
        for c in np.arange(rng.uniform(0, 1 / rate), seconds, 1 / rate):
            i = int(c * sr)
            k = min(n - i, int(0.004 * sr))
            x[i:i + k] += np.hanning(2 * k)[k:] * rng.choice([-1, 1])
    else:
        raise ValueError(f"unknown class {cls!r}; classes are {CLASSES}")
    fade = min(n // 4, int(0.01 * sr))
    env = np.ones(n)
    env[:fade], env[n - fade:] = np.linspace(0, 1, fade), np.linspace(1, 0, fade)
    x = x * env * rng.uniform(0.3, 0.8) + rng.normal(0, 0.01, n)
    return np.clip(x, -1, 1).astype(np.float32)


def make_corpus(out_dir: str | Path, *, n_per_class: int = 40, seed: int = 0, bad_files: bool = True) -> Path:
    """Write the demo corpus into out_dir (``<class>/<class>_NNN.<ext>``); reuses it if already complete."""
    import soundfile as sf
    out = Path(out_dir)
    stamp = {"n_per_class": n_per_class, "seed": seed, "bad_files": bad_files, "classes": list(CLASSES), "version": 1}
    marker = out / ".lmdbkit-demo.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    rng = np.random.default_rng(seed)
    k = 0
    for cls in CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            ext, subtype = FORMATS[k % len(FORMATS)]
            sr = RATES[(k // len(FORMATS) + k) % len(RATES)]
            seconds = float(rng.uniform(0.6, 1.2))
            x = clip(cls, sr, seconds, rng)
            if j % 10 == 9:  # some stereo files, to exercise the mono policy
                x = np.stack([x, np.roll(x, 7)], axis=1)
            sf.write(out / cls / f"{cls}_{j:03d}.{ext}", x, sr, subtype=subtype)
            k += 1
    if bad_files:
        for rel, data in BAD_FILES.items():
            (out / rel).write_bytes(data)
        sf.write(out / "clicks_fast" / "zero_length.wav", np.zeros((0, 1), np.float32), 16000)
    marker.write_text(json.dumps(stamp))
    return out


# -- a small real-speech corpus, spoken by espeak-ng (for measuring features on speech, not tones) ------

SPEECH_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp")
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Spectrograms are computed once and read many times.",
    "She sells sea shells by the sea shore.",
    "A large fawn jumped quickly over white zinc boxes.",
    "How vexingly quick daft zebras jump.",
    "Seven silver swans swam silently seaward.",
    "Pack my box with five dozen liquor jugs.",
    "Training reads every item again in every epoch.",
    "The five boxing wizards jump quickly.",
    "Bright vixens jump; dozy fowl quack.",
)


def make_speech_corpus(out_dir: str | Path, *, voices=SPEECH_VOICES, sentences=SENTENCES, seed: int = 0) -> Path:
    """Speech by espeak-ng into ``out_dir/<voice>/<voice>_NNN.wav`` (one clip per voice and sentence, with
    random rate and pitch); reused if already complete. Needs the espeak-ng program (apt install espeak-ng)."""
    import shutil
    import subprocess

    from .errors import LmdbkitError
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise LmdbkitError("the speech corpus is spoken by espeak-ng, which is not installed: "
                           "apt-get install espeak-ng (or give a folder of your own speech)")
    out = Path(out_dir)
    stamp = {"voices": list(voices), "sentences": list(sentences), "seed": seed, "version": 1}
    marker = out / ".lmdbkit-speech.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    rng = np.random.default_rng(seed)
    for voice in voices:
        (out / voice).mkdir(parents=True, exist_ok=True)
        for j, text in enumerate(sentences):
            rate, pitch = int(rng.integers(130, 190)), int(rng.integers(30, 70))
            subprocess.run([exe, "-v", voice, "-s", str(rate), "-p", str(pitch), "-w",
                            str(out / voice / f"{voice}_{j:03d}.wav"), text], check=True, capture_output=True)
    marker.write_text(json.dumps(stamp))
    return out
