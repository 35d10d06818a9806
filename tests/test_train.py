import json
import os
import subprocess
import sys

import pytest
import torch

import lmdbkit
from lmdbkit.dataset import (FixFrames, LMDBDataTransform, Normalize, ShardSampler, SpectrogramTransform,
                             ToSpectrogram, create_data_loader, create_train_val_loaders, crop_collate, pad_collate)
from lmdbkit.errors import LmdbkitError
from lmdbkit.train import check_result, split_paths, train
from lmdbkit.train import verdict as lmdbkit_verdict


def test_to_spectrogram_outputs():
    x = torch.complex(torch.tensor([[3.0, 0.0]]), torch.tensor([[4.0, 1e-9]]))
    s = {"stft": x, "label": 1}
    assert torch.allclose(ToSpectrogram("magnitude")(s)["stft"], torch.tensor([[[5.0, 1e-9]]]), atol=1e-6)
    assert torch.allclose(ToSpectrogram("power")(s)["stft"][0, 0, 0], torch.tensor(25.0))
    db = ToSpectrogram("db")(s)["stft"]
    assert db.shape == (1, 1, 2) and torch.allclose(db[0, 0], torch.tensor([10 * torch.log10(torch.tensor(25.0)), -100.0]))
    assert torch.allclose(ToSpectrogram("power", stored="db")({"stft": torch.tensor([[20.0]])})["stft"], torch.tensor(100.0))
    with pytest.raises(LmdbkitError, match=r"output='phase' is unsupported. Supported outputs are"):
        ToSpectrogram("phase")


def test_fix_frames_and_normalize():
    x = torch.arange(10.0).reshape(1, 1, 10)
    assert FixFrames(4, crop="start")({"stft": x})["stft"].tolist() == [[[0, 1, 2, 3]]]
    assert FixFrames(4, crop="center")({"stft": x})["stft"].tolist() == [[[3, 4, 5, 6]]]
    out = FixFrames(13)({"stft": x})
    assert out["stft"].shape[-1] == 13 and out["stft"][..., 10:].abs().sum() == 0 and out["length"] == 10
    torch.manual_seed(0)
    starts = {int(FixFrames(4)({"stft": x})["stft"][0, 0, 0]) for _ in range(50)}
    assert starts == set(range(7))  # random crops reach every start
    n = Normalize()({"stft": torch.randn(1, 5, 7) * 3 + 2})["stft"]
    assert abs(float(n.mean())) < 1e-5 and abs(float(n.std()) - 1) < 1e-3
    with pytest.raises(LmdbkitError, match="crop='middle' is unsupported"):
        FixFrames(4, crop="middle")


@pytest.mark.parametrize("stored,kind", [("complex", torch.complex64), ("complex", "pairs"), ("db", torch.float16),
                                         ("power", torch.float32)])
@pytest.mark.parametrize("crop", ["random", "center"])
def test_spectrogram_transform_crops_before_converting_with_the_same_result(stored, kind, crop):
    """A longer item is cropped before its conversion (per element: the same values), a shorter one padded
    after it: exactly what converting, then cropping or padding, then normalising gives."""
    for frames_stored, frames in ((40, 16), (9, 16), (16, 16), (40, 1)):  # (1: shorter than complex32's pairs)
        g = torch.Generator().manual_seed(frames_stored)
        if kind == "pairs":  # complex32 read as float16 pairs: the last axis is (real, imaginary)
            x = torch.randn(5, frames_stored, 2, generator=g).half()
        elif kind == torch.complex64:
            x = torch.complex(torch.randn(5, frames_stored, generator=g), torch.randn(5, frames_stored, generator=g))
        else:
            x = (torch.rand(5, frames_stored, generator=g) * 40).to(kind)
        sample = {"stft": x, "label": 3}
        old = [ToSpectrogram("db", stored=stored), FixFrames(frames, crop=crop), Normalize()]
        torch.manual_seed(7)
        want = sample
        for t in old:
            want = t(want)
        torch.manual_seed(7)
        got = SpectrogramTransform(frames=frames, stored=stored, crop=crop)(sample)
        assert torch.equal(got["stft"], want["stft"]) and got["length"] == want["length"] == min(frames_stored, frames)
        assert got["stft"].shape == (1, 5, frames) and got["label"] == 3
        assert torch.equal(sample["stft"], x)  # the input is not changed in place


