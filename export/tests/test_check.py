"""The numeric check each converted graph gets as it is written (check.py): cut into segments it
computes what the whole graph computes, and it refuses a graph that is wrong."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from export import check, checkpoint, decoder, decoder_gqa, manifest, vision
from export.errors import ExportError

from .conftest import converted_dir


@pytest.fixture(scope="module")
def gqa1(tiny_root):
    conv = converted_dir(tiny_root, "gqa1")
    model, weights = checkpoint.load_meta_model(conv.source, torch.float32)
    return conv, model, weights


@pytest.mark.parametrize("graph", ["vision_encoder", "decoder", "decoder_gqa"])
def test_a_graph_cut_into_segments_computes_the_whole_graph(gqa1, graph):
    """Segments of at most 2 KB of weights (dozens of cuts, values carried across each) against
    one session on the whole graph."""
    conv, model, _ = gqa1
    path = conv.onnx_dir / manifest.graph_path(graph, "fp32")
    if graph == "decoder_gqa":
        feeds, _, _ = decoder_gqa.check_case(model)
    else:
        feeds = check.spec_feeds((vision.spec if graph == "vision_encoder" else decoder.spec)(model))
    proto = onnx.load(str(path), load_external_data=False)
    assert len(check._segments(proto.graph, 2048)) > 10
    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    cut = check.run_in_segments(path, feeds, budget=2048)
    assert list(cut) == [o.name for o in proto.graph.output]
    for a, b in zip(cut.values(), whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_check_refuses_a_graph_with_one_weight_off(gqa1, tmp_path):
    """One norm weight 1% off in the written decoder: the check names the output that moved."""
    conv, model, weights = gqa1
    path = tmp_path / "decoder_model_merged.onnx"
    shutil.copy(conv.onnx_dir / manifest.graph_path("decoder", "fp32"), path)
    proto = onnx.load(str(path))
    norm = next(t for t in proto.graph.initializer if len(t.dims) == 1 and t.dims[0] == model.config.text_config.hidden_size)
    norm.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(norm) * 1.01, norm.name))
    onnx.save(proto, str(path))
    spec = decoder.spec(model)
    moved = r"decoder_model_merged.onnx: output (logits|present\.\d+\.(key|value)) differs from the torch module"
    with pytest.raises(ExportError, match=moved):
        check.check_graph(path, check.spec_feeds(spec), spec.module, spec.args, weights)
    # The unmodified graph passes, with the figure it prints.
    spec = decoder.spec(model)
    original = conv.onnx_dir / manifest.graph_path("decoder", "fp32")
    assert check.check_graph(original, check.spec_feeds(spec), spec.module, spec.args, weights) < 1e-5


def test_streamed_parameters_leave_the_module_on_the_meta_device(gqa1):
    """The torch side reads each submodule's weights for its own forward only."""
    _, model, weights = gqa1
    spec = vision.spec(model)
    check.torch_outputs(spec.module, spec.args, weights)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
