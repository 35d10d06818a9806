import numpy as np
import pytest
import soundfile as sf
import torch

from lmdbkit import audio
from lmdbkit.errors import AudioDecodeError, LmdbkitError
from lmdbkit.stft import StftConfig, compute, inverse, to_db

SR = 16000


def _tone(freq=440.0, sr=SR, seconds=0.5, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)


def _peak_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()]


@pytest.mark.parametrize("ext,subtype,tol", [
    ("wav", "PCM_U8", 1e-2), ("wav", "PCM_16", 1e-4), ("wav", "PCM_24", 1e-6), ("wav", "PCM_32", 1e-6),
    ("wav", "FLOAT", 0), ("flac", "PCM_16", 1e-4), ("flac", "PCM_24", 1e-6), ("ogg", "VORBIS", None),
    ("mp3", "MPEG_LAYER_III", None),
])
def test_decode_formats(tmp_path, ext, subtype, tol):
    x = _tone()
    p = tmp_path / f"a.{ext}"
    sf.write(p, x, SR, subtype=subtype)
    y, sr = audio.decode(p)
    assert sr == SR and y.dtype == np.float32 and y.shape[0] == 1
    if tol is None:  # lossy: same pitch, about the same length
        assert abs(y.shape[1] - x.shape[0]) < 0.1 * SR
        assert abs(_peak_hz(y[0], sr) - 440) < 5
    else:
        assert y.shape == (1, x.shape[0]) and np.abs(y[0] - x[:, 0]).max() <= tol + 1e-7


def test_mono_policies_and_resampling(tmp_path):
    p = tmp_path / "st.wav"
    sf.write(p, _tone(1000, sr=44100, channels=2), 44100, subtype="FLOAT")
    x, sr = audio.decode(p)
    assert x.shape[0] == 2 and sr == 44100
    assert np.allclose(audio.mix(x, "mean")[0], x.mean(0)) and np.allclose(audio.mix(x, "first")[0], x[0])
    assert audio.mix(x, "keep").shape[0] == 2
    with pytest.raises(LmdbkitError, match=r"mono='left' is unsupported. Supported policies are \['mean', 'first', 'keep'\]"):
        audio.mix(x, "left")
    y = audio.resample(audio.mix(x, "mean"), 44100, SR)
    assert y.shape == (1, round(x.shape[1] * SR / 44100)) and y.dtype == np.float32
    assert abs(_peak_hz(y[0], SR) - 1000) < 3


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("not audio at all " * 20), "not decodable audio"),
    (lambda p: sf.write(p, np.zeros((0, 1), np.float32), SR), "zero-length audio"),
    (lambda p: p.write_bytes(_wav_bytes()[:2000]), "truncated file"),
    (lambda p: p.symlink_to(p.parent / "missing.wav"), "cannot read the file"),
])
def test_bad_files_give_reasons(tmp_path, make, reason):
    p = tmp_path / "bad.wav"
    make(p)
    with pytest.raises(AudioDecodeError, match=reason):
        audio.decode(p)


def _wav_bytes():
    import io
    b = io.BytesIO()
    sf.write(b, _tone(), SR, format="WAV", subtype="PCM_16")
    return b.getvalue()


@pytest.mark.parametrize("n,seg,hop,pad,expected", [
    (16000, None, None, False, [(0, 16000)]),
    (16000, 0.25, None, False, [(0, 4000), (4000, 4000), (8000, 4000), (12000, 4000)]),
    (17000, 0.25, None, False, [(0, 4000), (4000, 4000), (8000, 4000), (12000, 4000)]),
    (17000, 0.25, None, True, [(0, 4000), (4000, 4000), (8000, 4000), (12000, 4000), (16000, 4000)]),
    (10000, 0.25, 0.125, False, [(0, 4000), (2000, 4000), (4000, 4000), (6000, 4000)]),
    (3000, 0.25, None, False, []),
    (3000, 0.25, None, True, [(0, 4000)]),
])
def test_segments(n, seg, hop, pad, expected):
    assert audio.segments(n, SR, seg, hop, pad) == expected


