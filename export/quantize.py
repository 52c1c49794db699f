"""`convert --quantize int8|int4`: weight-quantized copies of the exported fp32 graphs.

Both schemes are ONNX Runtime's MatMulNBits with int8 compute (accuracy_level 4: each activation
row quantized to int8 per block at run time), named like the transformers.js variants so the same
model directory layout serves both; CPU and CUDA kernels:
 - int8 (`*_int8.onnx`): symmetric 8-bit weights in blocks of 128 along the input dimension.
 - int4 (`*_q4.onnx`): symmetric 4-bit weights in blocks of 32.

Chosen by measurement (docs/QUANTIZATION.md): the int8 format these replaced, int8 weights in
DynamicQuantizeMatMul, is computed with saturating 16-bit sums on x86 CPUs without VNNI (92.4% ->
67.5% teacher-forced agreement on a tiny checkpoint); uint8 weights in the same op are exact there
but lost 7 points of agreement to MatMulNBits at full 3B width (82.8% against 89.5%), which also
decodes faster. MatMulNBits' 8-bit kernels never saturate: VNNI where the CPU has it, else each
16-bit pair sum holds one product (mlas `sqnbitgemm_kernel_avx2_int8_blklen*.h`).

Every MatMul with a constant 2-D weight is rewritten, the vocabulary projection included. Graph
inputs and outputs stay float32: only weights change, so the runtimes' I/O checks hold.

The rewrite streams one weight at a time from the fp32 graph's external data to the new graph's, so
it needs about the largest weight in memory (the 3B's vocabulary projection: 2.4 GB), not the graph:
ONNX Runtime's quantize_dynamic and MatMulNBitsQuantizer hold the whole graph two or three times
over and were killed for memory on the 10.5 GB 3B decoder on a 24 GB machine.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError
from .graph import EXTERNAL_ABOVE, report_written, write_external

# --quantize value -> manifest dtype key (transformers.js calls its 4-bit variant q4).
SCHEMES = {"int8": "int8", "int4": "q4"}
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations x n-bit weights, the fast CPU path
# What each dtype's graphs hold, written to manifest.json's `quantization` so a runtime knows the
# format without opening the graph (the Rust runtime warns about formats a CPU computes wrongly).
# Manifests without it (format_version 1) had int8 weights in DynamicQuantizeMatMul.
# Block sizes, measured: q4 on gqa1 (hidden 64) 52.0% agreement at 32, 56.6% at 16 (+5% size), 49.6%
# at 128. int8 on the full-width 3B 89.8% at 32, 89.5% at 128, whose decode step was 18% faster and
# prefill 26% faster (26 layers, 2 threads, AVX-512 VNNI).
WEIGHT_FORMATS = {
    "int8": {"op": "MatMulNBits", "weight_type": "uint8", "bits": 8, "block_size": 128, "accuracy_level": ACCURACY_LEVEL},
    "q4": {"op": "MatMulNBits", "weight_type": "uint4", "bits": 4, "block_size": 32, "accuracy_level": ACCURACY_LEVEL},
}
# Graphs each scheme rewrites; the others of a quantized dtype run the fp32 file. Measured on the
# three tiny test checkpoints (teacher-forced top-1 agreement with fp32, see README): quantizing the
# vision encoder or the embedding as well as the decoder cost 1-8 points more each. The embedding
# costs no memory to leave in fp32: ONNX Runtime maps its data file and only looked-up rows are read.
QUANTIZED_GRAPHS = {"int8": ("decoder", "decoder_gqa"), "q4": ("decoder", "decoder_gqa")}
# `convert --quantize-vision`: the vision encoder of the quantized dtypes (one file, `_int8`, for
# both), 7-bit weights per output column in DynamicQuantizeMatMul, activations quantized per tensor
# at run time. ONNX Runtime's integer GEMM behind it makes the full 27-layer encoder at 224 px 2.7x
# faster alone and 2.2-2.3x through the binary (MatMulNBits 8-bit: 1.6x alone, its per-block
# scaling dominates at 256 rows; docs/PERFORMANCE.md). No CUDA kernel: for CPU hosts. Seven bits,
# not eight: on x86 CPUs without VNNI the kernel sums u8 x s8 pairs in 16 bits, and 255 x 63 x 2 =
# 32,130 cannot saturate where 255 x 127 x 2 would, so the answer does not depend on the CPU
# (docs/QUANTIZATION.md).
VISION_FORMAT = {"op": "DynamicQuantizeMatMul", "weight_type": "int8", "bits": 7, "per": "output column"}
VISION_DTYPE = "int8"  # the file name suffix of the quantized vision encoder


def parse_schemes(values: list[str] | None) -> list[str]:
    """`--quantize int8,int4` (or the flag repeated) -> manifest dtype keys, in the order given."""
    out = []
    for name in (n.strip() for item in values or [] for n in item.split(",")):
        if name not in SCHEMES:
            raise ExportError(f"--quantize {name}: choose from {', '.join(SCHEMES)} (comma-separated, e.g. int8,int4)")
        if SCHEMES[name] not in out:
            out.append(SCHEMES[name])
    return out


def quantize_graph(src: Path, dst: Path, dtype: str, fmt: dict | None = None) -> Path:
    """Write the `dtype` ("int8" or "q4") version of the fp32 graph `src` to `dst`, in `dtype`'s
    WEIGHT_FORMATS entry unless `fmt` gives another (`bench.matmul` times other block sizes).
    Each new weight is written as soon as it is made, from column slices of the source weight, so
    memory holds one slice, not a weight or the graph."""
    if dtype not in SCHEMES.values():
        raise ExportError(f"no quantization scheme for dtype {dtype!r}; expected one of {', '.join(SCHEMES.values())}")
    src, dst = Path(src), Path(dst)
    start = time.monotonic()
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ExportError(f"{src.name} has control-flow subgraphs; the quantizer rewrites flat graphs only")
    source = _Initializers(src, graph)
    uses = Counter(name for node in graph.node for name in node.input)
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = _external(src)
    data_path = dst.with_name(dst.name + ".data")
    writer = _Writer(data_path if external else None)
    nodes, written = [], []
    for node in graph.node:
        weight = source.protos.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        node_new, tensors = _rewrite(node, weight.name, source, weight, fmt or WEIGHT_FORMATS[dtype], writer)
        nodes.append(node_new)
        written += tensors
        uses[weight.name] -= 1
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    kept = [t for t in graph.initializer if uses[t.name] > 0]
    del graph.initializer[:]
    for proto in kept:
        if not _is_external(proto):
            graph.initializer.append(proto)
            continue
        out = TensorProto(name=proto.name, data_type=proto.data_type, dims=proto.dims)
        writer.write(out, [source.raw(proto)])
        graph.initializer.append(out)
    graph.initializer.extend(written)
    writer.close()
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    report_written(dst, start)
    return dst


class _Writer:
    """Tensor bytes into the new graph's data file (page-aligned), or into the proto when the graph
    is small enough to hold its weights inline."""

    def __init__(self, data_path: Path | None):
        self.file = open(data_path, "wb") if data_path is not None else None

    def write(self, proto: TensorProto, parts) -> None:
        """`parts`: the tensor's bytes, in order (bytes or contiguous arrays)."""
        if self.file is None:
            proto.raw_data = b"".join(p.tobytes() if isinstance(p, np.ndarray) else p for p in parts)
            return

        def write(file) -> None:
            for part in parts:
                file.write(part.tobytes() if isinstance(part, np.ndarray) else part)

        write_external(proto, self.file, write)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _rewrite(node, weight_name: str, source, weight: TensorProto, fmt: dict, writer: _Writer) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """MatMul(A, W f32[K,N]) -> the op of format `fmt` (a WEIGHT_FORMATS entry or VISION_FORMAT),
    its new weight tensors written by `writer`."""
    if fmt["op"] == "DynamicQuantizeMatMul":
        return _per_column(node, weight_name, source.array(weight), fmt["bits"], writer)
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    k, n = weight.dims
    bits, block_size, level = fmt["bits"], fmt["block_size"], fmt["accuracy_level"]
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=level, bits=bits)
    quantizer = DefaultWeightOnlyQuantizer(config)
    k_blocks = -(-k // block_size)
    packed = TensorProto(name=f"{weight_name}_Q{bits}", data_type=TensorProto.UINT8, dims=[n, k_blocks, -(-block_size * bits // 8)])
    scale_parts = []

    def packed_parts():
        # Each output column is quantized on its own (blocks run along K), so column slices
        # quantized apart and concatenated are the whole weight quantized at once.
        step = _column_step(k)
        for start in range(0, n, step):
            part, part_scales, _ = quantizer.qbits_block_quant(source.columns(weight, start, min(n, start + step)))
            scale_parts.append(part_scales)
            yield part

    writer.write(packed, packed_parts())
    scales = TensorProto(name=f"{weight_name}_scales", data_type=TensorProto.FLOAT, dims=[n, k_blocks])
    writer.write(scales, scale_parts)
    op = helper.make_node(
        "MatMulNBits",
        [node.input[0], packed.name, scales.name],
        list(node.output),
        name=f"{node.name}_Q{bits}",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block_size,
        accuracy_level=level,
    )
    return op, [packed, scales]


def _column_step(k: int) -> int:
    """Columns per slice: about 64 MB of float32 source."""
    return max(1, (64 * 1024**2) // (4 * k))


def _per_column(node, weight_name: str, w: np.ndarray, bits: int, writer: _Writer) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """MatMul(A, W f32[K,N]) -> DynamicQuantizeMatMul with symmetric `bits`-bit weights (stored as
    int8) and one scale per output column: W ~ q * scale, |q| <= 2^(bits-1) - 1."""
    top = 2 ** (bits - 1) - 1
    peak = np.abs(w).max(axis=0)
    scale = np.where(peak > 0, peak / top, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -top, top).astype(np.int8)
    protos = []
    for name, array in ((f"{weight_name}_Q{bits}", q), (f"{weight_name}_scale", scale)):
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
        writer.write(proto, [array])
        protos.append(proto)
    op = helper.make_node(
        "DynamicQuantizeMatMul",
        [node.input[0], *(p.name for p in protos)],
        list(node.output),
        name=f"{node.name}_Q{bits}",
        domain="com.microsoft",
    )
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

    def columns(self, proto: TensorProto, start: int, end: int) -> np.ndarray:
        """Columns `[start, end)` of a float32 matrix, contiguous. External data is mapped for the
        slice only: mapped pages count as resident until unmapped."""
        if not _is_external(proto):
            return np.ascontiguousarray(numpy_helper.to_array(proto)[:, start:end])
        info = {e.key: e.value for e in proto.external_data}
        mapped = np.memmap(
            self.dir / info["location"], dtype=np.float32, mode="r", offset=int(info.get("offset", 0)), shape=tuple(proto.dims)
        )
        try:
            return np.array(mapped[:, start:end])
        finally:
            mapped._mmap.close()


def _external(src: Path) -> bool:
    # Keep external data where the fp32 graph needed it: a 10B decoder at 4 bits is still ~5 GB,
    # and external data is valid at any size.
    total = src.stat().st_size + sum(p.stat().st_size for p in src.parent.glob(src.name + ".data"))
    return total > EXTERNAL_ABOVE
