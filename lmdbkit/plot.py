"""Figures (matplotlib), usable in and outside notebooks. Each function returns its Figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .reader import Reader


def _plt():
    import matplotlib
    if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend().lower() \
            and "ipympl" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def split_name(path: str | os.PathLike) -> str:
    """`train` for .../train.lmdb or .../train-0-of-2.lmdb."""
    name = Path(path).name.removesuffix(".lmdb")
    return name.split("-", 1)[0]


def class_balance(paths: Iterable[str | os.PathLike], field: str = "label_name"):
    """Items per class in each database (from the secondary index on ``field``), as grouped bars."""
    plt = _plt()
    counts: dict[str, dict] = {}
    for p in paths:
        with Reader(p) as r:
            f = field if field in r.index_fields else ("label" if "label" in r.index_fields else None)
            if f is None:
                raise ValueError(f"{p} has no index on {field!r} or 'label'; indexed fields are {r.index_fields}")
            for value, n in r.values(f).items():
                counts.setdefault(split_name(p), {}).setdefault(value, 0)
                counts[split_name(p)][value] += n
    classes = sorted({c for d in counts.values() for c in d}, key=str)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(classes) + 2), 3.5))
    width = 0.8 / max(1, len(counts))
    x = np.arange(len(classes))
    for k, (split, d) in enumerate(counts.items()):
        ax.bar(x + k * width, [d.get(c, 0) for c in classes], width, label=f"{split} ({sum(d.values())})")
    ax.set_xticks(x + width * (len(counts) - 1) / 2, [str(c) for c in classes], rotation=30, ha="right")
    ax.set_ylabel("items")
    ax.set_title("Items per class and split")
    ax.legend()
    fig.tight_layout()
    return fig


def training_curves(result: dict, window: int = 10):
    """Training loss (raw and smoothed) by step, with validation accuracy against chance in the title."""
    plt = _plt()
    losses = np.asarray(result["losses"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(losses, alpha=0.3, label="loss")
    if len(losses) >= window:
        ax.plot(np.arange(window - 1, len(losses)), np.convolve(losses, np.ones(window) / window, "valid"),
                label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title(f"val accuracy {result['val_accuracy']:.2f} (chance {result['chance']:.2f}), "
                 f"{result['samples_per_second']:.0f} samples/s, data wait {100 * result['data_wait_share']:.0f}%")
    ax.legend()
    fig.tight_layout()
    return fig


def confusion(result: dict, labels: dict | None = None):
    """The validation confusion matrix (rows: true class, columns: predicted)."""
    plt = _plt()
    m = np.asarray(result["confusion"])
    names = [n for n, _ in sorted((labels or {}).items(), key=lambda kv: kv[1])] or [str(i) for i in range(len(m))]
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(m), 1 + 0.5 * len(m)))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(m)), names[:len(m)], rotation=45, ha="right")
    ax.set_yticks(range(len(m)), names[:len(m)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig
