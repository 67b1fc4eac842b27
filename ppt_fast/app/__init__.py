"""`ppt-fast app`: a local web page to tune a concept and listen to it (Gradio; `pip install 'ppt_fast[app]'`).

- `core`: everything the app does, as plain functions and classes (the working folder and its sanitised names,
  uploads, built-in reference clips, tune runs in a worker thread with progress and cancel, generations with and
  without a concept, the concept library). No Gradio: the unit tests use it without a browser.
- `ui`: the page (the only module that imports gradio), imported by `launch`.

`import ppt_fast` and `import ppt_fast.app` never import gradio; `launch` does, after setting what keeps Gradio
offline (`GRADIO_ANALYTICS_ENABLED=False`) and its upload cache inside the working folder (`GRADIO_TEMP_DIR`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .core import (
    BUILTIN_MODELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_WORKDIR,
    AppError,
    AppState,
    Workdir,
)

#: pip's name of what `launch` needs, for the error when it is missing.
GRADIO_REQUIREMENT = "gradio==6.31.0"


def require_gradio() -> None:
    """ImportError naming the fix when Gradio is not installed."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ImportError(f"`ppt-fast app` needs Gradio: pip install 'ppt_fast[app]' ({GRADIO_REQUIREMENT})",
                          name="gradio")  # fmt: skip


def make_state(workdir: str = DEFAULT_WORKDIR, *, max_file_size_mb: float = DEFAULT_MAX_UPLOAD_MB,
               models: Sequence[str] = ()) -> AppState:  # fmt: skip
    """The app's state: its working folder (created), the upload limit, the models the page offers (the built-in
    names, then `models`, which the operator may give as paths)."""
    if not max_file_size_mb > 0:
        raise AppError(f"--max-file-size must be a positive number of MB, got {max_file_size_mb!r}")
    offered = tuple(dict.fromkeys([*BUILTIN_MODELS, *models]))
    return AppState(Workdir(workdir), max_upload_bytes=int(max_file_size_mb * 1e6), models=offered)


def launch(workdir: str = DEFAULT_WORKDIR, *, host: str = "127.0.0.1", port: int | None = None,
           max_file_size_mb: float = DEFAULT_MAX_UPLOAD_MB, models: Sequence[str] = (), block: bool = True,
           quiet: bool = True):  # fmt: skip
    """Start the app on `host`:`port` (None: Gradio's first free port from 7860); returns (the Gradio Blocks, its
    URL). `block=False` returns once the server is up (stop it with `.close()`)."""
    require_gradio()
    state = make_state(workdir, max_file_size_mb=max_file_size_mb, models=models)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(state.workdir.root, ".gradio")
    from . import ui

    return ui.serve(state, host=host, port=port, block=block, quiet=quiet)


__all__ = ["GRADIO_REQUIREMENT", "AppError", "AppState", "Workdir", "launch", "make_state", "require_gradio"]
