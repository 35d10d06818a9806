"""The figures a researcher reads: shared colour scales, units, legends off the data, normalised confusion, and the
closing verdicts of the notebooks."""

import numpy as np
import pytest

import lmdbkit
from lmdbkit import plot, plot_bench, store
from lmdbkit.verdict import Table, Verdict


def _result(**kw):
    r = {"losses": list(np.linspace(2.0, 0.3, 50)), "val_curve": [{"step": s, "loss": 2.0 - s / 40, "accuracy": s / 60}
                                                               for s in (10, 20, 30, 40, 50)],
         "first_loss": 2.0, "final_loss": 0.3, "steps": 50, "val_accuracy": 50 / 60, "val_items": 30, "chance": 0.25,
         "samples_per_second": 900.0, "data_wait_share": 0.1, "device": "cpu",
         "confusion": [[5, 1, 0], [0, 3, 3], [0, 0, 8]], "labels": {"a": 0, "b": 1, "c": 2}}
    r.update(kw)
    return r


def test_spot_check_grid_has_one_colour_scale_and_one_colour_bar(demo_data):
    with lmdbkit.Reader(demo_data / "train.lmdb") as r:
        fig = plot.spot_check_grid(r, [0, 5, 9, 20])
        images = [im for ax in fig.axes for im in ax.get_images()]
        item_axes = [ax for ax in fig.axes if ax.get_images()]
        assert len(images) == 4 and len({im.get_clim() for im in images}) == 1
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == 1 and "dB re 1" in bars[0].get_ylabel()
        assert all(ax.get_title().startswith("#") and "\n" in ax.get_title() for ax in item_axes)
        lo, hi = images[0].get_clim()
        assert hi == pytest.approx(max(float(np.max(im.get_array())) for im in images)) and hi - lo == 80


def test_spectrogram_says_db_relative_to_what(demo_data):
    with lmdbkit.Reader(demo_data / "train.lmdb") as r:
        fig = plot.spectrogram(r[0]["stft"], plot.stft_config(r))
    assert any(ax.get_ylabel() == "power (dB re 1)" for ax in fig.axes)


def test_class_balance_legend_is_beside_the_bars(demo_data):
    fig = plot.class_balance(store.resolve_paths(demo_data))
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # outside the axes: it covers no bar


def test_training_curves_show_validation_loss_and_accuracy():
    fig = plot.training_curves(_result())
    loss, acc = fig.axes
    assert {line.get_label() for line in loss.get_lines()} >= {"validation", "training (per step)"}
    steps, accs = acc.get_lines()[0].get_data()
    assert list(steps) == [10, 20, 30, 40, 50] and accs[-1] == pytest.approx(50 / 60)
    assert "chance" in acc.get_lines()[1].get_label()
    plot.training_curves(_result(val_curve=None))  # a result recorded before validation curves: still drawn


def test_confusion_is_normalised_per_true_class_with_accuracy_in_title():
    fig = plot.confusion(_result())
    ax = fig.axes[0]
    share = ax.get_images()[0].get_array()
    assert np.allclose(share.sum(axis=1), 1) and share[1, 1] == pytest.approx(0.5)
    assert ax.get_title() == "validation: accuracy 0.80 on 20 items"


def test_bench_plots_have_plain_labels_and_integer_worker_ticks():
    res = [{"measure": "dataloader", "kind": "small1k", "method": m, "value": v, "unit": "items/s",
            "extra": {"num_workers": w}} for m in ("lmdbkit", "lmdbkit_plain", "pickle_lmdb") for w, v in ((0, 1), (2, 3))]
    ax = plot_bench.bench_dataloader({"results": res}).axes[0]
    assert list(ax.get_xticks()) == [0, 2] and ax.get_xlabel() == "DataLoader worker processes"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "lmdbkit, create_data_loader", "lmdbkit, plain DataLoader", "pickle in LMDB (older way)"]


def test_verdict_text_markdown_and_failure():
    ok = Verdict("precompute", [("made", "train 10 items")])
    assert str(ok) == "precompute: PASSED\n- made: train 10 items"
    assert ok._repr_markdown_().startswith("### precompute: **PASSED**")
    assert ok.show() is None
    bad = Verdict("train smoke test", [("loss", "2 -> 2")], ["the loss did not fall"])
    with pytest.raises(lmdbkit.LmdbkitError, match="train smoke test failed:\n  the loss did not fall"):
        bad.show()
    soft = Verdict("benchmark", [], ["write >= 1x"], strict=False, missed="1 TARGETS MISSED")
    assert soft.show() is None and str(soft).splitlines() == ["benchmark: 1 TARGETS MISSED", "- missed: write >= 1x"]
    t = Table(["a", "b"], [["x|y", 1]], title="T")
    assert str(t).splitlines()[1:] == ["a    b", "---  -", "x|y  1"] and "x\\|y" in t._repr_markdown_()