def test_transform_base_class_and_device():
    class AddOne(LMDBDataTransform):
        def transform(self, sample):
            return dict(sample, x=sample["x"] + 1)
    t = AddOne(target_device="cpu")
    assert t({"x": torch.zeros(2)})["x"].tolist() == [1, 1] and t.target_device == torch.device("cpu")
    moved = t.to_device({"x": torch.zeros(2), "names": ["a"], "n": [torch.ones(1)]})
    assert moved["x"].device.type == "cpu" and moved["names"] == ["a"]


def test_collates_for_variable_length():
    batch = [{"stft": torch.ones(1, 3, n), "label": i, "path": f"p{i}", "extra": None} for i, n in enumerate((4, 6, 5))]
    p = pad_collate(batch)
    assert p["stft"].shape == (3, 1, 3, 6) and p["lengths"].tolist() == [4, 6, 5]
    assert p["stft"][0, ..., 4:].abs().sum() == 0 and p["label"].tolist() == [0, 1, 2]
    assert p["path"] == ["p0", "p1", "p2"] and p["extra"] == [None, None, None]
    c = crop_collate(batch)
    assert c["stft"].shape == (3, 1, 3, 4)


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (8, 4), (5, 1)])
def test_shard_sampler_is_disjoint_and_covering(n, world):
    data = list(range(n))
    for epoch in range(3):
        shards = []
        for rank in range(world):
            s = ShardSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=1)
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(shards[-1]) == len(s)
        flat = [i for sh in shards for i in sh]
        assert sorted(flat) == data


def test_loaders_are_seeded_and_reproducible(demo_data):
    tf = SpectrogramTransform.for_database(demo_data / "train.lmdb", train=True, frames=16)
    first = []
    for _ in range(2):
        loader = create_data_loader(demo_data / "train.lmdb", tf, 8, shuffle=True, num_workers=2, seed=5)
        b = next(iter(loader))
        first.append((b["label"].tolist(), b["path"], b["stft"]))
        assert loader.persistent_workers and not loader.pin_memory
    assert first[0][0] == first[1][0] and first[0][1] == first[1][1] and torch.equal(first[0][2], first[1][2])
    other = next(iter(create_data_loader(demo_data / "train.lmdb", tf, 8, shuffle=True, num_workers=2, seed=6)))
    assert other["path"] != first[0][1]
    tr, va = create_train_val_loaders(demo_data / "train.lmdb", demo_data / "val.lmdb", batch_size=4, num_workers=0,
                                      transform=tf)
    assert tr.drop_last and not va.drop_last and len(va.dataset) == len(lmdbkit.Reader(demo_data / "val.lmdb"))


def test_train_learns_and_is_reproducible(demo_data):
    kw = dict(steps=60, batch_size=16, num_workers=0, frames=32, progress=False, seed=3)
    a = train(demo_data / "train.lmdb", demo_data / "val.lmdb", **kw)
    b = train(demo_data / "train.lmdb", demo_data / "val.lmdb", **kw)
    assert a["steps"] == 60 and a["final_loss"] < 0.7 * a["first_loss"]
    assert a["val_accuracy"] > a["chance"] + 0.1, a
    assert a["losses"] == b["losses"] and a["model_checksum"] == b["model_checksum"]
    # validation measured along the way (ten times), without changing what is trained
    assert [p["step"] for p in a["val_curve"]] == list(range(6, 61, 6)) and a["val_curve"] == b["val_curve"]
    assert a["val_curve"][-1]["accuracy"] == a["val_accuracy"] and a["val_curve"][-1]["loss"] == a["val_loss"]
    assert a["val_curve"][-1]["loss"] < a["val_curve"][0]["loss"]
    quiet = train(demo_data / "train.lmdb", demo_data / "val.lmdb", **dict(kw, eval_every=0))
    assert quiet["losses"] == a["losses"] and len(quiet["val_curve"]) == 1
    assert "validation accuracy" in check_result(a, min_accuracy_margin=0.1, min_val_items=1)
    v = lmdbkit_verdict(a, min_accuracy_margin=0.1, min_val_items=1)
    assert str(v).startswith("train smoke test: PASSED\n- trained: 60 steps") and not v.failed
    assert lmdbkit_verdict(dict(a, val_accuracy=a["chance"]), min_accuracy_margin=0.1, min_val_items=1).failed
    with pytest.raises(LmdbkitError, match=r"validation accuracy .* against chance"):
        check_result(dict(a, val_accuracy=a["chance"]), min_accuracy_margin=0.1, min_val_items=1)