def test_discover_labels_from_class_folders_and_manifest(tmp_path):
    for rel in ("dog/a.wav", "dog/sub/b.flac", "cat/c.ogg", "top.wav", "cat/.hidden.wav", "cat/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = audio.discover(tmp_path)  # a file directly in audio_dir takes the folder's name (and is logged)
    assert [(s.path, s.label_name) for s in found] == [
        ("cat/c.ogg", "cat"), ("dog/a.wav", "dog"), ("dog/sub/b.flac", "dog"), ("top.wav", tmp_path.name)]
    (tmp_path / "m.csv").write_text("path,label,split\ndog/a.wav,barks,test\ncat/c.ogg,meows,\n")
    m = audio.discover(tmp_path, manifest=tmp_path / "m.csv")
    assert [(s.path, s.label_name, s.split) for s in m] == [("cat/c.ogg", "meows", None), ("dog/a.wav", "barks", "test")]
    (tmp_path / "bad.csv").write_text("file,class\n")
    with pytest.raises(LmdbkitError, match=r"needs path,label"):
        audio.discover(tmp_path, manifest=tmp_path / "bad.csv")
    with pytest.raises(LmdbkitError, match="is not a folder"):
        audio.discover(tmp_path / "nope")


def test_label_depth_picks_the_folder_level_of_nested_corpora(tmp_path, caplog):
    for rel in ("speech/en/a.wav", "speech/en/b.wav", "speech/de/c.wav", "music/d.wav", "e.wav"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    labels = {d: {s.path: s.label_name for s in audio.discover(tmp_path, label_depth=d)} for d in (0, 1, -1)}
    assert labels[0] == {"e.wav": tmp_path.name, "music/d.wav": "music", "speech/de/c.wav": "speech",
                         "speech/en/a.wav": "speech", "speech/en/b.wav": "speech"}
    assert labels[1] == labels[-1] == {"e.wav": tmp_path.name, "music/d.wav": "music", "speech/de/c.wav": "de",
                                       "speech/en/a.wav": "en", "speech/en/b.wav": "en"}
    assert "1 audio files lie directly in" in caplog.text and "1 audio files are not 2 folders deep" in caplog.text
    with pytest.raises(LmdbkitError, match=r"label_depth=-2: give 0"):
        audio.discover(tmp_path, label_depth=-2)


def test_label_map_is_stable():
    first = audio.label_map(["dog", "cat", "dog"])
    assert first == {"cat": 0, "dog": 1}
    assert audio.label_map(["ant", "cat", "dog", "zebra"], first) == {"cat": 0, "dog": 1, "ant": 2, "zebra": 3}


def test_splits_are_stable_when_files_are_added():
    splits = {"train": 0.8, "val": 0.1, "test": 0.1}
    paths = [f"class{i % 7}/file_{i}.wav" for i in range(3000)]
    before = {p: audio.assign_split(p, splits, seed=3) for p in paths[:2000]}
    after = {p: audio.assign_split(p, splits, seed=3) for p in paths}
    assert all(after[p] == s for p, s in before.items())  # adding files moves no existing file
    counts = {s: list(after.values()).count(s) for s in splits}
    assert 0.75 < counts["train"] / 3000 < 0.85 and 0.07 < counts["val"] / 3000 < 0.13
    other = {p: audio.assign_split(p, splits, seed=4) for p in paths}
    assert other != after  # the seed matters
    shards = [audio.shard_of(p, 3) for p in paths]
    assert set(shards) == {0, 1, 2} and shards == [audio.shard_of(p, 3) for p in paths]


def test_stft_config_roundtrip_and_validation():
    cfg = StftConfig(n_fft=256, hop_length=64, output="db", dtype="float16")
    assert StftConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LmdbkitError, match=r"output='phase': unsupported. Supported outputs are"):
        StftConfig(output="phase")
    with pytest.raises(LmdbkitError, match=r"window='kaiser': unsupported. Supported windows are"):
        StftConfig(window="kaiser")
    with pytest.raises(LmdbkitError, match=r"dtype='float32': output='complex' is stored as one of"):
        StftConfig(dtype="float32")
    with pytest.raises(LmdbkitError, match="win_length=1024"):
        StftConfig(n_fft=512, win_length=1024)
    with pytest.raises(LmdbkitError, match="unknown StftConfig fields"):
        StftConfig.from_dict({"nfft": 3})


@pytest.mark.parametrize("output,dtype", [("complex", "complex64"), ("magnitude", "float32"), ("power", "float32"),
                                          ("db", "float16")])
def test_batched_stft_matches_single_and_shapes(output, dtype):
    cfg = StftConfig(n_fft=256, hop_length=64, output=output, dtype=dtype)
    x = torch.randn(3, 1, 4000)
    batch = compute(x, cfg)
    assert batch.shape == (3, 1, 129, cfg.num_frames(4000)) and str(batch.dtype) == f"torch.{dtype}"
    single = compute(x[1], cfg)
    assert torch.allclose(batch[1].to(torch.complex64 if output == "complex" else torch.float32),
                          single.to(torch.complex64 if output == "complex" else torch.float32), atol=1e-3)
    ref = torch.stft(x[0, 0], 256, 64, window=torch.hann_window(256), return_complex=True)
    expected = {"complex": ref, "magnitude": ref.abs(), "power": ref.abs() ** 2,
                "db": 10 * torch.log10((ref.abs() ** 2).clamp_min(1e-10))}[output]
    assert torch.allclose(batch[0, 0].to(expected.dtype), expected, atol=0.05 if dtype == "float16" else 1e-4, rtol=1e-3)
    assert np.allclose(to_db(batch[0, 0], cfg), to_db(ref, StftConfig(n_fft=256, hop_length=64)), atol=0.1)


def test_inverse_reconstructs_audio():
    cfg = StftConfig(n_fft=512, hop_length=128)
    x = torch.from_numpy(_tone(seconds=0.3)[:, 0])
    y = inverse(compute(x, cfg), cfg, length=len(x))
    assert torch.allclose(x, y, atol=1e-4)
    with pytest.raises(LmdbkitError, match="needs a complex STFT"):
        inverse(torch.zeros(257, 10), StftConfig(output="magnitude", dtype="float32"))
