import os
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


def _items_table(txn, env):
    import json

    from lmdbkit import store
    meta = json.loads(bytes(txn.get(store.META_KEY, db=env.open_db(store.META, txn=txn))))
    return env.open_db(store.ITEMS, txn=txn), store.packed(meta)


def stored(path, i: int) -> bytes:
    """Item i's stored bytes, whichever the format (a run's slice in a packed database)."""
    import lmdb

    from lmdbkit import store
    env = lmdb.open(str(path), max_dbs=64, readonly=True, lock=False)
    with env.begin() as txn:
        db, packed = _items_table(txn, env)
        data = bytes(store.get_item(txn, db, packed, i))
    env.close()
    return data


def replace_stored(path, i: int, data: bytes) -> None:
    """Put ``data`` where item i's stored bytes are, whichever the format (into its run's slot, the run's
    table rewritten to fit, in a packed database): to damage one item the way a bad disk would."""
    import lmdb

    from lmdbkit import runs, store
    env = lmdb.open(str(path), max_dbs=64)
    with env.begin(write=True) as txn:
        db, packed = _items_table(txn, env)
        if not packed:
            txn.put(store.pack_index(i), data, db=db)
        else:
            cursor = txn.cursor(db=db)
            assert cursor.set_range(store.pack_index(i))
            key = bytes(cursor.key())
            parts = [bytes(x) for x in runs.items(cursor.value())]
            parts[i - (store.unpack_index(key) - len(parts) + 1)] = data
            txn.put(key, runs.pack(parts), db=db)
    env.close()


def _works(call) -> bool:
    try:
        os.close(call())
        return True
    except (AttributeError, OSError):
        return False


# where the kernel (or a container's seccomp profile) refuses these, workers hand batches over as before
HAVE_MEMFD = _works(lambda: os.memfd_create("probe"))
HAVE_PIDFD = _works(lambda: os.pidfd_open(os.getpid()))
