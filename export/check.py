"""The numeric check `convert` runs on each graph right after writing it (optimum's
`validate_model_outputs` does the same): one small forward pass of the ONNX graph and of the torch
module it was traced from, on the same example inputs, outputs compared within a tolerance.

Both sides run in bounded memory, so a 28B converts and checks on the host it serves from:
 - torch: the module lives on the meta device; each submodule's parameters are read from the
   checkpoint just before it runs and dropped after (forward hooks), so memory holds one layer's
   weight at a time (the vocabulary projection, 4.7 GB for the 28B, is the largest);
 - ONNX Runtime: the graph is cut into consecutive runs of nodes holding at most SEGMENT_BYTES of
   weights (one weight per run when it is bigger); each run is a graph of its own whose external
   initializers point into the same `.onnx.data`, loaded, run and released in turn, the values
   that cross a cut carried between them. Prepacking is off: it would copy every weight.
`--validate` stays the end-to-end check (greedy tokens against transformers).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from .checkpoint import Weights
from .errors import ExportError

# Largest |onnx - torch| allowed, relative to max(1, largest |torch|) of that output. Float32
# graphs run the same float32 math in another order (measured on the tiny models: up to 6e-7);
# float16 rounds every activation, in another order on each side (1.7e-3).
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}
SEGMENT_BYTES = 1024**3


@contextmanager
def streamed_parameters(module: nn.Module, weights: Weights | None) -> Iterator[None]:
    """Inside: `module` runs on the CPU with each submodule's meta parameters read from `weights`
    for the duration of that submodule's forward, and its meta buffers replaced by their values."""
    if weights is None:
        yield
        return
    swapped_buffers = []
    for sub in module.modules():
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_meta:
                sub._buffers[name] = weights.buffer(buffer)
                swapped_buffers.append((sub, name, buffer))

    def load(sub, _args):
        sub._meta_parameters = dict(sub._parameters)
        for name, param in sub._meta_parameters.items():
            if param is not None and param.is_meta:
                sub._parameters[name] = nn.Parameter(weights.read(param), requires_grad=False)

    def drop(sub, _args, _out):
        sub._parameters.update(sub._meta_parameters)
        del sub._meta_parameters

    hooks = []
    for sub in module.modules():
        if any(p.is_meta for p in sub.parameters(recurse=False)):
            hooks += [sub.register_forward_pre_hook(load), sub.register_forward_hook(drop)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for sub, name, buffer in swapped_buffers:
            sub._buffers[name] = buffer


def _flatten(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        out += _flatten(a) if isinstance(a, (tuple, list)) else [a]
    return out


def spec_feeds(spec) -> dict[str, np.ndarray]:
    """A GraphSpec's example arguments as the graph's feeds, by input name."""
    return {name: t.numpy() for name, t in zip(spec.input_names, _flatten(spec.args))}


def torch_outputs(module: nn.Module, args: tuple, weights: Weights | None) -> list[np.ndarray]:
    with torch.no_grad(), streamed_parameters(module, weights):
        out = module.eval()(*args)
    return [t.numpy() for t in _flatten(out if isinstance(out, (tuple, list)) else (out,))]


def _tensor_bytes(t: TensorProto) -> int:
    if t.data_location == TensorProto.EXTERNAL:
        return int(next((e.value for e in t.external_data if e.key == "length"), 0))
    return len(t.raw_data) or t.ByteSize()


def _segments(graph: onnx.GraphProto, budget: int) -> list[list[onnx.NodeProto]]:
    """Consecutive runs of nodes, each using at most `budget` bytes of initializers (or one node)."""
    sizes = {t.name: _tensor_bytes(t) for t in graph.initializer}
    segments, current, used, held = [], [], 0, set()
    for node in graph.node:
        new = {n for n in node.input if n in sizes and n not in held}
        extra = sum(sizes[n] for n in new)
        if current and used + extra > budget:
            segments.append(current)
            current, used, held = [], 0, set()
            new = {n for n in node.input if n in sizes}
            extra = sum(sizes[n] for n in new)
        current.append(node)
        used += extra
        held |= new
    if current:
        segments.append(current)
    return segments


def _value_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    """Element type and rank of `array`, every dim symbolic: with static dims ONNX's data
    propagation gives Gather(Shape(x), scalar) rank 1, which Range then refuses."""
    dims = [f"{name}_{axis}" for axis in range(array.ndim)]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), dims)


