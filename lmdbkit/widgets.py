"""An ipywidgets browser of LMDB items, for JupyterLab.

``Browser(path)`` takes a database, a split folder (``train.lmdb``, ``val.lmdb``, ...) or a shard folder
(``train-0-of-2.lmdb``, ...). It shows an index slider linked to a number box, a key box, a split
drop-down, a label filter (through the secondary index), the item's metadata as a table and its
spectrogram (any stored kind) with axes in seconds and Hz (or mel bands) from the stored StftConfig
(generic databases: arrays drawn by shape), and for complex STFT items an audio player of the inverse STFT.

A step is fast and steady: only the item on screen is read, the figure is redrawn by blitting
(``itemview.ItemCanvas``) into one image widget whose size never changes, and the player keeps its place
(its audio is replaced, not the player). The slider reports on release, not on every pixel of a drag; an
exception in a callback is shown in the browser's own output area. ``Browser`` is itself a widget (a VBox).
"""

from __future__ import annotations

import contextlib
import html
import os
import traceback
from typing import Sequence

import ipywidgets as w
from IPython.display import Audio

from . import plot
from .itemview import ItemCanvas
from .reader import MultiReader
from .store import group_by_split

ALL = "(all)"


class Browser(w.VBox):
    """Browse items by index, key, split and label. Display it, or put it in any layout (it is a VBox)."""

    def __init__(self, source: str | os.PathLike, *, split: str | None = None, allow_pickle: bool = False,
                 label_field: str | None = None, audio: bool = True):
        self.groups = group_by_split(source)
        self.allow_pickle, self.audio = allow_pickle, audio
        self._label_field = label_field
        self.reader: MultiReader | None = None
        self.view: Sequence[int] = []  # global indices the slider walks: range(n) (O(1) to make) or one label's
        self.current: int | None = None
        self.sample: dict | None = None
        self.canvas: ItemCanvas | None = None
        self.reads = 0                # items read (the browser reads only the item on screen)
        self.last_error: str | None = None
        self._suppress = False        # set while the browser itself moves a widget: no second read

        first = split if split is not None else next(iter(self.groups))
        if first not in self.groups:
            raise ValueError(f"split={split!r} is not in {source}; splits there are {list(self.groups)}")
        self.split = w.Dropdown(options=list(self.groups), value=first, description="split")
        self.label = w.Dropdown(options=[ALL], value=ALL, description="label")
        self.slider = w.IntSlider(min=0, max=0, value=0, description="position", continuous_update=False,
                                  layout=w.Layout(width="60%"))
        self.number = w.BoundedIntText(min=0, max=0, value=0, description="index", layout=w.Layout(width="180px"))
        self.key = w.Text(placeholder="a sample's key, then Enter", description="key", continuous_update=False,
                          layout=w.Layout(width="60%"))
        self.status = w.HTML()
        self.caption = w.HTML()
        self.image = w.Image(format=ItemCanvas.format, layout=w.Layout(width="630px", height="288px", object_fit="contain"))
        self.table = w.HTML(layout=w.Layout(max_width="420px"))
        self.player = w.Audio(format="wav", autoplay=False, controls=True, layout=w.Layout(width="630px"))
        self.error_out = w.Output()
        super().__init__([
            w.HBox([self.split, self.label]), w.HBox([self.slider, self.number]), self.key, self.status,
            self.caption, w.HBox([self.image, self.table]), self.player, self.error_out,
        ])
        self.split.observe(self._guard(lambda ch: self.open_split(ch["new"])), names="value")
        self.label.observe(self._guard(lambda ch: None if self._suppress else self.filter_label(ch["new"])),
                           names="value")
        self.slider.observe(self._guard(lambda ch: self.show_position(ch["new"])), names="value")
        self.number.observe(self._guard(lambda ch: None if self._suppress else self.go_to_index(ch["new"])),
                            names="value")
        self.key.observe(self._guard(lambda ch: None if self._suppress or not ch["new"] else self.go_to_key(ch["new"])),
                         names="value")
        self.open_split(first)

    @property
    def widget(self) -> "Browser":
        """The browser itself (it is a widget); kept for code written when it was not."""
        return self

    @property
    def figure(self):
        """The matplotlib Figure of the item on screen."""
        return self.canvas.figure if self.canvas is not None else None

    # -- callbacks never lose an exception: it is shown in the browser ---------------------------------

    def _guard(self, fn):
        def handler(change):
            try:
                if self.last_error is not None:
                    self.error_out.clear_output()
                    self.last_error = None
                fn(change)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                with self.error_out:
                    print("".join(traceback.format_exception(exc)))
                self.status.value = f"<b style='color:#b00'>{html.escape(self.last_error)}</b>"
        return handler

    @contextlib.contextmanager
    def _quietly(self):
        """The browser moves its own widgets: their observers must not read or draw a second time."""
        self._suppress = True
        try:
            yield
        finally:
            self._suppress = False

    # -- navigation ---------------------------------------------------------------------------------

    def open_split(self, split: str) -> None:
        keep = self.label.value
        if self.reader is not None:
            self.reader.close()
        self.reader = MultiReader(self.groups[split], decode_to="auto", allow_pickle=self.allow_pickle)
        self.cfg = plot.stft_config(self.reader)
        self.canvas = ItemCanvas(self.cfg)
        field = self._label_field or next((f for f in ("label_name", "label") if f in self.reader.index_fields), None)
        self.label_field = field
        self._label_values = {str(v): v for v, _ in self.reader.value_counts(field)} if field else {}
        keep = keep if keep in self._label_values else ALL  # the label filter stays where that label exists
        with self._quietly():
            self.label.options = [ALL, *self._label_values]
            self.label.value = keep
            self.number.max = max(0, len(self.reader) - 1)
        self.label.disabled = field is None
        self.player.layout.display = None if self.audio and self.cfg is not None and self.cfg.output == "complex" else "none"
        self.filter_label(keep)

    def filter_label(self, value: str) -> None:
        n = len(self.reader)
        self.view = range(n) if value == ALL else self.reader.query(**{self.label_field: self._label_values[value]})
        with self._quietly():
            self.slider.max = max(0, len(self.view) - 1)
            self.slider.value = 0
        self.show_position(0)

    def go_to_key(self, key: str) -> None:
        i = self.reader.index_of(key.strip())
        if i is None:
            near = self.reader.near_keys(key.strip())
            raise KeyError(f"key {key.strip()!r} is not in split {self.split.value!r}"
                           + (f"; nearest keys: {', '.join(near)}" if near else ""))
        self.go_to_index(i)

    def go_to_index(self, i: int) -> None:
        """Show item ``i`` (its index in the split); leaves a label filter that does not hold it."""
        if not 0 <= i < len(self.reader):
            raise IndexError(f"index {i} is out of range: split {self.split.value!r} holds {len(self.reader)} items")
        if i not in self.view:
            with self._quietly():
                self.label.value = ALL
            self.view = range(len(self.reader))
            with self._quietly():
                self.slider.max = max(0, len(self.view) - 1)
        pos = self.view.index(i)
        with self._quietly():
            self.slider.value = pos
        self.show(i, pos)

    def show_position(self, pos: int) -> None:
        if self._suppress:
            return
        if not self.view:
            self.current, self.sample = None, None
            self.status.value = "<i>no items</i>"
            return
        self.show(self.view[pos], pos)

    def show(self, i: int, pos: int | None = None) -> None:
        """Read and draw item ``i`` (a global index within the split; ``pos``: its place in the view)."""
        sample = self.reader[i]
        self.reads += 1
        self.current, self.sample = i, sample
        key = self.reader.key_of(i)
        title = plot.item_title(self.reader, i, sample, key=key)
        self.image.value = self.canvas.render(sample, title)
        if pos is None:
            pos = self.view.index(i) if i in self.view else 0
        with self._quietly():  # the index and key boxes always name the item on screen
            self.number.value = i
            self.key.value = str(key) if key is not None else ""
        peak = "" if self.canvas.peak_db is None else \
            f" · peak {plot.db_unit(self.canvas.cfg)}: {self.canvas.peak_db:.1f}"  # the colour bar's words
        self.caption.value = f"<span class='lmdbkit-caption'>{html.escape(title)}</span>{peak}"
        self.status.value = (f"<b>item {i}</b> of {len(self.reader)} in <b>{html.escape(self.split.value)}</b>"
                             f" (position {pos + 1} of {len(self.view)}) · key <code>{html.escape(str(key))}</code>")
        self.table.value = self._table(sample)
        self._audio(sample)

    def _table(self, sample: dict) -> str:
        rows = "".join(f"<tr><td style='text-align:left;padding-right:1em'><b>{html.escape(k)}</b></td>"
                       f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in plot.metadata_rows(sample))
        return f"<table>{rows}</table>"

    def _audio(self, sample: dict) -> None:
        if self.player.layout.display == "none" or "stft" not in sample:
            return
        import torch
        from .stft import inverse
        length = int(round(sample.get("duration_s", 0) * self.cfg.sample_rate)) or None
        y = inverse(torch.as_tensor(sample["stft"]), self.cfg, length=length).numpy()
        self.player.value = Audio(y if y.ndim == 1 else y[0], rate=self.cfg.sample_rate, normalize=True).data

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        for child in (self.split, self.label, self.slider, self.number, self.key, self.status, self.caption,
                      self.image, self.table, self.player, self.error_out):
            child.close()
        super().close()
