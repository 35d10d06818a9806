"""Progress bars that move wherever the work runs.

In JupyterLab (a kernel with a live front end) bars are notebook widgets; in a terminal, text bars. A
notebook run headless (papermill) has a kernel but nobody to draw its widgets, and its widget bars would be
saved frozen at 0%: there bars are text on stderr, which papermill keeps in the executed notebook and can
pass on to the terminal (``lmdbkit.notebooks`` does). Headless is detected by ``notebooks.start`` (a cell of
injected parameters), by the kernel's parent process being a headless runner (papermill, nbconvert, nbclient:
a run without parameters has no injected cell), or asked for with ``LMDBKIT_PROGRESS=text``.
"""

from __future__ import annotations

import functools
import os
import sys

_headless = False


def set_headless(value: bool = True) -> None:
    global _headless
    _headless = value


def headless() -> bool:
    return _headless or os.environ.get("LMDBKIT_PROGRESS") == "text" or _started_by_headless_runner()


HEADLESS_RUNNERS = {"papermill", "nbconvert", "jupyter-nbconvert", "nbclient", "jupyter-execute", "jupyter-nbclient"}


@functools.cache
def _started_by_headless_runner() -> bool:
    """Whether this is a notebook kernel started by a headless runner: jupyter_client gives every kernel it
    starts its parent's pid (JPY_PARENT_PID), whose command line names the program (Linux's /proc; elsewhere
    this says False)."""
    pid = os.environ.get("JPY_PARENT_PID")
    if not pid or "ipykernel" not in sys.modules:
        return False
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except (OSError, ValueError):
        return False
    # the program is one of the first words: `papermill ...`, `python -m papermill ...`, `jupyter nbconvert ...`
    names = {os.path.basename(a).removesuffix(".exe").removesuffix("-script.py") for a in argv[:3]}
    return bool(names & HEADLESS_RUNNERS)


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
