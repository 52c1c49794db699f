"""`python -m bench.decode_step`: one decode step of the portable decoder and of the
GroupQueryAttention decoder at the same cache lengths, interleaved step by step in one process, so
that a shared host's bursts fall on both alike (whole `paligemma bench` runs minutes apart moved by
30% here). Random embeddings and caches: only the time is measured.

Each step is what the Rust runtime runs: the portable graph gets the past as ONNX Runtime values and
returns `present = concat(past, new)` in memory ONNX Runtime allocates; the GroupQueryAttention
graph gets one buffer per layer bound as both past and present and writes the new position in it.
Prints the median step per graph and length, and their ratio; writes them as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.manifest import read_manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode_step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a conversion with both decoders (format 3)")
    parser.add_argument("--dtype", default="q4")
    parser.add_argument("--lengths", default="272,784", help="cache positions before the step (prompt + tokens), comma-separated")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per graph and length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    return parser.parse_args(argv)


class Step:
    """One graph, one cache length: `run()` times one decode step."""

    def __init__(self, session: ort.InferenceSession, m: dict, length: int, in_place: bool, rng: np.random.Generator):
        self.session, self.binding = session, session.io_binding()
        layers, kv, d, h = m["num_hidden_layers"], m["num_key_value_heads"], m["head_dim"], m["hidden_size"]
        self.binding.bind_cpu_input("inputs_embeds", rng.normal(0, 1, (1, 1, h)).astype(np.float32))
        self.binding.bind_cpu_input("position_ids", np.array([[length + 1]], np.int64))
        self.binding.bind_output("logits")
        self.values = []  # kept alive while bound
        for i in range(layers):
            for kind in ("key", "value"):
                # The GroupQueryAttention buffer holds the new position too.
                cache = rng.normal(0, 1, (1, kv, length + int(in_place), d)).astype(np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(cache)
                self.values.append(value)
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                if in_place:
                    self.binding.bind_ortvalue_output(f"present.{i}.{kind}", value)
                else:
                    self.binding.bind_output(f"present.{i}.{kind}")
        if in_place:
            self.binding.bind_cpu_input("seqlens_k", np.array([length], np.int32))
            self.binding.bind_cpu_input("total_sequence_length", np.array(length + 1, np.int32))
        else:
            self.binding.bind_cpu_input("attention_mask", np.ones((1, length + 1), np.int64))
            self.binding.bind_cpu_input("token_type_ids", np.array([[0] * (length - 16) + [1] * 17], np.int64))

    def run(self) -> float:
        started = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - started) * 1e3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    m = read_manifest(args.model)
    if args.dtype not in m["graphs"].get("decoder_gqa", {}):
        raise SystemExit(f"error: {args.model} has no decoder_gqa graph for {args.dtype}: convert it with this version")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {
        graph: ort.InferenceSession(str(args.model / m["graphs"][graph][args.dtype]), options, providers=["CPUExecutionProvider"])
        for graph in ("decoder", "decoder_gqa")
    }
    rng = np.random.default_rng(0)
    figures = []
    for length in (int(n) for n in args.lengths.split(",")):
        steps = {graph: Step(session, m, length, graph == "decoder_gqa", rng) for graph, session in sessions.items()}
        for step in steps.values():
            step.run()  # ONNX Runtime's first-run allocations
        times = {graph: [] for graph in steps}
        for _ in range(args.steps):
            for graph, step in steps.items():
                times[graph].append(step.run())
        medians = {graph: statistics.median(t) for graph, t in times.items()}
        figures.append({"length": length, "median_ms": medians, "steps": times})
        ratio = medians["decoder_gqa"] / medians["decoder"]
        print(
            f"{args.dtype} at {length} cached positions: portable {medians['decoder']:.1f} ms, "
            f"GroupQueryAttention {medians['decoder_gqa']:.1f} ms ({ratio:.2f}x)",
            flush=True,
        )
        del steps
    if args.out:
        args.out.write_text(
            json.dumps({"model": str(args.model), "dtype": args.dtype, "threads": args.threads, "figures": figures}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
