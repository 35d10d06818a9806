"""The closing summary of a run: what was made, the key figures, and whether it passed, in a few lines.

Each notebook ends with one (``precompute.verdict``, ``plot.spot_check_verdict``, ``bench.verdict``,
``train.verdict``): JupyterLab renders it as Markdown, papermill's log and a terminal get the same text.
``show()`` displays it and then, if it failed, raises LmdbkitError with the problems, so that a papermill run
fails when the work failed.
"""

from __future__ import annotations

from .errors import LmdbkitError


class Verdict:
    """``facts``: (name, text) pairs; ``problems``: what failed. ``strict=False``: problems are reported (e.g.
    benchmark targets missed on this machine) but do not fail the run."""

    def __init__(self, title: str, facts: list[tuple[str, str]], problems: list[str] = (), *, strict: bool = True,
                 missed: str = "FAILED"):
        self.title, self.facts, self.problems, self.strict = title, list(facts), list(problems), strict
        self.status = "PASSED" if not self.problems else (missed if not strict else "FAILED")

    @property
    def failed(self) -> bool:
        return bool(self.problems) and self.strict

    def lines(self, bold=lambda s: s) -> list[str]:
        out = [f"{self.title}: {bold(self.status)}"]
        out += [f"- {bold(name)}: {text}" for name, text in self.facts]
        out += [f"- {bold('problem' if self.strict else 'missed')}: {p}" for p in self.problems]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    __repr__ = __str__

    def _repr_markdown_(self) -> str:
        first, *rest = self.lines(lambda s: f"**{s}**")
        return "\n".join([f"### {first}", "", *rest])

    def show(self) -> None:
        """Display (a notebook) or print (elsewhere) the verdict; then raise if it failed. Returns None, so that
        a cell ending with ``.show()`` shows it once."""
        try:
            from IPython import get_ipython
            from IPython.display import display
            shell = get_ipython()
        except ImportError:
            shell = None
        if shell is not None and getattr(shell, "kernel", None) is not None:
            display(self)
        else:
            print(self)
        if self.failed:
            raise LmdbkitError(f"{self.title} failed:\n  " + "\n  ".join(self.problems))


class Table:
    """Rows under headers, shown as a Markdown table in JupyterLab and as aligned text elsewhere."""

    def __init__(self, headers: list[str], rows: list[list], *, title: str | None = None):
        self.headers, self.rows, self.title = headers, [[str(c) for c in r] for r in rows], title

    def __str__(self) -> str:
        widths = [max(len(h), *(len(r[k]) for r in self.rows)) if self.rows else len(h)
                  for k, h in enumerate(self.headers)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [self.title] if self.title else []
        return "\n".join(out + [line(self.headers), line(["-" * w for w in widths])] + [line(r) for r in self.rows])

    __repr__ = __str__

    def _repr_markdown_(self) -> str:
        esc = lambda c: c.replace("|", "\\|")  # noqa: E731
        out = [f"**{self.title}**", ""] if self.title else []
        out += ["| " + " | ".join(map(esc, self.headers)) + " |", "|" + "---|" * len(self.headers)]
        return "\n".join(out + ["| " + " | ".join(map(esc, r)) + " |" for r in self.rows])
