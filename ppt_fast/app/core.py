"""What the app does, without a UI: its working folder and the names in it, uploads, the built-in reference clips,
tune runs in a worker thread with progress and cancel, generations with and without a concept, the concept library.

Every function here is plain Python (no Gradio), so the unit tests call them without a browser; `ppt_fast.app.ui`
only wires them to the page. The safety contract, for every request:

- the app reads and writes only inside its working folder (`Workdir`): an upload is checked (a regular file, at most
  `max_bytes`) and copied in under a sanitised name (`safe_name`); every path a request leads to is resolved and
  refused (`AppError`) when it leaves the folder (`Workdir.resolve`);
- a model named in the page is a built-in name or one the operator offered at launch (`ppt-fast app --model`); a
  filesystem path typed into the page is refused (`check_model`), so no request makes the app read a folder of the
  operator's disk;
- errors are the library's own messages (AudioError, TuneError, ConceptError, ...), with the working folder's
  absolute path cut out of them (`user_message`); anything else is logged with its traceback and shown as a bug.
"""

from __future__ import annotations

import html
import logging
import os
import re
import shutil
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

logger = logging.getLogger(__name__)

#: Where `ppt-fast app` works when no --workdir is given (relative to the current folder).
DEFAULT_WORKDIR = os.path.join("out", "app")
#: The largest upload accepted, in MB (`ppt-fast app --max-file-size`).
DEFAULT_MAX_UPLOAD_MB = 50.0
#: The longest reference the app accepts (checked from the file's header before its samples are read).
MAX_REFERENCE_SECONDS = 600.0
#: The built-in model names the page offers (any model the operator passes with --model is added).
BUILTIN_MODELS = ("tiny", "tiny-random", "hf-tiny-random")
#: Where each phase of a tune run sits on the progress bar, as (start, end) fractions: the training steps are most
#: of a run's time on every model measured, the sensitivity pass the next largest.
PHASE_SPAN = {"encoding": (0.0, 0.05), "sensitivity": (0.05, 0.25), "selection": (0.25, 0.3),
              "training": (0.3, 1.0), "done": (1.0, 1.0)}  # fmt: skip
_SUBFOLDERS = ("uploads", "builtin", "runs", "library", "generations", ".gradio")


class AppError(ValueError):
    """A request the app refuses; the message names the problem and the fix (the page shows it as it is)."""


