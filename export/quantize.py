"""`convert --quantize int8|int4`: weight-quantized copies of the exported fp32 graphs.

Two schemes, named like the transformers.js variants so the same model directory layout serves both:
 - int8 (`*_int8.onnx`): symmetric 8-bit weights per output column, stored as uint8 with zero point
   128, activations quantized per run (ONNX Runtime's DynamicQuantizeMatMul). uint8 weights, not
   int8, so that every CPU computes the same integers: ONNX Runtime's int8-weight (U8S8) kernels on
   x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) add u8 x s8 products in pairs with
   `vpmaddubsw`, whose 16-bit sums saturate (255 x 127 x 2 > 32767), while its uint8-weight (U8U8)
   kernels widen to 16 bits first and sum in 32 bits on every x86 CPU (mlas
   `QgemmU8X8KernelAvx2.S`, `QgemmU8X8KernelAvx512Core.S`). Measured on the tiny checkpoints: int8
   weights agreed with fp32 on 92.4% of teacher-forced positions with AVX-512 VNNI and on 67.5% on
   AVX2; uint8 weights give 92.4% on both (see `WEIGHT_FORMATS` and docs/QUANTIZATION.md). A CPU
   format: no CUDA kernel.
 - int4 (`*_q4.onnx`): ONNX Runtime's MatMulNBits, symmetric 4-bit blocks of 32 along the input
   dimension with int8 compute (accuracy_level 4); CPU and CUDA kernels.

Every MatMul with a constant 2-D weight is rewritten, the vocabulary projection included. Graph
inputs and outputs stay float32: only weights change, so the runtimes' I/O checks hold.

The rewrite streams one weight at a time from the fp32 graph's external data to the new graph's, so
it needs about the largest weight in memory (the 3B's vocabulary projection: 2.4 GB), not the graph:
ONNX Runtime's quantize_dynamic and MatMulNBitsQuantizer hold the whole graph two or three times
over and were killed for memory on the 10.5 GB 3B decoder on a 24 GB machine.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError
from .graph import PROTOBUF_LIMIT

# --quantize value -> manifest dtype key (transformers.js calls its 4-bit variant q4).
SCHEMES = {"int8": "int8", "int4": "q4"}
# gqa1 (hidden 64: two blocks a row) measured 52.0% agreement at 32, 56.6% at 16 (+5% size), 49.6% at
# 128; 32 stays until the full-width measurement, where rows are 2304 wide.
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations x int4 weights, the fast CPU path
# Graphs each scheme rewrites; the others of a quantized dtype run the fp32 file. Measured on the
# three tiny test checkpoints (teacher-forced top-1 agreement with fp32, see README): quantizing the
# vision encoder or the embedding as well as the decoder cost 1-8 points more each. The embedding
# costs no memory to leave in fp32: ONNX Runtime maps its data file and only looked-up rows are read.
QUANTIZED_GRAPHS = {"int8": ("decoder",), "q4": ("decoder",)}
# What each dtype's graphs hold, written to manifest.json's `quantization` so a runtime knows the
# format without opening the graph (the Rust runtime warns about formats a CPU computes wrongly).
# Manifests without it (format_version 1) had int8 weights in DynamicQuantizeMatMul.
WEIGHT_FORMATS = {
    "int8": {"op": "DynamicQuantizeMatMul", "weight_type": "uint8", "weight_zero_point": 128, "per": "column"},
    "q4": {"op": "MatMulNBits", "weight_type": "uint4", "bits": 4, "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL},
}
ALIGN = 4096  # external data offsets on page boundaries, so ONNX Runtime can map them


def parse_schemes(values: list[str] | None) -> list[str]:
    """`--quantize int8,int4` (or the flag repeated) -> manifest dtype keys, in the order given."""
    out = []
    for name in (n.strip() for item in values or [] for n in item.split(",")):
        if name not in SCHEMES:
            raise ExportError(f"--quantize {name}: choose from {', '.join(SCHEMES)} (comma-separated, e.g. int8,int4)")
        if SCHEMES[name] not in out:
            out.append(SCHEMES[name])
    return out


def quantize_graph(src: Path, dst: Path, dtype: str) -> Path:
    """Write the `dtype` ("int8" or "q4") version of the fp32 graph `src` to `dst`."""
    if dtype not in SCHEMES.values():
        raise ExportError(f"no quantization scheme for dtype {dtype!r}; expected one of {', '.join(SCHEMES.values())}")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ExportError(f"{src.name} has control-flow subgraphs; the quantizer rewrites flat graphs only")
    source = _Initializers(src, graph)
    uses = Counter(name for node in graph.node for name in node.input)
    new_tensors: list[tuple[TensorProto, np.ndarray]] = []
    nodes = []
    for node in graph.node:
        weight = source.protos.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        node_new, tensors = _rewrite(node, weight.name, source.array(weight), dtype)
        nodes.append(node_new)
        new_tensors += tensors
        uses[weight.name] -= 1
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    kept = [(t, None) for t in graph.initializer if uses[t.name] > 0]
    del graph.initializer[:]
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = _external(src)
    data_path = dst.with_name(dst.name + ".data")
    with open(data_path, "wb") if external else open(os.devnull, "wb") as data:
        for proto, array in [*kept, *new_tensors]:
            if array is None and not _is_external(proto):
                graph.initializer.append(proto)
                continue
            raw = array.tobytes() if array is not None else source.raw(proto)
            out = TensorProto(name=proto.name, data_type=proto.data_type, dims=proto.dims)
            if external:
                offset = -data.tell() % ALIGN + data.tell()
                data.write(b"\0" * (offset - data.tell()))
                data.write(raw)
                out.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                    out.external_data.add(key=key, value=value)
            else:
                out.raw_data = raw
            graph.initializer.append(out)
    if not external and data_path.exists():
        data_path.unlink()
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    return dst


def _rewrite(node, weight_name: str, w: np.ndarray, dtype: str) -> tuple[onnx.NodeProto, list[tuple[TensorProto, np.ndarray]]]:
    """MatMul(A, W f32[K,N]) -> the quantized op and its new weight tensors."""
    k, n = w.shape
    if dtype == "int8":
        # Symmetric per output column (-127..127, shifted by the zero point 128 into uint8: see the
        # module docstring); a zero column keeps scale 1 so nothing divides by zero. Column blocks
        # bound the temporaries (the vocabulary projection is 2.4 GB at 3B).
        zero_point = WEIGHT_FORMATS["int8"]["weight_zero_point"]
        q = np.empty((k, n), np.uint8)
        scale = np.empty(n, np.float32)
        for j in range(0, n, 8192):
            block = w[:, j : j + 8192]
            absmax = np.abs(block).max(axis=0)
            scale[j : j + 8192] = np.where(absmax > 0, absmax / 127.0, 1.0)
            q[:, j : j + 8192] = np.clip(np.rint(block / scale[j : j + 8192]), -127, 127) + zero_point
        tensors = [(f"{weight_name}_quantized", q), (f"{weight_name}_scale", scale),
                   (f"{weight_name}_zero_point", np.full(n, zero_point, np.uint8))]
        op = helper.make_node("DynamicQuantizeMatMul", [node.input[0], *(name for name, _ in tensors)], list(node.output),
                              name=f"{node.name}_int8", domain="com.microsoft")
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=4)
        packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(w))
        tensors = [(f"{weight_name}_Q4", packed), (f"{weight_name}_scales", scales)]
        op = helper.make_node("MatMulNBits", [node.input[0], tensors[0][0], tensors[1][0]], list(node.output),
                              name=f"{node.name}_Q4", domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=BLOCK_SIZE, accuracy_level=ACCURACY_LEVEL)
    protos = []
    for name, array in tensors:
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
        protos.append((proto, array))
    return op, protos


def _is_external(proto: TensorProto) -> bool:
    return proto.data_location == TensorProto.EXTERNAL


class _Initializers:
    """The fp32 graph's initializers, read one at a time from wherever they are stored."""

    def __init__(self, path: Path, graph: onnx.GraphProto):
        self.dir = path.parent
        self.protos = {t.name: t for t in graph.initializer}

    def raw(self, proto: TensorProto) -> bytes:
        if not _is_external(proto):
            return numpy_helper.to_array(proto).tobytes()
        info = {e.key: e.value for e in proto.external_data}
        with open(self.dir / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()

    def array(self, proto: TensorProto) -> np.ndarray:
        if not _is_external(proto):
            return numpy_helper.to_array(proto)
        return np.frombuffer(self.raw(proto), dtype=np.float32).reshape(tuple(proto.dims))


def _external(src: Path) -> bool:
    # Keep external data where the fp32 graph needed it: a 10B decoder at 4 bits is still ~5 GB,
    # and external data is valid at any size.
    total = src.stat().st_size + sum(p.stat().st_size for p in src.parent.glob(src.name + ".data"))
    return total > PROTOBUF_LIMIT * 0.9
