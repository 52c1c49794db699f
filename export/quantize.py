"""`convert --quantize int8|int4`: weight-quantized copies of the exported fp32 graphs.

Two schemes, named like the transformers.js variants so the same model directory layout serves both:
 - int8 (`*_int8.onnx`): ONNX Runtime dynamic quantization, int8 weights per output channel for
   MatMul/Gemm, activations quantized per run (MatMulInteger);
 - int4 (`*_q4.onnx`): ONNX Runtime's MatMulNBits, symmetric 4-bit blocks of 32 along the input
   dimension with int8 compute (accuracy_level 4).

Graph inputs and outputs stay float32: only weights change, so the runtimes' I/O checks hold.
"""

from __future__ import annotations

from pathlib import Path

import onnx

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
# vision encoder or the embedding (GatherBlockQuantized at 4 bits, GatherQuant at 8) as well as the
# decoder cost 1-8 points more each, so only the decoder is quantized until a full-width
# measurement says the embedding's size (2.4 GB at 3B in fp32) is worth it.
QUANTIZED_GRAPHS = {"int8": ("decoder",), "q4": ("decoder",)}


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
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dtype == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,  # gqa1: 92.4% teacher-forced agreement, 91.2% per tensor
            weight_type=QuantType.QInt8,
            use_external_data_format=_external(src),
            extra_options={"MatMulConstBOnly": True},  # weights only: activation x activation stays fp32
        )
    elif dtype == "q4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            bits=4,
            block_size=BLOCK_SIZE,
            is_symmetric=True,
            accuracy_level=ACCURACY_LEVEL,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=_external(src))
    else:
        raise ExportError(f"no quantization scheme for dtype {dtype!r}; expected one of {', '.join(SCHEMES.values())}")
    onnx.checker.check_model(str(dst))
    for written in dst.parent.glob(dst.name + "*"):
        written.chmod(0o644)  # the quantizers write external data private (0600); the model directory is not
    return dst


def _external(src: Path) -> bool:
    # Keep external data where the fp32 graph needed it: a 10B decoder at 4 bits is still ~5 GB,
    # and external data is valid at any size.
    total = src.stat().st_size + sum(p.stat().st_size for p in src.parent.glob(src.name + ".data"))
    return total > PROTOBUF_LIMIT * 0.9