def test_small_validation_split_is_judged_on_the_training_loss():
    """A 100-file folder gave 7 validation items: 0.714 against chance 0.571 is noise, the loss fell 1.42 -> 0.53."""
    small = {"first_loss": 1.42, "final_loss": 0.53, "val_items": 7, "val_accuracy": 5 / 7, "chance": 4 / 7,
             "train_label_entropy": 1.33}
    verdict = check_result(small)
    assert "only 7 items (fewer than 50)" in verdict and "rests on the training loss" in verdict
    assert "95% interval 0.36-0.92" in verdict and "0.530 against 1.330" in verdict
    with pytest.raises(LmdbkitError, match=r"final training loss 1.200 against 1.330 .* needs < 0.7"):
        check_result(dict(small, final_loss=1.2, first_loss=2.0))  # fell, but no lower than ignoring the input
    with pytest.raises(LmdbkitError, match=r"validation accuracy 0.700 on 60 items against chance 0.571"):
        check_result(dict(small, val_items=60, val_accuracy=0.7))  # enough items: accuracy decides
    sure = check_result(dict(small, val_accuracy=1.0, train_label_entropy=None))  # 7 of 7: not luck
    assert "on only 7 items, but its 95% interval 0.65-1.00 lies above chance 0.571" in sure


def test_train_with_workers_and_time_bound(demo_data):
    r = train(split_paths(demo_data, "train"), split_paths(demo_data, "val"), steps=10_000, max_seconds=3,
              batch_size=16, num_workers=2, frames=32, progress=False)
    assert 0 < r["steps"] < 10_000 and 0 <= r["data_wait_share"] < 1 and r["samples_per_second"] > 0
    with pytest.raises(LmdbkitError, match="no 'holdout' database"):
        split_paths(demo_data, "holdout")


@pytest.mark.slow
def test_ddp_torchrun_two_ranks(demo_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "lmdbkit.train", "--train-db", str(demo_data / "train.lmdb"),
                           "--val-db", str(demo_data / "val.lmdb"), "--steps", "12", "--batch-size", "8",
                           "--num-workers", "1", "--frames", "16", "--record-indices", "--no-progress",
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"train_rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["steps"] == r1["steps"] == 12
    n = len(lmdbkit.Reader(demo_data / "train.lmdb"))
    assert len(r0["epoch_indices"]) == len(r1["epoch_indices"]) >= 2
    for e0, e1 in zip(r0["epoch_indices"], r1["epoch_indices"]):
        assert not set(e0) & set(e1) and sorted(e0 + e1) == list(range(n))
    assert r0["epoch_indices"][0] != r0["epoch_indices"][1]  # reshuffled per epoch
    assert r0["model_checksum"] == r1["model_checksum"]  # the same model on both ranks
    assert r0["val_items"] == len(lmdbkit.Reader(demo_data / "val.lmdb"))  # evaluation covers val once


@pytest.mark.slow
def test_smoke_test_on_a_hundred_file_corpus_passes_on_sound_grounds(tmp_path):
    from lmdbkit import demo
    from lmdbkit.precompute import precompute
    corpus = demo.make_corpus(tmp_path / "corpus", n_per_class=12)  # 96 files: a handful of validation items
    precompute(corpus, output_dir=tmp_path / "data", num_workers=0, progress=False, n_fft=256, hop_length=128)
    r = train(split_paths(tmp_path / "data", "train"), split_paths(tmp_path / "data", "val"), steps=150,
              batch_size=16, num_workers=0, frames=32, progress=False)
    assert 0 < r["val_items"] < 50
    verdict = check_result(r)  # on the accuracy's interval if it clears chance, else on the training loss
    assert f"only {r['val_items']} items" in verdict
