"""The app's page (Gradio): wiring of `ppt_fast.app.core`'s functions to components, and the launch settings that
keep it offline and local. The only module of ppt_fast that imports gradio; `ppt_fast.app.launch` imports it.

Offline: analytics off (`GRADIO_ANALYTICS_ENABLED=False`, `analytics_enabled=False`), a theme with system fonts only
(no web font is fetched), no server-side rendering (no node process), no share link. Local: binds the host it is
given (127.0.0.1 by default); the web server's upload cache is the working folder's `.gradio/`, `allowed_paths` is
the working folder alone, and uploads are capped at `max_file_size`.
"""

from __future__ import annotations

import html
import logging
import time
from typing import Any

import gradio as gr

from ..recipes import DEFAULT, MODEL_DEFAULTS, RECIPES
from ..report_html import MONO_FONTS, SYSTEM_FONTS
from . import core

logger = logging.getLogger(__name__)

#: Seconds between two progress updates streamed to the page while a tune run goes.
POLL_SECONDS = 0.25

CSS = """
#ppt-progress progress { width: 100%; height: 1.1rem; accent-color: var(--color-accent); }
.ppt-progress-text { margin-top: .3rem; font-variant-numeric: tabular-nums; }
.ppt-error { color: #b42318; white-space: pre-wrap; }
.ppt-ok { color: #1a7f37; }
.ppt-concept pre { white-space: pre-wrap; font-size: .85rem; margin: .2rem 0 .8rem 0; }
.ppt-note { color: var(--body-text-color-subdued); font-size: .9rem; }
"""


#: The browser's own audio player (the spectrogram below each clip shows what a waveform would): plain <audio>
#: elements, keyboard-accessible, no WebAudio decoding of whole clips in the page.
PLAYER = gr.WaveformOptions(show_recording_waveform=False)
#: No "share" button anywhere: it would upload to a hosting service.
IMAGE_BUTTONS = ["download", "fullscreen"]


def theme() -> gr.themes.Base:
    """Gradio's default look with the system's own fonts: nothing is downloaded to draw the page."""
    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))


def _player(label: str, elem_id: str) -> gr.Audio:
    return gr.Audio(label=label, type="filepath", interactive=False, elem_id=elem_id, waveform_options=PLAYER,
                    buttons=["download"])  # fmt: skip


def _picture(label: str, elem_id: str) -> gr.Image:
    return gr.Image(label=label, type="filepath", interactive=False, elem_id=elem_id, format="png",
                    buttons=IMAGE_BUTTONS)  # fmt: skip


def _status(text: str, ok: bool = False, error: bool = False) -> str:
    cls = "ppt-error" if error else "ppt-ok" if ok else "ppt-note"
    return f"<div class=\"{cls}\" data-error=\"{'1' if error else '0'}\">{html.escape(text)}</div>"


def _error(e: BaseException, state: core.AppState) -> str:
    from .._errors import is_user_error

    if not isinstance(e, core.AppError) and not is_user_error(e):
        logger.exception("request failed")
    return _status(core.user_message(e, state.workdir), error=True)


def _key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or ""


