"""The notebooks: committed clean, parameterized, and run for real through papermill with params/ci/."""

import json
import shutil
import subprocess
import sys

import nbformat
import pytest

import lmdbkit
import torch
from lmdbkit import notebooks

NAMES = notebooks.available()
ARTIFACTS = notebooks.ROOT / "test-artifacts" / "notebooks"


def _verdict(executed, name):
    """The executed notebook's closing verdict (its last cell's text), kept as a CI artifact with the notebook."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(executed, ARTIFACTS / f"{name}.ipynb")
    text = notebooks.final_output(executed)
    (ARTIFACTS / f"{name}.verdict.txt").write_text(text)
    return text


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_clean_and_parameterized(name):
    nb = nbformat.read(notebooks.NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    first, params = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown" and "papermill notebooks/" in first.source
    assert params.cell_type == "code" and "parameters" in params.metadata.get("tags", [])
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: committed with outputs"
    for line in params.source.splitlines():
        if line and not line.startswith("#"):
            assert ": " in line.split("=")[0] and "#" in line, f"{name}: parameter without type or comment: {line}"
    helptext = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(notebooks.NOTEBOOKS / f"{name}.ipynb")],
                              capture_output=True, text=True).stdout
    n_params = sum(1 for line in params.source.splitlines() if line and not line.startswith("#"))
    assert helptext.count(" (default ") == n_params, helptext


@pytest.mark.parametrize("name", NAMES)
def test_ci_params_exist(name):
    assert (notebooks.PARAMS / "ci" / f"{name}.yaml").exists() and (notebooks.PARAMS / "demo" / f"{name}.yaml").exists()


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    """precompute.ipynb run once with params/ci (the other notebooks' tests reuse its databases)."""
    base = tmp_path_factory.mktemp("nb")
    data = base / "data"
    notebooks.run("precompute", base / "precompute.ipynb", profile="ci",
                  parameters={"output_dir": str(data), "demo_dir": str(base / "corpus")})
    return base, data


def test_precompute_notebook(ci_run):
    base, data = ci_run
    summary = json.loads((data / "summary.json").read_text())
    assert {d["items"] > 0 for d in summary["splits"].values()} == {True}
    assert summary["decode_only"]["audio_seconds_per_second"] > 0 and len(summary["skipped"]) == 3
    # decode-only timed the same corpus (it once regenerated the demo at its default size, 4x the CI one)
    assert summary["decode_only"]["files"] == summary["files_processed"] + len(summary["skipped"])
    assert (data / "class_balance.png").stat().st_size > 1000
    executed = nbformat.read(base / "precompute.ipynb", as_version=4)
    assert any("train" in "".join(o.get("text", "") for o in c.get("outputs", [])) for c in executed.cells)
    outputs = [o for c in executed.cells for o in c.get("outputs", [])]
    # headless, progress is text kept in the notebook (a widget bar would be saved frozen at 0%)
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "precompute: 100%" in text and "decode only: 100%" in text
    verdict = _verdict(base / "precompute.ipynb", "precompute")
    assert verdict.startswith("precompute: PASSED\n- made: train ") and "- skipped: 3 files" in verdict


def test_failing_invariant_fails_the_papermill_run(tmp_path):
    import papermill
    with pytest.raises(papermill.PapermillExecutionError, match="split 'val' is empty"):
        notebooks.run("precompute", tmp_path / "p.ipynb", profile="ci",
                      parameters={"output_dir": str(tmp_path / "d"), "demo_dir": str(tmp_path / "c"),
                                  "demo_clips_per_class": 2, "splits": {"train": 1.0, "val": 0.0},
                                  "segment_seconds": None, "segment_hop_seconds": None, "measure_decode_only": False})


def test_train_smoke_test_notebook(ci_run):
    base, data = ci_run
    out = base / "train"
    notebooks.run("train_smoke_test", base / "train.ipynb", profile="ci",
                  parameters={"data_dir": str(data), "output_dir": str(out)})
    s = json.loads((out / "summary.json").read_text())
    with lmdbkit.Reader(data / "train.lmdb") as r:  # the CI profile stores log-mel in float16: learnt from too
        assert r.metadata["stft"]["output"] == "log_mel" and r[0]["stft"].dtype == torch.float16
    assert s["val_accuracy"] >= s["chance"] + 0.1 and s["final_loss"] < s["first_loss"] and s["num_workers"] == 2
    assert (out / "training_curves.png").stat().st_size > 1000 and (out / "confusion.png").exists()
    verdict = _verdict(base / "train.ipynb", "train_smoke_test")
    assert verdict.startswith("train smoke test: PASSED\n- trained: ") and "- rests on: validation accuracy" in verdict
    assert len(s["val_curve"]) == 10


def test_benchmark_notebook(ci_run):
    base, data = ci_run
    out = base / "bench"
    notebooks.run("benchmark", base / "benchmark.ipynb", profile="ci",
                  parameters={"db_path": str(data / "train.lmdb"), "output_dir": str(out)})
    s = json.loads((out / "summary.json").read_text())
    assert s["database"]["items"] > 0 and s["targets"] and s["ratios"]
    assert {p.split("/")[-1] for p in s["figures"]} == {"bench_reads.png", "bench_open.png", "bench_dataloader.png",
                                                         "bench_cold.png", "bench_kinds.png", "bench_peers.png"}
    assert s["peers"]["ran"] == ["h5py"]  # the CI profile runs the peers' section with the dev extra's one peer
    verdict = _verdict(base / "benchmark.ipynb", "benchmark")
    missed = sum(t["holds"] is False for t in s["targets"])
    assert verdict.splitlines()[0] == ("benchmark: PASSED" if not missed else f"benchmark: {missed} TARGETS MISSED")
    assert verdict.count("- missed: ") == missed
    executed = nbformat.read(base / "benchmark.ipynb", as_version=4)  # a report: the ratio table, not raw results
    assert any("text/markdown" in o.get("data", {}) and "| target |" in o["data"]["text/markdown"]
               for c in executed.cells for o in c.get("outputs", []))
    assert not any("read_random" in o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    peer_tables = [o["data"]["text/markdown"] for c in executed.cells for o in c.get("outputs", [])
                   if "lmdbkit and the peers" in o.get("data", {}).get("text/markdown", "")]
    assert len(peer_tables) == 2 and all("| h5py (one dataset per field) |" in t for t in peer_tables)


def test_inspect_notebook(ci_run):
    base, data = ci_run
    out = base / "inspect"
    notebooks.run("inspect", base / "inspect.ipynb", profile="ci", parameters={"data_dir": str(data), "output_dir": str(out)})
    s = json.loads((out / "summary.json").read_text())
    assert s["split"] == "train" and len(s["items"]) == 8  # one per class
    for path in [s["grid"]] + [i["png"] for i in s["items"]]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert _verdict(base / "inspect.ipynb", "inspect").startswith("inspect: PASSED\n- drawn: 8 items of ")


def test_all_four_notebooks_are_in_the_demo():
    assert notebooks.available() == list(notebooks.ORDER)


def test_unknown_parameter_fails_a_plain_papermill_run(tmp_path):
    """A typo (output_dirr) must not run the notebook with the default output_dir: papermill only warns."""
    proc = subprocess.run([sys.executable, "-m", "papermill", str(notebooks.NOTEBOOKS / "precompute.ipynb"),
                           str(tmp_path / "out.ipynb"), "-p", "output_dirr", "my_data", "-p", "demo_dir",
                           str(tmp_path / "corpus"), "-k", "python3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "unknown parameter 'output_dirr' (did you mean 'output_dir'" in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "my_data").exists()  # nothing ran
    assert not (tmp_path / "corpus").exists()


def test_jupyterlab_recipe_kernel_started_in_notebooks(ci_run, tmp_path):
    """JupyterLab starts the kernel in notebooks/; the same relative paths as papermill from the root work."""
    _, data = ci_run
    proj = tmp_path / "proj"
    (proj / "notebooks").mkdir(parents=True)
    (proj / "params").mkdir()
    shutil.copy(notebooks.NOTEBOOKS / "inspect.ipynb", proj / "notebooks")
    shutil.copytree(data, proj / "runs" / "data", ignore=shutil.ignore_patterns("*.png", "*.json"))
    import papermill as pm
    pm.execute_notebook(str(proj / "notebooks" / "inspect.ipynb"), str(tmp_path / "executed.ipynb"),
                        parameters={"data_dir": "runs/data", "output_dir": "runs/inspect", "per_label": 1},
                        cwd=str(proj / "notebooks"), kernel_name="python3", progress_bar=False)
    assert json.loads((proj / "runs" / "inspect" / "summary.json").read_text())["split"] == "train"
    assert not (proj / "notebooks" / "runs").exists()


@pytest.mark.browser
def test_final_outputs_are_screenshotted():
    """Each executed notebook (kept by the tests above) as JupyterLab's HTML, its closing output screenshotted in
    Chromium into test-artifacts/notebooks/<name>.png."""
    from nbconvert import HTMLExporter
    from playwright.sync_api import sync_playwright
    from conftest import chromium
    missing = [n for n in NAMES if not (ARTIFACTS / f"{n}.ipynb").exists()]
    assert not missing, f"no executed {missing} in {ARTIFACTS}: run the whole of tests/test_notebooks.py"
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        try:
            for name in NAMES:
                html, _ = HTMLExporter(template_name="lab").from_filename(str(ARTIFACTS / f"{name}.ipynb"))
                (ARTIFACTS / f"{name}.html").write_text(html)
                page.goto((ARTIFACTS / f"{name}.html").as_uri())
                last = page.locator(".jp-CodeCell").last
                last.scroll_into_view_if_needed()
                out = ARTIFACTS / f"{name}.png"
                last.screenshot(path=str(out))
                assert "PASSED" in last.inner_text() or "TARGETS MISSED" in last.inner_text(), name
                assert out.stat().st_size > 2000
        finally:
            browser.close()


def test_plain_papermill_run_without_parameters_gets_text_progress(tmp_path):
    """`papermill nb.ipynb out.ipynb` with no -p injects no parameters cell; its bars must still be text that
    moves (a widget bar is saved frozen at 0%, with nobody to draw it)."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("from lmdbkit.progress import tqdm\n"
                                          "for _ in tqdm(range(3), desc='bar-test'):\n    pass")]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    proc = subprocess.run([sys.executable, "-m", "papermill", str(tmp_path / "nb.ipynb"), str(tmp_path / "out.ipynb"),
                           "-k", "python3"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    outputs = [o for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells for o in c.get("outputs", [])]
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert "bar-test: 100%" in "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
