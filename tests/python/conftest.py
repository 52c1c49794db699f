"""A real `paligemma serve` (on the tiny gqa1 model, and on the committed scenes model for answers
that must be right), and a headless Chromium, for the tests here.

Needs what `bash .ci/setup` installs (the release binary, Debian's chromium, the packages in
tests/python/requirements.txt) and the tiny models that `python -m export fixtures
target/tiny-models` converts (`bash .ci/run` does both). A missing piece fails the test with the
command that fixes it; nothing here skips.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The binary under test; PALIGEMMA_BIN points the tests at another build.
BINARY = Path(os.environ.get("PALIGEMMA_BIN", REPO / "target" / "release" / "paligemma"))
MODEL = Path(os.environ.get("PALIGEMMA_TEST_MODELS", REPO / "target" / "tiny-models")) / "gqa1" / "onnx"
SCENES_MODEL = REPO / "models" / "scenes"  # committed: real segment answers with masks
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: playwright must never download a browser
API_KEY = "test-key-7d1f"
STARTUP_TIMEOUT_S = 120


@dataclass
class Server:
    """One running `paligemma serve`: its base URL, the key it wants and what it printed."""

    url: str
    api_key: str
    process: subprocess.Popen
    log: list[str] = field(default_factory=list)

    def post(self, path: str, body: dict, api_key: str | None = None) -> tuple[int, dict]:
        """POSTs JSON with `Authorization: Bearer` (this server's key unless told); (status, JSON answer)."""
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key or self.api_key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def generate(self, image: Path, prompt: str, max_new_tokens: int) -> dict:
        """The non-streamed /v1/generate answer for one image file; fails the test on an error status."""
        status, answer = self.post(
            "/v1/generate", {"image": data_url(image), "prompt": prompt, "max_new_tokens": max_new_tokens, "stream": False}
        )
        assert status == 200, f"/v1/generate answered {status}: {answer}"
        return answer


def data_url(path: Path) -> str:
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _drain(stream, lines: "queue.Queue[str | None]", log: list[str]) -> None:
    # Reads the server's stderr to the end so its pipe never fills and blocks it.
    for line in stream:
        log.append(line.rstrip("\n"))
        lines.put(line)
    lines.put(None)


def start_server(*extra: str, model: Path = MODEL) -> Server:
    if not BINARY.is_file() or not os.access(BINARY, os.X_OK):
        pytest.fail(f"{BINARY} is missing: run `bash .ci/setup` (it builds the release binary)", pytrace=False)
    if not (model / "manifest.json").is_file():
        pytest.fail(
            f"no model at {model}: run `.venv/bin/python -m export fixtures target/tiny-models` "
            "(`bash .ci/run` does), or set PALIGEMMA_TEST_MODELS",
            pytrace=False,
        )
    command = [str(BINARY), "serve", "--model", str(model), "--port", "0", *extra]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_drain, args=(process.stderr, lines, log), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    prefix = "listening on "
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            stop(process)
            pytest.fail(
                f"`{' '.join(command)}` printed no `{prefix}` line in {STARTUP_TIMEOUT_S} s; stderr:\n" + "\n".join(log), pytrace=False
            )
        if line is None:
            code = process.wait()
            pytest.fail(
                f"`{' '.join(command)}` exited with {code} before listening (a binary older than `serve`? "
                "run `bash .ci/setup`); stderr:\n" + "\n".join(log),
                pytrace=False,
            )
        if line.startswith(prefix):
            return Server(url=line[len(prefix) :].strip().rstrip("/"), api_key=API_KEY, process=process, log=log)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def server():
    """`paligemma serve` with --api-key, shared by every test (requests need `Bearer API_KEY`)."""
    running = start_server("--api-key", API_KEY)
    yield running
    stop(running.process)


@pytest.fixture(scope="session")
def scenes_server():
    """`paligemma serve` on the scenes model (with its seg decoder), with --api-key."""
    running = start_server("--api-key", API_KEY, model=SCENES_MODEL)
    yield running
    stop(running.process)


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium driven by playwright (which never downloads a browser of its own)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: run `bash .ci/setup` (it installs tests/python/requirements.txt)", pytrace=False)
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `bash .ci/setup` (it installs Debian's chromium package)", pytrace=False)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


def open_page(browser, server: Server):
    """A fresh tab on the server's `/`; uncaught script errors are collected in `page.script_errors`."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    tab = context.new_page()
    tab.script_errors = []
    tab.on("pageerror", lambda error: tab.script_errors.append(str(error)))
    tab.goto(server.url + "/")
    yield tab
    context.close()


@pytest.fixture
def page(browser, server):
    """The page of the tiny model's server."""
    yield from open_page(browser, server)


@pytest.fixture
def scenes_page(browser, scenes_server):
    """The page of the scenes model's server."""
    yield from open_page(browser, scenes_server)
