"""Real-browser tests (`make test-browser`, `pytest -m browser tests/browser`): headless Chromium from the system
(Debian's `chromium`, never a browser download) driven by Playwright. Screenshots go to `out/browser-artifacts/`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACTS = os.path.join(ROOT, "out", "browser-artifacts")


def chromium_path() -> str | None:
    """The system's Chromium: chromium (Debian) or chromium-browser on PATH."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def pytest_addoption(parser):
    parser.addoption("--browser-required", action="store_true",
                     help="fail, instead of skipping, when Chromium, Playwright or Gradio is missing "
                     "(make test-browser passes it)")  # fmt: skip


def _missing(config, what: str) -> None:
    if config.getoption("--browser-required", default=False):
        pytest.fail(f"{what} (make test-browser installs it)", pytrace=False)
    pytest.skip(what)


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def artifacts() -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def browser(pytestconfig):
    try:
        from playwright import sync_api
    except ImportError:
        _missing(pytestconfig, "Playwright is not installed: pip install --no-deps playwright==1.65.2 greenlet==3.5.6")
    exe = chromium_path()
    if exe is None:
        _missing(pytestconfig, "no system Chromium: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, log: str, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"ppt-fast app exited with {proc.returncode}:\n{open(log).read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"ppt-fast app did not answer {url} within {timeout} s:\n{open(log).read()}")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory, pytestconfig):
    """`ppt-fast app` on 127.0.0.1 at a free port, in its own process and working folder; yields (url, workdir,
    seconds to start)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        _missing(pytestconfig, "Gradio is not installed: pip install 'ppt_fast[app]'")
    workdir = str(tmp_path_factory.mktemp("app-workdir"))
    port = free_port()
    log = os.path.join(workdir, "..", "app.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ppt_fast.cli", "app", "--port", str(port), "--workdir",
                                 workdir, "--max-file-size", "5"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_up(url, proc, log, timeout=120)
        yield url, workdir, time.monotonic() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(open(log).read()[-3000:])
