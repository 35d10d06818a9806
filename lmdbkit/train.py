"""A small CNN trained on the train split's spectrograms for a bounded number of steps (or seconds): the
smoke test that the pipeline really trains with several DataLoader workers.

It reports the loss curve, validation accuracy against chance, samples/s and the share of step time spent
waiting for data. Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel (gloo on
CPU, nccl on CUDA); the loaders shard by themselves. Run it from ``notebooks/train_smoke_test.ipynb``, from
Python (``lmdbkit.train.train(...)``) or ``python -m lmdbkit.train --help`` (also under torchrun).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import store
from .dataset import SpectrogramTransform, create_train_val_loaders, default_workers
from .errors import LmdbkitError
from .reader import Reader
from .stft import resolve_device


class SmallCNN(nn.Module):
    """Four conv blocks, global average pooling, a linear classifier: [B, C, freqs, frames] -> [B, classes]."""

    def __init__(self, n_classes: int, in_channels: int = 1, width: int = 16):
        super().__init__()
        layers, c = [], in_channels
        for k in range(4):
            out = width * 2**k
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_checksum(model: nn.Module) -> str:
    """A hash of every parameter and buffer (to check that DDP ranks end with the same model)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _init_distributed(device: torch.device) -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(train_db, val_db, *, steps: int = 300, max_seconds: float | None = None, batch_size: int = 32,
          num_workers: int | None = None, lr: float = 3e-3, device: str = "auto", seed: int = 0, frames: int = 64,
          width: int = 8, log_every: int = 10, record_indices: bool = False, progress: bool = True,
          eval_every: int | None = None) -> dict[str, Any]:
    """Train SmallCNN on ``train_db`` for ``steps`` optimizer steps (or until ``max_seconds``), evaluate on
    ``val_db``; returns the figures (see the module docstring). Reproducible for a given seed.

    eval_every: also measure validation loss and accuracy every this many steps (``val_curve``); None: ten
    times over the run; 0: only at the end."""
    if not isinstance(steps, int) or steps < 1:
        raise LmdbkitError(f"steps={steps!r}: give a positive number of optimizer steps")
    if eval_every is None:
        eval_every = max(1, steps // 10)
    if not isinstance(eval_every, int) or eval_every < 0:
        raise LmdbkitError(f"eval_every={eval_every!r}: give a number of steps (0: evaluate only at the end)")
    dev = resolve_device(device)
    if num_workers is None:
        num_workers = default_workers()
    rank, world = _init_distributed(dev)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    seed_everything(seed)
    with Reader(store.resolve_paths(train_db)[0]) as r:
        labels = r.metadata.get("labels")
        if not labels and "label" in r.index_fields:
            labels = {str(v): v for v, _ in r.value_counts("label")}
    if not labels:
        raise LmdbkitError(f"{train_db}: no label map in the metadata and no index on 'label'; "
                           "train needs labelled items (precompute writes both)")
    n_classes = max(labels.values()) + 1
    tf_train = SpectrogramTransform.for_database(train_db, train=True, frames=frames)
    tf_val = SpectrogramTransform.for_database(val_db, train=False, frames=frames)
    train_loader, val_loader = create_train_val_loaders(train_db, val_db, batch_size=batch_size,
                                                        num_workers=num_workers, target_device=dev,
                                                        transform=tf_train, val_transform=tf_val, seed=seed)
    if len(train_loader) == 0:
        raise LmdbkitError(f"{train_db}: {len(train_loader.dataset)} items is less than one batch of {batch_size} "
                           f"per rank ({world} ranks); lower batch_size")
    in_channels = next(iter(val_loader))["stft"].shape[1] if len(val_loader) else 1
    model = SmallCNN(n_classes, in_channels, width).to(dev)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()

    from .progress import tqdm
    bar = tqdm(total=steps, desc=f"train (rank {rank})" if world > 1 else "train", disable=not progress or rank != 0,
               dynamic_ncols=True)
    losses: list[float] = []
    val_curve: list[dict] = []
    label_counts = torch.zeros(n_classes, dtype=torch.long, device=dev)  # for the loss of ignoring the input
    epoch_indices: list[list[int]] = []
    step, epoch, samples, wait, t0 = 0, 0, 0, 0.0, time.perf_counter()
    stop = False
    model.train()
    while not stop:
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        if record_indices:
            epoch_indices.append(list(iter(train_loader.sampler)) if hasattr(train_loader.sampler, "set_epoch")
                                 else list(range(len(train_loader.dataset))))
        t_wait = time.perf_counter()
        for batch in train_loader:
            wait += time.perf_counter() - t_wait
            batch = tf_train.to_device(batch)
            x, y = batch["stft"], batch["label"]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            label_counts += torch.bincount(y, minlength=n_classes)
            samples += len(y)
            step += 1
            bar.update(1)
            if step % log_every == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.3f}")
            timed_out = max_seconds is not None and time.perf_counter() - t0 > max_seconds
            stop = step >= steps or _any_rank(timed_out, world, dev)
            if stop:
                break
            if eval_every and step % eval_every == 0:
                t_eval = time.perf_counter()
                correct, total, _, val_loss = _evaluate(_unwrap(model, world), val_loader, tf_val, n_classes, dev, world)
                val_curve.append(_val_point(step, correct, total, val_loss))
                t0 += time.perf_counter() - t_eval  # evaluating is not training time
            t_wait = time.perf_counter()
        epoch += 1
    elapsed = time.perf_counter() - t0
    bar.close()
    raw = _unwrap(model, world)
    if world > 1:  # BatchNorm statistics were last updated from each rank's own batch: take rank 0's, as DDP does
        for b in raw.buffers():
            dist.broadcast(b, 0)
    # evaluate the unwrapped model: DDP's forward is a collective, and val shards may differ in batches
    correct, total, per_class, val_loss = _evaluate(raw, val_loader, tf_val, n_classes, dev, world)
    val_curve.append(_val_point(step, correct, total, val_loss))
    val_counts = per_class.sum(dim=1)
    result = {
        "rank": rank, "world_size": world, "device": str(dev), "num_workers": num_workers, "batch_size": batch_size,
        "steps": step, "epochs": epoch, "elapsed_seconds": elapsed, "samples": samples * world,
        "samples_per_second": samples * world / elapsed, "data_wait_share": wait / elapsed,
        "first_loss": float(np.mean(losses[:log_every])), "final_loss": float(np.mean(losses[-log_every:])),
        "losses": losses, "val_items": int(total), "val_accuracy": correct / max(total, 1), "val_loss": val_loss,
        "val_curve": val_curve,
        "chance": float(val_counts.max() / max(total, 1)) if total else 1.0 / n_classes,
        "train_label_entropy": _entropy(label_counts.cpu()),
        "n_classes": n_classes, "labels": labels, "confusion": per_class.tolist(), "model_checksum": model_checksum(raw),
        "seed": seed,
    }
    if record_indices:
        result["epoch_indices"] = epoch_indices
    for loader in (train_loader, val_loader):
        loader.dataset.close()
    return result


