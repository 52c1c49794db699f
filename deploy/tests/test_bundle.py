"""The release bundle (deploy/bundle.py) unpacked into an empty directory and run there as a user
would: no Python or checkout on the path, no ORT_DYLIB_PATH, the scenes model copied beside it.
Its answers must be the checkout build's, token for token, and its ONNX Runtime the one it carries."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from deploy import bundle

REPO = Path(__file__).resolve().parents[2]
CHECKOUT_BINARY = REPO / "target" / "release" / "paligemma"
MODEL = REPO / "models" / "scenes"
MAX_BINARY_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    archive = bundle.build(tmp_path_factory.mktemp("dist"))
    into = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (top,) = into.iterdir()
    assert top.name == archive.name.removesuffix(".tar.gz")
    return top


def clean_env(home: Path) -> dict[str, str]:
    """A user's shell: system paths only, a home of its own, nothing of the checkout or .venv."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def test_bundle_holds_the_stripped_binary_its_runtime_licences_and_readme(unpacked):
    names = sorted(p.name for p in unpacked.iterdir())
    assert names[:2] == ["LICENSES", "README.md"] and names[3] == "paligemma", names
    assert names[2].startswith("libonnxruntime.so.1.31"), names
    binary = unpacked / "paligemma"
    assert binary.stat().st_size <= MAX_BINARY_BYTES, f"{binary.stat().st_size} bytes"
    sections = subprocess.run(["readelf", "-S", "-W", str(binary)], capture_output=True, text=True, check=True).stdout
    assert ".symtab" not in sections and ".debug_info" not in sections, "the binary is not stripped"
    licences = unpacked / "LICENSES"
    assert (licences / "onnxruntime" / "LICENSE").read_text().startswith("MIT License")
    assert (licences / "onnxruntime" / "ThirdPartyNotices.txt").stat().st_size > 10_000
    assert "Apache License" in (licences / "paligemma-LICENSE").read_text()
    shipped = bundle.shipped_crates(bundle.cargo_metadata(bundle.host_target()))
    folders = {p.name for p in (licences / "crates").iterdir()}
    assert folders == {f"{c['name']}-{c['version']}" for c in shipped}
    assert any(c["name"] == "ort" for c in shipped) and not any(c["name"] == "syn" for c in shipped)
    index = (licences / "README.md").read_text()
    assert all(f"| {c['name']} | {c['version']} |" in index for c in shipped)
    assert "--model" in (unpacked / "README.md").read_text()


def test_unpacked_bundle_answers_as_the_checkout_build(unpacked, tmp_path):
    if not CHECKOUT_BINARY.is_file():
        pytest.fail(f"{CHECKOUT_BINARY} is missing: build it with `cargo build --release` (.ci/setup does)")
    model = tmp_path / "scenes"
    shutil.copytree(MODEL, model)
    image = tmp_path / "example.png"
    shutil.copy2(MODEL / "example.png", image)
    prompts = bundle.example_prompts(MODEL)
    work = tmp_path / "work"
    work.mkdir()
    ours = [bundle.cli_answer(unpacked / "paligemma", model, image, p, work, clean_env(work)) for p in prompts]
    reference = [bundle.cli_answer(CHECKOUT_BINARY, model, image, p, REPO) for p in prompts]
    for prompt, got, want in zip(prompts, ours, reference):
        assert got["token_ids"] == want["token_ids"], prompt
        assert got.get("detections") == want.get("detections") and got.get("segments") == want.get("segments"), prompt


def test_bundled_server_loads_the_runtime_beside_itself(unpacked, tmp_path):
    server = subprocess.Popen(
        [str(unpacked / "paligemma"), "serve", "--model", str(MODEL), "--port", "0"],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        line = ""
        while not line.startswith("listening on ") and time.monotonic() < deadline:
            line = server.stderr.readline()
            assert line or server.poll() is None, "the bundled server exited before listening"
        assert line.startswith("listening on "), line
        with urllib.request.urlopen(line.split(" ", 2)[2].strip().rstrip("/") + "/health", timeout=10) as response:
            health = json.load(response)
        ort = health["onnxruntime"]
        assert ort["source"] == "next to the executable", ort
        assert Path(ort["path"]).parent == unpacked, ort
    finally:
        server.terminate()
        server.wait(timeout=30)
