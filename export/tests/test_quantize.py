"""`convert --quantize int8,int4`: the quantized decoders load with fp32 I/O and stay measurably close.

The tiny checkpoints are shaped to give varied greedy output, which also makes them chaotic: one
flipped argmax changes the rest of a row. So token identity is not expected; agreement with fp32
transformers is measured and held above the floors below (measured value, then a margin).
"""

from __future__ import annotations

import onnx
import pytest
from PIL import Image

from export import fixtures, manifest, quantize
from export.convert import convert
from export.runtime import OnnxPaliGemma
from export.validate import agreement, greedy_references

from .conftest import FIGURES, converted_dir, shared_images

MAX_NEW_TOKENS = 40
QUANTIZE = ["int8", "q4"]
CONFIGS = ("gqa1", "window8")
# Measured (onnxruntime 1.31.1, 9 images x 7 prompts x 40 steps): teacher-forced top-1 agreement
# gqa1 int8 0.924 / q4 0.520, window8 int8 0.941 / q4 0.542; whole greedy rows identical gqa1 int8
# 0.54 / q4 0.14, window8 int8 0.63 / q4 0.33.
FLOORS = {
    "int8": {"teacher_forced": 0.90, "rows_identical": 0.45},
    "q4": {"teacher_forced": 0.45, "rows_identical": 0.10},
}


@pytest.fixture(scope="module", params=CONFIGS)
def quantized(request, tiny_root):
    conv = converted_dir(tiny_root, request.param, quantize_to=tuple(QUANTIZE))
    return conv.name, conv.source, conv.onnx_dir


@pytest.fixture(scope="module")
def references(quantized):
    """transformers fp32 greedy tokens for every shared image with every search prompt."""
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    _, source, out = quantized
    model = PaliGemmaForConditionalGeneration.from_pretrained(source, attn_implementation="eager").eval()
    images = [Image.open(p) for p in shared_images()]
    refs = greedy_references(model, AutoProcessor.from_pretrained(source), images, fixtures.SEARCH_PROMPTS, MAX_NEW_TOKENS)
    # The same measurement on the fp32 graphs is exact: the method, not the graphs, cannot be the gap.
    control = agreement(OnnxPaliGemma(out), refs, MAX_NEW_TOKENS)
    assert (control.teacher_forced, control.rows_identical) == (1.0, 1.0), control
    return refs


def io_signature(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output]]


def test_manifest_lists_quantized_decoders_and_fp32_for_the_rest(quantized):
    _, _, out = quantized
    m = manifest.read_manifest(out)
    assert m["dtypes"] == ["fp32", *QUANTIZE]
    for dtype in QUANTIZE:
        assert m["graphs"]["decoder"][dtype] == manifest.graph_path("decoder", dtype)
        assert (out / m["graphs"]["decoder"][dtype]).is_file()
        for graph in ("vision_encoder", "embed_tokens"):
            assert m["graphs"][graph][dtype] == m["graphs"][graph]["fp32"]
    assert manifest.graph_path("decoder", "q4").endswith("decoder_model_merged_q4.onnx")
    assert manifest.graph_path("decoder", "int8").endswith("decoder_model_merged_int8.onnx")


def test_quantized_decoders_keep_the_fp32_inputs_and_outputs(quantized):
    """Names and element types unchanged, so the runtimes' graph checks hold for every dtype."""
    _, _, out = quantized
    fp32 = io_signature(out / manifest.graph_path("decoder", "fp32"))
    for dtype in QUANTIZE:
        assert io_signature(out / manifest.graph_path("decoder", dtype)) == fp32, dtype


def test_quantized_decoders_really_hold_quantized_weights(quantized):
    """Every MatMul with a constant weight is rewritten, the vocabulary projection included."""
    _, _, out = quantized
    fp32 = onnx.load(str(out / manifest.graph_path("decoder", "fp32")))
    weights = {t.name for t in fp32.graph.initializer}
    matmul_weights = {n.input[1] for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    constant_matmuls = sum(n.op_type == "MatMul" and n.input[1] in weights for n in fp32.graph.node)
    assert constant_matmuls > 0
    for dtype, op in (("int8", "DynamicQuantizeMatMul"), ("q4", "MatMulNBits")):
        graph = onnx.load(str(out / manifest.graph_path("decoder", dtype))).graph
        names = {t.name for t in graph.initializer}
        assert sum(n.op_type == op for n in graph.node) == constant_matmuls, dtype
        assert not any(n.op_type == "MatMul" and n.input[1] in names for n in graph.node), dtype
        assert not names & matmul_weights, f"{dtype}: fp32 weights left behind"
    sizes = {d: (out / manifest.graph_path("decoder", d)).stat().st_size for d in ["fp32", *QUANTIZE]}
    assert sizes["q4"] < sizes["int8"] < sizes["fp32"]


@pytest.mark.parametrize("dtype", QUANTIZE)
def test_external_data_quantizes_to_the_same_graph(quantized, dtype, tmp_path, monkeypatch):
    """The streaming path (weights read and written one at a time through .onnx.data, page-aligned)
    gives the graph the in-memory path gives."""
    import numpy as np
    import onnxruntime as ort

    _, _, out = quantized
    src = out / manifest.graph_path("decoder", "fp32")
    inline = quantize.quantize_graph(src, tmp_path / "inline" / "d.onnx", dtype)
    monkeypatch.setattr(quantize, "PROTOBUF_LIMIT", 0)
    external = quantize.quantize_graph(src, tmp_path / "external" / "d.onnx", dtype)
    data = external.with_name("d.onnx.data")
    assert data.is_file() and not inline.with_name("d.onnx.data").exists()
    offsets = [int(e.value) for t in onnx.load(str(external), load_external_data=False).graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % quantize.ALIGN == 0 for o in offsets)
    m = manifest.read_manifest(out)
    rng = np.random.default_rng(0)
    kv = (1, m["num_key_value_heads"], 0, m["head_dim"])
    feeds = {
        "inputs_embeds": rng.standard_normal((1, 5, m["hidden_size"]), dtype=np.float32),
        "attention_mask": np.ones((1, 5), np.int64),
        "token_type_ids": np.zeros((1, 5), np.int64),
        "position_ids": np.arange(1, 6)[None],
        **{f"past_key_values.{i}.{k}": np.zeros(kv, np.float32) for i in range(m["num_hidden_layers"]) for k in ("key", "value")},
    }
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(run(inline), run(external))


@pytest.mark.parametrize("dtype", QUANTIZE)
def test_next_token_agreement_with_fp32_under_teacher_forcing(quantized, references, dtype):
    name, _, out = quantized
    got = agreement(OnnxPaliGemma(out, dtype=dtype), references, MAX_NEW_TOKENS)
    FIGURES.append(
        f"{dtype} {name}: teacher-forced top-1 {got.teacher_forced:.1%} over {got.positions} positions, greedy tokens "
        f"{got.greedy:.1%}, rows identical {got.rows_identical:.0%} of {got.rows} rows "
        f"(floors {FLOORS[dtype]['teacher_forced']:.0%} / {FLOORS[dtype]['rows_identical']:.0%})"
    )
    assert got.positions >= 500
    assert got.teacher_forced >= FLOORS[dtype]["teacher_forced"]
    assert got.rows_identical >= FLOORS[dtype]["rows_identical"]


def test_quantize_needs_fp32_graphs(tmp_path):
    from export.errors import ExportError

    with pytest.raises(ExportError, match="--quantize starts from the fp32 graphs"):
        convert("unused", tmp_path / "out", dtype="fp16", quantize_to=["q4"])
