"""inspect.ipynb in a real JupyterLab, in headless Chromium driven by Playwright: run all cells, move the
slider, and see the index and the rendered spectrogram change. Screenshots go to test-artifacts/browser/.

Needs Debian's chromium (/usr/bin/chromium; .ci/run installs it). Skip locally with -m "not browser".
"""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lmdbkit import notebooks

from conftest import chromium

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(demo_data, tmp_path):
    """A JupyterLab server on 127.0.0.1 (free port, token) serving a copy of inspect.ipynb set to interactive."""
    import papermill as pm
    root = tmp_path / "lab"
    root.mkdir()
    pm.execute_notebook(str(notebooks.NOTEBOOKS / "inspect.ipynb"), str(root / "inspect.ipynb"), prepare_only=True,
                        parameters={"interactive": True, "data_dir": str(demo_data), "output_dir": str(tmp_path / "out"),
                                    "per_label": 1}, kernel_name="python3")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    log = open(tmp_path / "lab.log", "w")
    root_flag = ["--allow-root"] if os.geteuid() == 0 else []  # CI machines run as root
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", *root_flag,
                             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
                             "jupyterlab.NeverCheckForUpdate"], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _accept_kernel_dialog(page) -> None:
    """JupyterLab sometimes asks which kernel to start (a fresh user config); take the proposed Python 3."""
    dialog = page.locator(".jp-Dialog:has-text('Select Kernel')")
    try:
        dialog.wait_for(timeout=3_000)
    except Exception:
        return
    dialog.locator("button:has-text('Select')").click()
    dialog.wait_for(state="detached", timeout=10_000)


def test_inspect_notebook_in_jupyterlab(lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
    base, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        try:
            page.goto(f"{base}/lab/tree/inspect.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            _accept_kernel_dialog(page)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            status = page.locator(".widget-html-content:has-text('of ')").filter(has_text="item ").first
            for attempt in range(4):  # a click that lands before the kernel session is wired up runs nothing
                _accept_kernel_dialog(page)
                page.click(".lm-MenuBar-itemLabel:text-is('Run')")
                page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
                try:
                    status.wait_for(timeout=30_000)
                    break
                except PlaywrightTimeout:
                    if attempt == 3:
                        raise
            news = page.locator(".jp-Notification-Toast button:text-is('No')")
            if news.count():
                news.first.click()
            plot_img = page.locator(".jp-OutputArea-output img").first
            plot_img.wait_for(timeout=60_000)
            before_text, before_img = status.inner_text(), plot_img.get_attribute("src")
            assert before_text.startswith("item 0 of"), before_text
            page.locator(".widget-slider").first.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "1-after-run-all.png"), full_page=True)

            handle = page.locator(".widget-hslider .noUi-handle").first
            handle.focus()
            for _ in range(3):
                handle.press("ArrowRight")
            page.wait_for_function("() => { const e = [...document.querySelectorAll('.widget-html-content')]"
                                   ".find(x => x.innerText.startsWith('item ')); return e && e.innerText.startsWith('item 3 of'); }",
                                   timeout=60_000)
            page.wait_for_selector(".lmdbkit-caption:text-matches('^#3 ')", timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            caption = page.locator(".lmdbkit-caption").first.inner_text()
            after_text = status.inner_text()
            after_img = plot_img.get_attribute("src")
            number = page.locator(".widget-inline-hbox input[type=number]").first.input_value()
            page.screenshot(path=str(ARTIFACTS / "2-after-slider.png"), full_page=True)
            steps = _step_latencies(page, handle, first=3, n=STEPS)
            page.screenshot(path=str(ARTIFACTS / "3-after-steps.png"), full_page=True)
            images = page.locator(".jp-Cell:has(img.widget-image) .jp-OutputArea-output img").count()
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert after_text.startswith("item 3 of") and after_text != before_text, after_text
    assert number == "3"  # the linked number box followed the slider
    assert caption.startswith("#3 ") and caption.split()[1] in after_text  # the figure shows item 3 ...
    assert after_img != before_img  # ... a different spectrogram
    assert images == 1, f"{images} images in the browser's cell: a stale second figure is shown"
    bad = [s for s in steps if not s["caption_ok"] or not s["number_ok"]]
    assert not bad, f"a step showed another item than its index box and caption say: {bad[:3]}"
    assert all(s["blank"] is False for s in steps), "the image went blank between items"
    assert max(abs(s["shift_px"]) for s in steps) == 0, "the page moved between items"
    ms = sorted(s["ms"] for s in steps)
    report = {"steps": len(ms), "median_ms": ms[len(ms) // 2], "p90_ms": ms[int(len(ms) * 0.9)], "max_ms": ms[-1],
              "all_ms": [round(s["ms"], 1) for s in steps], "browser_part_s": round(time.time() - t0, 1)}
    (ARTIFACTS / "step_latency.json").write_text(json.dumps(report, indent=2))
    print(f"step latency (keypress -> new spectrogram painted), {len(ms)} steps: median {report['median_ms']:.0f} ms, "
          f"p90 {report['p90_ms']:.0f} ms, max {report['max_ms']:.0f} ms")


STEPS = 24
_WATCH = """([handleSel, expected]) => { window.__lmdbkitStep = new Promise((resolve, reject) => {
    // from the key press to the new item's spectrogram decoded and painted, watching for a blank image and
    // for anything on the page moving
    const img = document.querySelector('img.widget-image');
    const player = document.querySelector('audio') || img;
    const top = player.getBoundingClientRect().top;
    const before = img.getAttribute('src');
    let t0 = null, blank = false;
    const onKey = () => { t0 = performance.now(); };
    document.addEventListener('keydown', onKey, {capture: true, once: true});
    const srcWatch = new MutationObserver(() => { if (!img.getAttribute('src')) blank = true; });
    srcWatch.observe(img, {attributes: true, attributeFilter: ['src']});
    const timer = setTimeout(() => reject(new Error('no new item after 10 s')), 10000);
    const poll = async () => {
        const cap = document.querySelector('.lmdbkit-caption');
        if (t0 !== null && img.getAttribute('src') !== before && cap && cap.innerText.startsWith('#' + expected + ' ')) {
            await img.decode().catch(() => {});
            await new Promise(r => requestAnimationFrame(r));  // the frame that paints it
            const ms = performance.now() - t0;
            srcWatch.disconnect(); clearTimeout(timer);
            const number = [...document.querySelectorAll('.widget-inline-hbox input[type=number]')][0].value;
            resolve({ms, blank, caption_ok: true, number_ok: number === String(expected),
                     shift_px: player.getBoundingClientRect().top - top});
        } else {
            requestAnimationFrame(poll);
        }
    };
    requestAnimationFrame(poll);
}); return true; }"""


def _step_latencies(page, handle, *, first: int, n: int) -> list[dict]:
    """Press ArrowRight n times on the slider, one step at a time, timing each in the page itself."""
    out = []
    for k in range(n):
        expected = first + k + 1
        page.evaluate(_WATCH, [".widget-hslider .noUi-handle", expected])
        handle.press("ArrowRight")
        out.append(page.evaluate("() => window.__lmdbkitStep"))
    return out
