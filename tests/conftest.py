import shutil
from pathlib import Path

import numpy as np
import pytest

import lmdbkit


def make_samples(n, *, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(size).astype(np.float32), "i": i, "label": i % 3,
             "category": "AB"[i % 2]} for i in range(n)]


@pytest.fixture
def small_db(tmp_path):
    """A finished database of 100 items with an index on label, keys k0..k99."""
    path = tmp_path / "small.lmdb"
    with lmdbkit.Writer(path, index_fields=("label",)) as w:
        for i, s in enumerate(make_samples(100)):
            w.append(s, key=f"k{i}")
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small precomputed demo dataset (8 classes x 10 clips), shared by the tests that train or inspect."""
    from lmdbkit import demo
    from lmdbkit.precompute import precompute
    base = tmp_path_factory.mktemp("demo")
    corpus = demo.make_corpus(base / "corpus", n_per_class=10)
    precompute(corpus, output_dir=base / "data", num_workers=0, progress=False, n_fft=256, hop_length=128)
    return base / "data"


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium(playwright):
    """Debian's Chromium, headless, driven by Playwright (.ci/run installs it; Playwright's own download is not used)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium); .ci/run does")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
