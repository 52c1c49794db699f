"""Tiny checkpoints built once per session, each converted to ONNX once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from export.convert import convert
from export.tiny import TinySpec, write_random_vae, write_tiny

SHARED_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "images"

# Three shapes of Gemma 2 the exporter must not assume away:
#  gqa1: heads x head_dim (96) != hidden (64), one kv head, window far beyond the prompt;
#  window8: a sliding window (8) shorter than every prompt, three layers (two sliding);
#  window40: prompts fit the window (40) but decoding runs past it.
CONFIGS = {
    "gqa1": TinySpec(),
    "window8": TinySpec(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=16, intermediate_size=64, sliding_window=8,
    ),
    "window40": TinySpec(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
        query_pre_attn_scalar=32, intermediate_size=80, sliding_window=40, image_size=28,
    ),
}


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


def converted_dir(root: Path, name: str, dtype: str = "fp32") -> Converted:
    source = root / name
    if not (source / "config.json").exists():
        write_tiny(source, CONFIGS[name], seed=len(name))
    out = root / f"{name}-{dtype}-onnx"
    if not (out / "manifest.json").exists():
        convert(str(source), out, dtype=dtype, force=True)
    return Converted(name, CONFIGS[name], source, out)


@pytest.fixture(scope="session", params=sorted(CONFIGS))
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
