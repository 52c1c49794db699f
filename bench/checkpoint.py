"""The benchmark's model: a random-weight PaliGemma 2 of a released width, built and converted once.

Random weights time exactly like real ones (same shapes, same kernels); they say nothing about
answer quality. Cached under WORK/<preset>-L<text layers>-V<vision layers>/{source,onnx}: a
directory with its manifest.json is reused as it is.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from export.convert import convert
from export.tiny import PRESETS, TEST_CONFIGS, TinySpec, write_tiny

# Depth of the released 3B: 26 Gemma 2 layers, 27 SigLIP layers.
FULL_DEPTH = {"3b-224": (26, 27)}


def spec(preset: str, layers: int, vision_layers: int) -> TinySpec:
    """`tiny` is the test suite's gqa1 shape: the whole benchmark in seconds, for its own tests."""
    base = TEST_CONFIGS["gqa1"] if preset == "tiny" else TinySpec(**PRESETS[preset])
    return replace(base, num_hidden_layers=layers, vision_layers=vision_layers)


def build(work: Path, preset: str, layers: int, vision_layers: int, quantize_to: tuple[str, ...], seed: int = 0) -> tuple[Path, Path]:
    """(checkpoint directory, converted model directory with every dtype in `quantize_to`)."""
    root = Path(work) / f"{preset}-L{layers}-V{vision_layers}"
    source, onnx_dir = root / "source", root / "onnx"
    if not (source / "config.json").exists():
        write_tiny(source, spec(preset, layers, vision_layers), seed=seed)
    if not (onnx_dir / "manifest.json").exists():
        convert(str(source), onnx_dir, quantize_to=quantize_to, force=True)
    return source, onnx_dir
