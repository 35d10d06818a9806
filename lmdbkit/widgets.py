"""An ipywidgets browser of LMDB items, for JupyterLab.

``Browser(path)`` takes a database, a split folder (``train.lmdb``, ``val.lmdb``, ...) or a shard folder
(``train-0-of-2.lmdb``, ...). It shows an index slider linked to a number box, a key box, a split
drop-down, a label filter (through the secondary index), the item's metadata as a table and its
spectrogram in dB with axes in seconds and Hz from the stored StftConfig (generic databases: arrays drawn
by shape), and for complex STFT items an audio player of the inverse STFT. Only the item on screen is
read; the slider reports on release, not on every pixel of a drag; an exception in a callback is shown
in the browser's own output area.
"""

from __future__ import annotations

import contextlib
import html
import os
import traceback

import ipywidgets as w
from IPython.display import HTML, Audio, display

from . import plot
from .reader import MultiReader
from .store import group_by_split

ALL = "(all)"


class Browser:
    """Browse items by index, key, split and label. ``display(browser)`` or put ``browser.widget`` in a layout."""

    def __init__(self, source: str | os.PathLike, *, split: str | None = None, allow_pickle: bool = False,
                 label_field: str | None = None, audio: bool = True):
        self.groups = group_by_split(source)
        self.allow_pickle, self.audio = allow_pickle, audio
        self._label_field = label_field
        self.reader: MultiReader | None = None
        self.view: list[int] = []     # global indices shown by the slider (all items, or one label's)
        self.current: int | None = None
        self.sample: dict | None = None
        self.figure = None
        self.reads = 0                # items read (the browser reads only the item on screen)
        self.player = None            # the audio player of the item on screen (complex STFT items)
        self.last_error: str | None = None
        self._suppress = False        # set while the browser itself moves a widget: no second read

        first = split if split is not None else next(iter(self.groups))
        if first not in self.groups:
            raise ValueError(f"split={split!r} is not in {source}; splits there are {list(self.groups)}")
        self.split = w.Dropdown(options=list(self.groups), value=first, description="split")
        self.label = w.Dropdown(options=[ALL], value=ALL, description="label")
        self.slider = w.IntSlider(min=0, max=0, value=0, description="item", continuous_update=False,
                                  layout=w.Layout(width="60%"))
        self.number = w.BoundedIntText(min=0, max=0, value=0, description="index", layout=w.Layout(width="180px"))
        w.link((self.slider, "value"), (self.number, "value"))
        self.key = w.Text(placeholder="a sample's key, then Enter", description="key", continuous_update=False,
                          layout=w.Layout(width="60%"))
        self.status = w.HTML()
        self.table = w.HTML()
        self.plot_out = w.Output()
        self.audio_out = w.Output()
        self.error_out = w.Output()
        self.widget = w.VBox([
            w.HBox([self.split, self.label]), w.HBox([self.slider, self.number]), self.key, self.status,
            w.HBox([self.plot_out, self.table]), self.audio_out, self.error_out,
        ])
        self.split.observe(self._guard(lambda ch: self.open_split(ch["new"])), names="value")
        self.label.observe(self._guard(lambda ch: None if self._suppress else self.filter_label(ch["new"])),
                           names="value")
        self.slider.observe(self._guard(lambda ch: self.show_position(ch["new"])), names="value")
        self.key.observe(self._guard(lambda ch: self.go_to_key(ch["new"]) if ch["new"] else None), names="value")
        self.open_split(first)

    # -- callbacks never lose an exception: it is shown in the browser ---------------------------------

    def _guard(self, fn):
        def handler(change):
            try:
                self.error_out.clear_output()
                self.last_error = None
                fn(change)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                with self.error_out:
                    print("".join(traceback.format_exception(exc)))
                self.status.value = f"<b style='color:#b00'>{html.escape(self.last_error)}</b>"
        return handler

    # -- navigation ---------------------------------------------------------------------------------

    def open_split(self, split: str) -> None:
        if self.reader is not None:
            self.reader.close()
        self.reader = MultiReader(self.groups[split], decode_to="auto", allow_pickle=self.allow_pickle)
        self.cfg = plot.stft_config(self.reader)
        field = self._label_field or next((f for f in ("label_name", "label") if f in self.reader.index_fields), None)
        self.label_field = field
        self._label_values = {str(v): v for v, _ in self.reader.value_counts(field)} if field else {}
        options = [ALL, *self._label_values]
        with self._quietly():
            self.label.options = options
            self.label.value = ALL
        self.label.disabled = field is None
        self.filter_label(ALL)

    def filter_label(self, value: str) -> None:
        n = len(self.reader)
        self.view = list(range(n)) if value == ALL else self.reader.query(**{self.label_field: self._label_values[value]})
        self._set_range(len(self.view))
        self.show_position(0)

    @contextlib.contextmanager
    def _quietly(self):
        """The browser moves its own widgets: their observers must not read or draw a second time."""
        self._suppress = True
        try:
            yield
        finally:
            self._suppress = False

    def _set_range(self, n: int) -> None:
        with self._quietly():
            self.slider.max = self.number.max = max(0, n - 1)
            self.slider.value = 0

    def go_to_key(self, key: str) -> None:
        i = self.reader.index_of(key.strip())
        if i is None:
            raise KeyError(f"key {key.strip()!r} is not in split {self.split.value!r}")
        if i not in self.view:
            self.label.value = ALL
        pos = self.view.index(i)
        with self._quietly():
            self.slider.value = pos
        self.show_position(pos)

    def show_position(self, pos: int) -> None:
        if self._suppress:
            return
        if not self.view:
            self.current, self.sample = None, None
            self.status.value = "<i>no items</i>"
            self.plot_out.clear_output()
            return
        self.show(self.view[pos])

    def show(self, i: int) -> None:
        """Read and draw item ``i`` (a global index within the split)."""
        import matplotlib.pyplot as plt
        sample = self.reader[i]
        self.reads += 1
        self.current, self.sample = i, sample
        key = self.reader.key_of(i)
        title = plot.item_title(self.reader, i, sample)
        pos = self.view.index(i) if i in self.view else 0
        self.status.value = (f"<b>item {i}</b> of {len(self.reader)} in <b>{html.escape(self.split.value)}</b>"
                             f" (position {pos + 1} of {len(self.view)}) · key <code>{html.escape(str(key))}</code>")
        self.table.value = self._table(sample)
        fig = plot.item_figure(sample, self.cfg, title=title)
        if self.figure is not None:
            plt.close(self.figure)
        self.figure = fig
        with self.plot_out:  # caption and figure in one update, so they always name the same item
            self.plot_out.clear_output(wait=True)
            display(HTML(f"<span class='lmdbkit-caption'>{html.escape(title)}</span>"))
            display(fig)
        self._audio(sample)

    def _table(self, sample: dict) -> str:
        rows = "".join(f"<tr><td style='text-align:left;padding-right:1em'><b>{html.escape(k)}</b></td>"
                       f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in plot.metadata_rows(sample))
        return f"<table>{rows}</table>"

    def _audio(self, sample: dict) -> None:
        self.audio_out.clear_output()
        self.player = None
        if not self.audio or self.cfg is None or self.cfg.output != "complex" or "stft" not in sample:
            return
        import torch
        from .stft import inverse
        spec = torch.as_tensor(sample["stft"])
        length = int(round(sample.get("duration_s", 0) * self.cfg.sample_rate)) or None
        y = inverse(spec, self.cfg, length=length).numpy()
        self.player = Audio(y if y.ndim == 1 else y[0], rate=self.cfg.sample_rate, normalize=True)
        with self.audio_out:
            display(self.player)

    # -- display ------------------------------------------------------------------------------------

    def _ipython_display_(self):
        display(self.widget)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.figure is not None:
            import matplotlib.pyplot as plt
            plt.close(self.figure)
        self.widget.close()
