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
            for value, n in r.values(f):
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


def bench_reads(summary: dict):
    """Items/s per method for warm random reads, one panel per item size, with the limits drawn as lines."""
    plt = _plt()
    res = [r for r in summary["results"] if r["measure"] == "read_random"]
    kinds = sorted({r["kind"] for r in res})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = {r["method"]: r["value"] for r in res if r["kind"] == kind}
        methods = [m for m in ("lmdbkit", "pickle_lmdb", "pt_batches") if m in rows]
        ax.barh(methods, [rows[m] for m in methods], color=["C0", "C1", "C2"][:len(methods)])
        for name, style in (("bare_txn_get", "--"), ("memcpy", ":")):
            if name in rows:
                ax.axvline(rows[name], color="k", linestyle=style, label=f"{name} (limit)")
        ax.set_xscale("log")
        ax.set_xlabel("items/s (random, warm cache)")
        ax.set_title(kind)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def bench_open(summary: dict):
    """Open + len time against item count, log-log, lmdbkit against per-batch .pt files."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, marker in (("lmdbkit", "o"), ("pt_batches", "s")):
        pts = sorted((int(r["kind"]), r["value"]) for r in summary["results"]
                     if r["measure"] == "open" and r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items in the database")
    ax.set_ylabel("construct + len (ms)")
    ax.legend()
    fig.tight_layout()
    return fig


def bench_dataloader(summary: dict):
    """DataLoader items/s against num_workers, per item size, lmdbkit against pickle-in-LMDB."""
    plt = _plt()
    res = [r for r in summary["results"] if r["measure"] == "dataloader"]
    kinds = sorted({r["kind"] for r in res})
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(5 * max(1, len(kinds)), 3.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for method in ("lmdbkit", "pickle_lmdb"):
            pts = sorted((r["extra"]["num_workers"], r["value"]) for r in res if r["kind"] == kind and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xlabel("num_workers")
        ax.set_ylabel("items/s (batch 64, shuffled)")
        ax.set_title(kind)
        ax.legend()
    fig.tight_layout()
    return fig


def save_bench_figures(summary: dict, output_dir) -> list[str]:
    """Write the benchmark's figures as PNG files; returns their paths."""
    out = []
    for name, fn in (("bench_reads.png", bench_reads), ("bench_open.png", bench_open),
                     ("bench_dataloader.png", bench_dataloader)):
        fig = fn(summary)
        path = Path(output_dir) / name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        _plt().close(fig)
        out.append(str(path))
    return out
