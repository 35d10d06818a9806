"""Figures (matplotlib), usable in and outside notebooks. Each function returns its Figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from . import store
from .reader import Reader


def _ticker():
    import matplotlib.ticker
    return matplotlib.ticker


def _plt():
    import matplotlib
    if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend().lower() \
            and "ipympl" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def class_balance(paths: Iterable[str | os.PathLike], field: str = "label_name"):
    """Items per class in each database (from the secondary index on ``field``), as grouped bars."""
    plt = _plt()
    counts: dict[str, dict] = {}
    for p in paths:
        with Reader(p) as r:
            f = field if field in r.index_fields else ("label" if "label" in r.index_fields else None)
            if f is None:
                raise ValueError(f"{p} has no index on {field!r} or 'label'; indexed fields are {r.index_fields}")
            for value, n in r.value_counts(f):
                counts.setdefault(store.split_name(p), {}).setdefault(value, 0)
                counts[store.split_name(p)][value] += n
    classes = sorted({c for d in counts.values() for c in d}, key=str)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(classes) + 2), 3.5))
    width = 0.8 / max(1, len(counts))
    x = np.arange(len(classes))
    for k, (split, d) in enumerate(counts.items()):
        ax.bar(x + k * width, [d.get(c, 0) for c in classes], width, label=f"{split} ({sum(d.values())})")
    ax.set_xticks(x + width * (len(counts) - 1) / 2, [str(c) for c in classes], rotation=30, ha="right")
    ax.set_ylabel("items")
    ax.set_title("Items per class and split")
    ax.legend(title="split (items)", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    return fig


def training_curves(result: dict, window: int = 10):
    """Left: training loss (raw and smoothed) and validation loss by step; right: validation accuracy by step
    against chance. Runs recorded before validation curves existed show the final accuracy only."""
    plt = _plt()
    losses = np.asarray(result["losses"])
    curve = result.get("val_curve") or []
    fig, (ax, acc) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    ax.plot(np.arange(1, len(losses) + 1), losses, alpha=0.3, label="training (per step)")
    if len(losses) >= window:
        ax.plot(np.arange(window, len(losses) + 1), np.convolve(losses, np.ones(window) / window, "valid"),
                label=f"training (mean of {window})")
    if curve:
        ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    ax.set_title(f"loss: {result['first_loss']:.2f} -> {result['final_loss']:.2f} (training)", fontsize=10)
    ax.legend(fontsize=8)
    steps = [c["step"] for c in curve] or [result["steps"]]
    accs = [c["accuracy"] for c in curve] or [result["val_accuracy"]]
    acc.plot(steps, accs, "o-", color="C2", label="validation accuracy")
    acc.axhline(result["chance"], color="k", linestyle="--", label=f"chance ({result['chance']:.2f})")
    acc.set_ylim(0, 1.02)
    acc.set_xlim(0, max(steps) * 1.02 + 1)
    acc.set_xlabel("step")
    acc.set_ylabel("accuracy")
    acc.set_title(f"validation accuracy {result['val_accuracy']:.2f} on {result['val_items']} items", fontsize=10)
    acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{result['samples_per_second']:.0f} samples/s on {result['device']}, "
                 f"{100 * result['data_wait_share']:.0f}% of the time waiting for data", fontsize=9)
    fig.tight_layout()
    return fig


def confusion(result: dict):
    """The validation confusion matrix of a lmdbkit.train result, each row (true class) normalised to 1, with
    the counts in the cells and the accuracy in the title."""
    plt = _plt()
    m = np.asarray(result["confusion"], dtype=float)
    names = {v: k for k, v in (result.get("labels") or {}).items()}
    names = [str(names.get(i, i)) for i in range(len(m))]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * len(m), 1.5 + 0.55 * len(m)))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(m)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(m)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(m.sum())
    ax.set_title(f"validation: accuracy {np.trace(m) / max(total, 1):.2f} on {total} items", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of the true class", fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


# -- items ------------------------------------------------------------------------------------------

def stft_config(reader):
    """The StftConfig stored with a database, or None for generic databases."""
    d = reader.metadata.get("stft") if hasattr(reader, "metadata") else None
    if not d:
        return None
    from .stft import StftConfig
    return StftConfig.from_dict(d)


def _to_numpy(x):
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy() if x.dtype != torch.bfloat16 else x.float().numpy()
    except ImportError:
        pass
    return np.asarray(x)


def rows_axis(cfg, n_rows: int) -> tuple[tuple[float, float], str, tuple | None]:
    """The vertical axis of a stored item's image: (limits, label, ticks or None). STFT rows span 0 Hz to
    Nyquist; mel bands are rows labelled at six bands by their centre frequency; MFCCs are rows."""
    if cfg.output == "mfcc":
        return (0.0, float(n_rows)), "MFCC", None
    f = cfg.frequencies()
    if cfg.is_mel:
        rows = np.unique(np.linspace(0, len(f) - 1, 6).round().astype(int))
        return (0.0, float(n_rows)), f"mel band ({cfg.mel_scale} scale)", (rows + 0.5, [f"{f[i]:.0f} Hz" for i in rows])
    return (float(f[0]), float(f[-1])), "frequency (Hz)", None


def db_unit(cfg) -> str:
    """What an item's image shows, and in dB relative to what: power of the STFT coefficients (or of the mel
    bands) in dB re 1, where 1 is a full-scale coefficient of audio in [-1, 1]; MFCCs are plain values."""
    if cfg is not None and cfg.output == "mfcc":
        return "MFCC value"
    if cfg is not None and cfg.is_mel:
        return "mel-band power (dB re 1)"
    return "power (dB re 1)"


def item_image(spec, cfg=None) -> tuple[np.ndarray, list, str, str, tuple | None]:
    """(image in dB, extent, x label, y label, y ticks or None) of one stored spectrogram item."""
    x = _to_numpy(spec)
    if x.ndim == 3:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"a spectrogram is [freqs, frames] (or [channels, freqs, frames]); got shape {x.shape}")
    if cfg is not None:
        from .stft import to_db
        db = to_db(x, cfg)
        t = cfg.times(x.shape[1])
        ylim, ylabel, ticks = rows_axis(cfg, x.shape[0])
        return db, [t[0] if len(t) else 0, t[-1] if len(t) else 0, *ylim], "time (s)", ylabel, ticks
    p = np.abs(x).astype(np.float64) ** 2 if np.iscomplexobj(x) else x.astype(np.float64)
    db = 10 * np.log10(np.maximum(np.abs(p), 1e-10))
    return db, [0, x.shape[1], 0, x.shape[0]], "frame", "bin", None


def colour_range(images: list[np.ndarray], cfg=None, floor_db: float = 80.0) -> tuple[float, float]:
    """One colour scale for several images: the highest value down to ``floor_db`` below it (MFCCs: their
    whole range)."""
    images = [d for d in images if d.size]
    if not images:
        return -floor_db, 0.0
    hi = max(float(np.max(d)) for d in images)
    if cfg is not None and cfg.output == "mfcc":
        return min(float(np.min(d)) for d in images), hi
    return hi - floor_db, hi


def spectrogram(spec, cfg=None, *, ax=None, title: str | None = None, colorbar: bool = True,
                vrange: tuple[float, float] | None = None):
    """Draw one STFT item in dB, with time in seconds and frequency in Hz from ``cfg`` (frames and bins
    without it). Multichannel items ([C, freqs, frames]) show their first channel. ``vrange``: the colour
    scale (default: the item's peak down 80 dB). Returns the Figure."""
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.2))
    else:
        fig = ax.figure
    image = item_image(spec, cfg)
    im = draw_image(ax, image, vrange if vrange is not None else colour_range([image[0]], cfg), title=title)
    if colorbar:
        fig.colorbar(im, ax=ax, label=db_unit(cfg))
    return fig


