"""Small file helpers shared by every writer of results (concept files, pivot sets, WAVs, checkpoints, caches).

Contract of a write (`atomic_write`): the destination is replaced whole or not at all, only ever a regular file (or
the regular file a symlink points to), and no temporary file outlives the save that made it, even a killed one (the
next save of the same file removes it). `check_writable` finds an output that cannot be written in a moment, so a long
job can refuse it before it starts instead of failing at the end.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: A temporary file of ours left this long (by mtime) is removed whoever made it: no save takes a day, and a name
#: whose pid cannot be checked here (another host, an older ppt_fast) is otherwise never provably abandoned.
STALE_TMP_SECONDS = 24 * 3600
_TMP_SUFFIX = ".tmp"


class UnwritablePathError(OSError, ValueError):
    """An output path that cannot be written: not a regular file (a device, FIFO, socket, directory, dangling or
    non-regular symlink), under a regular file, or in a folder where no file can be created. The message names the
    path and the fix. An OSError (callers that turn write failures into their own errors still do) and a ValueError
    (it is bad input, like io.UnsupportedOperation). `filename` is the path refused and `errno` the closest code
    (EISDIR, ENOTDIR, ENOENT, EACCES, ...); `str()` is the message alone."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = code
        self.filename = None if path is None else os.fspath(path)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def give_default_permissions(tmp_path: str | os.PathLike) -> None:
    """`tempfile.mkstemp` creates 0600 files; before a temporary file is renamed over its destination, give it the
    mode a plain `open(path, "w")` would (0666 minus the umask), so a saved concept or clip is as shareable as any."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    os.chmod(tmp_path, 0o666 & ~mask)


_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISREG, "regular file"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _refuse_ancestor(path: str) -> None:
    """Raise UnwritablePathError when the deepest existing ancestor folder of `path` is not a folder."""
    anc = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(anc):
        up = os.path.dirname(anc)
        if up == anc:
            return
        anc = up
    if not os.path.isdir(anc):
        try:
            what = "a symlink to nothing" if os.path.islink(anc) else f"a {_kind(os.lstat(anc).st_mode)}"
        except OSError:
            what = "not readable"
        raise UnwritablePathError(
            f"cannot write {path!r}: {anc!r} is {what}, not a folder, so nothing can be created under it; choose a "
            "path in a folder",
            path,
            errno.ENOTDIR,
        )


def resolve_target(path: str | os.PathLike) -> str:
    """The file a write to `path` replaces: `path` itself when it is a regular file or does not exist; the regular
    file it points to when it is a symlink (the link stays; its target is replaced in the target's folder). Raises
    UnwritablePathError for anything else: a directory, device, FIFO or socket (replacing one with a file would
    destroy it, e.g. `/dev/null` when run as root), a symlink to one or to nothing, a name ending in a separator, or
    a path under a regular file."""
    path = os.fspath(path)
    if not path or not os.path.basename(path):
        raise UnwritablePathError(
            f"output path {path!r} names a folder, not a file; give a file name", path, errno.EISDIR
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _refuse_ancestor(path)  # a dangling symlink as a parent folder reads as missing here
        return path
    except NotADirectoryError:
        _refuse_ancestor(path)
        raise UnwritablePathError(
            f"cannot write {path!r}: a part of the path is not a folder", path, errno.ENOTDIR
        ) from None
    except OSError as e:  # ENAMETOOLONG, ELOOP, EACCES on a parent, ...
        raise UnwritablePathError(
            f"cannot write {path!r} ({e.strerror or e}); choose another path", path, e.errno
        ) from None
    if stat.S_ISREG(st.st_mode):
        return path
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(path)
        try:
            rst = os.stat(real)
        except FileNotFoundError:
            raise UnwritablePathError(
                f"{path!r} is a symlink to {real!r}, which does not exist; remove the link or point it at a file",
                path,
                errno.ENOENT,
            ) from None
        except OSError as e:
            raise UnwritablePathError(
                f"{path!r} is a symlink that cannot be followed ({e.strerror or e})", path, e.errno
            ) from None
        if not stat.S_ISREG(rst.st_mode):
            raise UnwritablePathError(
                f"{path!r} is a symlink to a {_kind(rst.st_mode)} ({real!r}), not to a regular file; refusing to "
                "replace it; give a file path",
                path,
                errno.EISDIR if stat.S_ISDIR(rst.st_mode) else errno.EINVAL,
            )
        return real
    raise UnwritablePathError(
        f"{path!r} is a {_kind(st.st_mode)}, not a regular file; refusing to replace it with a file; give a file "
        "path" + (" inside it" if stat.S_ISDIR(st.st_mode) else ""),
        path,
        errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
    )


def check_writable(path: str | os.PathLike, *, folder: bool = False) -> str:
    """Find in a moment whether a later `atomic_write(path, ...)` can succeed; call it before long work that saves
    at the end. Checks what `resolve_target` checks, then that the file's folder exists and is a folder, or can be
    created under its deepest existing ancestor, and that a file can be created there (one is created and deleted:
    `os.access` answers from permission bits, which root ignores and a network file system may overrule).

    `folder=True`: `path` is a folder to hold the output files (it may exist as a folder or be creatable). Creates
    nothing that stays. Returns the file (or folder) that will be written. Raises UnwritablePathError naming the path
    and the fix."""
    path = os.fspath(path)
    if folder:
        if not path:
            raise UnwritablePathError("output folder '' is empty; give a folder name", path, errno.ENOENT)
        target = path
        if os.path.lexists(path) and not os.path.isdir(path):
            st = os.lstat(path)
            what = "a symlink to nothing" if stat.S_ISLNK(st.st_mode) else f"a {_kind(st.st_mode)}"
            raise UnwritablePathError(
                f"output folder {path!r} is {what}, not a folder; give a folder path", path, errno.ENOTDIR
            )
        _refuse_ancestor(os.path.join(path, "x"))
        probe = os.path.abspath(path)
    else:
        target = resolve_target(path)
        probe = os.path.dirname(os.path.abspath(target))
    # The probe is named as a save of `target` would name its temporary file, so that should this process die right
    # here, the next save removes it (`_remove_stale_temps`); elsewhere (a folder not made yet) a neutral name.
    prefix = f".{os.path.basename(target)}." if not folder and os.path.isdir(probe) else ".ppt_fast-write-check."
    while not os.path.isdir(probe):  # not made yet: files will be created in the deepest existing ancestor first
        probe = os.path.dirname(probe)
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-{_host_tag()}.", suffix=_TMP_SUFFIX, dir=probe)
    except OSError as e:
        raise UnwritablePathError(
            f"cannot write {path!r}: no file can be created in {probe!r} ({e.strerror or e}); choose a writable folder",
            path,
            e.errno,
        ) from None
    os.close(fd)
    os.unlink(tmp)
    return target


def _host_tag() -> str:
    # The host in a temporary file's name: a pid is only checkable on the host (and in the pid namespace: containers
    # get their own hostname) that wrote it.
    return hashlib.sha1(socket.gethostname().encode(), usedforsecurity=False).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's; anything else: do not guess dead
        return True
    return True


def _remove_stale_temps(folder: str, base: str) -> None:
    """Remove temporary files of earlier saves of `base` in `folder` that no live save owns: named by this host
    with a pid that no longer runs, or (any of our naming, including older ppt_fast's `.<base>.<random>.tmp`) older
    than STALE_TMP_SECONDS. Another process's save in progress is never touched: its pid is alive (or on another
    host) and its file is fresh."""
    rx = re.compile(re.escape(f".{base}.") + r"(?:(\d+)-([0-9a-f]{8})\.)?[a-z0-9_]+" + re.escape(_TMP_SUFFIX) + "$")
    head = f".{base}."
    me, host, now = os.getpid(), _host_tag(), time.time()
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(head) and e.name.endswith(_TMP_SUFFIX)]
    except OSError:
        return
    for e in entries:
        m = rx.match(e.name)
        if m is None:
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            pid = int(m.group(1)) if m.group(1) else None
            dead = pid is not None and m.group(2) == host and pid != me and not _pid_alive(pid)
            if dead or now - st.st_mtime > STALE_TMP_SECONDS:
                os.unlink(e.path)
                logger.info("removed %s, left by an earlier save of %s that did not finish", e.path, base)
        except OSError:  # gone already (another save cleaned it) or not ours to remove
            continue


MAGIC = b"PPTFAST-CHECKED\x00v1\n"  # 19 bytes, then the sha256 of the payload, then a torch.save payload


class CorruptFileError(ValueError):
    """A checked file (pretraining checkpoint, default-model weights) is truncated, tampered with or foreign."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Publish a file atomically: `write(tmp)` fills a temporary file in the destination's folder, which is fsynced,
    given default permissions and renamed over the destination (then the folder is fsynced). A crash or an exception
    leaves either the old file or the new one, never half of one.

    The destination is `resolve_target(path)`: `path` when it is a regular file or new; when `path` is a symlink to a
    regular file, that file (the link stays and points at the new content; the temporary file lives in the target's
    folder so the rename stays atomic). Anything else (directory, device, FIFO, socket, a symlink to one or to
    nothing, a path under a regular file) raises UnwritablePathError before anything is written. Missing folders are
    created. A hard-linked destination is replaced by a new file (the other names keep the old content).

    Temporary files are named `.<name>.<pid>-<host>.<random>.tmp`. An exception removes its own; a save that was
    killed leaves one, which the next save of the same file removes once its pid is dead on this host (or it is older
    than STALE_TMP_SECONDS), never one a live save is writing."""
    import tempfile

    target = resolve_target(path)
    folder = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        _refuse_ancestor(target)
        raise UnwritablePathError(
            f"cannot create the folder {folder!r} for {target!r} ({e.strerror or e})", target, e.errno
        ) from None
    _remove_stale_temps(folder, base)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}-{_host_tag()}.", suffix=_TMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        give_default_permissions(tmp)
        os.replace(tmp, target)
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
