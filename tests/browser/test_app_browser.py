"""`ppt-fast app` in headless Chromium: upload, tune with a live progress bar, cancel, generate, download the concept
file, the library's error for a text file, and that the page asks nothing of any host but 127.0.0.1."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.browser

TUNE_TIMEOUT_MS = 240_000

# Every value the progress bar takes, recorded in the page (a MutationObserver sees changes a poll would miss).
_WATCH_PROGRESS = """
() => {
  window.__pptProgress = [];
  const seen = () => {
    const el = document.querySelector('#ppt-progress');
    if (!el) return;
    const bar = el.querySelector('progress');
    const rec = {state: el.dataset.state, phase: el.dataset.phase, step: Number(el.dataset.step || 0),
                 value: bar ? Number(bar.value) : null, text: el.innerText};
    const last = window.__pptProgress[window.__pptProgress.length - 1];
    if (!last || JSON.stringify(last) !== JSON.stringify(rec)) window.__pptProgress.push(rec);
  };
  new MutationObserver(seen).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                      characterData: true});
  seen();
}
"""

_AUDIO_STATE = """
(sel) => Array.from(document.querySelectorAll(sel + ' audio')).map(a => ({src: a.currentSrc || a.src,
  readyState: a.readyState, duration: a.duration}))
"""


def _write_clip(path: str, seconds: float = 8.0) -> None:
    from ppt_fast.audio import synth_reference, write_wav

    write_wav(path, synth_reference(seconds, 16000, seed=3, timbre="bell"), 16000, normalize=None)


def _progress_state(page) -> dict:
    return page.evaluate("() => { const el = document.querySelector('#ppt-progress'); "
                         "return {state: el.dataset.state, phase: el.dataset.phase, text: el.innerText}; }")


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def _wait_audio(page, sel: str, timeout_s: float = 60.0) -> list[dict]:
    t0 = time.monotonic()
    while True:
        states = page.evaluate(_AUDIO_STATE, sel)
        if states and all(s["readyState"] >= 2 and (s["duration"] or 0) > 0 for s in states):
            return states
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"audio in {sel} did not load: {states}")
        time.sleep(0.2)


def test_app_tune_generate_download(browser, app_server, tmp_path, artifacts):
    from ppt_fast import Concept

    url, workdir, start_s = app_server
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    page.wait_for_selector("#tune-btn")
    page.evaluate(_WATCH_PROGRESS)

    # a text file: the library's own message, in the page
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio at all\n" * 50)
    page.locator("#ref-upload input[type=file]").set_input_files(str(notes))
    page.wait_for_function("() => document.querySelector('#ref-status [data-error]')?.dataset.error === '1'",
                           timeout=30_000)  # fmt: skip
    err = page.inner_text("#ref-status")
    assert "cannot read 'uploads/notes.txt' as audio" in err and "use a format libsndfile reads" in err, err
    assert workdir not in err  # the working folder's absolute path is not shown
    assert not os.path.exists(os.path.join(workdir, "uploads", "notes.txt"))  # a refused upload is not kept

    clip = tmp_path / "my clip (take 1).wav"
    _write_clip(str(clip))
    page.locator("#ref-upload input[type=file]").set_input_files(str(clip))
    page.wait_for_function("() => document.querySelector('#ref-status')?.innerText.includes('reference:')",
                           timeout=30_000)  # fmt: skip
    assert "uploads/my_clip_take_1.wav: 8.0 s, 16000 Hz, mono" in page.inner_text("#ref-status")
    _wait_audio(page, "#ref-audio")

    _set_number(page, "steps", 5)
    t0 = time.monotonic()
    page.click("#tune-btn")
    page.wait_for_function("() => ['done', 'failed', 'cancelled'].includes(document.querySelector('#ppt-progress')"
                           "?.dataset.state)", timeout=TUNE_TIMEOUT_MS)  # fmt: skip
    tune_s = time.monotonic() - t0
    st = _progress_state(page)
    assert st["state"] == "done", st
    seen = page.evaluate("() => window.__pptProgress")
    running = [r for r in seen if r["state"] == "running"]
    values = [r["value"] for r in running]
    assert values == sorted(values), values  # the bar only moves forward
    assert len({round(v, 3) for v in values}) >= 3, seen  # and it moved while the run went
    phases = [r["phase"] for r in running]
    assert "training" in phases and "sensitivity" in phases, phases
    assert any("loss" in r["text"] and "step" in r["text"] for r in running if r["phase"] == "training"), running
    assert seen[-1]["value"] == 1.0 and "done: 5 steps" in seen[-1]["text"], seen[-1]
    page.wait_for_function("() => { const i = document.querySelector('#loss-plot img'); "
                           "return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)  # fmt: skip

    # the concept file: downloaded through the page, loaded by the library
    link = page.locator("#concept-file a").first
    link.wait_for(timeout=30_000)
    with page.expect_download() as dl:
        link.click()
    saved = tmp_path / "downloaded.ppt"
    dl.value.save_as(str(saved))
    concept = Concept.load(str(saved))
    assert concept.identifiers == ["<v1>"] and concept.meta.get("model") == "tiny"

    # listen: with and without, same prompt and seed
    assert "<v1>" in page.input_value("#prompt textarea, #prompt input")
    t1 = time.monotonic()
    page.click("#generate-btn")
    page.wait_for_function("() => document.querySelector('#gen-status')?.innerText.includes('generated')",
                           timeout=120_000)  # fmt: skip
    gen_s = time.monotonic() - t1
    for sel in ("#with-audio", "#without-audio"):
        (state,) = _wait_audio(page, sel)
        assert state["duration"] == pytest.approx(4.0, abs=0.1), state
    for sel in ("#with-spec", "#without-spec", "#ref-spec"):
        assert page.evaluate(f"() => {{ const i = document.querySelector('{sel} img'); "
                             "return !!i && i.complete && i.naturalWidth > 0; }"), sel  # fmt: skip
    page.screenshot(path=os.path.join(artifacts, "app-tune.png"), full_page=True)

    # the library lists the new concept, as `ppt-fast concept info` prints it
    page.get_by_role("tab", name="Concept library").click()
    page.wait_for_selector("#ppt-library .ppt-concept")
    lib = page.inner_text("#library-list")
    assert "<v1>" in lib and "base model tiny" in lib and "pivots in" in lib and "bytes" in lib, lib
    page.screenshot(path=os.path.join(artifacts, "app-library.png"), full_page=True)

    # offline and local: nothing was asked of another host; nothing outside the working folder is served
    outside = [u for u in requests if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]
    assert not outside, outside
    for probe in ("/gradio_api/file=/etc/passwd", f"/gradio_api/file={os.path.abspath(__file__)}"):
        try:
            code = urllib.request.urlopen(url.rstrip("/") + probe, timeout=10).status
        except urllib.error.HTTPError as e:
            code = e.code
        assert code in (403, 404), (probe, code)
    with open(os.path.join(artifacts, "app-timings.json"), "w") as f:
        json.dump({"app_start_s": round(start_s, 1), "tune_5_steps_s": round(tune_s, 1),
                   "generate_pair_4s_s": round(gen_s, 1)}, f)  # fmt: skip
    context.close()


def _tune_in_page(page, identifier: str, steps: int) -> None:
    box = page.locator("#identifier textarea, #identifier input").first
    box.fill(identifier)
    _set_number(page, "steps", steps)
    page.click("#tune-btn")
    page.wait_for_function("() => { const el = document.querySelector('#ppt-progress'); "
                           "return el && el.dataset.state === 'running'; }", timeout=30_000)  # fmt: skip
    page.wait_for_function("() => ['done', 'failed', 'cancelled'].includes(document.querySelector('#ppt-progress')"
                           "?.dataset.state)", timeout=TUNE_TIMEOUT_MS)  # fmt: skip
    st = _progress_state(page)
    assert st["state"] == "done", st


def test_app_cancel_stops_a_run(browser, app_server, tmp_path, artifacts):
    url, workdir, _ = app_server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#tune-btn")
    page.click("#use-builtin")  # the violin the demo uses, rendered by the package
    page.wait_for_function("() => document.querySelector('#ref-status')?.innerText.includes('reference:')",
                           timeout=60_000)  # fmt: skip
    _set_number(page, "steps", 5000)
    runs_before = set(os.listdir(os.path.join(workdir, "runs")))
    page.click("#tune-btn")
    page.wait_for_function("() => { const el = document.querySelector('#ppt-progress'); "
                           "return el && el.dataset.phase === 'training' && Number(el.dataset.step) >= 2; }",
                           timeout=TUNE_TIMEOUT_MS)  # fmt: skip
    page.click("#cancel-btn")
    page.wait_for_function("() => document.querySelector('#ppt-progress')?.dataset.state === 'cancelled'",
                           timeout=60_000)  # fmt: skip
    text = page.inner_text("#tune-progress")
    assert "cancelled at training" in text and "no concept file was written" in text, text
    (new_run,) = set(os.listdir(os.path.join(workdir, "runs"))) - runs_before
    assert not [f for f in os.listdir(os.path.join(workdir, "runs", new_run)) if f.endswith(".ppt")]
    page.screenshot(path=os.path.join(artifacts, "app-cancelled.png"), full_page=True)

    # the tab tunes again after a cancel: a second concept, then the library plays two together
    _tune_in_page(page, "<v2>", 3)
    page.get_by_role("tab", name="Concept library").click()
    page.wait_for_selector("#ppt-library .ppt-concept")
    labels = page.locator("#library-picks label")
    if not any("<v1>" in t for t in labels.all_inner_texts()):  # run alone: the first test's concept is not there
        page.get_by_role("tab", name="Tune").click()
        _tune_in_page(page, "<v1>", 3)
        page.get_by_role("tab", name="Concept library").click()
    page.click("#library-refresh")
    for ident in ("<v1>", "<v2>"):
        page.locator("#library-picks label", has_text=ident).first.click()
    page.wait_for_function("() => { const b = document.querySelector('#library-prompt textarea, "
                           "#library-prompt input'); "
                           "return b && b.value.includes('<v1>') && b.value.includes('<v2>'); }",
                           timeout=30_000)  # fmt: skip
    page.click("#library-play")
    page.wait_for_function("() => document.querySelector('#play-status')?.innerText.includes('played')",
                           timeout=120_000)  # fmt: skip
    (state,) = _wait_audio(page, "#together-audio")
    assert state["duration"] == pytest.approx(4.0, abs=0.1)
    assert "played <v" in page.inner_text("#play-status")

    # a file that is no concept file: the library's own message
    bad = tmp_path / "not a concept.ppt"
    bad.write_bytes(b"garbage" * 10)
    page.locator("#library-upload input[type=file]").set_input_files(str(bad))
    page.wait_for_function("() => document.querySelector('#library-status [data-error]')?.dataset.error === '1'",
                           timeout=30_000)  # fmt: skip
    err = page.inner_text("#library-status")
    assert "library/not_a_concept.ppt" in err and workdir not in err, err
    page.screenshot(path=os.path.join(artifacts, "app-library-together.png"), full_page=True)
    page.close()
