"""Small file helpers shared by every atomic writer (concept files, pivot sets, WAVs)."""

from __future__ import annotations

import os
from collections.abc import Callable


def give_default_permissions(tmp_path: str | os.PathLike) -> None:
    """`tempfile.mkstemp` creates 0600 files; before a temporary file is renamed over its destination, give it the
    mode a plain `open(path, "w")` would (0666 minus the umask), so a saved concept or clip is as shareable as any."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    os.chmod(tmp_path, 0o666 & ~mask)


MAGIC = b"PPTFAST-CHECKED\x00v1\n"  # 19 bytes, then the sha256 of the payload, then a torch.save payload


class CorruptFileError(ValueError):
    """A checked file (pretraining checkpoint, default-model weights) is truncated, tampered with or foreign."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Publish a file atomically: `write(tmp)` fills a temporary file in the destination's folder, which is fsynced,
    given default permissions and renamed over `path` (then the folder is fsynced). A crash or an exception leaves
    either the old file or the new one, never half of one, and no temporary file behind."""
    import tempfile

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        give_default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write` of a bytes object."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def save_checked(obj, path: str | os.PathLike) -> str:
    """`torch.save(obj)` behind a magic header and a sha256 of the payload, written atomically; returns the sha256."""
    import hashlib
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).digest()
    atomic_write_bytes(path, MAGIC + digest + payload)
    return digest.hex()


def load_checked(path: str | os.PathLike, what: str, fix: str):
    """Read a file written by :func:`save_checked` (`weights_only` unpickling). A missing magic, a short file or a
    sha256 mismatch raises :class:`CorruptFileError` naming `what` the file is and `fix` (what to do about it)."""
    import hashlib
    import io

    import torch

    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(MAGIC):
        raise CorruptFileError(f"{path} is not a ppt_fast {what} (no ppt_fast header); {fix}")
    digest, payload = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
    if len(digest) < 32 or hashlib.sha256(payload).digest() != digest:
        raise CorruptFileError(
            f"{path}: {what} is corrupted or truncated (sha256 of its {len(payload)}-byte payload does not match "
            f"its header); {fix}"
        )
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
