"""`python -m bench.matmul`: one decoder-shaped MatMul in fp32 and in MatMulNBits formats (bits,
block size, accuracy level), timed at the row counts that matter: 1 (a decode step), 4 (a batch-4
step) and a prompt's length (a prefill). Random weights, quantized by `export.quantize` as a
conversion does; each format's largest error, relative to the product in float64, is printed
beside its time.

This isolates the kernel ONNX Runtime's mlas takes for each format: the end-to-end figures of
`python -m bench` mix it with attention, the cache and the vocabulary projection. Runs are
interleaved across formats (round robin), so a shared host's bursts fall on all of them alike.
Nothing here is asserted: `bench/tests/test_matmul.py` checks the errors only.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export import cpu, quantize

# Gemma 2 2B (PaliGemma 2 3B) text projections: hidden 2304, intermediate 9216, 8 heads x 256.
DEFAULT_SHAPES = "2304x9216,9216x2304,2304x2048"
DEFAULT_FORMATS = "int8:128:4,q4:32:4,q4:64:4,q4:128:4,q4:256:4"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.matmul", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="weights KxN, comma-separated (default: the 3B's MLP and attention)")
    parser.add_argument("--rows", default="1,4,268", help="activation rows M, comma-separated (268: a 224 px prompt)")
    parser.add_argument(
        "--formats",
        default=DEFAULT_FORMATS,
        help="MatMulNBits formats dtype:block_size:accuracy_level (dtype int8 or q4), comma-separated; fp32 always runs",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per format, shape and rows")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    return parser.parse_args(argv)


# What ONNX Runtime's MatMulNBits accepts.
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = range(5)


def parse_formats(text: str) -> list[tuple[str, dict]]:
    """`int8:128:4,q4:32:4` -> [(label, WEIGHT_FORMATS-like entry)]."""
    formats = []
    for item in filter(None, (f.strip() for f in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in quantize.WEIGHT_FORMATS or not all(re.fullmatch("[0-9]+", p) for p in parts[1:]):
            raise SystemExit(
                f"error: --formats {item!r}: expected dtype:block_size:accuracy_level, dtype one of {', '.join(quantize.WEIGHT_FORMATS)}"
            )
        dtype, block, level = parts[0], int(parts[1]), int(parts[2])
        if block not in BLOCK_SIZES or level not in ACCURACY_LEVELS:
            raise SystemExit(
                f"error: --formats {item!r}: MatMulNBits takes block sizes {', '.join(map(str, BLOCK_SIZES))} "
                f"and accuracy levels 0-{ACCURACY_LEVELS[-1]}"
            )
        fmt = dict(quantize.WEIGHT_FORMATS[dtype], block_size=block, accuracy_level=level)
        formats.append((f"{dtype} b{block} l{level}", {"dtype": dtype, **fmt}))
    return formats


def parse_sizes(text: str, option: str, parts: int) -> list[tuple[int, ...]]:
    """`2304x9216,9216x2304` (parts=2) or `1,4,268` (parts=1) -> positive integer tuples."""
    out = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        fields = item.lower().split("x")
        if len(fields) != parts or not all(re.fullmatch("[0-9]+", f) and int(f) > 0 for f in fields):
            form = "KxN with K, N > 0 (e.g. 2304x9216)" if parts == 2 else "a row count > 0"
            raise SystemExit(f"error: {option} {item!r}: expected {form}, comma-separated")
        out.append(tuple(int(f) for f in fields))
    if not out:
        raise SystemExit(f"error: {option} is empty")
    return out


def matmul_graph(path: Path, w: np.ndarray) -> Path:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"], name="matmul")],
        "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def measure(
    shapes: list[tuple[int, ...]], rows: list[int], formats: list[tuple[str, dict]], threads: int, repeats: int, work: Path
) -> list[dict]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rng = np.random.default_rng(0)
    results = []
    for k, n in shapes:
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        fp32 = matmul_graph(work / f"{k}x{n}.onnx", w)
        graphs = {"fp32": fp32}
        for label, fmt in formats:
            dst = work / f"{k}x{n}-{label.replace(' ', '-')}.onnx"
            graphs[label] = quantize.quantize_graph(fp32, dst, fmt["dtype"], fmt)
        sessions = {label: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for label, path in graphs.items()}
        for m in rows:
            a = rng.standard_normal((m, k)).astype(np.float32)
            reference = a @ w.astype(np.float64)
            times: dict[str, list[float]] = {label: [] for label in sessions}
            errors = {}
            for label, session in sessions.items():
                y = session.run(None, {"a": a})[0]  # warm-up, and the error
                errors[label] = float(np.abs(y - reference).max() / np.abs(reference).max())
            for _ in range(repeats):
                for label, session in sessions.items():
                    started = time.perf_counter()
                    session.run(None, {"a": a})
                    times[label].append(time.perf_counter() - started)
            for label in sessions:
                median = statistics.median(times[label])
                results.append(
                    {
                        "k": k,
                        "n": n,
                        "rows": m,
                        "format": label,
                        "median_ms": median * 1e3,
                        "min_ms": min(times[label]) * 1e3,
                        "gflops": 2 * m * k * n / median / 1e9,
                        "max_error_relative": errors[label],
                    }
                )
    return results


def table(results: list[dict]) -> str:
    """Markdown: one line per shape and format, the median ms at each row count, how many times
    one row's throughput M rows give, and the error."""
    rows = sorted({r["rows"] for r in results})
    head = ["K x N", "format", *(f"M={m} ms" for m in rows), *(f"M={m} / M=1 throughput" for m in rows if m > 1), "max rel. error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = dict.fromkeys((r["k"], r["n"], r["format"]) for r in results)
    for k, n, label in keys:
        by_rows = {r["rows"]: r for r in results if (r["k"], r["n"], r["format"]) == (k, n, label)}
        one = by_rows.get(1)
        cells = [f"{k} x {n}", label, *(f"{by_rows[m]['median_ms']:.3f}" for m in rows)]
        cells += [f"{m * one['median_ms'] / by_rows[m]['median_ms']:.2f}x" if one else "" for m in rows if m > 1]
        cells.append(f"{max(r['max_error_relative'] for r in by_rows.values()):.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Every argument is checked before the first conversion.
    shapes = parse_sizes(args.shapes, "--shapes", 2)
    rows = [m for (m,) in parse_sizes(args.rows, "--rows", 1)]
    formats = parse_formats(args.formats)
    if args.repeats < 1 or args.threads < 1:
        raise SystemExit("error: --repeats and --threads must be at least 1")
    if args.out and not args.out.parent.is_dir():
        raise SystemExit(f"error: --out {args.out}: its directory {args.out.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix="bench-matmul-") as work:
        results = measure(shapes, rows, formats, args.threads, args.repeats, Path(work))
    print(f"{cpu.describe()}; onnxruntime {ort.__version__}, {args.threads} threads, median of {args.repeats} interleaved runs")
    print(table(results))
    if args.out:
        args.out.write_text(
            json.dumps({"cpu": cpu.describe(), "onnxruntime": ort.__version__, "threads": args.threads, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
