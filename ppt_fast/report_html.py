"""One self-contained listening page (`report.html`) beside a run's outputs, and the PNGs it shows.

`ppt-fast demo` and `ppt-fast eval --protocol` (and the app) describe what they made as a list of `Section`s (text,
`Clip` players, `Table`s, `Figure`s, `Link`s) and call `write_report`. The contract of the page:

- every string is escaped (`html.escape`); nothing the caller passes becomes markup;
- every file it shows is referenced by a path relative to the page's folder, inside that folder, and must exist when
  the page is written (`ReportError` otherwise), so the folder can be zipped and opened anywhere;
- nothing outside the folder is loaded: no external CSS, script or font (system fonts only), and a
  Content-Security-Policy that forbids any other source.

The PNGs are drawn with matplotlib's object API (`matplotlib.figure.Figure`, never pyplot's global state), so the
app's worker threads can draw them concurrently.
"""

from __future__ import annotations

import html
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Fonts the page asks for: each is found on the reader's machine or skipped; none is downloaded.
SYSTEM_FONTS = ("system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "DejaVu Sans",
                "sans-serif")  # fmt: skip
MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "DejaVu Sans Mono", "monospace")


class ReportError(ValueError):
    """A page that cannot be written as promised: a file it would show is missing, absolute or outside its folder."""


@dataclass(frozen=True)
class Clip:
    """An audio player: `audio` (and `spectrogram`, a PNG) are paths relative to the page's folder."""

    label: str
    audio: str
    spectrogram: str | None = None
    caption: str = ""


@dataclass(frozen=True)
class Table:
    """A table of text cells (already formatted: "0.491 ± 0.015"); no `headers`: a table of rows alone."""

    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    """An image (a path relative to the page's folder) with its caption."""

    image: str
    caption: str = ""


@dataclass(frozen=True)
class Link:
    """A link to a file beside the page (a concept file, the JSON results)."""

    label: str
    path: str
    note: str = ""


Item = str | Clip | Table | Figure | Link | Sequence[Clip]


@dataclass
class Section:
    """A heading and its items in order: a str is a paragraph, a list of `Clip`s is one row of players."""

    title: str
    items: list[Item] = field(default_factory=list)


_CSS = """
:root { color-scheme: light; }
body { font-family: __FONT__; margin: 2rem auto; max-width: 96rem; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem;
  border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
code, .mono { font-family: __MONO__; font-size: .9em; }
.row { display: flex; flex-wrap: wrap; gap: 1rem; margin: .8rem 0; }
.clip { border: 1px solid #d0d7de; border-radius: 6px; padding: .6rem; flex: 1 1 19rem; max-width: 30rem; }
.clip h3 { font-size: 1rem; margin: 0 0 .4rem 0; }
.clip audio { width: 100%; } .clip img, figure img { max-width: 100%; height: auto; display: block; }
.caption, figcaption { color: #57606a; font-size: .9rem; margin-top: .3rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .92rem; max-width: 100%; }
caption { caption-side: bottom; text-align: left; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: .8rem 0; }
""".replace("__FONT__", ", ".join(f'"{f}"' if " " in f else f for f in SYSTEM_FONTS)).replace(
    "__MONO__", ", ".join(f'"{f}"' if " " in f else f for f in MONO_FONTS))  # fmt: skip

# Nothing but the page's own folder: media and images from it ('self'; file: for a page opened from disk), the
# inline style above; no script, no font, no frame, no connection anywhere.
_CSP = "default-src 'none'; img-src 'self' file:; media-src 'self' file:; style-src 'unsafe-inline'; base-uri 'none'"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def relative_path(folder: str | os.PathLike, path: str) -> str:
    """`path` as the page references it: relative to `folder`, inside it, an existing regular file; raise
    ReportError otherwise. Returns it URL-quoted (a space, `#` or `?` percent-encoded, so it stays part of the
    path), not yet HTML-escaped."""
    if not isinstance(path, str) or not path:
        raise ReportError(f"report: a file path must be a non-empty string, got {path!r}")
    if os.path.isabs(path) or "\\" in path or urllib.parse.urlsplit(path).scheme:
        raise ReportError(f"report: {path!r} is not a path relative to the report's folder; write the file beside "
                          "the report and give its relative path (the folder is shared as a whole)")  # fmt: skip
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ReportError(f"report: {path!r} leaves or re-enters the report's folder; give a plain relative path "
                          "such as 'clips/a.wav'")  # fmt: skip
    root = os.path.realpath(folder)
    full = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, full]) != root:
        raise ReportError(f"report: {path!r} resolves outside the report's folder {folder!r} (a symlink?); copy "
                          "the file into the folder")  # fmt: skip
    if not os.path.isfile(full):
        raise ReportError(f"report: {path!r} does not exist in {folder!r}; write it before the report")
    return urllib.parse.quote(path, safe="/")


