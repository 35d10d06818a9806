import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import lmdbkit
from lmdbkit import audio, demo, pipeline
from lmdbkit.errors import AudioDecodeError, ConfigMismatchError, LmdbkitError, ValueRangeError
from lmdbkit.precompute import AudioConfig, check_outputs, format_summary, precompute
from lmdbkit.stft import StftConfig

FAST = dict(num_workers=0, progress=False, n_fft=256, hop_length=128)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return demo.make_corpus(tmp_path_factory.mktemp("corpus"), n_per_class=4)


def _keys(out, pattern="*.lmdb"):
    keys = []
    for p in sorted(out.glob(pattern)):
        with lmdbkit.Reader(p) as r:
            keys += r.keys()
    return keys


def test_end_to_end_items_meta_and_skips(corpus, tmp_path):
    out = tmp_path / "out"
    s = precompute(corpus, output_dir=out, **FAST)
    good = [x for x in audio.discover(corpus) if x.path not in {b["path"] for b in s["skipped"]}]
    assert len(good) == 32 and sorted(b["path"] for b in s["skipped"]) == [
        "chirp_up/not_audio.flac", "clicks_fast/zero_length.wav", "tone_low/empty.wav"]
    assert {b["reason"] for b in s["skipped"]} == {"empty file (0 bytes)", "no audio frames (zero-length audio)",
                                                   "not decodable audio (Error opening '%s': Format not recognised.)"
                                                   % (corpus / "chirp_up/not_audio.flac")}
    keys = _keys(out)
    assert sorted(keys) == sorted(f"{x.path}#0" for x in good)  # one item per file, every file once
    ds = lmdbkit.LMDBDataset(out / "train.lmdb")
    item = ds[0]
    assert set(item) == {"stft", "label", "label_name", "path", "segment", "offset_s", "duration_s", "sample_rate",
                         "orig_sample_rate"}
    assert item["stft"].dtype == torch.complex64 and item["stft"].shape[0] == 129
    md = ds.meta["metadata"]
    assert md["stft"]["n_fft"] == 256 and md["labels"][item["label_name"]] == item["label"]
    assert item["orig_sample_rate"] in demo.RATES and item["sample_rate"] == 16000
    assert ds.key_of(0) == f"{item['path']}#0"
    expected_frames = lmdbkit.stft.StftConfig(n_fft=256, hop_length=128).num_frames(round(item["duration_s"] * 16000))
    assert item["stft"].shape[1] == expected_frames
    on_disk = json.loads((out / "train.lmdb" / "metadata.json").read_text())
    assert on_disk["metadata"]["stft"]["hop_length"] == 128 and len(on_disk["metadata"]["summary"]["skipped"]) == 3
    assert on_disk["metadata"]["summary"]["splits"]["train"]["bytes"] > 0
    assert sum(d["items"] for d in s["splits"].values()) == 32 and all(d["bytes"] > 0 for d in s["splits"].values())
    table = format_summary(s)
    assert "train" in table and "skipped 3 files" in table and "tone_low/empty.wav: empty file" in table
    check_outputs(s)


def test_item_matches_direct_stft_of_decoded_file(corpus, tmp_path):
    out = tmp_path / "out"
    precompute(corpus, output_dir=out, **FAST, limit=6)
    r = lmdbkit.Reader(out / "train.lmdb", decode_to="torch")
    item = r[0]
    x, sr = audio.decode(corpus / item["path"])
    x = audio.resample(audio.mix(x, "mean"), sr, 16000)
    ref = torch.stft(torch.from_numpy(x[0]), 256, 128, window=torch.hann_window(256), return_complex=True)
    assert torch.allclose(item["stft"], ref.to(torch.complex64), atol=1e-4)


