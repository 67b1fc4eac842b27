"""The atomic writer and the writability pre-check (ppt_fast/_io.py): only regular files are ever replaced, symlinks
to regular files are followed, an output that cannot be written is found before any work, and the temporary file of
a killed save is removed by the next save of the same file, never one a live save is writing."""

import errno
import os
import random
import re
import socket
import stat
import subprocess
import sys
import time

import pytest

from ppt_fast import _io
from ppt_fast._io import UnwritablePathError, atomic_write_bytes, check_writable


def _payload() -> bytes:
    return random.randbytes(random.randint(1, 4096))


def _snapshot(path):
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), st.st_ino


def _temps(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


def _make(kind: str, path: str) -> None:
    if kind == "directory":
        os.mkdir(path)
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()  # the socket file stays
    elif kind == "character device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
        except (PermissionError, OSError) as e:
            pytest.skip(f"cannot make a device node here ({e})")


@pytest.mark.parametrize("kind", ["directory", "FIFO", "socket", "character device"])
@pytest.mark.parametrize("via_link", [False, True])
def test_non_regular_targets_are_refused_and_left_alone(tmp_path, kind, via_link):
    node = str(tmp_path / f"node-{random.randint(0, 10**6)}")
    _make(kind, node)
    target = node
    if via_link:
        target = str(tmp_path / "link.ppt")
        os.symlink(node, target)
    before = _snapshot(node)
    for attempt in (lambda: atomic_write_bytes(target, _payload()), lambda: check_writable(target)):
        with pytest.raises(UnwritablePathError, match=f"a {kind}") as e:
            attempt()
        assert isinstance(e.value, OSError) and isinstance(e.value, ValueError)
        assert repr(target) in str(e.value) and e.value.filename == target  # a path error, named, one line
        assert e.value.errno == (errno.EISDIR if kind == "directory" else errno.EINVAL)
    assert _snapshot(node) == before
    assert not via_link or os.path.islink(target)
    assert _temps(tmp_path) == []


def test_the_systems_null_device_is_refused():
    with pytest.raises(UnwritablePathError, match="'/dev/null' is a character device, not a regular file"):
        check_writable("/dev/null")


def test_dangling_symlink_is_refused(tmp_path):
    link = tmp_path / "out.ppt"
    os.symlink(tmp_path / "missing" / "file.ppt", link)
    with pytest.raises(UnwritablePathError, match="symlink to .*which does not exist"):
        atomic_write_bytes(link, _payload())
    assert os.path.islink(link) and not os.path.exists(tmp_path / "missing")
    with pytest.raises(UnwritablePathError, match="does not exist"):
        check_writable(link)


def test_symlink_to_a_regular_file_is_followed(tmp_path):
    """The link stays (pointing where it did) and its target gets the new bytes, replaced in the target's folder."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    real = tmp_path / "b" / "real.ppt"
    real.write_bytes(_payload())
    link = tmp_path / "a" / "link.ppt"
    os.symlink(real, link)
    new = _payload()
    assert check_writable(link) == str(real)
    atomic_write_bytes(link, new)
    assert os.path.islink(link) and os.readlink(link) == str(real)
    assert real.read_bytes() == new and link.read_bytes() == new
    assert os.listdir(tmp_path / "a") == ["link.ppt"] and os.listdir(tmp_path / "b") == ["real.ppt"]


def test_a_regular_file_is_replaced_atomically(tmp_path):
    path = tmp_path / "x.ppt"
    path.write_bytes(_payload())
    new = _payload()
    atomic_write_bytes(path, new)
    assert path.read_bytes() == new and os.listdir(tmp_path) == ["x.ppt"]


def test_paths_under_a_regular_file_or_naming_a_folder_are_refused(tmp_path):
    f = tmp_path / "file.txt"
    old = _payload()
    f.write_bytes(old)
    for bad in (f / "x.ppt", f / "a" / "b" / "x.ppt"):
        for attempt in (lambda p=bad: atomic_write_bytes(p, _payload()), lambda p=bad: check_writable(p)):
            with pytest.raises(UnwritablePathError, match=re.escape(f"{str(f)!r} is a regular file, not a folder")):
                attempt()
    with pytest.raises(UnwritablePathError, match="is a regular file, not a folder"):
        check_writable(f, folder=True)
    with pytest.raises(UnwritablePathError, match="names a folder, not a file"):
        check_writable(str(tmp_path / "sub") + os.sep)
    assert f.read_bytes() == old and os.listdir(tmp_path) == ["file.txt"]


def test_check_writable_creates_nothing(tmp_path):
    deep = tmp_path / "a" / "b" / "c.ppt"
    assert check_writable(deep) == str(deep)
    assert check_writable(tmp_path / "d" / "e", folder=True) == str(tmp_path / "d" / "e")
    assert os.listdir(tmp_path) == []
    atomic_write_bytes(deep, b"x")  # and the write it vouched for works, making the folders
    assert deep.read_bytes() == b"x"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux procfs: a folder where root cannot create")
def test_a_folder_where_no_file_can_be_created_is_found(tmp_path):
    # Tests run as root, which chmod does not stop; procfs refuses every new file, root or not.
    name = f"/proc/ppt_fast-{random.randint(0, 10**9)}.ppt"
    with pytest.raises(UnwritablePathError, match=r"no file can be created in '/proc'"):
        check_writable(name)
    with pytest.raises(UnwritablePathError, match=r"no file can be created in '/proc'"):
        check_writable(name + ".d", folder=True)


_KILLED_SAVE = """
import os, signal, sys
from ppt_fast._io import atomic_write

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"partial")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], write)
"""


def test_a_killed_save_keeps_the_old_file_and_the_next_save_removes_its_temp(tmp_path):
    target = tmp_path / "concept.ppt"
    old = _payload()
    target.write_bytes(old)
    bystander = tmp_path / ".concept.ppt.bak"  # not ours: a user's file with a similar name
    bystander.write_bytes(b"keep")
    p = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(target)], stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=120)
    assert p.returncode == -9, err.decode()
    (stale,) = _temps(tmp_path)
    assert stale.startswith(f".concept.ppt.{p.pid}-{_io._host_tag()}.")
    assert target.read_bytes() == old  # nothing already saved is lost
    new = _payload()
    atomic_write_bytes(target, new)
    assert target.read_bytes() == new
    assert sorted(os.listdir(tmp_path)) == [".concept.ppt.bak", "concept.ppt"]
    assert bystander.read_bytes() == b"keep"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_cleanup_never_touches_a_live_save(tmp_path):
    """Only ours and provably abandoned: a dead pid of this host, or older than STALE_TMP_SECONDS."""
    host = _io._host_tag()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        base = f"t{random.randint(0, 999)}.wav"
        names = {
            f".{base}.{dead}-{host}.abc123_x.tmp": False,  # killed save on this host: removed
            f".{base}.{live.pid}-{host}.k2j4h5g6.tmp": True,  # another process writing now: kept
            f".{base}.{os.getpid()}-{host}.q1w2e3r4.tmp": True,  # this process (another thread may be writing)
            f".{base}.{dead}-{other_host}.zzzzzzzz.tmp": True,  # a pid of another host cannot be checked here
            f".{base}.abcdefgh.tmp": True,  # an older ppt_fast's name, fresh: may be in progress
            f".{base}.old.{dead}-{host}.abcdefgh.tmp": True,  # a save of the file "{base}.old"
            f".x{base}.{dead}-{host}.abcdefgh.tmp": True,  # a save of another file
            f".{base}.{dead}-{host}.abcdefgh.tmp.bak": True,  # not our suffix
        }
        for n in names:
            (tmp_path / n).write_bytes(_payload())
        aged = {f".{base}.hgfedcba.tmp": False, f".{base}.{dead}-{other_host}.yyyyyyyy.tmp": False}
        for n in aged:
            (tmp_path / n).write_bytes(_payload())
            t = time.time() - _io.STALE_TMP_SECONDS - 60
            os.utime(tmp_path / n, (t, t))
        os.mkdir(tmp_path / f".{base}.{dead}-{host}.dirdirdi.tmp")  # not a regular file: never removed
        atomic_write_bytes(tmp_path / base, _payload())
        left = set(os.listdir(tmp_path))
        want = {n for n, kept in {**names, **aged}.items() if kept} | {base, f".{base}.{dead}-{host}.dirdirdi.tmp"}
        assert left == want
    finally:
        live.kill()
        live.wait()
