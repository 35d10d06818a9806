"""Secondary indexes: build one on an existing database, and the query conveniences older code calls.

An index maps a field's value (int, str or bool, stored canonically as its JSON text, so 1, "1" and true
stay distinct) to the sorted indices of the items holding it, in the ``index:<field>`` sub-database.
``Reader.query(label=1, category="A")`` intersects several; ``Reader.value_counts(field)`` counts the values.
"""

from __future__ import annotations

import os
from typing import Any

from .reader import Reader
from .writer import Writer


def build_index(path: str | os.PathLike, field: str, *, progress: bool = True) -> int:
    """Index ``field`` of every item of an existing database (reads headers only); returns the entries written.

    The database stays as complete as it was; later appends keep the index current.
    """
    with Reader(path) as r:
        complete = r.meta.get("complete", False)
    w = Writer(path, mode="append")
    try:
        n = w.add_index(field, progress=progress)
    except BaseException:
        w.close(complete=complete)
        raise
    w.close(complete=complete)
    return n


def query(path: str | os.PathLike, **conditions: Any) -> list[int]:
    """Sorted indices of the items of a database matching every ``field=value`` (indexed fields)."""
    with Reader(path) as r:
        return r.query(**conditions)


def query_samples_by_label(db_path: str | os.PathLike, label: Any) -> list[int]:
    """Sorted indices of the items whose ``label`` equals ``label`` (needs an index on label)."""
    return query(db_path, label=label)


def query_samples_by_category(db_path: str | os.PathLike, category: Any) -> list[int]:
    """Sorted indices of the items whose ``category`` equals ``category`` (needs an index on category, or on
    one nested field named category, such as ``metadata.category``)."""
    return query(db_path, category=category)
