"""The benchmark's model: a random-weight PaliGemma 2 of a released width, built and converted once.

Random weights time exactly like real ones (same shapes, same kernels); they say nothing about
answer quality. Cached under WORK/<preset>-L<text layers>-V<vision layers>/{source,onnx}, reused
while its tiny_spec.json matches and its manifest.json exists.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from export.convert import convert
from export.tiny import PRESETS, TEST_CONFIGS, TinySpec, write_tiny

# Depth of the released 3B: 26 Gemma 2 layers, 27 SigLIP layers.
FULL_DEPTH = {"3b-224": (26, 27), "3b-448": (26, 27)}
# At full width and depth the tiny models' layer gain (3) leaves the tied head echoing the input
# token: teacher-forced on random tokens, the 26-layer model predicted its input at 97 of 97
# positions (top-2 margin >= 0.99), so no quantization could change an argmax. At 11 it echoed 9%,
# predicted 37 distinct tokens, with a median margin of 0.2: an agreement figure can then fail.
FULL_WIDTH_LAYER_GAIN = 11.0


def spec(preset: str, layers: int, vision_layers: int) -> TinySpec:
    """`tiny` is the test suite's gqa1 shape: the whole benchmark in seconds, for its own tests."""
    base = TEST_CONFIGS["gqa1"] if preset == "tiny" else TinySpec(**PRESETS[preset], layer_gain=FULL_WIDTH_LAYER_GAIN)
    return replace(base, num_hidden_layers=layers, vision_layers=vision_layers)


def build(
    work: Path, preset: str, layers: int, vision_layers: int, quantize_to: tuple[str, ...], seed: int = 0, quantize_vision: bool = False
) -> tuple[Path, Path]:
    """(checkpoint directory, converted model directory with every dtype in `quantize_to`, their
    vision encoder quantized too with `quantize_vision`)."""
    root = Path(work) / f"{preset}-L{layers}-V{vision_layers}"
    source, onnx_dir = root / "source", root / "onnx"
    want = {"seed": seed, **asdict(spec(preset, layers, vision_layers))}
    stamp = source / "tiny_spec.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != want:
        shutil.rmtree(root, ignore_errors=True)
        write_tiny(source, spec(preset, layers, vision_layers), seed=seed)
    converted = onnx_dir / "manifest.json"
    if not converted.exists() or _vision_quantized(converted) != quantize_vision:
        convert(str(source), onnx_dir, quantize_to=quantize_to, quantize_vision=quantize_vision, force=True)
    return source, onnx_dir


def _vision_quantized(manifest_file: Path) -> bool:
    return any("vision_encoder" in q for q in json.loads(manifest_file.read_text()).get("quantization", {}).values())
