"""One export routine for every graph: names and dynamic axes as data, weights streamed to disk.

A graph whose module lives on the meta device (`convert`) is traced without weights: the dynamo
exporter records each parameter as an initializer, `_bind` points it at its checkpoint tensor
(`checkpoint.CheckpointTensor`, read when written), and `_fold_weights` does what the exporter's
optimizer would do to those initializers (transpose a Linear weight into the `[in, out]` MatMul
constant, add 1 to a Gemma norm weight, gather SigLIP's position rows) as lazy tensors too. Then
the exporter's own optimizer runs on the rest, and the initializers are written one at a time. The
result is the graph today's `torch.onnx.export(..., optimize=True)` writes from a model in memory,
initializer for initializer (`export/tests/test_streaming.py`), at the memory of one tensor.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from .checkpoint import CheckpointTensor, TransposedTensor, Weights

OPSET = 20
# Protobuf's hard limit: bigger graphs must keep their weights in `<name>.onnx.data` beside them.
PROTOBUF_LIMIT = 2 * 1024**3
# Graphs with more weight than this keep it in `<name>.onnx.data` too: writing weights into one
# protobuf holds them about three times over (tensors, message, serialized bytes; measured 5.1 GB
# for the 1.7 GB vision encoder), where external data is written a tensor at a time.
EXTERNAL_ABOVE = 256 * 1024**2


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


def _is_weight(value: ir.Value | None) -> bool:
    return value is not None and isinstance(value.const_value, ir.LazyTensor)


def _fold_weights(graph: ir.Graph) -> None:
    """Replace each node whose inputs are all constants, one at least a checkpoint tensor, by a
    lazy initializer named after its output, as the optimizer's constant folding names it."""
    for node in list(graph):
        inputs = [v for v in node.inputs if v is not None]
        if node.op_type == "Constant" or not inputs or len(node.outputs) != 1:
            continue
        if not any(_is_weight(v) for v in inputs) or not all(v.const_value is not None for v in inputs):
            continue
        out = node.outputs[0]
        perm = node.attributes.get("perm")
        source = inputs[0].const_value
        if (
            node.op_type == "Transpose"
            and isinstance(source, CheckpointTensor)
            and len(source.shape) == 2
            and (perm is None or list(perm.as_ints()) == [1, 0])
        ):
            tensor: ir.TensorProtocol = TransposedTensor(source, out.name)
        elif node.op_type == "Identity":
            tensor = source
        else:
            tensor = _lazy_result(node, out.name)
        folded = ir.Value(name=out.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        out.replace_all_uses_with(folded, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        graph.register_initializer(folded)


def _lazy_result(node: ir.Node, name: str) -> ir.LazyTensor:
    """The node's output as a lazy tensor: run by ONNX's reference evaluator on its inputs' values
    when written; its type from ONNX shape inference now."""
    inputs = [v for v in node.inputs if v is not None]
    proto = ir.serde.serialize_node(node)
    opset = node.graph.opset_imports.get(node.domain, OPSET) if node.graph is not None else OPSET
    declared = [onnx.helper.make_tensor_value_info(v.name, int(v.const_value.dtype), list(v.const_value.shape)) for v in inputs]
    graph = onnx.helper.make_graph([proto], "fold", declared, [onnx.helper.make_empty_tensor_value_info(proto.output[0])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(node.domain, opset)])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0].type.tensor_type

    def run() -> ir.TensorProtocol:
        from onnx.reference import ReferenceEvaluator

        (result,) = ReferenceEvaluator(model).run(None, {v.name: v.const_value.numpy() for v in inputs})
        return ir.tensor(np.asarray(result))

    shape = ir.Shape([d.dim_value for d in inferred.shape.dim])
    return ir.LazyTensor(run, dtype=ir.DataType(inferred.elem_type), shape=shape, name=name)


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
    _fold_weights(model.graph)
    # What `torch.onnx.export(optimize=True)` runs (onnxscript's torch_2_8 `optimize`).
    onnxscript.optimizer.optimize_ir(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    _name_axes(model.graph, spec.axes)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    start = time.monotonic()
    if weight_bytes > EXTERNAL_ABOVE:
        ir.save(model, path, external_data=f"{path.name}.data", callback=_progress(path.name))
    else:
        ir.save(model, path)
    onnx.checker.check_model(str(path))
    count = len(model.graph.initializers)
    print(f"  {path.name}: {count} tensors, {weight_bytes / 1e9:.2f} GB in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return path
