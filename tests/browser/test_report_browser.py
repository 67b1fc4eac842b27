"""A demo's report.html opened from disk in headless Chromium: every player and image loads, and the page asks for
nothing outside its own folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    pytest.importorskip("audiocraft")
    out = str(tmp_path_factory.mktemp("demo"))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ppt_fast.cli", "demo", "--steps", "5", "--out", out, "--quiet"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "a listening page with spectrograms and scores" in proc.stdout
    return out, time.monotonic() - t0


def test_demo_report_loads_every_file(browser, demo_folder, artifacts):
    out, _ = demo_folder
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto("file://" + os.path.join(out, "report.html"))
    page.wait_for_load_state("load")
    page.wait_for_function("() => Array.from(document.querySelectorAll('audio')).every(a => a.readyState >= 2)",
                           timeout=30_000)  # fmt: skip
    audio = page.evaluate("() => Array.from(document.querySelectorAll('audio')).map(a => ({src: a.getAttribute('src'),"
                          " readyState: a.readyState, duration: a.duration}))")  # fmt: skip
    assert [a["src"] for a in audio] == ["reference.wav", "with_concept.wav", "without_concept.wav"]
    assert all(a["readyState"] >= 2 and a["duration"] > 0 for a in audio), audio
    assert audio[0]["duration"] == pytest.approx(30.0) and audio[1]["duration"] == pytest.approx(4.0)
    images = page.evaluate("() => Array.from(document.querySelectorAll('img')).map(i => ({src: i.getAttribute('src'),"
                           " ok: i.complete && i.naturalWidth > 0}))")  # fmt: skip
    assert {i["src"] for i in images} == {"reference.png", "with_concept.png", "without_concept.png", "loss.png"}
    assert all(i["ok"] for i in images), images
    assert page.locator("a[href='concept.ppt']").count() == 1
    table = page.inner_text("table")
    assert "audio alignment to the reference" in table and "copying" in table
    outside = [u for u in requests if not u.startswith("file://" + out)]
    assert not outside, outside
    page.screenshot(path=os.path.join(artifacts, "demo-report.png"), full_page=True)
    page.close()
