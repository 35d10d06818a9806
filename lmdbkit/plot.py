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
