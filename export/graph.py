"""One export routine for every graph: names and dynamic axes as data, external data past 2 GB."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

OPSET = 20
# Protobuf's hard limit; bigger graphs keep their weights in `<name>.onnx.data` beside them.
PROTOBUF_LIMIT = 2 * 1024**3


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


def _name_axes(model: onnx.ModelProto, axes: dict[str, dict[int, str]]) -> None:
    """Give the graph's inputs and outputs readable dim names (the exporter writes s0, s1, ...)."""
    for value in [*model.graph.input, *model.graph.output]:
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.ClearField("dim_value")
            dim.dim_param = name


def export_graph(spec: GraphSpec, path: Path) -> Path:
    """Export `spec` to `path` with the dynamo exporter and check the result with onnx."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            spec.module.eval(),
            spec.args,
            dynamo=True,
            opset_version=OPSET,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec),
            optimize=True,
            verbose=False,
        )
    weight_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
    external = weight_bytes > PROTOBUF_LIMIT * 0.9
    program.save(str(path), external_data=external)
    model = onnx.load(str(path), load_external_data=False)
    _name_axes(model, spec.axes)
    if external:
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return path
