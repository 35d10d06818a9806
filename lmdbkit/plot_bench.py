"""The benchmark's figures (``lmdbkit.bench`` saves them beside summary.json): reads against the limits, open
time, DataLoader throughput, cold reads, feature kinds and the peers. The items' own figures are
``lmdbkit.plot``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plot import _plt, _ticker


# plain names of the benchmark's methods
LABELS = {
    "lmdbkit": "lmdbkit", "lmdbkit_plain": "lmdbkit, plain DataLoader", "pickle_lmdb": "pickle in LMDB (older way)",
    "pt_batches": ".pt batch files (older way)", "bare_txn_get": "bare txn.get (limit)", "memcpy": "memory copy (limit)",
    "raw_put": "bare txn.put (limit)", "pread_1thread": "pread, 1 thread (disk limit)",
    "pread_16threads": "pread, 16 threads (disk limit)",
}
KIND_LABELS = {"stft256k": "~256 KiB STFT items", "small1k": "~1 KiB items"}


def label(method: str) -> str:
    return LABELS.get(method, method)


def bench_reads(summary: dict):
    """Items/s per method for warm random reads, one panel per item size, with the limits drawn as lines."""
    plt = _plt()
    res = [r for r in summary["results"] if r["measure"] == "read_random"]
    kinds = sorted({r["kind"] for r in res})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = {r["method"]: r["value"] for r in res if r["kind"] == kind}
        methods = [m for m in ("lmdbkit", "pickle_lmdb", "pt_batches") if m in rows]
        ax.barh([label(m) for m in methods], [rows[m] for m in methods], color=["C0", "C1", "C2"][:len(methods)])
        for name, style in (("bare_txn_get", "--"), ("memcpy", ":")):
            if name in rows:
                ax.axvline(rows[name], color="k", linestyle=style, label=label(name))
        ax.set_xscale("log")
        ax.set_xlabel("items per second (random reads, warm page cache)")
        ax.set_title(KIND_LABELS.get(kind, kind))
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
            ax.plot(*zip(*pts), marker=marker, label=label(method))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items in the database")
    ax.set_ylabel("open + len() (ms)")
    ax.set_title("time to open a dataset")
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
        counts = set()
        for method in ("lmdbkit", "lmdbkit_plain", "pickle_lmdb"):
            pts = sorted((r["extra"]["num_workers"], r["value"]) for r in res if r["kind"] == kind and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label="lmdbkit, create_data_loader" if method == "lmdbkit" else label(method))
                counts |= {w for w, _ in pts}
        ax.set_xticks(sorted(counts))
        ax.set_xlabel("DataLoader worker processes")
        ax.set_ylabel("items per second (batch 64, shuffled)")
        ax.set_title(KIND_LABELS.get(kind, kind))
        ax.legend()
    fig.tight_layout()
    return fig


def bench_peers(summary: dict):
    """lmdbkit beside each peer that ran, a row of panels per item size (writes synced at the end, disk, open,
    warm random reads, DataLoader epoch), lmdbkit's bars in blue; None when the peers did not run."""
    from .bench_peers import COLUMNS, LMDBKIT
    from .peers import PEERS
    res = [r for r in summary["results"] if r["measure"].startswith("peers_") and r["measure"] != "peers_write"]
    if not res:
        return None
    plt = _plt()
    kinds = [k for k in KIND_LABELS if any(r["kind"] == k for r in res)]
    measures = [m for m in COLUMNS if m != "peers_write"]
    fig, axes = plt.subplots(len(kinds), len(measures), figsize=(3.3 * len(measures), 0.4 + 2.6 * len(kinds)),
                             squeeze=False)
    for row, kind in zip(axes, kinds):
        for ax, m in zip(row, measures):
            pts = [(r["method"], r["value"]) for r in res if r["kind"] == kind and r["measure"] == m]
            names = [("lmdbkit, create_data_loader" if n == "lmdbkit" and m == "peers_dataloader" else
                      label(n) if n in LMDBKIT else PEERS[n].name if n in PEERS else n) for n, _ in pts]
            ax.barh(range(len(pts)), [v for _, v in pts], color=["C0" if n in LMDBKIT else "0.6" for n, _ in pts])
            ax.set_yticks(range(len(pts)), names if ax is row[0] or m == "peers_dataloader" else [""] * len(pts),
                          fontsize=8)
            ax.invert_yaxis()
            what, more = COLUMNS[m]
            for y, (_, v) in enumerate(pts):
                ax.text(v, y, f" {v:.3g}" if v < 100 else f" {v:,.0f}", va="center", fontsize=7)
            if m != "peers_disk":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(_ticker().NullFormatter())
            ax.margins(x=0.35)
            ax.set_title(f"{what}\n({'more' if more else 'less'} is better)", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
        row[0].set_ylabel(KIND_LABELS.get(kind, kind))
    for ax in axes[:, measures.index("peers_dataloader")]:
        ax.yaxis.tick_right()
    fig.tight_layout()
    return fig


def bench_cold(summary: dict):
    """MiB/s of each way of reading ~256 KiB items, cold (page cache dropped) beside warm, lmdbkit against the
    disk's limits for the same bytes and the older ways; None when the cold section did not run."""
    plt = _plt()
    res = [r for r in summary["results"] if r["measure"].split("_")[0] in ("cold", "warm") and r["kind"] == "stft256k"]
    if not res:
        return None
    methods = ["lmdbkit", "pread_1thread", "pread_16threads", "pickle_lmdb", "pt_batches"]
    modes = [("single", "one item at a time"), ("batch64", "batches of 64"), ("dataloader", "DataLoader, 2 workers")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, temp in zip(axes, ("cold", "warm")):
        v = {(r["measure"], r["method"]): r["extra"]["MiB/s"] for r in res if r["measure"].startswith(temp)}
        width = 0.8 / len(methods)
        for k, m in enumerate(methods):
            ys = [v.get((f"{temp}_{mode}", m), 0.0) for mode, _ in modes]
            ax.bar([x + k * width for x in range(len(modes))], ys, width, label=label(m), color=f"C{k}")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(modes))], [label for _, label in modes], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{temp} page cache" + (" (dropped before each method)" if temp == "cold" else ""))
    axes[0].set_ylabel("MiB/s (~256 KiB items, random)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def bench_kinds(summary: dict):
    """Per stored kind: bytes per audio-second, and audio-seconds read per second warm and cold; None when the
    kinds section did not run."""
    plt = _plt()
    k = summary.get("kinds")
    if not k:
        return None
    rows = k["rows"]
    names = [r["kind"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].barh(names, [r["disk_bytes_per_audio_second"] / 1024 for r in rows], color="C0")
    axes[0].set_xlabel("KiB on disk per second of audio")
    axes[0].invert_yaxis()
    y = np.arange(len(rows))
    for j, (temp, color) in enumerate((("warm", "C1"), ("cold", "C2"))):
        axes[1].barh(y + (j - 0.5) * 0.4, [r[f"{temp}_audio_seconds_per_second"] for r in rows], 0.4,
                     label=f"{temp} page cache", color=color)
    axes[1].set_yticks(y, [])
    axes[1].invert_yaxis()
    axes[1].set_xscale("log")
    axes[1].set_xlabel("seconds of audio read per second (random single reads)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"stored feature kinds, {k['corpus']}, {k['audio_seconds']:.0f} s of audio", fontsize=10)
    fig.tight_layout()
    return fig


def save_bench_figures(summary: dict, output_dir) -> list[str]:
    """Write the benchmark's figures as PNG files; returns their paths."""
    out = []
    for name, fn in (("bench_reads.png", bench_reads), ("bench_open.png", bench_open),
                     ("bench_dataloader.png", bench_dataloader), ("bench_cold.png", bench_cold),
                     ("bench_kinds.png", bench_kinds), ("bench_peers.png", bench_peers)):
        fig = fn(summary)
        if fig is None:
            continue
        path = Path(output_dir) / name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        _plt().close(fig)
        out.append(str(path))
    return out
