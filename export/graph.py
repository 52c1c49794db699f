"""One export routine for every graph: names and dynamic axes as data, weights streamed to disk.

A graph whose module lives on the meta device (`convert`) is traced without weights: the dynamo
exporter records each parameter as an initializer, `_bind` points it at its checkpoint tensor
(`checkpoint.CheckpointTensor`, read when written), and `_fold_transposes` turns each Linear
weight into the `[in, out]` MatMul constant as a lazy tensor too (the one fold the optimizer makes
on large weights). Then the exporter's own optimizer runs (it folds small constants such as
Gemma's `1 + norm weight` by reading them), and the initializers are written one at a time. The
result is the graph `torch.onnx.export(..., optimize=True)` writes from a model in memory,
initializer for initializer (`export/tests/test_streaming.py`), at the memory of one tensor.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch

from .checkpoint import CheckpointTensor, TransposedTensor, Weights

OPSET = 20
# Graphs with more weight than this keep it in `<name>.onnx.data` beside them: protobuf stops at
# 2 GB, and writing weights into one protobuf holds them about three times over (tensors, message,
# serialized bytes; measured 5.1 GB for the 1.7 GB vision encoder), where external data is written
# a tensor at a time.
EXTERNAL_ABOVE = 256 * 1024**2
# The optimizer's limit on what it folds (elements of one input): its default, passed explicitly
# so a test can lower it for both sides and check the folds of a full-size model at toy size.
FOLD_INPUT_LIMIT = 8192


@dataclass
class GraphSpec:
    module: torch.nn.Module
    args: tuple[Any, ...]
    input_names: list[str]
    output_names: list[str]
    # tensor name -> {axis: symbolic dim name}; axes not listed are static.
    axes: dict[str, dict[int, str]]


def _dynamic_shapes(spec: GraphSpec):
    names = iter(spec.input_names)

    def shape_of(arg):
        if isinstance(arg, (tuple, list)):
            return type(arg)(shape_of(a) for a in arg)
        return {axis: torch.export.Dim.DYNAMIC for axis in spec.axes.get(next(names), {})}

    return tuple(shape_of(a) for a in spec.args)


def _to_device(args, device):
    if isinstance(args, (tuple, list)):
        return type(args)(_to_device(a, device) for a in args)
    return args.to(device)


def _name_axes(graph: ir.Graph, axes: dict[str, dict[int, str]]) -> None:
    """Give the graph's inputs and outputs readable dim names (the exporter writes s0, s1, ...)."""
    for value in [*graph.inputs, *graph.outputs]:
        named = axes.get(value.name, {})
        if named and value.shape is not None:
            value.shape = ir.Shape([named.get(i, dim) for i, dim in enumerate(value.shape)])


def _bind(graph: ir.Graph, module: torch.nn.Module, weights: Weights) -> None:
    """Point every initializer traced from a meta tensor at its checkpoint tensor or real buffer."""
    tensors = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
    for name, value in graph.initializers.items():
        tensor = tensors.get(name)
        if tensor is None or not tensor.is_meta:
            continue
        if isinstance(tensor, torch.nn.Parameter):
            value.const_value = CheckpointTensor(weights, tensor, name)
        else:
            value.const_value = ir.tensor(weights.buffer(tensor).numpy(), name=name)
    unbound = [
        n
        for n, v in graph.initializers.items()
        if isinstance(getattr(v.const_value, "raw", None), torch.Tensor) and v.const_value.raw.is_meta
    ]
    if unbound:
        raise AssertionError(f"initializers with no weight behind them: {unbound}")


def _fold_transposes(graph: ir.Graph, input_limit: int) -> None:
    """Replace each Transpose of a 2-D checkpoint tensor by a lazy initializer holding the
    transposed weight, named after its output, where the exporter's optimizer folds it: always
    when the weight has at most `input_limit` elements, else when the Transpose is its only
    consumer (onnxscript's `_DEFAULT_ALWAYS_FOLD_OPS`). Every other node on checkpoint tensors is
    left to the optimizer, which folds it on small inputs (reading them then) and leaves it on
    large ones (SigLIP's position rows stay a Gather), as it does for a model in memory."""
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "" or len(node.inputs) != 1:
            continue
        value = node.inputs[0]
        source = value.const_value if value is not None else None
        perm = node.attributes.get("perm")
        if not isinstance(source, CheckpointTensor) or len(source.shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        if source.size > input_limit and len(value.consumers()) != 1:
            continue
        out = node.outputs[0]
        folded = ir.Value(name=out.name, shape=ir.Shape(list(source.shape)[::-1]), type=ir.TensorType(source.dtype))
        folded.const_value = TransposedTensor(source, out.name)
        out.replace_all_uses_with(folded, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        graph.register_initializer(folded)


def _progress(label: str) -> Callable:
    """ONNX IR's save callback, called before each tensor is written: a line on stderr for each
    tensor of 256 MB or more, with what was written before it and the time so far."""
    start = time.monotonic()
    done = 0

    def report(tensor: ir.TensorProtocol, info) -> None:
        nonlocal done
        if tensor.nbytes >= 256 * 1024**2:
            print(
                f"  {label}: writing {tensor.name} ({tensor.nbytes / 1e9:.2f} GB), tensor {info.index + 1}/{info.total}, "
                f"{done / 1e9:.2f} GB written in {time.monotonic() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        done += tensor.nbytes

    return report


def export_graph(spec: GraphSpec, path: Path, weights: Weights | None = None) -> Path:
    """Export `spec` to `path` with the dynamo exporter and check the result with onnx. With
    `weights`, `spec.module` is on the meta device and its parameters are read from there."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    path.parent.mkdir(parents=True, exist_ok=True)
    args = _to_device(spec.args, "meta") if weights is not None else spec.args
    with torch.no_grad():
        program = torch.onnx.export(
            spec.module.eval(),
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec),
            optimize=False,
            verbose=False,
        )
    model = program.model
    if weights is not None:
        _bind(model.graph, spec.module, weights)
    ir.passes.common.InlinePass()(model)
    _fold_transposes(model.graph, FOLD_INPUT_LIMIT)
    # What `torch.onnx.export(optimize=True)` runs (onnxscript's torch_2_8 `optimize`).
    onnxscript.optimizer.optimize_ir(model, input_size_limit=FOLD_INPUT_LIMIT)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    _name_axes(model.graph, spec.axes)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    start = time.monotonic()
    if weight_bytes > EXTERNAL_ABOVE:
        ir.save(model, path, external_data=f"{path.name}.data", callback=_progress(path.name))
    else:
        ir.save(model, path)
    onnx.checker.check_model(str(path))
    report_written(path, start)
    return path


# External data offsets on page boundaries, so ONNX Runtime can map them.
ALIGN = 4096


def write_external(proto: onnx.TensorProto, file, write: Callable[[Any], None]) -> None:
    """Points `proto` at the bytes `write(file)` appends to the open data `file`, from its next
    page boundary (ONNX external data: location, offset, length)."""
    file.write(b"\0" * (-file.tell() % ALIGN))
    offset = file.tell()
    write(file)
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", Path(file.name).name), ("offset", str(offset)), ("length", str(file.tell() - offset))):
        proto.external_data.add(key=key, value=value)


def report_written(path: Path, start: float) -> None:
    """The progress line for a finished graph: its bytes on disk (with its data file) and seconds."""
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())
    print(f"  {path.name}: {size / 1e9:.2f} GB written in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
