"""`convert --quantize-vision`: the quantized dtypes' vision encoder with 7-bit weights per output
column (`quantize.VISION_FORMAT`): where the manifest points, what the graph holds, how close its
image features stay to fp32's, and that its answers do not depend on the CPU (the emulated AVX2 CPU
without VNNI, whose 16-bit pair sums would saturate with 8-bit weights)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image

from export import manifest, quantize
from export.convert import convert
from export.errors import ExportError
from export.tiny import TEST_CONFIGS, TEST_SEEDS, write_tiny

from .conftest import shared_images
from .test_quantize import assert_int8_tokens_are_the_same_on_an_avx2_cpu

QUANTIZE = ("int8", "q4")


@pytest.fixture(scope="module")
def converted(tiny_root):
    source = tiny_root / "gqa1"
    if not (source / "config.json").exists():
        write_tiny(source, TEST_CONFIGS["gqa1"], seed=TEST_SEEDS["gqa1"])
    out = tiny_root / "gqa1-fp32-int8-q4-vision-onnx"
    if not (out / "manifest.json").exists():
        convert(str(source), out, quantize_to=QUANTIZE, quantize_vision=True, force=True)
    return source, out


def test_the_quantized_dtypes_run_one_quantized_vision_encoder_and_say_its_format(converted):
    _, out = converted
    m = manifest.read_manifest(out)
    file = manifest.graph_path("vision_encoder", "int8")
    assert m["graphs"]["vision_encoder"] == {"fp32": manifest.graph_path("vision_encoder", "fp32"), "int8": file, "q4": file}
    for dtype in QUANTIZE:
        assert m["quantization"][dtype]["vision_encoder"] == {**quantize.VISION_FORMAT, "file": file}
        assert m["quantization"][dtype]["graphs"] == list(quantize.QUANTIZED_GRAPHS[dtype])
    graph = onnx.load(str(out / file)).graph
    ops = {n.op_type for n in graph.node}
    assert "DynamicQuantizeMatMul" in ops and "MatMul" in ops, ops  # attention's MatMuls stay float
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_Q7")]
    assert weights and all(w.dtype == np.int8 and np.abs(w).max() <= 63 for w in weights)
    assert max(np.abs(w).max() for w in weights) == 63


def features(path, pixel_values):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixel_values})[0]


def test_image_features_stay_within_a_cosine_of_fp32(converted):
    from transformers import AutoProcessor

    source, out = converted
    processor = AutoProcessor.from_pretrained(source)
    images = [Image.open(p).convert("RGB") for p in shared_images()]
    pixels = processor.image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
    fp32 = features(out / manifest.graph_path("vision_encoder", "fp32"), pixels)
    int8 = features(out / manifest.graph_path("vision_encoder", "int8"), pixels)
    cosine = (fp32 * int8).sum(-1) / np.linalg.norm(fp32, axis=-1) / np.linalg.norm(int8, axis=-1)
    # Measured here: see FEATURE_COSINE_FLOOR's note.
    assert cosine.min() > FEATURE_COSINE_FLOOR, cosine.min()
    assert not np.array_equal(fp32, int8)


# Measured on gqa1 (vision hidden 32, 2 layers): lowest token cosine 0.9989 over the 9 shared
# images; the full-width 27-layer encoder at 224 px gave 0.9991 on 3 images (docs/PERFORMANCE.md).
FEATURE_COSINE_FLOOR = 0.995


def test_the_binary_answers_the_same_on_an_avx2_cpu_with_the_quantized_vision_encoder(converted):
    _, out = converted
    assert_int8_tokens_are_the_same_on_an_avx2_cpu(out)


def test_quantize_vision_without_a_quantized_dtype_is_refused(tmp_path):
    with pytest.raises(ExportError, match="add --quantize int8"):
        convert("unused", tmp_path / "out", quantize_vision=True)