def _any_rank(flag: bool, world: int, dev: torch.device) -> bool:
    """True if any rank says so (ranks stop together, so DDP's collectives never wait for a stopped rank)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _unwrap(model, world: int):
    return model.module if world > 1 else model


def _val_point(step: int, correct: int, total: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "accuracy": correct / max(total, 1)}


@torch.no_grad()
def _evaluate(model, loader, tf, n_classes, dev, world):
    """(correct, total, confusion [true, predicted], mean cross-entropy) over the validation loader."""
    model.eval()
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long, device=dev)  # [true, predicted]
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    for batch in loader:
        batch = tf.to_device(batch)
        logits = model(batch["stft"])
        loss += nn.functional.cross_entropy(logits, batch["label"], reduction="sum").double()
        pred = logits.argmax(1)
        confusion.index_put_((batch["label"], pred), torch.ones_like(pred), accumulate=True)
    if world > 1:
        dist.all_reduce(confusion)
        dist.all_reduce(loss)
    model.train()
    total = int(confusion.sum())
    return int(confusion.diag().sum()), total, confusion.cpu(), float(loss) / max(total, 1)


def split_paths(data_dir: str | os.PathLike, split: str) -> list[str]:
    """The database(s) of one split in a precompute output folder: <split>.lmdb or its shards."""
    d = Path(data_dir)
    if (d / f"{split}.lmdb").is_dir():
        return [str(d / f"{split}.lmdb")]
    shards = sorted(str(p) for p in d.glob(f"{split}-*-of-*.lmdb"))
    if not shards:
        raise LmdbkitError(f"no {split!r} database in {d} (looked for {split}.lmdb and {split}-*-of-*.lmdb in "
                           f"{store.where(d)}); "
                           "run notebooks/precompute.ipynb first, or pass the path")
    return shards


def _entropy(counts: torch.Tensor) -> float:
    """The entropy (nats) of the labels' distribution: the lowest cross-entropy loss of a model that ignores its
    input and predicts the class shares."""
    p = counts.double() / max(int(counts.sum()), 1)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of correct/n."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


MIN_VAL_ITEMS = 50  # below this, the 95% interval of a validation accuracy is wider than about +-0.14: noise


def verdict(result: dict, *, min_accuracy_margin: float = 0.2, max_loss_ratio: float = 0.7,
            min_val_items: int = MIN_VAL_ITEMS):
    """The smoke test's closing summary (see lmdbkit.verdict): what trained, how fast, and what the verdict
    rests on (``judge``)."""
    from .verdict import Verdict
    basis, problems = judge(result, min_accuracy_margin=min_accuracy_margin, max_loss_ratio=max_loss_ratio,
                            min_val_items=min_val_items)
    facts = [("trained", f"{result['steps']} steps ({result['epochs']} epochs) of batch {result['batch_size']} in "
                         f"{result['elapsed_seconds']:.1f} s on {result['device']}, {result['num_workers']} workers"),
             ("speed", f"{result['samples_per_second']:.0f} samples/s, {100 * result['data_wait_share']:.1f}% of the "
                       "time waiting for data"),
             ("loss", f"{result['first_loss']:.3f} -> {result['final_loss']:.3f}"),
             ("validation", f"accuracy {result['val_accuracy']:.3f} on {result['val_items']} items (chance "
                            f"{result['chance']:.3f})")]
    facts += [("rests on", b) for b in basis]
    return Verdict("train smoke test", facts, problems)


def check_result(result: dict, *, min_accuracy_margin: float = 0.2, max_loss_ratio: float = 0.7,
                 min_val_items: int = MIN_VAL_ITEMS) -> str:
    """The verdict as one line; LmdbkitError (the same text) if the model did not learn (see ``judge``)."""
    basis, problems = judge(result, min_accuracy_margin=min_accuracy_margin, max_loss_ratio=max_loss_ratio,
                            min_val_items=min_val_items)
    if problems:
        raise LmdbkitError("train smoke test failed:\n  " + "\n  ".join(problems + basis))
    return ("train smoke test passed: the loss fell " + f"{result['first_loss']:.3f} -> {result['final_loss']:.3f}; "
            + "; ".join(basis))


def judge(result: dict, *, min_accuracy_margin: float = 0.2, max_loss_ratio: float = 0.7,
          min_val_items: int = MIN_VAL_ITEMS) -> tuple[list[str], list[str]]:
    """(what the verdict rests on, problems): the model learnt when there are no problems.

    The loss must fall (below ``max_loss_ratio`` x its start). With at least ``min_val_items`` validation items,
    validation accuracy must beat chance (the largest class's share) by ``min_accuracy_margin``. With fewer (a
    small corpus), it is enough that the accuracy's 95% interval lies above chance; when it does not, that
    accuracy is noise and the verdict rests on the training loss instead: it must be below ``max_loss_ratio`` x
    the loss of a model that ignores its input (the entropy of the training labels), which only a model that
    reads its spectrograms can reach.
    """
    problems, basis = [], []
    first, final, n = result["first_loss"], result["final_loss"], result["val_items"]
    if not final < max_loss_ratio * first:
        problems.append(f"the loss did not fall enough: {first:.3f} -> {final:.3f} (needs < {max_loss_ratio} x the "
                        "first)")
    acc, chance = result["val_accuracy"], result["chance"]
    lo, hi = wilson_interval(round(acc * n), n)
    if n == 0:
        problems.append("the validation split is empty")
    elif n >= min_val_items:
        line = f"validation accuracy {acc:.3f} on {n} items against chance {chance:.3f} (needs + {min_accuracy_margin})"
        (basis if acc >= chance + min_accuracy_margin else problems).append(line)
    elif lo > chance:  # even so few items show learning: the low end of the accuracy's interval clears chance
        basis.append(f"validation accuracy {acc:.3f} on only {n} items, but its 95% interval {lo:.2f}-{hi:.2f} lies "
                     f"above chance {chance:.3f}")
    else:
        prior = result.get("train_label_entropy")
        basis.append(f"validation has only {n} items (fewer than {min_val_items}): its accuracy {acc:.3f} (95% "
                     f"interval {lo:.2f}-{hi:.2f}, chance {chance:.3f}) cannot tell learning from luck, so the verdict "
                     "rests on the training loss")
        if prior is None:
            problems.append("no training-label entropy recorded to judge a small validation split by")
        else:
            line = (f"final training loss {final:.3f} against {prior:.3f} for a model that ignores its input (the "
                    f"entropy of the training labels; needs < {max_loss_ratio} x)")
            (basis if final < max_loss_ratio * prior else problems).append(line)
    return basis, problems


def build_parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter
    """The options of train(), each with its help and default (``lmdbkit train --help``)."""
    ap = argparse.ArgumentParser(prog="lmdbkit train", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add = ap.add_argument
    add("--train-db", required=True, help="train database, folder of shards or glob")
    add("--val-db", required=True, help="validation database, folder of shards or glob")
    add("--steps", type=int, default=300, help="optimizer steps")
    add("--max-seconds", type=float, help="stop earlier after this many seconds; none: run every step")
    add("--batch-size", type=int, default=32, help="items per batch (per rank)")
    add("--num-workers", type=int, help="DataLoader workers; none: 4, or the cores here if fewer")
    add("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle schedule)")
    add("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    add("--seed", type=int, default=0, help="seeds the model, the shuffling and the workers")
    add("--frames", type=int, default=64, help="items are cropped (randomly in training) or padded to this")
    add("--width", type=int, default=8, help="channels of the first conv layer (doubling per layer)")
    add("--eval-every", type=int, help="validation loss and accuracy every this many steps; none: ten times; 0: at "
        "the end only")
    add("--record-indices", action="store_true", help="record each epoch's sample indices per rank")
    add("--output-dir", help="each rank writes train_rank<r>.json here; none: print rank 0's result only")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = vars(ap.parse_args(argv))
    out = a.pop("output_dir")
    try:
        result = train(a.pop("train_db"), a.pop("val_db"), **a)
    except LmdbkitError as exc:
        ap.exit(2, f"error: {exc}\n")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"train_rank{result['rank']}.json").write_text(json.dumps(result))
    if result["rank"] == 0:
        print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "epoch_indices", "confusion")}, indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
