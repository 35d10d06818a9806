"""Items as JPEG images, fast enough for a browser that steps through them (tens of ms, not hundreds).

``ItemCanvas`` owns one matplotlib Figure (made without pyplot, so a notebook never shows it by itself). For
spectrogram items it draws the whole figure once (axes, frequency ticks, colour bar) and keeps that as a
background; each later item redraws only its image, its time axis and its title over the background
(blitting), and the canvas is encoded as JPEG by Pillow (quality 92: 2 ms where PNG at its lowest useful
compression took 9 ms, for about the same bytes). The colour scale is fixed:
dB below each item's peak (the peak itself is in ``peak_db``), so the colour bar never changes. Generic
items are drawn in full with ``plot.item_figure``.
"""

from __future__ import annotations

import io

import numpy as np

from . import plot

FLOOR_DB = 80.0  # the colour scale spans the item's peak down to this many dB below it


class ItemCanvas:
    def __init__(self, cfg=None, *, field: str = "stft", size=(7.0, 3.2), dpi: int = 90):
        self.cfg, self.field, self.size, self.dpi = cfg, field, size, dpi
        self.figure = None
        self.peak_db: float | None = None
        self._bg = self._rows = None

    format = "jpeg"  # what render() returns: the browser's Image widget is made with this format

    def render(self, sample: dict, title: str) -> bytes:
        """JPEG bytes of one item. Spectrograms carry no title (the browser's caption shows it, and their
        peak in ``self.peak_db``): text is what costs most to draw."""
        if self.cfg is None or self.field not in sample:
            return self._generic(sample, title)
        x = plot._to_numpy(sample[self.field])
        if x.ndim == 3:
            x = x[0]
        from .stft import to_db
        db = np.asarray(to_db(x, self.cfg), dtype=np.float32)
        if self._bg is None or db.shape[0] != self._rows:
            self._layout(db)
        mfcc = self.cfg.output == "mfcc"
        peak = float(db.max()) if db.size else 0.0
        t = self.cfg.times(db.shape[1])
        t1 = float(t[-1]) if len(t) > 1 else 1.0
        self._im.set_data(db if mfcc else db - peak)
        self._im.set_extent([0.0, t1, *self._ylim])
        self._ax.set_xlim(0.0, t1)
        self.peak_db = None if mfcc else peak
        canvas = self.figure.canvas
        canvas.restore_region(self._bg)
        self._ax.draw_artist(self._im)
        for spine in self._ax.spines.values():
            self._ax.draw_artist(spine)
        self._ax.draw_artist(self._ax.xaxis)
        return self._encode()

    def _layout(self, db: np.ndarray) -> None:
        """Draw everything once; keep the background without the parts that change per item."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        cfg = self.cfg
        fig = self.figure = Figure(figsize=self.size, dpi=self.dpi)
        FigureCanvasAgg(fig)
        ax = self._ax = fig.add_axes([0.09, 0.15, 0.74, 0.8])
        cax = fig.add_axes([0.85, 0.15, 0.02, 0.8])
        self._ylim, ylabel, ticks = plot.rows_axis(cfg, db.shape[0])
        if ticks is not None:
            ax.set_yticks(*ticks)
        if cfg.output == "mfcc":  # a symmetric scale fixed by the first item
            lo, hi = np.percentile(db, [1, 99]) if db.size else (-1.0, 1.0)
            span = max(abs(lo), abs(hi), 1e-6)
            clim, unit = (-span, span), "coefficient"
        else:
            clim, unit = (-FLOOR_DB, 0.0), "dB below the item's peak (power)"
        self._im = ax.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=clim[0], vmax=clim[1],
                             extent=[0.0, 1.0, *self._ylim], interpolation="nearest")
        ax.set_ylim(*self._ylim)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(ylabel)
        fig.colorbar(self._im, cax=cax, label=unit)
        self._im.set_visible(False)
        ax.xaxis.set_visible(False)
        fig.canvas.draw()
        self._bg = fig.canvas.copy_from_bbox(fig.bbox)
        self._im.set_visible(True)
        ax.xaxis.set_visible(True)
        self._rows = db.shape[0]

    def _generic(self, sample: dict, title: str) -> bytes:
        import matplotlib.pyplot as plt
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        fig = plot.item_figure(sample, self.cfg if self.field in sample else None, title=title, field=self.field)
        plt.close(fig)  # made through pyplot: closed at once so that a notebook never shows it a second time
        FigureCanvasAgg(fig)
        self.figure, self._bg = fig, None
        fig.canvas.draw()
        return self._encode()

    def _encode(self) -> bytes:
        from PIL import Image
        rgba = np.asarray(self.figure.canvas.buffer_rgba())
        out = io.BytesIO()
        Image.fromarray(rgba[..., :3]).save(out, format="jpeg", quality=92)
        return out.getvalue()
