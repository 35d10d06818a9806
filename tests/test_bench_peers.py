"""The peer comparison runs with whichever peers are installed (h5py is, in the dev extra); no timings asserted."""

import json

import pytest

from lmdbkit import bench, bench_peers, peers, plot_bench
from lmdbkit.bench import Result


def test_lmdbkit_and_h5py_are_compared_on_the_same_items(tmp_path):
    pytest.importorskip("h5py")
    res = bench_peers.bench_peers("small1k", 300, tmp_path, peers=["h5py"], reads=50, min_seconds=0.0, rounds=1,
                                  num_workers=0, batch_size=16)
    got = {(r.measure, r.method) for r in res}
    for system in ("lmdbkit", "h5py"):
        for m in ("peers_write", "peers_write_synced", "peers_disk", "peers_open", "peers_read_random",
                  "peers_dataloader"):
            assert (m, system) in got
    assert ("peers_dataloader", "lmdbkit_plain") in got
    assert all(r.value > 0 for r in res)
    r = bench_peers.ratios(res)
    assert "peers_read_random/small1k: lmdbkit / best peer (h5py)" in r
    assert "peers_dataloader/small1k: lmdbkit_plain / best peer (h5py)" in r
    assert not list(tmp_path.glob("small1k-*"))  # each copy is removed after the run


def test_a_peer_that_reads_back_other_items_fails_the_run(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    real = peers._H5Items.__getitem__
    monkeypatch.setattr(peers._H5Items, "__getitem__", lambda self, i: real(self, (i + 1) % len(self)))
    with pytest.raises(AssertionError, match="h5py read back another item 7"):
        bench_peers.bench_peers("small1k", 20, tmp_path, peers=["h5py"], reads=5, min_seconds=0.0, rounds=1,
                                num_workers=None)


def test_missing_peers_are_named_with_the_reason_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(peers.Litdata, "module", "no_such_module_here")
    assert "No module named 'no_such_module_here'" in peers.available()["litdata"]
    res = bench_peers.bench_peers("small1k", 20, tmp_path, peers=["litdata"], reads=5, min_seconds=0.0, rounds=1,
                                  num_workers=None)
    assert {r.method for r in res} == {"lmdbkit"}
    s = bench_peers.summary(res, ["litdata"])
    assert s["ran"] == [] and "no_such_module_here" in s["not_installed"]["litdata"]
    with pytest.raises(ValueError, match=r"peers=\['nope'\]: unknown"):
        bench.run(tmp_path / "b", n_stft=0, n_small=10, peers=["nope"], cold=False, kinds=False, progress=False)


def _results():
    rows = []
    for kind in ("stft256k", "small1k"):
        for m, vals in {"peers_write": (100, 300, 200), "peers_write_synced": (400, 300, 200),
                        "peers_disk": (1.4, 1.0, 1.02), "peers_open": (0.2, 0.1, 0.3),
                        "peers_read_random": (5e4, 1e4, 2e4), "peers_dataloader": (9e3, 4e3, 5e3)}.items():
            for system, v in zip(("lmdbkit", "h5py", "lhotse"), vals):
                rows.append(Result(m, kind, system, v, ""))
        rows.append(Result("peers_dataloader", kind, "lmdbkit_plain", 1e4, ""))
    return rows


def test_ratios_are_against_the_best_peer_of_each_column_and_the_targets_follow():
    res = _results()
    r = bench_peers.ratios(res)
    assert r["peers_write_synced/stft256k: lmdbkit / best peer (h5py)"] == pytest.approx(400 / 300)
    assert r["peers_disk/small1k: lmdbkit / best peer (h5py)"] == pytest.approx(1.0 / 1.4)  # less is better
    assert r["peers_open/stft256k: lmdbkit / best peer (h5py)"] == pytest.approx(0.1 / 0.2)
    assert r["peers_dataloader/small1k: lmdbkit_plain / best peer (lhotse)"] == pytest.approx(1e4 / 5e3)
    assert r["peers_write/stft256k: lmdbkit durable (fsync per commit) / best peer synced (h5py)"] == \
        pytest.approx(100 / 300)
    tg = {t["target"]: t for t in bench_peers.targets(res)}
    assert tg["writes, ~256 KiB, synced once at the end: >= 1.0x the best peer"]["holds"] is True
    assert tg["writes, ~256 KiB, lmdbkit's default (fsync per commit): >= 0.8x the best peer synced once"]["holds"] \
        is False
    assert tg["open + len, ~1 KiB: fastest"]["holds"] is False
    assert tg["DataLoader, 2 workers, ~1 KiB: plain DataLoader(LMDBDataset) >= 1.1x the best peer"]["holds"] is True
    targets = bench.targets(res)  # the suite's targets include the peers' when they ran
    assert sum(t["target"].startswith("DataLoader, 2 workers, ~256 KiB: create") for t in targets) == 1


def test_the_table_marks_the_best_of_each_column_and_the_figure_draws():
    res = _results()
    t = bench_peers.table(res, "stft256k")
    header, rows = t.headers, t.rows
    assert header[0] == "system" and len(rows) == 4 and "| lmdbkit (create_data_loader" in t._repr_markdown_()
    lmdbkit = rows[0]
    assert lmdbkit[header.index("warm random reads")] == "**50,000**"
    assert rows[1][header.index("disk x payload")] == "**1**"
    summary = {"results": [vars(r) for r in res], "peers": {"kinds": ["stft256k", "small1k"], "not_installed": {}}}
    assert "h5py (one dataset per field)" in bench_peers.text_tables(summary)
    fig = plot_bench.bench_peers(summary)
    assert len(fig.axes) == 10
    assert plot_bench.bench_peers({"results": []}) is None


@pytest.mark.slow
def test_the_command_line_prints_the_peer_table_and_keeps_it_in_the_summary(tmp_path, capsys):
    pytest.importorskip("h5py")
    with pytest.raises(ValueError, match="unknown"):
        bench.main(["--output-dir", str(tmp_path), "--n-stft", "0", "--n-small", "40", "--workers", "", "--no-cold",
                    "--no-kinds", "--no-pt", "--peers", "h5py,nope"])
    assert bench.main(["--output-dir", str(tmp_path), "--n-stft", "0", "--n-small", "40", "--workers", "",
                       "--no-cold", "--no-kinds", "--no-pt", "--peers", "h5py"]) == 0
    out = capsys.readouterr().out
    assert "lmdbkit and the peers, ~1 KiB items" in out and "h5py (one dataset per field)" in out
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["peers"]["ran"] == ["h5py"] and s["peers"]["kinds"] == ["small1k"]
    assert (tmp_path / "bench_peers.png").exists()


def test_hdf5_datasets_open_in_the_reading_process_and_pickle_for_spawned_workers(tmp_path):
    pytest.importorskip("h5py")
    import pickle
    import numpy as np
    samples = [{"x": np.full(4, i, np.float32), "label": i} for i in range(5)]
    peers.H5py().write(tmp_path / "h", samples, "x")
    ds = peers.H5py().dataset(tmp_path / "h", "x", np.dtype(np.float32))
    clone = pickle.loads(pickle.dumps(ds))  # what spawn does; the open file stays behind
    assert clone.r is None and len(clone) == 5 and clone[3]["label"] == 3 and np.array_equal(clone[3]["x"], [3] * 4)