def draw_image(ax, image: tuple, vrange: tuple[float, float], *, title: str | None = None, ylabel: bool = True,
               small: bool = False):
    """Draw what ``item_image`` made on ``ax`` with the colour scale ``vrange``; returns the AxesImage."""
    db, extent, xlabel, yname, ticks = image
    im = ax.imshow(db, origin="lower", aspect="auto", extent=extent, cmap="magma", vmin=vrange[0], vmax=vrange[1])
    size = 8 if small else None
    ax.set_xlabel(xlabel, fontsize=size)
    ax.set_ylabel(yname if ylabel else "", fontsize=size)
    if ticks is not None:
        ax.set_yticks(*ticks)
    if small:
        ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return im


def array(value, *, ax=None, title: str | None = None):
    """Draw a generic array by its shape: 1-D as a line, 2-D (or image-like 3-D) as an image."""
    plt = _plt()
    x = _to_numpy(value)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3))
    else:
        fig = ax.figure
    if np.iscomplexobj(x):
        x = np.abs(x)
    if x.ndim == 0 or x.size == 0:
        ax.text(0.5, 0.5, f"{x!r}"[:80], ha="center", va="center")
        ax.axis("off")
    elif x.ndim == 1:
        ax.plot(x)
        ax.set_xlabel("index")
    else:
        if x.ndim == 3 and x.shape[-1] in (3, 4):
            img = x
        elif x.ndim == 3 and x.shape[0] in (1, 3, 4):
            img = np.moveaxis(x, 0, -1)
        else:
            img = x.reshape(-1, x.shape[-1])
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim == 3:
            img = (img - img.min()) / (np.ptp(img) or 1)
            ax.imshow(img, aspect="auto")
        else:
            im = ax.imshow(img.astype(np.float64), aspect="auto", origin="lower", cmap="viridis")
            fig.colorbar(im, ax=ax)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def is_array(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and len(getattr(v, "shape", ())) > 0


def item_figure(sample: dict, cfg=None, *, title: str | None = None, field: str = "stft"):
    """One item: its STFT as a spectrogram when the database has an StftConfig, else every array field
    drawn by shape. Returns the Figure."""
    plt = _plt()
    if cfg is not None and field in sample:
        return spectrogram(sample[field], cfg, title=title)
    arrays = [(k, v) for k, v in sample.items() if is_array(v)]
    if not arrays:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.text(0.5, 0.5, "no array fields", ha="center", va="center")
        ax.axis("off")
        return fig
    fig, axes = plt.subplots(1, len(arrays), figsize=(5 * len(arrays), 3), squeeze=False)
    for ax, (k, v) in zip(axes[0], arrays):
        array(v, ax=ax, title=f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def metadata_rows(sample: dict) -> list[tuple[str, str]]:
    """(field, text) for a sample's table: metadata values as they are, arrays as shape and dtype."""
    rows = []
    for k, v in sample.items():
        if is_array(v):
            rows.append((k, f"{str(v.dtype).removeprefix('torch.')} {tuple(v.shape)}"))
        else:
            text = repr(v)
            rows.append((k, text if len(text) <= 120 else text[:117] + "..."))
    return rows


def choose_spot_check(reader, *, indices=None, per_label: int = 2, seed: int = 0,
                      label_field: str | None = None) -> list[int]:
    """Items to spot-check: the given indices, else a seeded random choice of ``per_label`` items per label
    (through the secondary index), else ``per_label * 4`` random items."""
    n = len(reader)
    if indices:
        for i in indices:
            if not -n <= i < n:
                raise IndexError(f"spot-check index {i} is out of range for {reader.path}, which holds {n} items")
        return [i % n for i in indices]
    rng = np.random.default_rng(seed)
    fields = [f for f in ((label_field,) if label_field else ("label", "label_name")) if f in reader.index_fields]
    if fields:
        out = []
        for value, _count in reader.value_counts(fields[0]):
            members = reader.query(**{fields[0]: value})
            out += sorted(rng.choice(members, size=min(per_label, len(members)), replace=False).tolist())
        return out
    return sorted(rng.choice(n, size=min(n, per_label * 4), replace=False).tolist())


def spot_check_grid(reader, indices: list[int], *, cols: int = 4, field: str = "stft",
                    read: list[tuple[dict, str | None]] | None = None):
    """A grid of items (spectrograms for STFT databases) on one colour scale with one colour bar, each titled
    with its index and label over its key. ``read``: the (sample, key) of each index, if the caller has them."""
    plt = _plt()
    cfg = stft_config(reader)
    rows = max(1, -(-len(indices) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    read = read if read is not None else [(reader[i], reader.key_of(i)) for i in indices]
    samples = [sample for sample, _ in read]
    spectra = cfg is not None and all(field in s for s in samples)
    images = [item_image(s[field], cfg) for s in samples] if spectra else []
    vmin, vmax = colour_range([im[0] for im in images], cfg)
    im = None
    for k, (ax, i, (s, key)) in enumerate(zip(axes.flat, indices, read)):
        ax.axis("on")
        key = key or ""
        label = s.get("label_name", s.get("label"))
        short = key if len(key) <= 34 else "..." + key[-31:]
        title = f"#{i}" + (f"  [{label}]" if label is not None else "") + f"\n{short}"
        if spectra:
            im = draw_image(ax, images[k], (vmin, vmax), title=title, ylabel=k % cols == 0, small=True)
        else:
            arrays = [v for v in s.values() if is_array(v)]
            array(arrays[0] if arrays else np.zeros(0), ax=ax, title=title)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label=db_unit(cfg), shrink=0.9, pad=0.01)
    return fig


def item_title(reader, i: int, sample: dict, *, key: str | None = None) -> str:
    """"#i key [label]"; ``key`` when the caller has already read it."""
    key = reader.key_of(i) if key is None else key
    label = sample.get("label_name", sample.get("label"))
    return f"#{i} {key}" + (f" [{label}]" if label is not None else "")


def spot_check(source, output_dir, *, split: str | None = None, indices=None, per_label: int = 2, seed: int = 0,
               allow_pickle: bool = False, cols: int = 4) -> dict:
    """Headless inspection: a grid of spot-check items (given indices, or a seeded random choice per label)
    of one split of ``source`` (a database, split folder or shard folder), saved as ``spot_check.png`` plus
    one PNG per item in output_dir. Returns a summary naming the items shown."""
    from .reader import MultiReader
    groups = store.group_by_split(source)
    chosen_split = split or ("train" if "train" in groups else next(iter(groups)))
    if chosen_split not in groups:
        raise ValueError(f"split={split!r} is not in {source}; splits there are {sorted(groups)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    with MultiReader(groups[chosen_split], decode_to="auto", allow_pickle=allow_pickle) as r:
        chosen = choose_spot_check(r, indices=indices, per_label=per_label, seed=seed)
        cfg = stft_config(r)
        items, read = [], []
        for i in chosen:
            s, key = r[i], r.key_of(i)
            read.append((s, key))
            fig = item_figure(s, cfg, title=item_title(r, i, s, key=key))
            path = out / f"item_{chosen_split}_{i:06d}.png"
            fig.savefig(path, dpi=90, bbox_inches="tight")
            plt.close(fig)
            items.append({"index": i, "key": key, "label": s.get("label"), "label_name": s.get("label_name"),
                          "png": str(path)})
        grid = spot_check_grid(r, chosen, cols=cols, read=read)
        grid_path = out / "spot_check.png"
        grid.savefig(grid_path, dpi=90, bbox_inches="tight")
        plt.close(grid)
        return {"source": str(source), "split": chosen_split, "splits": sorted(groups), "items_in_split": len(r),
                "stft": cfg.to_dict() if cfg else None, "items": items, "grid": str(grid_path)}


def spot_check_verdict(summary: dict):
    """The inspect notebook's closing summary (see lmdbkit.verdict): what was drawn, and any empty figure."""
    from .verdict import Verdict
    items = summary["items"]
    labels = sorted({str(i["label_name"] if i["label_name"] is not None else i["label"]) for i in items
                     if i["label"] is not None or i["label_name"] is not None})
    kind = (summary.get("stft") or {}).get("output", "generic arrays")
    facts = [("drawn", f"{len(items)} items of {summary['items_in_split']} in split {summary['split']!r} "
                       f"({', '.join(summary['splits'])} in {summary['source']}), stored as {kind}"),
             ("labels", ", ".join(labels) if labels else "none"),
             ("figures", f"{summary['grid']} and one PNG per item")]
    problems = [f"empty figure {p}" for p in [summary["grid"]] + [i["png"] for i in items] if not Path(p).stat().st_size]
    return Verdict("inspect", facts, problems)
