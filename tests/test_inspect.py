"""The browser's logic, headless (no frontend): set a widget's value and check what it shows."""

import ipywidgets
import numpy as np
import pytest

import lmdbkit
from lmdbkit import plot
from lmdbkit.store import group_by_split
from lmdbkit.widgets import ALL, Browser


@pytest.fixture
def browser(demo_data):
    b = Browser(demo_data)
    yield b
    b.close()


def _image(fig):
    return np.asarray(fig.axes[0].get_images()[0].get_array())


def test_slider_shows_that_item(browser, demo_data):
    assert list(browser.groups) == ["train", "val", "test"] and browser.current == 0 and browser.reads == 1
    browser.slider.value = 7
    r = lmdbkit.Reader(demo_data / "train.lmdb")
    expected = r[7]
    assert browser.current == 7 and browser.number.value == 7 and browser.reads == 2  # one read per move
    assert browser.key.value == r.key_of(7)  # the key box names the item on screen
    title = f"#7 {r.key_of(7)} [{expected['label_name']}]"
    assert f"<span class='lmdbkit-caption'>{title}</span> · peak " in browser.caption.value.replace("&#x27;", "'")
    cfg = plot.stft_config(r)
    db = lmdbkit.stft.to_db(expected["stft"], cfg)
    assert np.allclose(_image(browser.figure), db - db.max())  # dB below the item's peak: one fixed colour bar
    # the caption names the peak in the colour bar's own words ("power (dB re 1)"), with its value
    assert browser.caption.value.endswith(f" · peak {plot.db_unit(cfg)}: {db.max():.1f}")
    ax = browser.figure.axes[0]
    assert ax.get_xlabel() == "time (s)" and ax.get_ylabel() == "frequency (Hz)"
    assert ax.get_images()[0].get_extent()[3] == pytest.approx(cfg.sample_rate / 2)
    assert browser.image.value[:3] == b"\xff\xd8\xff" and len(browser.image.value) > 10_000  # JPEG
    assert f"item 7</b> of {len(r)}" in browser.status.value and r.key_of(7) in browser.status.value
    assert "label_name" in browser.table.value and expected["path"] in browser.table.value
    browser.number.value = 3  # the index box goes to that item, and the slider follows
    assert browser.slider.value == 3 and browser.current == 3 and browser.reads == 3
    assert isinstance(browser, ipywidgets.VBox) and ipywidgets.VBox([browser]).children[0] is browser


def test_label_filter_key_box_split_and_audio(browser, demo_data):
    r = lmdbkit.Reader(demo_data / "train.lmdb")
    browser.label.value = "tone_high"
    assert browser.sample["label_name"] == "tone_high" and browser.slider.max == len(browser.view) - 1
    browser.slider.value = browser.slider.max
    assert browser.sample["label_name"] == "tone_high"
    assert browser.number.value == browser.view[-1] == browser.current  # the item's index, not its position
    inside = browser.view[1]
    browser.number.value = inside  # an index inside the filter keeps it
    assert browser.label.value == "tone_high" and browser.slider.value == 1
    key = r.key_of(11)
    browser.key.value = key
    assert browser.current == 11 and browser.number.value == 11
    assert browser.label.value == (ALL if r[11]["label_name"] != "tone_high" else "tone_high")
    with lmdbkit.Reader(demo_data / "val.lmdb") as v:
        in_val = {name for name, _ in v.value_counts("label_name")}
    shared = sorted(in_val)[0]
    browser.label.value = shared
    reads = browser.reads
    browser.split.value = "val"  # the label filter stays where that label exists ...
    assert browser.reader.path.endswith("val.lmdb") and browser.reads == reads + 1
    assert browser.label.value == shared and browser.sample["label_name"] == shared
    missing = sorted({r[i]["label_name"] for i in range(len(r))} - in_val)
    if missing:  # ... and is cleared where it does not
        browser.split.value = "train"
        browser.label.value = missing[0]
        browser.split.value = "val"
        assert browser.label.value == ALL
        browser.label.value = shared
    import io
    import soundfile as sf
    y, sr = sf.read(io.BytesIO(browser.player.value))  # a complex item gets a player of its inverse STFT
    assert sr == 16000 and len(y) == round(browser.sample["duration_s"] * 16000) and np.abs(y).max() > 0.5
    assert browser.player.layout.display is None


def test_callback_errors_are_shown_not_lost(browser):
    browser.key.value = "tone_low/tone_low_00.wav#0"
    assert "KeyError" in browser.last_error and "tone_low/tone_low_00.wav#0" in browser.status.value
    assert "nearest keys: tone_low/tone_low_00" in browser.last_error  # a wrong key suggests near ones
    browser.slider.value = 2  # and the browser keeps working
    assert browser.current == 2 and browser.last_error is None


def test_generic_database_and_legacy_refusal(tmp_path):
    import pickle
    import lmdb
    p = tmp_path / "gen.lmdb"
    with lmdbkit.Writer(p) as w:
        for i in range(4):
            w.append({"image": np.full((8, 8, 3), i, np.uint8), "curve": np.sin(np.arange(20) + i), "tag": f"t{i}"})
    b = Browser(p)
    assert b.cfg is None and len(b.figure.axes) >= 2 and "image (8, 8, 3) uint8" in b.figure.axes[0].get_title()
    assert b.player.layout.display == "none" and b.image.value[:3] == b"\xff\xd8\xff"
    b.slider.value = 3
    assert b.sample["tag"] == "t3" and b.label.disabled
    b.close()
    old = tmp_path / "old.lmdb"
    env = lmdb.open(str(old))
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps({"x": np.zeros(3)}))
    env.close()
    with pytest.raises(lmdbkit.UnsafeFormatError):
        Browser(old)
    assert Browser(old, allow_pickle=True).sample["x"].shape == (3,)


def test_shard_folder(tmp_path, demo_data):
    from lmdbkit.precompute import precompute
    out = tmp_path / "shards"
    corpus = demo_data.parent / "corpus"
    for i in range(2):
        precompute(corpus, output_dir=out, shard_index=i, num_shards=2, num_workers=0, progress=False, n_fft=256)
    groups = group_by_split(out)
    assert list(groups) == ["train", "val", "test"] and len(groups["train"]) == 2
    b = Browser(out)
    n = len(b.reader)
    assert n == len(lmdbkit.Reader(demo_data / "train.lmdb"))
    b.slider.value = n - 1
    assert b.current == n - 1
    b.close()


def test_spot_check_choice_is_seeded_per_label(demo_data, tmp_path):
    from lmdbkit.reader import MultiReader
    with MultiReader(demo_data / "train.lmdb") as m:
        a = plot.choose_spot_check(m, per_label=2, seed=1)
        assert a == plot.choose_spot_check(m, per_label=2, seed=1) != plot.choose_spot_check(m, per_label=2, seed=2)
        labels = [m[i]["label_name"] for i in a]
        assert all(labels.count(x) == 2 for x in set(labels)) and len(set(labels)) == 8
        assert plot.choose_spot_check(m, indices=[3, -1]) == [3, len(m) - 1]
        with pytest.raises(IndexError, match="out of range"):
            plot.choose_spot_check(m, indices=[10_000])
    s = plot.spot_check(demo_data, tmp_path, split="val", indices=[0, 2])
    assert [i["index"] for i in s["items"]] == [0, 2] and s["split"] == "val"
    for f in [s["grid"]] + [i["png"] for i in s["items"]]:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
