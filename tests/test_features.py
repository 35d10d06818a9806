"""Mel, log-mel and MFCC features beside the STFT, and half-size storage: parity with librosa on real speech,
round trips of every kind and dtype, range errors, resume refusing a changed mel config, drawing each kind."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import lmdbkit
from lmdbkit import codec, demo, mel, plot
from lmdbkit import layout as lklayout
from lmdbkit.errors import ConfigMismatchError, LmdbkitError, ValueRangeError
from lmdbkit.precompute import precompute
from lmdbkit.dataset import ToSpectrogram
from lmdbkit.stft import StftConfig, compute, inverse

librosa = pytest.importorskip("librosa")

SPEECH = Path(__file__).parent / "data" / "speech_en_us.flac"  # espeak-ng, en-us, 7.2 s, 16 kHz
FAST = dict(num_workers=0, progress=False, n_fft=256, hop_length=128)


@pytest.fixture(scope="module")
def speech():
    y, sr = sf.read(SPEECH, dtype="float32")
    assert sr == 16000 and len(y) > 5 * sr
    return y


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return demo.make_corpus(tmp_path_factory.mktemp("corpus"), n_per_class=3, bad_files=False)


@pytest.mark.parametrize("scale,norm", [("slaney", "slaney"), ("slaney", None), ("htk", None), ("htk", "slaney")])
@pytest.mark.parametrize("sr,n_fft,n_mels,f_min,f_max", [(16000, 512, 80, 0.0, 8000.0), (22050, 2048, 128, 20.0, 9000.0),
                                                         (16000, 400, 40, 50.0, 7600.0), (8000, 256, 23, 0.0, 4000.0)])
def test_filterbank_matches_librosa(scale, norm, sr, n_fft, n_mels, f_min, f_max):
    ours = mel.filterbank(sr, n_fft, n_mels, f_min, f_max, scale, norm)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=scale == "htk",
                              norm=norm, dtype=np.float64)
    assert ours.shape == ref.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    hz = np.array([0.0, 440.0, 999.0, 1000.0, 4000.0])
    np.testing.assert_allclose(mel.hz_to_mel(hz, scale), librosa.hz_to_mel(hz, htk=scale == "htk"), rtol=1e-9)


@pytest.mark.parametrize("scale,norm", [("slaney", "slaney"), ("htk", None)])
def test_log_mel_and_mfcc_of_real_speech_match_librosa(speech, scale, norm):
    kw = dict(n_fft=512, hop_length=128, n_mels=80, f_min=20.0, f_max=7600.0, mel_scale=scale, mel_norm=norm)
    S = librosa.feature.melspectrogram(y=speech.astype(np.float64), sr=16000, n_fft=512, hop_length=128,
                                       window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=80,
                                       fmin=20.0, fmax=7600.0, htk=scale == "htk", norm=norm)
    log_mel = compute(torch.from_numpy(speech), StftConfig(output="log_mel", **kw)).numpy()
    ref = librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=None)
    assert log_mel.shape == ref.shape == (80, 1 + len(speech) // 128)
    assert np.abs(log_mel - ref).max() < 0.01  # dB: float32 against librosa's float64
    mel_power = compute(torch.from_numpy(speech), StftConfig(output="mel", **kw)).numpy()
    np.testing.assert_allclose(mel_power, S, rtol=1e-3, atol=1e-6 * S.max())
    clipped = compute(torch.from_numpy(speech), StftConfig(output="log_mel", top_db=60.0, **kw)).numpy()
    assert np.abs(clipped - librosa.power_to_db(S, top_db=60.0)).max() < 0.01
    mfcc = compute(torch.from_numpy(speech), StftConfig(output="mfcc", n_mfcc=20, **kw)).numpy()
    ref = librosa.feature.mfcc(S=librosa.power_to_db(S, top_db=80.0), n_mfcc=20)  # both clip at 80 dB
    assert mfcc.shape == (20, log_mel.shape[1]) and np.abs(mfcc - ref).max() < 2e-3


def test_top_db_clips_each_item_of_a_batch_on_its_own():
    x = torch.randn(2, 4000)
    x[1] *= 1e-3  # 60 dB quieter: its floor follows its own max, as torchaudio's AmplitudeToDB per item
    y = compute(x, StftConfig(output="log_mel", n_fft=256, n_mels=32, top_db=40.0))
    for b in range(2):
        assert y[b].min() >= y[b].max() - 40.0 - 1e-4
        assert torch.allclose(y[b], compute(x[b], StftConfig(output="log_mel", n_fft=256, n_mels=32, top_db=40.0)),
                              atol=1e-4)


def test_config_checks_and_the_dict_older_databases_stored():
    legacy = {"sample_rate": 16000, "n_fft": 512, "hop_length": 128, "win_length": None, "window": "hann",
              "center": True, "output": "complex", "dtype": "complex64", "db_floor": 1e-10}
    assert StftConfig().to_dict() == legacy  # an STFT run started before mel features still resumes
    assert StftConfig.from_dict(legacy) == StftConfig()
    assert StftConfig(output="db").dtype == "float32" and StftConfig(output="mfcc").top_db == 80.0
    m = StftConfig(output="log_mel", dtype="float16", n_mels=64, top_db=80.0)
    assert m.to_dict()["f_max"] == 8000.0 and "n_mfcc" not in m.to_dict()
    assert StftConfig.from_dict(m.to_dict()) == m and m.n_bins == 64 and len(m.frequencies()) == 64
    for kw, match in [(dict(output="mel", f_min=9000.0), r"f_min=9000.0, f_max=8000.0: give 0 <= f_min < f_max"),
                      (dict(output="mel", n_fft=128, n_mels=128), r"mel band\(s\) \[0, 1, .*lower n_mels or raise n_fft"),
                      (dict(output="mel", mel_scale="bark"), "mel_scale='bark': unsupported"),
                      (dict(output="mel", mel_norm="l2"), "mel_norm='l2': unsupported"),
                      (dict(output="mfcc", n_mels=20, n_mfcc=40), r"n_mfcc=40: give an integer in 1..n_mels \(20\)"),
                      (dict(output="log_mel", top_db=-3.0), "top_db=-3.0: give a positive number"),
                      (dict(output="mel", dtype="complex32"), "output='mel' is stored as one of"),
                      (dict(output="complex", dtype="float16"), "output='complex' is stored as one of")]:
        with pytest.raises(LmdbkitError, match=match):
            StftConfig(**kw)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 129, 9)])
def test_complex32_round_trips(shape):
    x = torch.randn(shape, dtype=torch.complex64)
    half = x.to(torch.complex32)
    buf = codec.encode({"s": half, "nested": {"n": half}, "t": half.transpose(0, -1) if len(shape) > 1 else half})
    assert len(buf) - len(codec.encode({"s": torch.zeros(0)})) < 3 * 4 * max(1, x.numel()) + 200  # 4 bytes a value
    _, d = codec.decode(buf)
    want = half.to(torch.complex64)
    for got in (d["s"], d["nested"]["n"]):
        assert got.dtype == torch.complex64 and got.shape == shape and torch.equal(got, want)
    assert torch.equal(d["t"], want.transpose(0, -1) if len(shape) > 1 else want)
    _, d = codec.decode(buf, complex32="pairs")
    assert d["s"].dtype == torch.float16 and torch.equal(d["s"], torch.view_as_real(half))
    _, d = codec.decode(buf, decode_to="numpy")
    assert d["s"].dtype == np.complex64 and np.array_equal(d["s"], want.numpy())
    layout = lklayout.batch_layout([buf, buf])  # a batch: widened straight into its row of a batch array
    dests = {d[0]: np.empty((2, *d[6]), np.complex64) for d in layout.arrays}
    metas = lklayout.decode_layout([buf, buf], layout, dests, verify=True)
    assert np.array_equal(dests["s"][1], want.numpy()) and np.array_equal(metas[1]["nested"]["n"], want.numpy())
    with pytest.raises(LmdbkitError, match="complex32='half' is unsupported"):
        codec.decode(buf, complex32="half")


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_complex32_database_reads_as_complex64_or_pairs(tmp_path, context):
    items = [torch.randn(33, 10, dtype=torch.complex64).to(torch.complex32) for _ in range(12)]
    with lmdbkit.Writer(tmp_path / "h.lmdb") as w:
        for i, s in enumerate(items):
            w.append({"stft": s, "label": i % 3})
    with lmdbkit.Reader(tmp_path / "h.lmdb") as r:
        assert r[3]["stft"].dtype == torch.complex64 and torch.equal(r[3]["stft"], items[3].to(torch.complex64))
    with lmdbkit.Reader(tmp_path / "h.lmdb", complex32="pairs") as r:
        assert torch.equal(r.read_many([5])[0]["stft"], torch.view_as_real(items[5]))
    for complex32, prebatch in [("complex64", True), ("pairs", True), ("complex64", False)]:
        loader = lmdbkit.create_data_loader(tmp_path / "h.lmdb", batch_size=4, num_workers=2, prebatch=prebatch,
                                            complex32=complex32, multiprocessing_context=context)
        got = torch.cat([b["stft"] for b in loader])
        want = torch.stack([s.to(torch.complex64) for s in items])
        assert torch.equal(got, want if complex32 == "complex64" else torch.view_as_real(want).half())


def test_values_beyond_half_range_are_refused_never_inf(corpus, tmp_path):
    loud = torch.ones(1, 4000) * 300.0  # e.g. int16-scaled samples given as floats
    with pytest.raises(ValueRangeError, match=r"output='power' reaches .* beyond float16's range \(\+-65504\)"):
        compute(loud, StftConfig(output="power", dtype="float16", n_fft=256))
    with pytest.raises(ValueRangeError, match="beyond complex32's range.*dtype='complex64'"):
        compute(loud * 2, StftConfig(dtype="complex32", n_fft=256))  # DC: 600 x the window's sum 128
    assert torch.isfinite(compute(loud, StftConfig(output="log_mel", dtype="float16", n_fft=256, n_mels=32))).all()
    src = tmp_path / "audio"
    (src / "loud").mkdir(parents=True)
    sf.write(src / "loud" / "boom.wav", np.full(8000, 400.0, np.float32), 16000, subtype="FLOAT")  # float WAV: unclipped
    with pytest.raises(ValueRangeError, match=r"beyond float16's range.*in the batch of loud/boom.wav"):
        precompute(src, output_dir=tmp_path / "o", output="power", dtype="float16", splits={"train": 1.0}, **FAST)


def test_precompute_log_mel_float16_and_resume_refuses_another_mel_config(corpus, tmp_path):
    out = tmp_path / "o"
    kw = dict(FAST, output="log_mel", dtype="float16", n_mels=32, top_db=80.0)
    s = precompute(corpus, output_dir=out, **kw)
    with lmdbkit.Reader(out / "train.lmdb") as r:
        item = r[0]
        cfg = plot.stft_config(r)
        assert item["stft"].dtype == torch.float16 and item["stft"].shape[0] == 32
        assert cfg.output == "log_mel" and cfg.n_mels == 32 and cfg.mel_scale == "slaney"
        y, _ = sf.read(corpus / item["path"], dtype="float32", always_2d=True)
    assert s["splits"]["train"]["items"] > 0
    with pytest.raises(ConfigMismatchError, match=r"(?s)stft.n_mels\s+32\s+40"):
        precompute(corpus, output_dir=out, **dict(kw, n_mels=40))
    again = precompute(corpus, output_dir=out, **kw)  # the same config resumes: nothing to add
    assert again["files_processed"] == 0
    tf = lmdbkit.SpectrogramTransform.for_database(out / "train.lmdb", train=False, frames=8)
    x = tf(item)["stft"]
    assert x.shape == (1, 32, 8) and x.dtype == torch.float32 and abs(float(x.mean())) < 1e-4


def test_complex32_items_keep_the_audio(speech, tmp_path):
    """Half-size complex STFTs: the spectrogram's error and the inverse STFT's, against complex64."""
    cfg64 = StftConfig(n_fft=512, hop_length=128)
    full = compute(torch.from_numpy(speech), cfg64)
    half = compute(torch.from_numpy(speech), StftConfig(n_fft=512, hop_length=128, dtype="complex32"))
    back = codec.decode(codec.encode({"s": half}))[1]["s"]

    def snr(ref, x):
        return float(10 * torch.log10(ref.abs().square().sum() / (ref - x).abs().square().sum()))
    assert snr(full, back) > 55  # float16 keeps 11 bits of mantissa: ~60 dB
    audio = inverse(back, cfg64, length=len(speech))
    assert snr(torch.from_numpy(speech), audio) > 50
    pairs = codec.decode(codec.encode({"s": half}), complex32="pairs")[1]["s"]  # the stored float16 pairs
    assert torch.equal(inverse(pairs, cfg64, length=len(speech)), audio)


@pytest.mark.parametrize("output,dtype,ylabel", [("complex", "complex32", "frequency (Hz)"),
                                                 ("log_mel", "float16", "mel band (slaney scale)"),
                                                 ("mel", "bfloat16", "mel band (slaney scale)"),
                                                 ("mfcc", "float32", "MFCC")])
def test_each_kind_is_drawn_and_browsed(corpus, tmp_path, output, dtype, ylabel):
    from lmdbkit.widgets import Browser
    out = tmp_path / "o"
    precompute(corpus, output_dir=out, **dict(FAST, output=output, dtype=dtype, n_mels=24, n_mfcc=13))
    b = Browser(out, audio=True)
    try:
        ax = b.figure.axes[0]
        img = np.asarray(ax.get_images()[0].get_array())
        assert ax.get_ylabel() == ylabel and np.isfinite(img).all() and img.shape[0] == b.cfg.n_bins
        if output == "complex":
            assert b.player.value[:4] == b"RIFF"  # complex32 still plays its inverse STFT
        else:
            assert b.player.layout.display == "none" and not b.player.value  # no phase: nothing to listen to
        if output in ("log_mel", "mel"):
            assert ax.get_yticklabels()[-1].get_text().endswith(" Hz")  # mel bands are labelled by frequency
        b.slider.value = 1
        assert b.current == 1
    finally:
        b.close()


def test_train_transform_takes_every_stored_kind():
    x = torch.randn(1, 8000) * 0.1
    ref_db = compute(x, StftConfig(output="db", n_fft=256))[0]
    for stored, cfg in [("complex", StftConfig(n_fft=256, dtype="complex32")), ("power", StftConfig(output="power", n_fft=256)),
                        ("magnitude", StftConfig(output="magnitude", n_fft=256, dtype="float16"))]:
        item = compute(x, cfg)[0]
        y = ToSpectrogram("db", stored=stored)({"stft": item})["stft"]
        assert y.shape == (1, 129, ref_db.shape[-1]) and y.dtype == torch.float32
        assert (y[0] - ref_db).abs().max() < 0.05  # dB, float16/complex32 rounding included
    pairs = torch.view_as_real(compute(x, StftConfig(n_fft=256, dtype="complex32"))[0])  # complex32="pairs"
    assert (ToSpectrogram("db")({"stft": pairs})["stft"][0] - ref_db).abs().max() < 0.05
    mel_cfg = dict(n_fft=256, n_mels=32)
    log_mel = compute(x, StftConfig(output="log_mel", dtype="float16", **mel_cfg))[0]
    power = compute(x, StftConfig(output="mel", **mel_cfg))[0]
    for stored, item in [("log_mel", log_mel), ("mel", power)]:
        y = ToSpectrogram("db", stored=stored)({"stft": item})["stft"]
        assert y.shape == (1, 32, log_mel.shape[-1]) and (y[0] - log_mel.float()).abs().max() < 0.05
    assert torch.allclose(ToSpectrogram("power", stored="log_mel")({"stft": log_mel})["stft"][0], power,
                          rtol=0.01, atol=1e-6)
    mfcc = compute(x, StftConfig(output="mfcc", n_mfcc=13, **mel_cfg))[0]
    assert torch.equal(ToSpectrogram("db", stored="mfcc")({"stft": mfcc})["stft"][0], mfcc)
    with pytest.raises(LmdbkitError, match="stored='cqt'"):
        ToSpectrogram("db", stored="cqt")({"stft": power})
