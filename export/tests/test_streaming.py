"""Conversion from the checkpoint a tensor at a time (checkpoint.py, graph.py) against the export
of a model loaded in memory: the same graphs, initializer for initializer; and the checkpoints it
refuses, each with one `error:` line and nothing written."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.numpy import load_file, save_file

from export import checkpoint, convert, decoder, decoder_gqa, embedding, manifest, quantize, vision
from export.__main__ import main
from export.graph import OPSET, _dynamic_shapes
from export.tiny import TEST_CONFIGS, write_tiny

from .conftest import converted_dir


def in_memory_export(spec, path: Path, fold_input_limit: int | None = None) -> Path:
    """The exporter's own path on a model in memory: `torch.onnx.export(..., optimize=True)`, or
    with `fold_input_limit` the same optimizer (onnxscript's torch_2_8 `optimize`) under that limit."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    with torch.no_grad():
        program = torch.onnx.export(
            spec.module.eval(),
            spec.args,
            dynamo=True,
            opset_version=OPSET,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec),
            optimize=fold_input_limit is None,
        )
    if fold_input_limit is not None:
        onnxscript.optimizer.optimize_ir(program.model, input_size_limit=fold_input_limit)
        onnxscript.rewriter.onnx_fusions.fuse(program.model)
    program.save(str(path))
    return path


def graph_content(path: Path):
    """Initializers by name (dtype, shape, bytes) and nodes (op, inputs, outputs) of a graph."""
    model = onnx.load(str(path))
    tensors = {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}
    nodes = [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]
    return tensors, nodes


def assert_same_graph(streamed: Path, reference: Path) -> None:
    got, want = graph_content(streamed), graph_content(reference)
    assert sorted(got[0]) == sorted(want[0]), "initializer names differ"
    differing = [name for name in want[0] if got[0][name] != want[0][name]]
    assert not differing, f"initializers differ: {differing[:5]}"
    assert got[1] == want[1], "nodes differ"


@pytest.fixture(scope="module")
def bf16_shards(tmp_path_factory) -> Path:
    """gqa1 stored as released checkpoints are: bfloat16, several shards and an index."""
    source = write_tiny(tmp_path_factory.mktemp("bf16") / "gqa1", TEST_CONFIGS["gqa1"], seed=4, dtype="bf16", max_shard_size="300KB")
    assert len(list(source.glob("model-*-of-*.safetensors"))) > 1
    assert (source / checkpoint.INDEX).is_file()
    return source


def test_streamed_graphs_equal_the_in_memory_export(tiny_root, tmp_path):
    """The conversion's graphs (traced on the meta device, weights streamed) are the exporter's on
    the model loaded by transformers: same initializers, bytes and names, same nodes."""
    from transformers import PaliGemmaForConditionalGeneration

    conv = converted_dir(tiny_root, "gqa1")
    hf = PaliGemmaForConditionalGeneration.from_pretrained(conv.source, attn_implementation="eager").eval()
    for graph, make_spec in (("vision_encoder", vision.spec), ("embed_tokens", embedding.spec), ("decoder", decoder.spec)):
        reference = in_memory_export(make_spec(hf), tmp_path / f"{graph}.onnx")
        assert_same_graph(conv.onnx_dir / manifest.graph_path(graph, "fp32"), reference)
    reference = decoder_gqa.export(hf, tmp_path / "gqa" / "decoder_model_gqa.onnx")
    assert_same_graph(conv.onnx_dir / manifest.graph_path("decoder_gqa", "fp32"), reference)


def test_bf16_shards_in_small_slices_equal_the_in_memory_export(bf16_shards, tmp_path, monkeypatch):
    """From bfloat16 shards, each tensor read and converted in slices of a few rows or columns
    (the big-checkpoint path at toy size), then quantized in column slices: the graphs are the
    in-memory export of the model transformers loads in float32, and the quantized graphs the
    quantizer's on whole weights."""
    from transformers import PaliGemmaForConditionalGeneration

    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(quantize, "_column_step", lambda k: 7)
    out = convert.convert(str(bf16_shards), tmp_path / "out", quantize_to=("q4",))
    hf = PaliGemmaForConditionalGeneration.from_pretrained(bf16_shards, attn_implementation="eager", dtype=torch.float32).eval()
    for graph, make_spec in (("vision_encoder", vision.spec), ("embed_tokens", embedding.spec), ("decoder", decoder.spec)):
        reference = in_memory_export(make_spec(hf), tmp_path / f"{graph}.onnx")
        assert_same_graph(out / manifest.graph_path(graph, "fp32"), reference)
    reference = decoder_gqa.export(hf, tmp_path / "gqa" / "decoder_model_gqa.onnx")
    assert_same_graph(out / manifest.graph_path("decoder_gqa", "fp32"), reference)
    monkeypatch.undo()
    whole = quantize.quantize_graph(reference, tmp_path / "whole" / "decoder_model_gqa_q4.onnx", "q4")
    assert_same_graph(out / manifest.graph_path("decoder_gqa", "q4"), whole)


