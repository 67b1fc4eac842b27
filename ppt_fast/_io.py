"""Small file helpers shared by every atomic writer (concept files, pivot sets, WAVs)."""

from __future__ import annotations

import os


def give_default_permissions(tmp_path: str | os.PathLike) -> None:
    """`tempfile.mkstemp` creates 0600 files; before a temporary file is renamed over its destination, give it the
    mode a plain `open(path, "w")` would (0666 minus the umask), so a saved concept or clip is as shareable as any."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    os.chmod(tmp_path, 0o666 & ~mask)