def run_in_segments(path: Path, feeds: dict[str, np.ndarray], budget: int = SEGMENT_BYTES) -> dict[str, np.ndarray]:
    """The graph at `path` run on `feeds` one segment at a time (see the module docstring): its
    outputs by name, in graph order."""
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    outputs = [o.name for o in graph.output]
    segments = _segments(graph, budget)
    # Where each value is last read, so a value crossing a cut is kept exactly as long as needed.
    last_use = {}
    for i, segment in enumerate(segments):
        for node in segment:
            for name in node.input:
                last_use[name] = i
    values = dict(feeds)
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    for i, segment in enumerate(segments):
        produced = {o for node in segment for o in node.output if o}
        used = [n for node in segment for n in node.input if n]
        inputs = list(dict.fromkeys(n for n in used if n not in produced and n not in initializers))
        wanted = [o for o in dict.fromkeys(o for node in segment for o in node.output if o) if o in outputs or last_use.get(o, -1) > i]
        sub = helper.make_graph(
            segment,
            f"segment_{i}",
            [_value_info(n, values[n]) for n in inputs],
            [helper.make_empty_tensor_value_info(n) for n in wanted],
            [initializers[n] for n in dict.fromkeys(used) if n in initializers],
        )
        sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
        # Beside the graph, so the initializers' relative `location` finds the same data file.
        with tempfile.NamedTemporaryFile(suffix=".onnx", dir=path.parent, prefix=".check-") as f:
            f.write(sub_model.SerializeToString())
            f.flush()
            session = ort.InferenceSession(f.name, options, providers=["CPUExecutionProvider"])
            results = session.run(wanted, {n: values[n] for n in inputs})
            del session
        values.update(zip(wanted, results))
        for name in [n for n in values if last_use.get(n, -1) <= i and n not in outputs]:
            del values[name]
    return {name: values[name] for name in outputs}


def compare(label: str, names: list[str], got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """The largest relative difference over the outputs; ExportError when one is past TOLERANCE."""
    worst = 0.0
    for name, a, b in zip(names, got, want):
        if a.shape != b.shape:
            raise ExportError(
                f"{label}: output {name} has shape {list(a.shape)}, the torch module gives {list(b.shape)}: the export is wrong"
            )
        scale = max(1.0, float(np.abs(b.astype(np.float32)).max(initial=0.0)))
        diff = float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max(initial=0.0)) / scale
        tolerance = TOLERANCE.get(b.dtype, 0.0)
        if not diff <= tolerance:
            raise ExportError(
                f"{label}: output {name} differs from the torch module by {diff:.2e} of its scale {scale:.3g} "
                f"(tolerance {tolerance:g}): the export is wrong; report it with the checkpoint's config.json"
            )
        worst = max(worst, diff)
    return worst


def check_graph(path: Path, feeds: dict[str, np.ndarray], module: nn.Module, args: tuple, weights: Weights | None) -> float:
    """Run the graph at `path` on `feeds` and `module` on `args` (the same values); compare every
    output. Returns the largest relative difference; prints it."""
    want = torch_outputs(module, args, weights)
    got = run_in_segments(path, feeds)
    worst = compare(path.name, list(got), list(got.values()), want)
    print(f"  {path.name}: checked against torch, largest difference {worst:.1e} of scale", file=sys.stderr, flush=True)
    return worst