def test_the_optimizers_size_rules_hold_for_checkpoint_tensors(tiny_root, tmp_path, monkeypatch):
    """At full size the optimizer folds a large weight only in a Transpose (SigLIP's position rows
    stay a Gather): with its input limit lowered to 16 elements on both sides, the toy model's
    weights are all "large", and the streamed graphs still equal the in-memory export."""
    from transformers import PaliGemmaForConditionalGeneration

    from export import graph as graph_module

    source = converted_dir(tiny_root, "gqa1").source
    monkeypatch.setattr(graph_module, "FOLD_INPUT_LIMIT", 16)
    out = convert.convert(str(source), tmp_path / "out", check_graphs=False)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(source, attn_implementation="eager").eval()
    for graph, make_spec in (("vision_encoder", vision.spec), ("decoder", decoder.spec)):
        reference = in_memory_export(make_spec(hf), tmp_path / f"{graph}.onnx", fold_input_limit=16)
        assert_same_graph(out / manifest.graph_path(graph, "fp32"), reference)
    written = onnx.load(str(out / manifest.graph_path("vision_encoder", "fp32"))).graph
    weights = {t.name for t in written.initializer}
    assert any(n.op_type == "Gather" and n.input[0] in weights for n in written.node), "position rows folded"
    assert not any(n.op_type == "Transpose" and n.input[0] in weights for n in written.node), "a weight left transposed at run time"


Broken = namedtuple("Broken", "source expected")


def _rewrite_single(source: Path, edit) -> None:
    path = source / checkpoint.SINGLE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _drop(source: Path) -> Broken:
    _rewrite_single(source, lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    return Broken(source, "lacks tensors the model needs: model.language_model.layers.1.mlp.up_proj.weight")


def _extra(source: Path) -> Broken:
    _rewrite_single(source, lambda t: t.update({"language_model.model.layers.9.extra.weight": np.zeros(4, np.float32)}))
    return Broken(source, "has tensors this model does not: language_model.model.layers.9.extra.weight")


def _reshaped(source: Path) -> Broken:
    def edit(t):
        t["language_model.model.norm.weight"] = np.zeros(3, np.float32)

    _rewrite_single(source, edit)
    return Broken(source, "language_model.model.norm.weight [3] (expected [64])")


def _truncated(source: Path) -> Broken:
    path = source / checkpoint.SINGLE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return Broken(source, f"{path}: truncated: tensor")


def _shard_missing(source: Path) -> Broken:
    index = {"metadata": {}, "weight_map": {"language_model.model.norm.weight": "model-00002-of-00002.safetensors"}}
    (source / checkpoint.INDEX).write_text(json.dumps(index))
    (source / checkpoint.SINGLE).unlink()
    return Broken(source, "names shards that are not there: model-00002-of-00002.safetensors")


@pytest.mark.parametrize("breakage", [_drop, _extra, _reshaped, _truncated, _shard_missing])
def test_a_broken_checkpoint_is_one_error_line_and_nothing_written(tiny_root, tmp_path, capsys, breakage):
    source = tmp_path / "source"
    shutil.copytree(converted_dir(tiny_root, "gqa1").source, source)
    broken = breakage(source)
    out = tmp_path / "out"
    capsys.readouterr()  # what building the tiny model printed, when the shared cache was stale
    assert main(["convert", str(broken.source), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert broken.expected in err[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"], "a partial conversion was left behind"


def test_too_little_disk_is_refused_before_writing(tiny_root, tmp_path, capsys, monkeypatch):
    source = converted_dir(tiny_root, "gqa1").source
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda path: usage._replace(free=10 * 1024**2))
    out = tmp_path / "out"
    capsys.readouterr()  # what building the tiny model printed, when the shared cache was stale
    assert main(["convert", str(source), str(out), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: not enough disk for "), err
    assert "int8 decoders" in err[0] and "0.0 GB free" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_disk_estimate_is_the_float_graphs_weights(tiny_root, tmp_path):
    """The up-front estimate of the float32 parts against the weights the graphs hold (within 5%:
    small constants). At toy size the graphs' nodes and the quantized formats' block padding weigh
    as much as the weights, so the files and the quantized parts are compared at full size
    (README: the 28B at two layers, 24.9 GB estimated for 24.0 GB written)."""
    conv = converted_dir(tiny_root, "gqa1")

    def weight_bytes(*graphs) -> int:
        return sum(
            numpy_helper.to_array(t).nbytes
            for g in graphs
            for t in onnx.load(str(conv.onnx_dir / manifest.graph_path(g, "fp32"))).graph.initializer
        )

    written = {
        "vision encoder": weight_bytes("vision_encoder"),
        "embedding": weight_bytes("embed_tokens"),
        "decoders": weight_bytes("decoder", "decoder_gqa"),
    }
    model, _ = checkpoint.load_meta_model(conv.source, torch.float32)
    estimate = convert.output_bytes(model, 4, True, (), False)
    assert estimate.keys() == written.keys()
    off = {part: (estimate[part], written[part]) for part in estimate if abs(estimate[part] - written[part]) > written[part] / 20}
    assert not off, off


def test_load_model_is_from_pretrained(bf16_shards):
    """`--validate`'s reference, read a tensor at a time, is the model transformers loads: the same
    parameters and buffers bit for bit (from bf16 shards), the vocabulary projection still tied,
    the checkpoint's generation config."""
    from transformers import PaliGemmaForConditionalGeneration

    ours = checkpoint.load_model(bf16_shards, torch.float32)
    theirs = PaliGemmaForConditionalGeneration.from_pretrained(bf16_shards, attn_implementation="eager", dtype=torch.float32)
    want = {**dict(theirs.named_parameters()), **dict(theirs.named_buffers())}
    got = {**dict(ours.named_parameters()), **dict(ours.named_buffers())}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) and got[name].dtype == want[name].dtype for name in want)
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
    assert ours.generation_config.eos_token_id == theirs.generation_config.eos_token_id
