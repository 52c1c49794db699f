"""Tiny checkpoints built once per session, each converted to ONNX once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from export.convert import convert
from export.tiny import TEST_CONFIGS, TEST_SEEDS, TinySpec, write_random_vae, write_tiny

SHARED_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "images"


@dataclass
class Converted:
    name: str
    spec: TinySpec
    source: Path
    onnx_dir: Path


def shared_images() -> list[Path]:
    images = sorted(p for p in SHARED_IMAGES.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".gif"})
    assert images, f"no test images in {SHARED_IMAGES}"
    return images


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def converted_dir(root: Path, name: str, dtype: str = "fp32", quantize_to: tuple[str, ...] = ()) -> Converted:
    source = root / name
    if not (source / "config.json").exists():
        write_tiny(source, TEST_CONFIGS[name], seed=TEST_SEEDS[name])
    out = root / f"{name}-{dtype}{''.join('-' + q for q in quantize_to)}-onnx"
    if not (out / "manifest.json").exists():
        convert(str(source), out, dtype=dtype, quantize_to=quantize_to, force=True)
    return Converted(name, TEST_CONFIGS[name], source, out)


@pytest.fixture(scope="session", params=sorted(TEST_CONFIGS))
def converted(request, tiny_root) -> Converted:
    return converted_dir(tiny_root, request.param)


@pytest.fixture(scope="session")
def converted_fp16(tiny_root) -> Converted:
    return converted_dir(tiny_root, "gqa1", "fp16")


@pytest.fixture(scope="session")
def reference(converted):
    """transformers model + processor (eager attention, fp32) for a converted checkpoint."""
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(converted.source, attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(converted.source)


@pytest.fixture(scope="session")
def random_vae(tmp_path_factory) -> Path:
    return write_random_vae(tmp_path_factory.mktemp("vae") / "vae-oid.npz", seed=3)


# Measured figures (max logit difference, token agreement), printed at the end of the run.
FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("parity figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
