"""The benchmark code runs on tiny sizes and produces every measure; no assertion on timings."""

import json
import pickle
import shutil

import pytest

from lmdbkit import bench, bench_cold


def test_run_produces_every_measure_ratio_target_and_figure(tmp_path):
    s = bench.run(tmp_path, n_stft=8, n_small=40, open_counts=(10, 50), reads=10, min_seconds=0.0,
                  workers=(0, 2), cold=True, cold_gb=0.01, cold_reads=64, progress=False)
    got = {(r["measure"], r["kind"], r["method"]) for r in s["results"]}
    for kind in ("stft256k", "small1k"):
        for m in ("lmdbkit", "pickle_lmdb", "raw_put", "pt_batches"):
            assert ("write", kind, m) in got and ("disk", kind, m) in got
        for m in ("lmdbkit", "pickle_lmdb", "bare_txn_get", "memcpy", "pt_batches"):
            assert ("read_random", kind, m) in got and ("read_sequential", kind, m) in got
        for m in ("lmdbkit", "lmdbkit_prebatch", "lmdbkit_singles", "bare_txn_get"):  # batches in one process
            assert ("read_batched", kind, m) in got
            assert f"read_batched/{kind}: lmdbkit / bare_txn_get" in s["ratios"]
        for m in ("lmdbkit", "pickle_lmdb"):
            assert ("dataloader", kind, m) in got and ("worker_uss", kind, m) in got
    for temp in ("cold", "warm"):  # the cold section: the same items read every way, after a drop and warm
        for m in ("lmdbkit", "pread_1thread", "pickle_lmdb", "pt_batches"):
            assert (f"{temp}_single", "stft256k", m) in got
        for m in ("lmdbkit", "pread_16threads", "pread_1thread", "pickle_lmdb", "pt_batches"):
            assert (f"{temp}_batch64", "stft256k", m) in got
        for m in ("lmdbkit", "pread_16threads", "pickle_lmdb"):
            assert (f"{temp}_dataloader", "stft256k", m) in got
    for temp in ("cold", "warm"):  # small items, packed and one per value
        for m in ("lmdbkit_packed", "lmdbkit_format1"):
            assert (f"{temp}_single", "small1k", m) in got and (f"{temp}_batch256", "small1k", m) in got
        assert f"{temp}_batch256/small1k: lmdbkit_packed / lmdbkit_format1" in s["ratios"]
    cold = [r for r in s["results"] if r["measure"].startswith("cold_")]
    assert all(r["extra"]["fadvise_dontneed"] and r["extra"]["MiB/s"] > 0 for r in cold)
    assert {("open", "10", "lmdbkit"), ("open", "50", "pt_batches")} <= got
    assert all(r["value"] > 0 for r in s["results"])
    workers = {r["extra"]["num_workers"] for r in s["results"] if r["measure"] == "dataloader"}
    assert workers == {0, 2}
    assert "read_random/stft256k: lmdbkit / memcpy" in s["ratios"] and "open: lmdbkit slowest / fastest, 1k-100k items" in s["ratios"]
    assert len(s["targets"]) == len(bench.TARGETS) + len(bench_cold.TARGETS) + 1
    assert all(t["holds"] is not None for t in s["targets"])
    assert "cold_dataloader/stft256k: lmdbkit / pread_16threads" in s["ratios"]
    for f in s["figures"]:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text())["ratios"] == s["ratios"]
    assert not (tmp_path / "work").exists()
    text = bench.targets_table(s["targets"])
    assert "random read ~256 KiB" in text and ("holds" in text or "MISSED" in text)
    assert s["kinds"]["rows"] and any(f.endswith("bench_kinds.png") for f in s["figures"])


def test_feature_kinds_are_measured_on_speech(tmp_path):
    from lmdbkit import bench_kinds
    k = bench_kinds.bench_kinds(tmp_path / "k", min_seconds=0.0, progress=False)
    assert k["corpus"] == "speech (espeak-ng)" or not shutil.which("espeak-ng")
    rows = {r["kind"]: r for r in k["rows"]}
    assert list(rows) == [name for name, *_ in bench_kinds.KINDS] and k["audio_seconds"] > 10
    c64, c32 = rows["complex64"], rows["complex32"]
    assert c32["payload_bytes_per_audio_second"] == c64["payload_bytes_per_audio_second"] / 2
    assert c32["disk_vs_complex64"] < 0.55 and rows["log_mel f16"]["disk_vs_complex64"] < 0.1
    assert rows["log_mel f16 zstd"]["disk_bytes_per_audio_second"] < rows["log_mel f16"]["disk_bytes_per_audio_second"]
    assert 60 < c32["snr_db"] < 90 and 60 < c32["audio_snr_db"] < c64["audio_snr_db"]
    assert rows["log_mel bf16"]["max_abs_error"] > rows["log_mel f16"]["max_abs_error"] > 0
    assert rows["log_mel f16 zstd"]["max_abs_error"] == rows["log_mel f16"]["max_abs_error"]  # zstd is lossless
    assert all(r["warm_items_per_second"] > 0 and r["cold_items_per_second"] > 0 for r in rows.values())
    bf16 = k["evaluated"][0]
    assert bf16["kind"] == "complex bf16 pairs" and bf16["snr_db"] < bf16["complex32_snr_db"]
    assert "complex32" in bench_kinds.table(k) and not (tmp_path / "k").exists()


def test_benchmark_lmdb_performance(small_db):
    out = bench.benchmark_lmdb_performance(small_db, num_samples=50)
    assert out["items"] == 100
    for k in ("random_ms_per_sample", "sequential_ms_per_sample", "random_samples_per_second",
              "sequential_samples_per_second"):
        assert out[k] > 0


def test_baselines_read_the_same_items(tmp_path):
    import torch
    samples = bench.make_samples("small1k", 20)
    paths = bench.bench_paths("small1k", tmp_path)
    bench.write_lmdbkit(paths["lmdbkit"], samples)
    bench.write_pickle_lmdb(paths["pickle_lmdb"], samples)
    bench.write_pt_batches(paths["pt_batches"], samples, batch=8)
    ds = pickle.loads(pickle.dumps(bench.PickleLmdb(paths["pickle_lmdb"])))
    pt = bench.PtBatches(paths["pt_batches"])
    from lmdbkit import Reader
    r = Reader(paths["lmdbkit"], decode_to="torch")
    assert len(ds) == len(pt) == len(r) == 20
    for i in (0, 7, 8, 19):
        assert torch.equal(ds[i]["x"], samples[i]["x"]) and torch.equal(pt[i]["x"], samples[i]["x"])
        assert torch.equal(r[i]["x"], samples[i]["x"])
    r.close()
    assert bench.drop_page_cache(paths["lmdbkit"]) is True
    with pytest.raises(ValueError, match="item kind 'huge' is unsupported"):
        bench.make_samples("huge", 1)


def test_a_missed_target_never_shows_its_threshold_as_the_measured_value():
    t = {"target": "x", "value": 1.9964, "threshold": ">= 2.0", "holds": False}
    assert bench.shown(t) == "1.996"
    assert bench.shown(dict(t, value=0.6981)) == "0.698" and bench.shown(dict(t, value=None)) == "-"
    assert bench.shown(dict(t, value=2.0, holds=True)) == "2"
    assert "(measured 1.996)" in str(bench.verdict({"targets": [t], "ratios": {}}).problems)
