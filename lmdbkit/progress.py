"""Progress bars that move wherever the work runs.

In JupyterLab (a kernel with a live front end) bars are notebook widgets; in a terminal, text bars. A
notebook run headless (papermill) has a kernel but nobody to draw its widgets, and its widget bars would be
saved frozen at 0%: there bars are text on stderr, which papermill keeps in the executed notebook and can
pass on to the terminal (``lmdbkit.notebooks`` does). Headless is detected by ``notebooks.start`` (a cell of
injected parameters) or asked for with ``LMDBKIT_PROGRESS=text``.
"""

from __future__ import annotations

import os
import sys

_headless = False


def set_headless(value: bool = True) -> None:
    global _headless
    _headless = value


def headless() -> bool:
    return _headless or os.environ.get("LMDBKIT_PROGRESS") == "text"


def tqdm(*args, **kwargs):
    """tqdm.auto's bar, or a text bar on stderr (updated at most every 2 s) in a headless notebook run."""
    if headless():
        from tqdm.std import tqdm as text
        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("mininterval", 2.0)
        kwargs.setdefault("ascii", True)
        kwargs["dynamic_ncols"] = False  # no terminal to measure
        kwargs.setdefault("ncols", 100)
        return text(*args, **kwargs)
    from tqdm.auto import tqdm as auto
    return auto(*args, **kwargs)
