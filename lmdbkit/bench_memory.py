"""Peak memory of precompute on one long recording: is it bounded by segment and batch sizes, not the file?

Generates a long 44.1 kHz stereo WAV (a real recording's format: an hour is 635 MB of PCM, 1.3 GB as
float32), runs ``precompute`` on it in a fresh process with one decode worker, 2 s segments, and reports
the peak resident memory of the main process and of the decode worker.

    python -m lmdbkit.bench_memory --minutes 10 60 --workdir /tmp/lmdbkit-mem
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

_CHILD = """
import json, resource, sys
from lmdbkit.precompute import precompute
s = precompute(sys.argv[1], output_dir=sys.argv[2], segment_seconds=2.0, num_workers=1, batch_size=16,
               progress=False, splits={"train": 1.0}, mode="overwrite", index_fields=())
print(json.dumps({"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "items": s["items_written"], "audio_seconds": s["audio_seconds"]}))
"""


def long_recording(path: Path, minutes: float, sr: int = 44100) -> Path:
    """A stereo 16-bit WAV of ``minutes`` of tones and noise, written a minute at a time."""
    import soundfile as sf
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=2, subtype="PCM_16") as f:
        for m in range(int(np.ceil(minutes))):
            n = int(sr * 60 * min(1.0, minutes - m))
            t = np.arange(n) / sr
            x = 0.2 * np.sin(2 * np.pi * (220 + 20 * m) * t) + 0.05 * rng.standard_normal(n)
            f.write(np.stack([x, 0.7 * x], axis=1).astype(np.float32))
    return path


def peak_rss(minutes: float, workdir: str | Path) -> dict:
    """Peak RSS (bytes) of precompute's main process and decode worker on one recording of ``minutes``."""
    workdir = Path(workdir)
    audio_dir = workdir / f"audio-{minutes:g}min"
    wav = audio_dir / "rec" / "long.wav"
    if not wav.exists():
        long_recording(wav, minutes)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(audio_dir), str(workdir / f"out-{minutes:g}min")],
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(minutes=minutes, file_bytes=wav.stat().st_size)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmdbkit.bench_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[10, 60], help="recording lengths (default: 10 60)")
    ap.add_argument("--workdir", default="runs/bench-memory", help="where the recordings and databases go")
    a = ap.parse_args(argv)
    print(f"{'minutes':>8} {'file MiB':>9} {'items':>6} {'main peak MiB':>14} {'worker peak MiB':>16}")
    for m in a.minutes:
        r = peak_rss(m, a.workdir)
        print(f"{m:>8g} {r['file_bytes'] / 2**20:>9.0f} {r['items']:>6} {r['main'] / 2**20:>14.0f} "
              f"{r['worker'] / 2**20:>16.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
