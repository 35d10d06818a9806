"""Run the project's notebooks with papermill: one at a time, or all four in order for the demo.

``python -m lmdbkit.notebooks demo --runs runs/demo`` runs every notebook on the embedded demo corpus with
``params/demo/<notebook>.yaml``, writing executed copies to ``runs/demo/<notebook>.ipynb``.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import sys
import time
from pathlib import Path

from .errors import LmdbkitError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params"
ORDER = ("precompute", "inspect", "benchmark", "train_smoke_test")


def start(namespace: dict) -> Path:
    """The first cell after a notebook's parameters: refuse a parameter the notebook does not declare, and make
    relative paths mean the same files in JupyterLab (whose kernel starts in ``notebooks/``) as in papermill
    run from the project root. Returns the working directory that relative paths are taken from."""
    if check_parameters(namespace):
        from .progress import set_headless
        set_headless()  # papermill: nobody draws widget bars, so progress is text (kept in the notebook)
    return enter_project()


def call(fn, namespace: dict, **overrides):
    """``fn`` called with every notebook parameter (a name in ``namespace``) that it takes, so a cell does
    not repeat its parameters by hand; ``overrides`` win."""
    import inspect
    names = inspect.signature(fn).parameters
    return fn(**{**{k: namespace[k] for k in names if k in namespace}, **overrides})


def check_parameters(namespace: dict) -> bool:
    """LmdbkitError naming each injected parameter that the parameters cell does not declare, with the nearest
    declared names (papermill itself only warns, and the run would go on with the default).

    Reads the kernel's input history: papermill's injected cell starts with "# Parameters" and runs right
    after the notebook's own parameters cell. An interactive run has no injected cell: nothing to check.
    Returns whether parameters were injected (a papermill run)."""
    history = namespace.get("In") or []
    for k in range(len(history) - 1, 0, -1):
        if history[k].lstrip().startswith("# Parameters"):
            declared, injected = _assigned(history[k - 1]), _assigned(history[k])
            unknown = [n for n in injected if n not in declared]
            if unknown:
                hints = "; ".join(f"{n!r}" + (f" (did you mean {', '.join(map(repr, near))}?)"
                                               if (near := difflib.get_close_matches(n, declared, 3, 0.6)) else "")
                                  for n in unknown)
                raise LmdbkitError(f"unknown parameter {hints}: this notebook declares {', '.join(declared)}. "
                                   "Nothing was run; fix the name (papermill --help-notebook lists them)")
            return True
    return False


def _assigned(source: str) -> list[str]:
    """Names assigned at the top level of a cell, in order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def enter_project() -> Path:
    """Move to the project root when the kernel started in its ``notebooks/`` folder (JupyterLab does), so a
    parameter such as ``runs/demo/data`` names the same folder as under papermill from the root."""
    cwd = Path.cwd()
    if cwd.name == "notebooks" and (cwd.parent / "params").is_dir():
        os.chdir(cwd.parent)
    return Path.cwd()


def available() -> list[str]:
    """The notebooks of ORDER that exist in this checkout, in order."""
    return [n for n in ORDER if (NOTEBOOKS / f"{n}.ipynb").exists()]


def run(name: str, output: str | Path, *, profile: str | None = "demo", parameters: dict | None = None,
        cwd: str | Path = ROOT, progress: bool = False, stream_progress: bool = False) -> Path:
    """Execute notebooks/<name>.ipynb into ``output`` with params/<profile>/<name>.yaml plus ``parameters``.

    progress: papermill's bar over cells; stream_progress: the notebook's own (text) progress bars and
    warnings, as the kernel writes them to stderr, also on this process's stderr."""
    import papermill as pm
    import yaml
    src = NOTEBOOKS / f"{name}.ipynb"
    if not src.exists():
        raise LmdbkitError(f"no notebook {src}; notebooks are {available()}")
    params = {}
    if profile is not None:
        pfile = PARAMS / profile / f"{name}.yaml"
        if not pfile.exists():
            raise LmdbkitError(f"no parameter file {pfile}; profiles are {sorted(p.name for p in PARAMS.iterdir())}")
        params = yaml.safe_load(pfile.read_text()) or {}
    params.update(parameters or {})
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # the kernel's own log would warn on every run that its local TCP sockets are not encrypted
    pm.execute_notebook(str(src), str(output), parameters=params, cwd=str(cwd), kernel_name="python3",
                        progress_bar=progress, log_output=False, extra_arguments=["--IPKernelApp.log_level=ERROR"],
                        stderr_file=sys.stderr if stream_progress else None)
    return output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmdbkit.notebooks", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="demo", help="'demo' (all notebooks in order) or one notebook's name")
    ap.add_argument("--runs", default="runs/demo", help="folder for the executed notebooks (default runs/demo)")
    ap.add_argument("--profile", default="demo", help="parameter profile: a folder of params/ (default demo)")
    a = ap.parse_args(argv)
    names = available() if a.what == "demo" else [a.what]
    for name in names:
        t0 = time.perf_counter()
        out = Path(a.runs) / f"{name}.ipynb"
        print(f"running notebooks/{name}.ipynb -> {out} ...", flush=True)
        try:
            run(name, out, profile=a.profile, stream_progress=True)
        except Exception as exc:
            where = (f"The executed notebook with the error is {out.resolve()}" if out.exists()
                     else "No executed notebook was written (it failed before running)")
            print(f"FAILED: notebooks/{name}.ipynb: {exc}\n{where}", file=sys.stderr)
            return 1
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
        verdict = final_output(out)
        if verdict:
            print("  " + verdict.replace("\n", "\n  "), flush=True)
    return 0


def final_output(executed: str | Path) -> str:
    """The text that an executed notebook's last code cell showed (its verdict), or "" if none."""
    import nbformat
    nb = nbformat.read(str(executed), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    texts = []
    for o in code[-1].get("outputs", []) if code else []:
        if o.get("output_type") == "stream" and o.get("name") == "stdout":
            texts.append(o.get("text", ""))
        elif o.get("output_type") in ("display_data", "execute_result"):
            texts.append(o.get("data", {}).get("text/plain", ""))
    return "\n".join(t.strip() for t in texts if t.strip())


if __name__ == "__main__":
    raise SystemExit(main())
