"""Tiny checkpoints built once per session, each converted to ONNX once: the conversions
`python -m export fixtures` keeps in the shared cache are reused when they were made by this code
(their stamps current), so a CI run converts each tiny model once for every suite."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from export import fixtures as fx
from export.convert import convert
from export.tiny import TEST_CONFIGS, TEST_SEEDS, TinySpec, write_random_vae, write_tiny

# The repository's copies of the workplace's shared test images (tests/data/images/README.md).
SHARED_IMAGES = Path(__file__).resolve().parents[2] / "tests" / "data" / "images"


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


def shared_models_root() -> Path:
    """Where `python -m export fixtures` keeps its checkpoints and conversions (the Rust tests' cache)."""
    return Path(os.environ.get("PALIGEMMA_TEST_MODELS", fx.REPO_ROOT / "target" / "tiny-models"))


def shared_conversion(name: str, dtype: str, quantize_to: tuple[str, ...]) -> Converted | None:
    """The shared cache's conversion of `name` when it is current and holds what is asked: the fp32
    graphs (with the fixture's quantized decoders beside them, when `quantize_to` asks for exactly
    those or none), or the fp16 graphs of a configuration the fixtures convert to fp16."""
    root, want = shared_models_root() / name, fx.stamp(name)
    fixture_quantized = tuple(fx.QUANTIZE.get(name, []))
    if dtype == "fp32" and quantize_to in ((), fixture_quantized):
        onnx_dir, stamp = root / "onnx", root / "onnx.stamp.json"
    elif dtype == "fp16" and not quantize_to and name in fx.FP16_CONFIGS:
        onnx_dir, stamp = root / "onnx-fp16", root / "onnx-fp16.stamp.json"
    else:
        return None
    current = fx._read_json(root / "source.stamp.json") == want and fx._read_json(stamp) == want
    if not current or not (onnx_dir / "manifest.json").is_file():
        return None
    return Converted(name, TEST_CONFIGS[name], root / "source", onnx_dir)


def community_layout(root: Path, name: str, dtypes: tuple[str, ...]) -> Path:
    """`name`'s transformers.js layout (export/community.py) in `dtypes`: the shared cache's when
    current and it holds them, else written under `root`."""
    from export import community

    shared = shared_models_root() / name / fx.COMMUNITY_DIR
    if set(dtypes) <= set(fx.COMMUNITY_DTYPES) and fx.community_is_current(shared, name):
        return shared
    return community.build(converted_dir(root, name).source, root / f"{name}-community-{'-'.join(dtypes)}", dtypes)


def converted_dir(root: Path, name: str, dtype: str = "fp32", quantize_to: tuple[str, ...] = ()) -> Converted:
    shared = shared_conversion(name, dtype, quantize_to)
    if shared is not None:
        return shared
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
