"""The optional compiled part of the read path: ``C`` is the ``lmdbkit._speedups`` extension, or None.

``make setup`` (``pip install -e .``) builds it with the system's C compiler; without one the install goes on
and lmdbkit reads in pure Python, as it does with ``LMDBKIT_PURE_PYTHON=1``. The extension takes only the
common case of each step (an item's bytes in its run, its prefix and header key, a warm batch's timed run
lookups, and a batch's items grouped by header, checked (their checksums too, when verified) and copied into
their rows in one pass), checking every offset against its buffer; whatever it does not take, Python takes
the same way as without it, and names what is wrong (``CorruptItemError``).
"""

from __future__ import annotations

import os

C = None
if os.environ.get("LMDBKIT_PURE_PYTHON", "") in ("", "0"):
    try:
        from . import _speedups as C
    except ImportError:  # not built here (no C compiler at install time)
        C = None