_NUMBER = re.compile(r"^[-+−]?(\d[\d,]*)?\.?\d+( ± \d*\.?\d+)?( ?(%|×|x|s|ms|KB|MB|KiB|MiB|GiB))?$")


def _num(cell: str) -> bool:
    """A cell that is one number (with an optional ± error and unit): right-aligned."""
    return bool(_NUMBER.match(cell.strip()))


def _text(text: object) -> str:
    """Escaped text; `code` spans (backticks) become <code> and **bold** <strong>, after escaping, so nothing else
    can become markup."""
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(text))
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _render_item(folder: str, item: Item) -> list[str]:
    if isinstance(item, str):
        return [f"<p>{_text(item)}</p>"]
    if isinstance(item, Clip):
        return _render_clips(folder, [item])
    if isinstance(item, Table):
        out = ["<table>"]
        if item.caption:
            out.append(f"<caption class=\"caption\">{_text(item.caption)}</caption>")
        width = len(item.headers) or (len(item.rows[0]) if item.rows else 0)
        if item.headers:
            out.append("<thead><tr>" + "".join(f"<th>{_text(h)}</th>" for h in item.headers) + "</tr></thead>")
        out.append("<tbody>")
        for row in item.rows:
            if len(row) != width:
                raise ReportError(f"report: table row {list(row)!r} has {len(row)} cells for {width} columns")
            out.append("<tr>" + "".join(f"<td class=\"num\">{_esc(c)}</td>" if _num(str(c)) else f"<td>{_text(c)}</td>"
                                        for c in row) + "</tr>")  # fmt: skip
        out.append("</tbody></table>")
        return out
    if isinstance(item, Figure):
        src = _esc(relative_path(folder, item.image))
        cap = f"<figcaption>{_text(item.caption)}</figcaption>" if item.caption else ""
        return [f"<figure><img src=\"{src}\" alt=\"{_esc(item.caption or item.image)}\">{cap}</figure>"]
    if isinstance(item, Link):
        href = _esc(relative_path(folder, item.path))
        note = f" <span class=\"caption\">{_text(item.note)}</span>" if item.note else ""
        return [f"<p><a href=\"{href}\" download>{_esc(item.label)}</a>{note}</p>"]
    if isinstance(item, Sequence) and all(isinstance(c, Clip) for c in item):
        return _render_clips(folder, list(item))
    raise ReportError(f"report: cannot show {type(item).__name__} {item!r}; use str, Clip, Table, Figure or Link")


def _render_clips(folder: str, clips: Sequence[Clip]) -> list[str]:
    out = ["<div class=\"row\">"]
    for c in clips:
        src = _esc(relative_path(folder, c.audio))
        out.append(f"<div class=\"clip\"><h3>{_esc(c.label)}</h3>")
        out.append(f"<audio controls preload=\"auto\" src=\"{src}\"></audio>")
        if c.spectrogram:
            img = _esc(relative_path(folder, c.spectrogram))
            out.append(f"<img src=\"{img}\" alt=\"{_esc('spectrogram: ' + c.label)}\">")
        if c.caption:
            out.append(f"<div class=\"caption\">{_text(c.caption)}</div>")
        out.append("</div>")
    out.append("</div>")
    return out