def build(state: core.AppState) -> gr.Blocks:
    """The page: Tune (reference, settings, progress, loss curve, concept file, listen with and without) and
    Concept library (load, inspect, play several together)."""
    recipes = [(f"{r.name}: {r.summary}", r.name) for r in RECIPES.values()]
    builtin = [(c.label, c.key) for c in core.BUILTIN_CLIPS.values()]
    trained = MODEL_DEFAULTS["trained"]
    with gr.Blocks(title="ppt-fast", analytics_enabled=False) as page:
        gr.HTML(
            "<h1 style=\"margin-bottom:0\">ppt-fast: teach MusicGen a concept</h1><p class=\"ppt-note\">Pick a "
            "reference, tune, then listen with and without the concept. Everything stays on this machine: the app "
            f"reads and writes only its working folder <code>{_esc(state.workdir.root)}</code>.</p>"
        )
        with gr.Tab("Tune", id="tune-tab"):
            with gr.Row():
                with gr.Column(scale=3):
                    gr.Markdown("### 1. Reference")
                    with gr.Row():
                        clip = gr.Dropdown(builtin, value="violin", label="built-in clip (made by the package)",
                                           elem_id="builtin-clip", scale=3)  # fmt: skip
                        use_clip = gr.Button("Use this clip", elem_id="use-builtin", scale=1)
                    upload = gr.File(label="or upload a reference (wav, flac, ogg, mp3; about 2 minutes is best)",
                                     file_count="single", type="filepath", elem_id="ref-upload")  # fmt: skip
                    ref_status = gr.HTML(_status("no reference yet"), elem_id="ref-status")
                    ref_audio = _player("reference", "ref-audio")
                    ref_spec = _picture("reference spectrogram", "ref-spec")
                with gr.Column(scale=2):
                    gr.Markdown("### 2. Tune")
                    ident = gr.Textbox("<v1>", label="identifier (the word that names the concept in prompts)",
                                       elem_id="identifier")  # fmt: skip
                    model = gr.Dropdown(list(state.models), value=state.models[0], allow_custom_value=True,
                                        label="model (tiny: the embedded default; or a cached hub id)",
                                        elem_id="model")  # fmt: skip
                    preset = gr.Dropdown(recipes, value=DEFAULT, label="recipe", elem_id="recipe")
                    with gr.Row():
                        ratio = gr.Number(0, label=f"ratio (0: the model's default, {trained.ratio:g} on tiny)",
                                          minimum=0, maximum=1, step=0.0005, elem_id="ratio")  # fmt: skip
                        steps = gr.Number(0, label=f"steps (0: the model's default, {trained.steps} on tiny)",
                                          precision=0, minimum=0, elem_id="steps")  # fmt: skip
                        seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
                    with gr.Row():
                        tune_btn = gr.Button("Tune", variant="primary", elem_id="tune-btn")
                        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
                    progress = gr.HTML(core.progress_html(None), elem_id="tune-progress")
                    loss_img = _picture("loss curve", "loss-plot")
                    concept_file = gr.File(label="concept file", interactive=False, elem_id="concept-file", height=100)
            gr.Markdown("### 3. Listen: the same prompt and seed with the concept and without it")
            with gr.Row():
                prompt = gr.Textbox("a piece of music, <v1>", label="prompt (names the identifier)", scale=3,
                                    elem_id="prompt")  # fmt: skip
                gen_seed = gr.Number(0, label="seed", precision=0, minimum=0, scale=1, elem_id="gen-seed")
                duration = gr.Number(4.0, label="seconds", minimum=0.5, maximum=60, scale=1, elem_id="duration")
                gen_btn = gr.Button("Generate", variant="primary", scale=1, elem_id="generate-btn")
            gen_status = gr.HTML(_status("tune a concept first"), elem_id="gen-status")
            with gr.Row():
                with gr.Column():
                    with_audio = _player("with the concept", "with-audio")
                    with_spec = _picture("spectrogram, with", "with-spec")
                with gr.Column():
                    without_audio = _player("without it (the identifier cut from the prompt)", "without-audio")
                    without_spec = _picture("spectrogram, without", "without-spec")

        with gr.Tab("Concept library", id="library-tab"):
            lib_upload = gr.File(label="load concept files (.ppt)", file_count="multiple", type="filepath",
                                 elem_id="library-upload", height=140)  # fmt: skip
            lib_status = gr.HTML(_status(""), elem_id="library-status")
            with gr.Row():
                with gr.Column(scale=3):
                    lib_list = gr.HTML(core.library_html([]), elem_id="library-list")
                with gr.Column(scale=2):
                    picks = gr.CheckboxGroup([], label="play together", elem_id="library-picks")
                    lib_prompt = gr.Textbox("<v1>, a piece of music", label="prompt", elem_id="library-prompt")
                    lib_model = gr.Dropdown(list(state.models), value=state.models[0], allow_custom_value=True,
                                            label="base model the concepts were tuned on", elem_id="library-model")
                    with gr.Row():
                        lib_seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="library-seed")
                        lib_duration = gr.Number(4.0, label="seconds", minimum=0.5, maximum=60,
                                                 elem_id="library-duration")  # fmt: skip
                    refresh = gr.Button("Refresh the list", elem_id="library-refresh")
                    play_btn = gr.Button("Play together", variant="primary", elem_id="library-play")
                    play_status = gr.HTML(_status(""), elem_id="play-status")
                    together_audio = _player("together", "together-audio")
                    together_spec = _picture("spectrogram", "together-spec")

        # ---- handlers -----------------------------------------------------------------------------------------------
        def show_reference(info: core.ReferenceInfo):
            return _status(f"reference: {info.summary()}", ok=True), info.path, info.spectrogram

        def on_upload(path: str | None, request: gr.Request):
            # The upload field is emptied again each time (the reference is shown below it), ready for another file.
            if path is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            try:
                return (*show_reference(state.use_upload(_key(request), path)), None)
            except Exception as e:
                return _error(e, state), None, None, None

        def on_builtin(key: str, seed_value: Any, request: gr.Request):
            try:
                return show_reference(state.use_builtin(_key(request), key, seed_value or 0))
            except Exception as e:
                return _error(e, state), None, None

        def library_view():
            entries = state.library.entries()
            choices = [(e.label, e.name) for e in entries if not e.error]
            return core.library_html(entries), gr.update(choices=choices)

        def on_tune(identifier, model_name, recipe, ratio_value, steps_value, seed_value, prompt_text,
                    request: gr.Request):  # fmt: skip
            key = _key(request)
            try:
                settings = core.parse_tune_settings(identifier, model_name, recipe, ratio_value, steps_value,
                                                    seed_value, state.models)  # fmt: skip
                job = state.start_tune(key, settings)
            except Exception as e:
                failed = core.JobStatus("failed", message="not started: " + core.user_message(e, state.workdir))
                yield core.progress_html(failed), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            try:
                while not job.status().finished:
                    yield core.progress_html(job.status()), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                    time.sleep(POLL_SECONDS)
                st = job.wait()
                if st.state != "done":
                    yield core.progress_html(st), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                    return
                session = state.session(key)
                session.concept_path, session.concept_model = st.concept_path, settings.model
                from ..identifiers import mentions

                new_prompt = prompt_text if mentions(settings.identifier, prompt_text or "") else \
                    f"a piece of music, {settings.identifier}"  # fmt: skip
                html_list, choices = library_view()
                yield core.progress_html(st), st.loss_png, st.concept_path, new_prompt, html_list, choices
            finally:  # the page went away mid-run: stop the run
                if not job.status().finished:
                    job.cancel()

        def on_cancel(request: gr.Request):
            state.cancel(_key(request))

        def on_generate(prompt_text, seed_value, seconds, model_name, request: gr.Request):
            s = state.session(_key(request))
            try:
                if s.concept_path is None:
                    raise core.AppError("tune a concept first (or play library concepts in the Concept library tab)")
                settings = core.parse_generate_settings(prompt_text, seed_value, seconds)
                t0 = time.perf_counter()
                # the base model the concept was tuned on (the field may have changed since)
                base = s.concept_model or core.check_model(model_name, state.models)
                with_c, without_c = core.generate_pair(state.cache, state.workdir, s.concept_path, settings,
                                                       model=base)  # fmt: skip
                note = _status(f"generated {settings.duration:g} s twice in {time.perf_counter() - t0:.1f} s, seed "
                               f"{settings.seed}: with '{with_c.prompt}' and without: '{without_c.prompt}'; both at "
                               "one loudness gain", ok=True)  # fmt: skip
                return note, with_c.path, with_c.spectrogram, without_c.path, without_c.spectrogram
            except Exception as e:
                return _error(e, state), None, None, None, None

        def on_library_upload(paths, request: gr.Request):
            if not paths:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            added, errors = [], []
            for p in paths if isinstance(paths, list) else [paths]:
                try:
                    added.append(state.library.add_upload(p, max_bytes=state.max_upload_bytes).name)
                except Exception as e:
                    errors.append(core.user_message(e, state.workdir))
            html_list, choices = library_view()
            if errors:
                msg = _status("; ".join(errors) + (f" (loaded: {', '.join(added)})" if added else ""), error=True)
            else:
                msg = _status(f"loaded {', '.join(added)}", ok=True)
            return msg, html_list, choices, None

        def on_pick(chosen):
            entries = {e.name: e for e in state.library.entries()}
            idents = [i for name in chosen or [] if name in entries for i in entries[name].identifiers]
            return core.default_prompt(idents)

        def on_play(chosen, prompt_text, model_name, seed_value, seconds):
            try:
                settings = core.parse_generate_settings(prompt_text, seed_value, seconds)
                t0 = time.perf_counter()
                g = core.play_together(state.cache, state.workdir, list(chosen or []), settings,
                                       model=core.check_model(model_name, state.models))  # fmt: skip
                note = _status(f"played {', '.join(g.concepts)} together: '{g.prompt}', {settings.duration:g} s in "
                               f"{time.perf_counter() - t0:.1f} s", ok=True)  # fmt: skip
                return note, g.path, g.spectrogram
            except Exception as e:
                return _error(e, state), None, None

        upload.upload(on_upload, [upload], [ref_status, ref_audio, ref_spec, upload])
        use_clip.click(on_builtin, [clip, seed], [ref_status, ref_audio, ref_spec])
        tune_btn.click(on_tune, [ident, model, preset, ratio, steps, seed, prompt],
                       [progress, loss_img, concept_file, prompt, lib_list, picks], show_progress="hidden")
        # Cancel runs beside the tune stream (its own event, never queued behind it).
        cancel_btn.click(on_cancel, None, None, concurrency_limit=None, show_progress="hidden")
        gen_btn.click(on_generate, [prompt, gen_seed, duration, model],
                      [gen_status, with_audio, with_spec, without_audio, without_spec])  # fmt: skip
        lib_upload.upload(on_library_upload, [lib_upload], [lib_status, lib_list, picks, lib_upload])
        refresh.click(library_view, None, [lib_list, picks])
        picks.change(on_pick, [picks], [lib_prompt])
        play_btn.click(on_play, [picks, lib_prompt, lib_model, lib_seed, lib_duration],
                       [play_status, together_audio, together_spec])  # fmt: skip
        page.load(library_view, None, [lib_list, picks])
    return page


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def serve(state: core.AppState, *, host: str = "127.0.0.1", port: int | None = None, max_file_size: int | None = None,
          block: bool = True, quiet: bool = True):  # fmt: skip
    """Build the page and start the web server; returns (the Blocks, its local URL). `block=False` returns at once
    (the server runs in a thread until `page.close()`)."""
    page = build(state)
    page.queue(default_concurrency_limit=1)
    _, url, _ = page.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True, quiet=quiet,
        show_error=False, max_file_size=max_file_size or state.max_upload_bytes, allowed_paths=[state.workdir.root],
        ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False, footer_links=[],
        theme=theme(), css=CSS,
    )  # fmt: skip
    state.preload(state.models[0])  # once the server is up: the first generation does not wait for the model
    if block:
        try:
            page.block_thread()
        finally:
            page.close()
    return page, url


__all__ = ["CSS", "POLL_SECONDS", "build", "serve", "theme"]