def test_segments_and_db_output(corpus, tmp_path):
    s = precompute(corpus, output_dir=tmp_path / "o", segment_seconds=0.25, segment_hop_seconds=0.125, pad_last=True,
                   output="db", dtype="float16", **FAST)
    with lmdbkit.Reader(tmp_path / "o" / "train.lmdb", decode_to="torch") as r:
        shapes = {tuple(x["stft"].shape) for x in r}
        assert shapes == {(129, 32)} and r[0]["stft"].dtype == torch.float16
        segs = [x for x in r if x["path"] == r[0]["path"]]
        assert [x["segment"] for x in segs] == list(range(len(segs))) and len(segs) >= 4
        assert np.allclose([x["offset_s"] for x in segs], 0.125 * np.arange(len(segs)))
        assert segs[-1]["duration_s"] <= 0.25
    assert s["items_written"] > 4 * s["files_processed"]


def test_strict_stops_at_first_bad_file(corpus, tmp_path):
    with pytest.raises(AudioDecodeError, match=r"chirp_up/not_audio.flac: not decodable audio.*strict=True"):
        precompute(corpus, output_dir=tmp_path / "o", strict=True, **FAST)


def test_config_mismatch_and_overwrite(corpus, tmp_path):
    out = tmp_path / "o"
    precompute(corpus, output_dir=out, **FAST, limit=8)
    with pytest.raises(ConfigMismatchError, match=r"(?s)stft.hop_length\s+128\s+64"):
        precompute(corpus, output_dir=out, **dict(FAST, hop_length=64), limit=8)
    before = sorted(_keys(out))
    assert json.loads((out / "train.lmdb" / "metadata.json").read_text())["complete"] is True  # refused: untouched
    s = precompute(corpus, output_dir=out, **dict(FAST, hop_length=64), limit=8, mode="overwrite")
    assert sorted(_keys(out)) == before and s["stft"]["hop_length"] == 64


def test_resume_adds_only_new_files_and_keeps_splits(corpus, tmp_path):
    src = tmp_path / "audio"
    shutil.copytree(corpus, src)
    out = tmp_path / "o"
    precompute(src, output_dir=out, **FAST)
    where = {k: p.name for p in out.glob("*.lmdb") for k in _keys(out, p.name)}
    x = np.sin(np.arange(8000) / 7).astype(np.float32)
    for i in range(5):
        sf.write(src / "tone_low" / f"new_{i}.wav", x, 16000)
    (src / "zebra").mkdir()
    sf.write(src / "zebra" / "z.wav", x, 16000)
    s = precompute(src, output_dir=out, **FAST)
    assert s["files_processed"] == 6 and s["files_resumed"] == 32
    after = {k: p.name for p in out.glob("*.lmdb") for k in _keys(out, p.name)}
    assert all(after[k] == v for k, v in where.items())  # no existing file moved to another split
    assert len(after) == len(where) + 6
    labels = lmdbkit.Reader(out / "train.lmdb").metadata["labels"]
    assert labels["zebra"] == 8 and labels["chirp_down"] == 0  # new label appended, old ones kept