def render_report(folder: str | os.PathLike, title: str, sections: Sequence[Section], *, intro: str = "") -> str:
    """The page's HTML text; every file it references is checked against `folder` (`relative_path`)."""
    folder = os.fspath(folder)
    body = [f"<h1>{_esc(title)}</h1>"]
    if intro:
        body.append(f"<p>{_text(intro)}</p>")
    for s in sections:
        body.append(f"<section><h2>{_esc(s.title)}</h2>")
        for item in s.items:
            body.extend(_render_item(folder, item))
        body.append("</section>")
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_esc(_CSP)}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(
    folder: str | os.PathLike, title: str, sections: Sequence[Section], *, intro: str = "", name: str = "report.html"
) -> str:
    """Write `render_report(...)` as `folder/name`, atomically; return its path."""
    from ._io import atomic_write_bytes

    path = os.path.join(os.fspath(folder), name)
    atomic_write_bytes(path, render_report(folder, title, sections, intro=intro).encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# PNGs
# ---------------------------------------------------------------------------------------------------------------------
def _mono(audio) -> np.ndarray:
    a = audio.detach().cpu().float().numpy() if hasattr(audio, "detach") else np.asarray(audio, dtype=np.float32)
    while a.ndim > 2:  # [1, C, T]
        a = a[0]
    if a.ndim == 2:
        a = a.mean(axis=0)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"spectrogram: audio must be [T], [C, T] or [1, C, T] with samples, got shape {a.shape}")
    return a.astype(np.float64)


def spectrogram_db(audio, sample_rate: int, *, n_fft: int = 1024, hop: int = 256, floor_db: float = 80.0):
    """(dB magnitudes `[freqs, frames]` relative to the loudest bin, floored at -`floor_db`; frame times in s;
    frequencies in Hz) of the mono mix of `audio`, Hann window."""
    x = _mono(audio)
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    frames = 1 + (x.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft)[None, :], axis=1)).T
    ref = spec.max()
    db = 20 * np.log10(np.maximum(spec, 1e-12) / (ref if ref > 0 else 1.0))
    return np.maximum(db, -floor_db), (np.arange(frames) * hop + n_fft / 2) / sample_rate, np.fft.rfftfreq(
        n_fft, 1 / sample_rate)  # fmt: skip


# An empty band along the top of every PNG: an image viewer's label and buttons (the app's) sit over it, not over the
# title.
_FRAME = (0.0, 0.0, 1.0, 0.9)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> str:
    from ._io import atomic_write

    path = os.fspath(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def spectrogram_png(audio, sample_rate: int, path: str | os.PathLike, *, title: str = "") -> str:
    """Draw the spectrogram of `audio` (`[T]`, `[C, T]` or `[1, C, T]`, tensor or array) as a PNG at `path`."""
    db, times, freqs = spectrogram_db(audio, sample_rate)
    fig = _figure(6.0, 2.4)
    ax = fig.add_subplot(1, 1, 1)
    duration = _mono(audio).size / sample_rate
    im = ax.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=-80, vmax=0,
                   extent=(0.0, max(duration, float(times[-1])), 0.0, float(freqs[-1]) / 1000))  # fmt: skip
    ax.set_xlabel("time (s)")
    ax.set_ylabel("kHz")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="dB", pad=0.01)
    fig.tight_layout(rect=_FRAME)
    return _save(fig, path)


def loss_curves_png(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, *, title: str = "",
                    every: int = 1) -> str:  # fmt: skip
    """Draw one line per named loss curve (and its centred running mean when it is long) as a PNG at `path`; `every`:
    steps per value."""
    fig = _figure(6.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for name, losses in curves.items():
        ys = [float(v) for v in losses]
        if not ys:
            continue
        xs = [every * (i + 1) for i in range(len(ys))]
        line = ax.plot(xs, ys, lw=1, alpha=0.45 if len(ys) > 30 else 1.0, marker="o" if len(ys) <= 30 else None,
                       ms=3, label=name if len(ys) <= 30 else None)[0]  # fmt: skip
        if len(ys) > 30:  # a centred window of 2h + 1 values: a trailing one lags a falling curve and sits above it
            h = max(1, len(ys) // 30)
            smooth = [sum(ys[max(0, i - h) : i + h + 1]) / len(ys[max(0, i - h) : i + h + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=2, color=line.get_color(), label=f"{name} (centred mean of {2 * h + 1})")
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    if title:
        ax.set_title(title, fontsize=9)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout(rect=_FRAME)
    return _save(fig, path)


__all__ = ["Clip", "Figure", "Link", "ReportError", "Section", "Table", "loss_curves_png", "relative_path",
           "render_report", "spectrogram_db", "spectrogram_png", "write_report"]  # fmt: skip