# ---------------------------------------------------------------------------------------------------------------------
# Names and the working folder
# ---------------------------------------------------------------------------------------------------------------------
def safe_name(name: str | None, *, default: str = "file", max_length: int = 80) -> str:
    """A file name that is safe to create in a folder: the last component of `name` (any folder part, Windows' too,
    dropped), accents folded to ASCII, every character but letters, digits, `.`, `-` and `_` turned into `_`, no
    leading dot (no hidden files, no `..`), at most `max_length` characters with the extension kept; `default` when
    nothing is left."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._ ") or ""
    base = re.sub(r"_+", "_", base)
    stem, ext = os.path.splitext(base)
    base = stem.strip("_") + ext if stem.strip("_") else base
    if not base or not re.search(r"[A-Za-z0-9]", base):
        base = default
    if len(base) > max_length:
        stem, ext = os.path.splitext(base)
        ext = ext if len(ext) <= 12 else ""
        base = stem[: max_length - len(ext)] + ext
    return base


class Workdir:
    """The app's working folder: the only place a request reads or writes. Subfolders: `uploads/` (references as
    uploaded), `builtin/` (rendered built-in clips), `runs/` (one folder per tune run: concept file, loss curve),
    `library/` (concept files loaded into the library), `generations/` (clips and spectrograms), `.gradio/` (the
    web server's own upload cache)."""

    def __init__(self, root: str | os.PathLike) -> None:
        from .._io import check_writable

        check_writable(root, folder=True)
        os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)
        for sub in _SUBFOLDERS:
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._lock = threading.Lock()
        self._counter = 0

    def contains(self, path: str | os.PathLike) -> bool:
        """Whether `path`, symlinks resolved, is the working folder or inside it."""
        full = os.path.realpath(path)
        return os.path.commonpath([self.root, full]) == self.root

    def resolve(self, path: str | os.PathLike, what: str = "file") -> str:
        """`path` (absolute, or relative to the folder), symlinks resolved; AppError when it leaves the folder."""
        path = os.fspath(path)
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(self.root, path))
        if not self.contains(full):
            raise AppError(f"{what} {os.path.basename(path)!r} is outside the app's working folder; the app reads and "
                           "writes only there (give files through the page's upload fields)")  # fmt: skip
        return full

    def display(self, path: str | os.PathLike) -> str:
        """`path` as the page shows it: relative to the working folder."""
        return os.path.relpath(os.path.realpath(path), self.root)

    def new_path(self, folder: str, name: str) -> str:
        """A path for a new file `name` (sanitised) in the subfolder `folder`, made unique with -2, -3, ..."""
        if folder not in _SUBFOLDERS and not folder.startswith("runs" + os.sep):
            raise AppError(f"no subfolder {folder!r} in the working folder")
        d = self.resolve(os.path.join(self.root, folder), "folder")
        os.makedirs(d, exist_ok=True)
        stem, ext = os.path.splitext(safe_name(name))
        with self._lock:
            for i in range(1, 10_000):
                candidate = os.path.join(d, f"{stem}{'' if i == 1 else f'-{i}'}{ext}")
                if not os.path.lexists(candidate):
                    open(candidate, "wb").close()  # claimed now: a concurrent request picks the next name
                    return candidate
        raise AppError(f"too many files named {name!r} in {folder}/: remove some")

    def new_folder(self, parent: str, name: str) -> str:
        """A new, empty folder `parent/<name>-<time>-<n>` (the name sanitised; n counts up past existing ones)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        with self._lock:
            for _ in range(10_000):
                self._counter += 1
                path = self.resolve(os.path.join(self.root, parent, f"{safe_name(name)}-{stamp}-{self._counter}"))
                try:
                    os.makedirs(path, exist_ok=False)
                    return path
                except FileExistsError:  # another app on the same folder took it
                    continue
        raise AppError(f"cannot make a new folder in {parent}/: remove old ones")


def user_message(e: BaseException, workdir: Workdir | None = None) -> str:
    """The page's text for an error: the library's own message (it names the problem and the fix), with the working
    folder's absolute path cut out; for an unexpected error, its type and a note that it is a bug (what `ppt-fast`
    calls bad input and what a bug is the same rule: `ppt_fast._errors.is_user_error`)."""
    from .._errors import is_user_error

    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if workdir is not None:
        text = text.replace(workdir.root + os.sep, "").replace(workdir.root, ".")
    text = " ".join(text.split())
    if isinstance(e, AppError) or is_user_error(e):
        return text or type(e).__name__
    return f"unexpected error ({type(e).__name__}: {text}); this is a bug: the app's log has the traceback"


# ---------------------------------------------------------------------------------------------------------------------
# Uploads and references
# ---------------------------------------------------------------------------------------------------------------------
def import_upload(src: str | os.PathLike | None, workdir: Workdir, *, max_bytes: int, folder: str = "uploads",
                  name: str | None = None) -> str:  # fmt: skip
    """Copy the uploaded file `src` (which the web server put in the working folder's upload cache) into
    `workdir/folder/` under its sanitised name (`name`, default the upload's own); return the new path. AppError when
    no file came, when it is no regular file inside the working folder, or when it is larger than `max_bytes`."""
    if src is None or (isinstance(src, str) and not src.strip()):
        raise AppError("no file was uploaded: choose a file first")
    src = workdir.resolve(os.fspath(src), "upload")
    shown = safe_name(name or os.path.basename(src))
    if not os.path.isfile(src):
        raise AppError(f"upload {shown!r} is not a regular file: upload an audio file (wav, flac, ogg, mp3)")
    size = os.path.getsize(src)
    if size > max_bytes:
        raise AppError(f"upload {shown!r} is {size / 1e6:.1f} MB; the app accepts files up to {max_bytes / 1e6:g} MB "
                       "(cut the part to learn, about 2 minutes works best, or start the app with --max-file-size)")
    if size == 0:
        raise AppError(f"upload {shown!r} is empty (0 bytes): upload the file again")
    dest = workdir.new_path(folder, shown)
    shutil.copyfile(src, dest)
    return dest


@dataclass(frozen=True)
class ReferenceInfo:
    """A checked reference clip inside the working folder, and its spectrogram PNG beside it."""

    path: str
    name: str  # as the page shows it (relative to the working folder)
    seconds: float
    sample_rate: int
    channels: int
    spectrogram: str | None = None

    def summary(self) -> str:
        ch = "mono" if self.channels == 1 else f"{self.channels} channels"
        return f"{self.name}: {self.seconds:.1f} s, {self.sample_rate} Hz, {ch}"


def check_reference(path: str, workdir: Workdir, *, spectrogram: bool = True) -> ReferenceInfo:
    """Read and check a reference inside the working folder the way `tune()` will (`audio.read_audio`: a format
    libsndfile reads, at most MAX_REFERENCE_SECONDS; `reference.check_audio`: finite, not silent, long enough), and
    draw its spectrogram beside it; the library's AudioError otherwise."""
    from ..audio import read_audio
    from ..reference import check_audio
    from ..report_html import spectrogram_png

    path = workdir.resolve(path, "reference")
    audio, sr = read_audio(path, max_seconds=MAX_REFERENCE_SECONDS)
    name = workdir.display(path)
    check_audio(audio, sr, repr(name))
    png = None
    if spectrogram:
        png = spectrogram_png(audio, sr, os.path.splitext(path)[0] + ".png",
                              title=f"reference: {os.path.basename(path)}")  # fmt: skip
    return ReferenceInfo(path, name, audio.shape[-1] / sr, sr, int(audio.shape[0]), png)


@dataclass(frozen=True)
class BuiltinClip:
    """A reference clip the package makes itself: a soundfont rendering of one of the instruments the default model
    never heard (as `ppt-fast demo` makes its violin), or a synthetic timbre (`audio.synth_reference`; no renderer)."""

    key: str
    label: str
    instrument: str | None = None  # rendered (ppt_fast.tiny.pretrain.render_clip)
    timbre: str | None = None  # synthetic (ppt_fast.audio.synth_reference)


BUILTIN_CLIPS: dict[str, BuiltinClip] = {
    c.key: c
    for c in (
        BuiltinClip("violin", "violin, rendered (held out of the default model's training; the demo's clip)",
                    instrument="violin"),  # fmt: skip
        BuiltinClip("marimba", "marimba, rendered (held out)", instrument="marimba"),
        BuiltinClip("trumpet", "trumpet, rendered (held out)", instrument="trumpet"),
        BuiltinClip("nylon_guitar", "nylon guitar, rendered (held out)", instrument="nylon_guitar"),
        BuiltinClip("pluck", "synthetic plucked string", timbre="pluck"),
        BuiltinClip("organ", "synthetic organ", timbre="organ"),
        BuiltinClip("bell", "synthetic bell", timbre="bell"),
    )
}
BUILTIN_SECONDS = 30.0
_SAMPLE_RATE = 16000


def make_builtin_clip(key: str, workdir: Workdir, *, seed: int = 0, seconds: float = BUILTIN_SECONDS) -> str:
    """Write the built-in clip `key` (a `BUILTIN_CLIPS` key) for `seed` into `workdir/builtin/` (once: reused after)
    and return its path. The violin of seed s is the `ppt-fast demo --seed s` reference."""
    from ..audio import synth_reference, write_wav

    clip = BUILTIN_CLIPS.get(key)
    if clip is None:
        raise AppError(f"no built-in clip {key!r}; choose one of {', '.join(BUILTIN_CLIPS)}")
    seed = _whole(seed, "seed", 0, 2**31 - 1)
    path = workdir.resolve(os.path.join("builtin", f"{key}-seed{seed}-{seconds:g}s.wav"))
    if os.path.isfile(path):
        return path
    if clip.instrument is not None:
        try:
            from ..tiny.pretrain import clip_seed, render_clip

            audio = render_clip(clip.instrument, clip_seed(clip.instrument, seed, 400_000), seconds, _SAMPLE_RATE)
        except (ImportError, RuntimeError, FileNotFoundError) as e:
            raise AppError(f"cannot render the {clip.instrument} clip ({e}): the soundfont renderer needs "
                           "`pip install --no-deps tinysoundfont==0.3.7` and pretty_midi; or choose a synthetic "
                           "clip") from e  # fmt: skip
        audio = audio.view(1, -1)
    else:
        audio = synth_reference(seconds, _SAMPLE_RATE, seed=seed, timbre=clip.timbre)
    return write_wav(path, audio, _SAMPLE_RATE, normalize=None)  # as made: what the tune reads


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------
def _whole(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or value is None:
        raise AppError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise AppError(f"{name} must be a whole number in [{low}, {high}], got {value!r}") from None
    if f != f or f != int(f) or not low <= f <= high:
        raise AppError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    return int(f)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def check_model(name: Any, offered: Sequence[str] = BUILTIN_MODELS) -> str:
    """The model a request names: one of `offered` (the built-in names and what the operator passed at launch), or a
    name that is no filesystem path (a cached hub id such as `facebook/musicgen-small`, which `load_model` finds in
    the local Hugging Face cache, offline). A path typed into the page is refused: the app reads nothing a request
    names outside its working folder."""
    name = name.strip() if isinstance(name, str) else name
    if not name or not isinstance(name, str):
        raise AppError(f"choose a model: {', '.join(offered)}, or a cached hub id such as facebook/musicgen-small")
    if name in offered:
        return name
    bare = name[3:] if name.startswith("hf:") else name
    if os.path.isabs(bare) or bare.startswith(("~", ".")) or bare.endswith(".pt") or os.path.exists(bare):
        raise AppError(f"model {name!r} is a path on this machine; the page may name only the offered models and "
                       f"cached hub ids: start the app with `ppt-fast app --model {name}` to offer it")  # fmt: skip
    return name


@dataclass(frozen=True)
class TuneSettings:
    """What a tune run is asked for in the page (None: the model's default, `recipes.MODEL_DEFAULTS`)."""

    identifier: str = "<v1>"
    model: str = "tiny"
    preset: str = "ppt"
    ratio: float | None = None
    steps: int | None = None
    seed: int = 0


def parse_tune_settings(identifier: Any, model: Any, preset: Any, ratio: Any, steps: Any, seed: Any,
                        offered: Sequence[str] = BUILTIN_MODELS) -> TuneSettings:  # fmt: skip
    """The page's fields as TuneSettings, each checked (AppError / the library's ValueError naming the field)."""
    from ..identifiers import check_identifier
    from ..recipes import RECIPES

    identifier = identifier.strip() if isinstance(identifier, str) else identifier
    check_identifier(identifier)
    if preset not in RECIPES:
        raise AppError(f"recipe {preset!r} is not one of {', '.join(RECIPES)}")
    r = None
    if not _blank(ratio):
        try:
            r = float(ratio)
        except (TypeError, ValueError):
            raise AppError(f"ratio must be a number in (0, 1], got {ratio!r}") from None
        r = None if r == 0 else r  # 0 (the page's empty number field): the model's default
        if r is not None and not 0 < r <= 1:
            raise AppError(f"ratio must be a fraction in (0, 1] of the entries in the recipe's scope (0.001 = "
                           f"0.1 %), got {ratio!r}; leave it empty for the model's default")  # fmt: skip
    n = None if _blank(steps) or steps == 0 else _whole(steps, "steps", 1, 100_000)  # 0: the model's default
    return TuneSettings(identifier, check_model(model, offered), preset, r, n, _whole(seed, "seed", 0, 2**31 - 1))


# ---------------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------------
PHASE_LABELS = {"encoding": "encoding the reference", "sensitivity": "sensitivity pass",
                "selection": "choosing the pivots", "training": "training", "done": "done"}  # fmt: skip


def format_seconds(s: float | None) -> str:
    """"0.4 s", "12 s", "2 min 05 s"; "?" for None."""
    if s is None or s != s:
        return "?"
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s"


def progress_fraction(p: Any) -> float:
    """Where a `tuning.TuneProgress` sits on the whole run's bar, in [0, 1] (`PHASE_SPAN`)."""
    if p is None:
        return 0.0
    lo, hi = PHASE_SPAN.get(p.phase, (0.0, 0.0))
    part = min(max(p.step / p.total, 0.0), 1.0) if p.total else 1.0
    return lo + (hi - lo) * part


def format_progress(p: Any) -> str:
    """One line for a `tuning.TuneProgress`: phase, step of total, loss, time so far and the phase's time left."""
    if p is None:
        return "starting (loading the model)"
    label = PHASE_LABELS.get(p.phase, p.phase)
    if p.phase == "done":
        loss = f", last loss {p.loss:.3f}" if p.loss is not None else ""
        return f"done in {format_seconds(p.elapsed)}{loss}"
    unit = {"encoding": "clip", "sensitivity": "batch", "training": "step"}.get(p.phase)
    parts = [f"{label}: {unit} {p.step} of {p.total}" if unit else label]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.3f}")
    parts.append(f"{format_seconds(p.elapsed)} elapsed")
    if p.eta is not None:
        parts.append(f"about {format_seconds(p.eta)} left in this phase")
    return " · ".join(parts)


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of a tune run: `state` running | done | cancelled | failed; the last progress report; the training
    losses so far; the message to show; the concept file and loss-curve PNG once done."""

    state: str
    progress: Any = None
    losses: tuple[float, ...] = ()
    message: str = ""
    concept_path: str | None = None
    loss_png: str | None = None
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state != "running"


def progress_html(status: JobStatus | None) -> str:
    """The progress bar and its line as HTML (every string escaped): a `<progress>` whose value is the run's
    fraction (`progress_fraction`), `data-state` and `data-phase` for tests and styling."""
    if status is None:
        return ("<div id=\"ppt-progress\" data-state=\"idle\" data-phase=\"\"><progress value=\"0\" max=\"1\">"
                "</progress><div class=\"ppt-progress-text\">not started</div></div>")  # fmt: skip
    p = status.progress
    frac = 1.0 if status.state == "done" else progress_fraction(p)
    text = format_progress(p) if status.state == "running" else status.message
    phase = p.phase if p is not None else ""
    cls = " ppt-error" if status.state == "failed" else ""
    return (f"<div id=\"ppt-progress\" data-state=\"{html.escape(status.state)}\" data-phase=\"{html.escape(phase)}\""
            f" data-step=\"{p.step if p is not None else 0}\"><progress value=\"{frac:.4f}\" max=\"1\"></progress>"
            f"<div class=\"ppt-progress-text{cls}\">{html.escape(text)}</div></div>")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Tune runs
# ---------------------------------------------------------------------------------------------------------------------
class TuneJob:
    """One tune run in a worker thread: `tune(..., progress=...)` with the page's settings, writing the concept file
    and the loss curve into its run folder. `cancel()` makes the next progress report raise `TuneCancelled` (the run
    stops within a step or a sensitivity batch, the model is left as it was and nothing is written); `status()` is a
    snapshot the page polls."""

    def __init__(self, reference: str, settings: TuneSettings, run_dir: str, *, workdir: Workdir | None = None,
                 tune: Callable[..., Any] | None = None) -> None:  # fmt: skip
        self.reference = reference
        self.workdir = workdir
        self.settings = settings
        self.run_dir = run_dir
        self.concept_path = os.path.join(run_dir, safe_name(settings.identifier, default="concept") + ".ppt")
        self._tune = tune
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._status = JobStatus("running")
        self._losses: list[float] = []
        self._thread = threading.Thread(target=self._run, name=f"ppt-fast tune {settings.identifier}", daemon=True)
        self._t0 = 0.0

    def start(self) -> TuneJob:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def cancel(self) -> bool:
        """Ask the run to stop; False when it had already finished."""
        if self._status.finished:
            return False
        self._cancel.set()
        return True

    def status(self) -> JobStatus:
        with self._lock:
            return replace(self._status, losses=tuple(self._losses),
                           seconds=time.perf_counter() - self._t0 if self._t0 else 0.0)  # fmt: skip

    def wait(self, timeout: float | None = None) -> JobStatus:
        self._thread.join(timeout)
        return self.status()

    def _progress(self, p: Any) -> None:
        from ..tuning import TuneCancelled

        with self._lock:
            if p.phase == "training" and p.loss is not None and p.step > len(self._losses):
                self._losses.append(float(p.loss))
            self._status = replace(self._status, progress=p)
        if self._cancel.is_set():
            raise TuneCancelled(f"cancelled from the page during {PHASE_LABELS.get(p.phase, p.phase)}")

    def _finish(self, **kw: Any) -> None:
        with self._lock:
            self._status = replace(self._status, **kw)

    def _run(self) -> None:
        from ..report_html import loss_curves_png
        from ..tuning import TuneCancelled

        s = self.settings
        try:
            tune = self._tune
            if tune is None:
                import ppt_fast

                tune = ppt_fast.tune
            tune(self.reference, model=s.model, identifier=s.identifier, preset=s.preset, ratio=s.ratio,
                 steps=s.steps, seed=s.seed, verbose=False, progress=self._progress, out=self.concept_path)  # fmt: skip
            png = loss_curves_png({s.identifier: self._losses}, os.path.join(self.run_dir, "loss.png"),
                                  title=f"tuning {s.identifier} on {s.model} ({s.preset})")  # fmt: skip
            took = time.perf_counter() - self._t0
            last = f", last loss {self._losses[-1]:.3f}" if self._losses else ""
            self._finish(state="done", concept_path=self.concept_path, loss_png=png,
                         message=f"done: {len(self._losses)} steps in {format_seconds(took)}{last}; concept file "
                         f"{os.path.basename(self.concept_path)} ({os.path.getsize(self.concept_path) / 1024:.1f} KiB)")
        except TuneCancelled:
            took = time.perf_counter() - self._t0
            at = self._status.progress
            where = f" at {PHASE_LABELS.get(at.phase, at.phase)} {at.step} of {at.total}" if at is not None else ""
            self._finish(state="cancelled", message=f"cancelled{where} after {format_seconds(took)}: the model is "
                         "unchanged and no concept file was written")  # fmt: skip
        except BaseException as e:  # shown in the page; a bug is logged with its traceback too
            from .._errors import is_user_error

            if not is_user_error(e):
                logger.exception("tune run %s failed", self.run_dir)
            self._finish(state="failed", message="failed: " + user_message(e, self.workdir))


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------
class ModelCache:
    """Base models for generation, loaded once per name; `use(name)` holds the model's lock while a request applies
    concepts to it (generate() applies and removes them, so one request at a time per model)."""

    def __init__(self, loader: Callable[[str], Any] | None = None) -> None:
        self._loader = loader
        self._models: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(name, threading.Lock())

    def get(self, name: str) -> Any:
        """The loaded model `name` (loads it the first time; call under `lock(name)`)."""
        if name not in self._models:
            loader = self._loader
            if loader is None:
                import ppt_fast

                loader = ppt_fast.load_model
            self._models[name] = loader(name)
        return self._models[name]


def strip_identifiers(prompt: str, identifiers: Sequence[str]) -> str:
    """`prompt` without `identifiers` (whole tokens, `identifiers.token_pattern`) and the punctuation left around
    them: the prompt of the clip without the concept."""
    from ..identifiers import clean_prompt, token_pattern

    for ident in identifiers:
        prompt = token_pattern(ident).sub(" ", prompt)
    return clean_prompt(prompt)


@dataclass(frozen=True)
class Generated:
    """A generated clip in the working folder, its spectrogram, and what made it."""

    path: str
    spectrogram: str
    prompt: str
    concepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerateSettings:
    prompt: str
    seed: int = 0
    duration: float = 4.0


def parse_generate_settings(prompt: Any, seed: Any, duration: Any) -> GenerateSettings:
    from ..generation import MAX_DURATION

    if not isinstance(prompt, str) or not prompt.strip():
        raise AppError("write a prompt, e.g. 'a piece of music, <v1>'")
    if _blank(duration):
        raise AppError("duration must be a number of seconds")
    try:
        d = float(duration)
    except (TypeError, ValueError):
        raise AppError(f"duration must be a number of seconds, got {duration!r}") from None
    limit = min(MAX_DURATION, 60.0)
    if not 0.5 <= d <= limit:
        raise AppError(f"duration must be between 0.5 and {limit:g} seconds in the app, got {duration!r}")
    return GenerateSettings(" ".join(prompt.split()), _whole(seed, "seed", 0, 2**31 - 1), d)


def _write_clips(clips: Sequence[Any], paths: Sequence[str], sample_rate: int, titles: Sequence[str]) -> list[str]:
    """Write `clips` at one loudness gain (their levels compare: -14 LUFS over all of them, as `ppt-fast demo`) and
    a spectrogram PNG beside each; return the PNG paths."""
    import torch

    from ..audio import loudness_normalize, write_wav
    from ..report_html import spectrogram_png

    joined = torch.cat([c.reshape(c.shape[-2] if c.dim() > 1 else 1, -1) for c in clips], -1)
    _, report = loudness_normalize(joined, sample_rate)
    pngs = []
    for clip, path, title in zip(clips, paths, titles):
        write_wav(path, clip * report.gain, sample_rate, normalize=None)
        pngs.append(spectrogram_png(clip, sample_rate, os.path.splitext(path)[0] + ".png", title=title))
    return pngs


def _check_named(prompt: str, concepts: Sequence[Any]) -> None:
    from ..identifiers import mentions

    for c in concepts:
        if not any(mentions(i, prompt) for i in c.identifiers):
            raise AppError(f"the prompt {prompt!r} does not name {', '.join(c.identifiers)}: write the identifier "
                           f"into it (e.g. '{c.identifiers[0]}, a piece of music') so the concept is played")


def generate_pair(models: ModelCache, workdir: Workdir, concept_path: str, settings: GenerateSettings, *,
                  model: str) -> tuple[Generated, Generated]:  # fmt: skip
    """The same prompt and seed with the concept and without it (the prompt's identifiers cut: the base model does
    not know them), written at one gain into a new `generations/` folder, each with its spectrogram."""
    from ..concept import load_concepts

    concept_path = workdir.resolve(concept_path, "concept file")
    concepts = load_concepts(concept_path)
    _check_named(settings.prompt, concepts)
    idents = [i for c in concepts for i in c.identifiers]
    plain = strip_identifiers(settings.prompt, idents) or "a piece of music"
    out = workdir.new_folder("generations", "pair")
    with models.lock(model):
        import ppt_fast

        base = models.get(model)
        kw = dict(model=base, duration=settings.duration, seed=settings.seed, resample_silent=2)
        a = ppt_fast.generate([settings.prompt], concepts=concepts, **kw)
        b = ppt_fast.generate([plain], **kw)
    paths = [os.path.join(out, "with_concept.wav"), os.path.join(out, "without_concept.wav")]
    pngs = _write_clips([a[0], b[0]], paths, base.sample_rate,
                        [f"with {', '.join(idents)}: {settings.prompt}", f"without: {plain}"])  # fmt: skip
    return (Generated(paths[0], pngs[0], settings.prompt, tuple(idents)), Generated(paths[1], pngs[1], plain))


def play_together(models: ModelCache, workdir: Workdir, concept_paths: Sequence[str], settings: GenerateSettings, *,
                  model: str) -> Generated:  # fmt: skip
    """`generate([prompt], concepts=[c1, c2, ...])`: several library concepts at once (the prompt names each)."""
    from ..concept import load_concepts

    if not concept_paths:
        raise AppError("choose one or more concepts from the library to play")
    concepts = [c for p in concept_paths for c in load_concepts(workdir.resolve(p, "concept file"))]
    _check_named(settings.prompt, concepts)
    out = workdir.new_folder("generations", "together")
    with models.lock(model):
        import ppt_fast

        base = models.get(model)
        a = ppt_fast.generate([settings.prompt], model=base, concepts=concepts, duration=settings.duration,
                              seed=settings.seed, resample_silent=2)  # fmt: skip
    idents = tuple(i for c in concepts for i in c.identifiers)
    path = os.path.join(out, "together.wav")
    (png,) = _write_clips([a[0]], [path], base.sample_rate, [f"{', '.join(idents)}: {settings.prompt}"])
    return Generated(path, png, settings.prompt, idents)


def default_prompt(identifiers: Sequence[str], text: str = "a piece of music") -> str:
    """`"<v1>, <v2>, a piece of music"`: every identifier, then the text."""
    return ", ".join([*identifiers, text]) if identifiers else text


# ---------------------------------------------------------------------------------------------------------------------
# The concept library
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LibraryEntry:
    """A concept file in the working folder (`library/` or a tune run's folder) and what it holds."""

    path: str
    name: str  # relative to the working folder
    identifiers: tuple[str, ...]
    model: str | None
    lines: tuple[str, ...]  # `ppt-fast concept info`'s lines (concept.describe_concept)
    size: int
    error: str | None = None  # the file could not be read: why

    @property
    def label(self) -> str:
        if self.error:
            return f"{self.name} (unreadable)"
        return f"{', '.join(self.identifiers)} — {self.name} ({self.model or '?'})"


class Library:
    """The concept files of the working folder: those loaded through the page (`library/`) and those tuned in it
    (`runs/*/`). Reads are cached by (size, mtime)."""

    def __init__(self, workdir: Workdir) -> None:
        self.workdir = workdir
        self._cache: dict[str, tuple[tuple[int, float], LibraryEntry]] = {}
        self._lock = threading.Lock()

    def add_upload(self, src: str, *, max_bytes: int) -> LibraryEntry:
        """Copy an uploaded concept file into `library/` and read it (ConceptError, and the copy removed, when it
        is no concept file)."""
        from ..concept import load_concepts

        dest = import_upload(src, self.workdir, max_bytes=max_bytes, folder="library")
        try:
            load_concepts(dest)
        except BaseException:
            os.remove(dest)
            raise
        return self.entry(dest)

    def entry(self, path: str) -> LibraryEntry:
        from ..concept import describe_concept, load_concepts

        path = self.workdir.resolve(path, "concept file")
        st = os.stat(path)
        key = (st.st_size, st.st_mtime)
        with self._lock:
            hit = self._cache.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        name = self.workdir.display(path)
        try:
            concepts = load_concepts(path)
            lines = [line for c in concepts for line in describe_concept(c, name)]
            lines.append(f"{st.st_size:,} bytes")
            idents = tuple(i for c in concepts for i in c.identifiers)
            models = {str(c.meta.get("model")) for c in concepts if c.meta.get("model") is not None}
            entry = LibraryEntry(path, name, idents, ", ".join(sorted(models)) or None, tuple(lines), st.st_size)
        except Exception as e:  # listed, with the library's reason, instead of hiding the file
            entry = LibraryEntry(path, name, (), None, (), st.st_size, error=user_message(e, self.workdir))
        with self._lock:
            self._cache[path] = (key, entry)
        return entry

    def entries(self) -> list[LibraryEntry]:
        """Every concept file, newest first."""
        root = self.workdir.root
        found = []
        for folder, pattern in (("library", None), ("runs", "*")):
            base = os.path.join(root, folder)
            dirs = [base] if pattern is None else [os.path.join(base, d) for d in sorted(os.listdir(base))]
            for d in dirs:
                if not os.path.isdir(d):
                    continue
                for f in os.listdir(d):
                    p = os.path.join(d, f)
                    if f.endswith(".ppt") and os.path.isfile(p) and os.path.getsize(p) > 0:
                        found.append(p)
        found.sort(key=lambda p: os.path.getmtime(p), reverse=True)
        return [self.entry(p) for p in found]


def library_html(entries: Sequence[LibraryEntry]) -> str:
    """The library as HTML (every string escaped): one block per file with what `ppt-fast concept info` prints."""
    if not entries:
        return ("<div id=\"ppt-library\" data-count=\"0\"><p>No concept files yet: tune one, or load .ppt files "
                "above.</p></div>")  # fmt: skip
    out = [f"<div id=\"ppt-library\" data-count=\"{len(entries)}\">"]
    for e in entries:
        out.append(f"<div class=\"ppt-concept\" data-identifiers=\"{html.escape(' '.join(e.identifiers))}\">")
        out.append(f"<strong>{html.escape(e.label)}</strong>")
        body = e.error if e.error else "\n".join(e.lines)
        out.append(f"<pre class=\"{'ppt-error' if e.error else ''}\">{html.escape(body)}</pre></div>")
    out.append("</div>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# The app's state
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Session:
    """One browser tab's state: its reference, its tune run, its last concept."""

    reference: ReferenceInfo | None = None
    job: TuneJob | None = None
    concept_path: str | None = None
    concept_model: str | None = None  # the base model it was tuned on


@dataclass
class AppState:
    """Everything the app holds: the working folder, the upload limit, the offered models, the base models for
    generation, the library, and the sessions (keyed by the web server's session id)."""

    workdir: Workdir
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6)
    models: tuple[str, ...] = BUILTIN_MODELS
    cache: ModelCache = field(default_factory=ModelCache)
    sessions: dict[str, Session] = field(default_factory=dict)
    library: Library | None = None

    def __post_init__(self) -> None:
        if self.library is None:
            self.library = Library(self.workdir)
        self._lock = threading.Lock()

    def session(self, key: str | None) -> Session:
        with self._lock:
            return self.sessions.setdefault(key or "", Session())

    def use_upload(self, key: str | None, src: str | None) -> ReferenceInfo:
        path = import_upload(src, self.workdir, max_bytes=self.max_upload_bytes)
        try:
            info = check_reference(path, self.workdir)
        except BaseException:
            os.remove(path)  # a refused upload is not kept
            raise
        self.session(key).reference = info
        return info

    def use_builtin(self, key: str | None, clip: str, seed: Any = 0) -> ReferenceInfo:
        info = check_reference(make_builtin_clip(clip, self.workdir, seed=seed), self.workdir)
        self.session(key).reference = info
        return info

    def start_tune(self, key: str | None, settings: TuneSettings, *, tune: Callable[..., Any] | None = None) -> TuneJob:
        s = self.session(key)
        if s.reference is None:
            raise AppError("choose a reference first: upload a clip or pick a built-in one")
        if s.job is not None and not s.job.status().finished:
            raise AppError("a tune run is already going in this tab: wait for it or cancel it")
        run_dir = self.workdir.new_folder("runs", settings.identifier)
        s.job = TuneJob(s.reference.path, settings, run_dir, workdir=self.workdir, tune=tune).start()
        return s.job

    def preload(self, model: str) -> threading.Thread:
        """Load `model` for generation in a background thread (a failure is logged; the request that needs the
        model then reports it)."""

        def load() -> None:
            try:
                with self.cache.lock(model):
                    self.cache.get(model)
            except Exception:
                logger.warning("could not preload model %r", model, exc_info=True)

        t = threading.Thread(target=load, name=f"ppt-fast preload {model}", daemon=True)
        t.start()
        return t

    def cancel(self, key: str | None) -> bool:
        job = self.session(key).job
        return job.cancel() if job is not None else False