def test_manifest_splits(corpus, tmp_path):
    files = [x for x in audio.discover(corpus) if "empty" not in x.path and "not_audio" not in x.path
             and "zero_length" not in x.path][:9]
    rows = ["path,label,split"] + [f"{x.path},{'a' if i % 2 else 'b'},{('train', 'val', 'test')[i % 3]}"
                                   for i, x in enumerate(files)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    precompute(corpus, output_dir=tmp_path / "o", manifest=tmp_path / "m.csv", **FAST)
    with lmdbkit.Reader(tmp_path / "o" / "val.lmdb") as r:
        assert sorted(x["path"] for x in r) == sorted(x.path for i, x in enumerate(files) if i % 3 == 1)
        assert r.metadata["labels"] == {"a": 0, "b": 1}
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label,split\n{files[0].path},a,holdout\n")
    with pytest.raises(LmdbkitError, match="split 'holdout'.*is not one of splits"):
        precompute(corpus, output_dir=tmp_path / "o2", manifest=bad, **FAST)


def test_empty_split_fails_the_output_check(corpus, tmp_path):
    s = precompute(corpus, output_dir=tmp_path / "o", splits={"train": 1.0, "val": 0.0}, **FAST, limit=4)
    with pytest.raises(LmdbkitError, match="split 'val' is empty"):
        check_outputs(s)


def test_bad_parameters_are_named(tmp_path):
    with pytest.raises(LmdbkitError, match="no audio files under"):
        (tmp_path / "empty").mkdir()
        precompute(tmp_path / "empty", output_dir=tmp_path / "o", **FAST)
    with pytest.raises(LmdbkitError, match="device='tpu' is unsupported"):
        precompute(tmp_path, output_dir=tmp_path / "o", device="tpu", **FAST)
    with pytest.raises(LmdbkitError, match="shard_index=2, num_shards=2"):
        precompute(tmp_path, output_dir=tmp_path / "o", shard_index=2, num_shards=2, **FAST)


def _cli(*args):
    return [sys.executable, "-m", "lmdbkit.precompute", "--no-progress", "--n-fft", "256", *map(str, args)]


def test_killed_run_resumes_to_exactly_once(corpus, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cli("--audio-dir", corpus, "--output-dir", ref, "--num-workers", "0"), check=True,
                   capture_output=True)
    expected = sorted(_keys(ref))
    out = tmp_path / "o"
    for attempt in range(20):  # kill at a moment when some but not all files are committed
        proc = subprocess.Popen(_cli("--audio-dir", corpus, "--output-dir", out, "--batch-size", "1",
                                     "--num-workers", "1", "--commit-items", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                n = len(_keys(out))
            except LmdbkitError:
                n = 0
            if n >= 5 or proc.poll() is not None:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = _keys(out)
        if 0 < len(partial) < len(expected):
            break
        shutil.rmtree(out, ignore_errors=True)
    assert 0 < len(partial) < len(expected), "could not interrupt the run mid-way"
    assert len(set(partial)) == len(partial)
    subprocess.run(_cli("--audio-dir", corpus, "--output-dir", out, "--num-workers", "0"), check=True,
                   capture_output=True)
    final = _keys(out)
    assert sorted(final) == expected  # every source exactly once: nothing lost, nothing doubled
    for p in out.glob("*.lmdb"):
        with lmdbkit.Reader(p) as r:
            assert r.meta["complete"] and len(r) == len(r.keys()) == len(list(r))


@pytest.mark.slow
def test_torchrun_two_shards_cover_every_item_once(corpus, tmp_path):
    ref = tmp_path / "ref"
    precompute(corpus, output_dir=ref, **FAST)
    out = tmp_path / "sharded"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "lmdbkit.precompute", "--audio-dir", str(corpus), "--output-dir", str(out),
                           "--no-progress", "--n-fft", "256", "--num-workers", "0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in out.glob("*.lmdb"))
    assert names == sorted(f"{s}-{i}-of-2.lmdb" for s in ("train", "val", "test") for i in (0, 1))
    ds = lmdbkit.LMDBDataset(out)
    keys = [ds.key_of(i) for i in range(len(ds))]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(_keys(ref))
    for split in ("train", "val", "test"):
        shard_keys = sorted(_keys(out, f"{split}-*-of-2.lmdb"))
        assert shard_keys == sorted(_keys(ref, f"{split}.lmdb"))  # same split assignment as one process


def test_file_name_that_is_not_utf8_is_skipped_with_its_reason(corpus, tmp_path):
    src = tmp_path / "audio"
    shutil.copytree(corpus / "chirp_up", src / "chirp_up")
    good = len(audio.discover(src))
    raw = os.fsencode(src / "chirp_up") + b"/caf\xe9.wav"  # latin-1 bytes: not UTF-8
    shutil.copy(sorted((src / "chirp_up").glob("*.wav"))[0], raw)
    summary = precompute(src, output_dir=tmp_path / "out", splits={"train": 1.0}, **FAST)
    assert summary["files_processed"] + len(summary["skipped"]) == good + 1 and summary["files_processed"] >= 3
    skip = next(s for s in summary["skipped"] if "caf" in s["path"])
    assert skip["path"] == "chirp_up/caf\ufffd.wav" and "not valid UTF-8" in skip["reason"]
    assert "caf" in format_summary(summary)
    with pytest.raises(AudioDecodeError, match="not valid UTF-8"):
        precompute(src, output_dir=tmp_path / "strict", splits={"train": 1.0}, strict=True, **FAST)


def test_decode_workers_exit_when_the_run_is_killed(tmp_path):
    """Workers whose decoded files (MBs each) fill the pipe to a parent that was killed block forever on
    the write (they hold the pipe's read end too), unless they die with their parent."""
    import psutil
    src = tmp_path / "long" / "tone"
    src.mkdir(parents=True)
    t = np.arange(16000 * 30) / 16000
    for i in range(12):
        sf.write(src / f"t{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16000)
    proc = subprocess.Popen(_cli("--audio-dir", tmp_path / "long", "--output-dir", tmp_path / "o", "--batch-size",
                                 "1", "--num-workers", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 60
    workers = []
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = parent.children()
        time.sleep(0.05)
    assert len(workers) >= 2, "the run ended before its workers could be seen"
    time.sleep(1.0)  # the workers decode ahead and fill the pipe
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"decode workers outlived their parent: {alive}"


def test_long_file_is_decoded_in_blocks_and_matches_one_shot_decoding(tmp_path):
    sr_in = 44100
    t = np.arange(int(sr_in * 25)) / sr_in  # 25 s: three blocks of 10 s
    x = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 1000 * t)]).astype(np.float32) * 0.5
    f = tmp_path / "long.wav"
    sf.write(f, x.T, sr_in, subtype="FLOAT")
    y, sr = audio.decode_resampled(f, sample_rate=16000, mono="mean")
    ref = audio.resample(audio.mix(x, "mean"), sr_in, 16000)
    assert sr == sr_in and y.shape == ref.shape and y.dtype == np.float32
    assert np.abs(y - ref).max() < 1e-4  # soxr's stream equals its one-shot resampling but for rounding
    keep, _ = audio.decode_resampled(f, sample_rate=sr_in, mono="keep")
    assert np.array_equal(keep, x)


def test_long_source_commits_in_parts_and_resumes_where_it_stopped(tmp_path):
    """A source larger than commit_bytes is committed in parts (bounded memory) with a partial record;
    after a crash mid-source, resuming appends exactly the missing samples."""
    path = tmp_path / "db.lmdb"

    def samples(start, stop, boom=None):
        for j in range(start, stop):
            if j == boom:
                raise RuntimeError("killed")
            yield f"long.wav#{j}", {"x": np.full(1024, j, np.float32)}  # 4 KiB each

    w = lmdbkit.Writer(path, commit_bytes=20 * 4096)
    with pytest.raises(RuntimeError):
        w.append_source("long.wav", samples(0, 100, boom=50))
    assert not w.has_source("long.wav") and w.source_progress("long.wav") == 40  # two parts of 20 committed
    w.abort()
    with lmdbkit.Reader(path) as r:
        assert len(r) == 40
    with lmdbkit.Writer(path, mode="append", commit_bytes=20 * 4096) as w:
        done = w.source_progress("long.wav")
        w.append_source("long.wav", samples(done, 100), info={"duration_s": 1.0})
        assert w.has_source("long.wav") and w.source_progress("long.wav") == 100
    with lmdbkit.Reader(path) as r:
        assert [int(s["x"][0]) for s in r] == list(range(100))


def _keyword_corpus(root):
    """Laid out as public corpora are: speech/<language>/<word>.wav with sub-second clips, a folder whose files
    all fail to decode, and a stray file directly in the corpus folder."""
    t = np.arange(int(16000 * 0.98)) / 16000
    for lang, f0 in (("en", 300), ("de", 500)):
        (root / "speech" / lang).mkdir(parents=True)
        for i in range(6):
            secs = 0.98 if i < 4 else 2.0  # four one-second keyword clips, just short of a segment; two long
            tt = np.arange(int(16000 * secs)) / 16000
            sf.write(root / "speech" / lang / f"w{i}.wav", (0.3 * np.sin(2 * np.pi * f0 * tt)).astype(np.float32), 16000)
    (root / "speech" / "bad").mkdir()
    for i in range(2):
        (root / "speech" / "bad" / f"x{i}.wav").write_bytes(b"RIFF....not audio")
    sf.write(root / "stray.wav", (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return root


def test_nested_corpus_labels_short_clips_and_empty_classes(tmp_path, caplog):
    root = _keyword_corpus(tmp_path / "kw")
    split = {"splits": {"train": 1.0}}
    s = precompute(root, output_dir=tmp_path / "out", segment_seconds=1.0, label_depth=1, **split, **FAST)
    with lmdbkit.Reader(tmp_path / "out" / "train.lmdb") as r:
        items = {it["path"]: it for it in r}
        labels = r.metadata["labels"]
    assert set(labels) == {"en", "de", "bad", "kw"}  # speech/<language>: the level asked for; the stray file: "kw"
    assert len(items) == 13 and items["speech/de/w0.wav"]["label_name"] == "de"
    short = items["speech/en/w1.wav"]  # a 0.98 s clip is kept, zero-padded to one segment, its true length kept
    assert short["duration_s"] == pytest.approx(0.98) and short["stft"].shape == items["speech/en/w5.wav"]["stft"].shape
    assert s["short_files"] == {"policy": "pad", "padded": 9, "dropped": 0}
    assert s["labels"]["en"] == {"files": 6, "items": 8} and s["labels"]["bad"] == {"files": 2, "items": 0}
    assert s["empty_labels"] == ["bad"] and s["label_depth"] == 1
    text = format_summary(s)
    assert "labels with no items (every file skipped): bad" in text and "9 kept zero-padded, 0 dropped" in text
    assert "de (6 files, 8 items)" in text and "lie directly in" in caplog.text
    d = precompute(root, output_dir=tmp_path / "drop", segment_seconds=1.0, label_depth=1, short_files="drop",
                   **split, **FAST)
    assert d["short_files"] == {"policy": "drop", "padded": 0, "dropped": 9} and d["items_written"] == 8
    assert sum("shorter than one segment" in x["reason"] for x in d["skipped"]) == 9
    with pytest.raises(LmdbkitError, match=r"short_files='trim' is unsupported"):
        precompute(root, output_dir=tmp_path / "x", short_files="trim", **FAST)


def test_run_started_before_label_depth_and_short_files_existed_resumes(corpus, tmp_path):
    """A database whose settings predate label_depth and short_files resumes when asked for the same behaviour."""
    out = tmp_path / "out"
    precompute(corpus, output_dir=out, limit=8, short_files="drop", **FAST)
    for p in out.glob("*.lmdb"):  # as an older lmdbkit recorded it
        with lmdbkit.Reader(p) as r:
            assert "label_depth" not in r.metadata and "short_files" not in r.metadata["audio"]
    s = precompute(corpus, output_dir=out, short_files="drop", **FAST)  # resumes: only the new files
    assert 0 < s["files_resumed"] <= 8 and s["files_processed"] > 0
    assert s["files_resumed"] + s["files_processed"] + len(s["skipped"]) == len(audio.discover(corpus))
    with pytest.raises(ConfigMismatchError, match="short_files"):
        precompute(corpus, output_dir=out, **FAST)  # short files now kept: not the same run


def test_another_audio_folder_is_not_appended_and_outputs_follow_the_folder(corpus, tmp_path, monkeypatch):
    out = tmp_path / "o"
    precompute(corpus, output_dir=out, **FAST, limit=6)
    before = sorted(_keys(out))
    other = tmp_path / "my_audio"
    shutil.copytree(corpus / "tone_low", other / "dog")
    with pytest.raises(ConfigMismatchError, match=r"(?s)written with other settings.*audio_dir") as e:
        precompute(other, output_dir=out, **FAST)
    assert str(corpus.resolve()) in str(e.value) and str(other.resolve()) in str(e.value)
    assert "another output_dir" in str(e.value)
    assert sorted(_keys(out)) == before  # nothing of the other corpus was written
    for p in out.glob("*.lmdb"):
        with lmdbkit.Reader(p) as r:
            assert r.meta["complete"] and r.metadata["origin"]["audio_dir"] == str(corpus.resolve())
    precompute(corpus, output_dir=out, **FAST)  # the same folder still resumes
    monkeypatch.chdir(tmp_path)  # no output_dir: derived from the audio folder, never the demo's
    s = precompute(other, **FAST)
    assert Path(s["output_dir"]) == Path("runs/my_audio/data") and (tmp_path / "runs/my_audio/data/train.lmdb").is_dir()
    assert not (tmp_path / "runs" / "demo").exists()


def _items(db):
    with lmdbkit.Reader(db, decode_to="torch") as r:
        return {r.key_of(i): r[i] for i in range(len(r))}


@pytest.mark.parametrize("opts", [
    dict(),
    dict(segment_seconds=0.25, segment_hop_seconds=0.2, output="db", dtype="float16"),
    dict(dtype="complex32", mono="keep"),
    dict(output="mfcc", n_mels=32, n_mfcc=13),
])
def test_features_computed_in_the_workers_equal_the_main_process(corpus, tmp_path, monkeypatch, opts):
    """On the CPU the decode workers compute the features (pipeline.Features); the budgets send the longest files
    and a batch's overflow to the main process, so one run mixes both ways. Every item equals num_workers=0's."""
    kw = dict(FAST, device="cpu", batch_size=6, **opts)
    if opts.get("mono") == "keep":  # items of two channels too: [2, freqs, frames]
        shutil.copytree(corpus, tmp_path / "stereo")
        corpus = tmp_path / "stereo"
        rng = np.random.default_rng(0)
        for n in range(4):
            sf.write(corpus / "tone_low" / f"stereo{n}.wav", rng.uniform(-0.5, 0.5, (8000 + 3000 * n, 2)), 16000)
    acfg = AudioConfig(**{k: v for k, v in opts.items() if k in AudioConfig.__dataclass_fields__})
    cfg = StftConfig(n_fft=256, hop_length=128,
                     **{k: v for k, v in opts.items() if k in StftConfig.__dataclass_fields__})
    files = pipeline.Files(corpus, audio.discover(corpus), acfg)
    sizes = sorted(sum(pipeline.feature_bytes(s.shape, cfg) for s in rec["segments"])
                   for rec in map(files.__getitem__, range(len(files))) if "error" not in rec)
    monkeypatch.setattr(pipeline, "FILE_BUDGET", sizes[len(sizes) * 3 // 4])  # the longest quarter: the main process
    monkeypatch.setattr(pipeline, "BATCH_BUDGET", 3 * sizes[len(sizes) // 2])  # and what outgrows ~3 files a batch
    want = precompute(corpus, output_dir=tmp_path / "main", **kw)
    got = precompute(corpus, output_dir=tmp_path / "workers", **dict(kw, num_workers=2))
    assert want["time_split"]["worker_stft_seconds"] == 0 and got["time_split"]["worker_stft_seconds"] > 0
    assert got["time_split"]["stft_seconds"] > 0  # (what the budgets left to the main process)
    a, b = {}, {}
    for split in want["splits"]:
        a |= _items(tmp_path / "main" / f"{split}.lmdb")
        b |= _items(tmp_path / "workers" / f"{split}.lmdb")
    assert a.keys() == b.keys() and len(a) >= 29
    assert {v["stft"].dim() for v in a.values()} == ({2, 3} if opts.get("mono") == "keep" else {2})
    for key, item in a.items():
        assert item.keys() == b[key].keys()
        for f, v in item.items():
            assert torch.equal(v, b[key][f]) if isinstance(v, torch.Tensor) else v == b[key][f], (key, f)


def test_a_worker_that_cannot_compute_leaves_the_error_to_the_main_process(tmp_path):
    src = tmp_path / "audio"
    (src / "loud").mkdir(parents=True)
    sf.write(src / "loud" / "boom.wav", np.full(8000, 400.0, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(ValueRangeError, match=r"beyond float16's range.*in the batch of loud/boom.wav"):
        precompute(src, output_dir=tmp_path / "o", output="power", dtype="float16", splits={"train": 1.0},
                   **dict(FAST, num_workers=1, device="cpu"))


def test_a_run_killed_inside_a_file_resumes_it_from_the_workers_features(corpus, tmp_path, monkeypatch):
    """A file committed in parts, the run dying in the middle of one: the rerun's workers compute the whole file
    again and the main process writes only the segments that were missing (resume's skip)."""
    import functools
    import lmdbkit.precompute as pc
    kw = dict(FAST, device="cpu", segment_seconds=0.1, segment_hop_seconds=0.05, limit=10, splits={"train": 1.0},
              durable=False)  # (commits of 3 items: their fsyncs would only slow the test)
    want = _items_of(precompute(corpus, output_dir=tmp_path / "ref", **kw))
    item = next(iter(want.values()))["stft"]
    monkeypatch.setattr(pc, "Writer", functools.partial(lmdbkit.Writer, commit_bytes=3 * item.numel() * 8))
    real, drawn = pc._file_samples, [0]

    def dying(*a, **k):
        for x in real(*a, **k):
            drawn[0] += 1
            if drawn[0] == len(want) // 2:
                raise RuntimeError("killed")
            yield x
    monkeypatch.setattr(pc, "_file_samples", dying)
    with pytest.raises(RuntimeError, match="killed"):
        precompute(corpus, output_dir=tmp_path / "out", **dict(kw, num_workers=1))
    with lmdbkit.Writer(tmp_path / "out" / "train.lmdb", mode="append") as w:
        partial = [p for p, rec in w.sources().items() if rec.get("partial")]
    assert len(partial) == 1  # (the file it died in, committed in part)
    monkeypatch.setattr(pc, "_file_samples", real)
    s = precompute(corpus, output_dir=tmp_path / "out", **dict(kw, num_workers=1))
    assert s["time_split"]["worker_stft_seconds"] > 0
    got = _items_of(s)
    assert got.keys() == want.keys()
    for key, item in want.items():
        for f, v in item.items():
            assert torch.equal(v, got[key][f]) if isinstance(v, torch.Tensor) else v == got[key][f], (key, f)


def _items_of(summary):
    out = {}
    for d in summary["splits"].values():
        out |= _items(d["database"])
    return out


def test_a_database_keeps_the_first_skipped_files_and_their_count(corpus, tmp_path, monkeypatch):
    """Each database's copy of the summary lists at most SKIPPED_STORED skipped files (its format record is
    rewritten at every commit and parsed at every open); the returned summary and summary.json list them all,
    the printed table the first SHOWN."""
    import lmdbkit.precompute as pc
    src = tmp_path / "audio"
    shutil.copytree(corpus / "tone_low", src / "tone_low")
    for n in range(12):
        (src / "tone_low" / f"broken{n:02d}.wav").write_bytes(b"")
    monkeypatch.setattr(pc, "SKIPPED_STORED", 5)
    s = precompute(src, output_dir=tmp_path / "o", splits={"train": 1.0}, **FAST)
    assert len(s["skipped"]) == 13 and "skipped_count" not in s  # (12 empty files and tone_low/empty.wav)
    on_disk = json.loads((tmp_path / "o" / "train.lmdb" / "metadata.json").read_text())["metadata"]["summary"]
    with lmdbkit.Reader(tmp_path / "o" / "train.lmdb") as r:
        stored = r.metadata["summary"]
    for d in (on_disk, stored):
        assert d["skipped"] == s["skipped"][:5] and d["skipped_count"] == 13 and d["summary_json"] == s["summary_json"]
        assert d["splits"] == s["splits"] and d["files_processed"] == s["files_processed"]
    saved = json.loads((tmp_path / "o" / "summary.json").read_text())  # every one, beside the databases
    assert saved["skipped"] == s["skipped"] and s["summary_json"] == str(tmp_path / "o" / "summary.json")
    monkeypatch.setattr(pc, "SHOWN", 4)
    table = format_summary(s).splitlines()
    i = table.index("skipped 13 files:")
    assert table[i + 1:i + 5] == [f"  {x['path']}: {x['reason']}" for x in s["skipped"][:4]]
    assert table[i + 5:] == [f"  ... and 9 more: every one is in {tmp_path / 'o' / 'summary.json'}"]
