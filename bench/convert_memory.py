"""`python -m bench.convert_memory`: peak memory and time of `python -m export convert` at full width.

For each preset and text depth: writes a random checkpoint as released (bf16 safetensors shards,
`python -m export tiny --preset`), converts it under `/usr/bin/time -v` (any extra convert
arguments after `--`), and prints one JSON line: peak RSS (GB), wall time (s), the checkpoint's
largest tensor in float32 (GB, the yardstick of the memory bound), the bytes written, the checks'
and `--validate`'s lines; then deletes both, so a 28B run needs about 55 GB free at a time, not
all of them. The figures are asserted nowhere; how they are read is (tests/test_convert_memory.py).

    python -m bench.convert_memory --preset 10b-448 28b-448 --layers 2 6
    python -m bench.convert_memory --preset 3b-224 --layers 26 -- --quantize int8,int4
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_VISION_LAYERS = 27


def timed(command: list[str]) -> tuple[float, float, str, str]:
    """(peak RSS in GB, wall seconds, stderr, stdout) of `command` under GNU time."""
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024 / 1e9
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    return peak, seconds, proc.stderr, proc.stdout


def largest_tensor_fp32(source: Path) -> float:
    from export.checkpoint import Checkpoint

    return max(4 * e.nbytes // (2 if e.dtype in ("BF16", "F16") else 4) for e in Checkpoint(source).entries.values()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["10b-448"], choices=["3b-224", "3b-448", "10b-448", "28b-448"])
    parser.add_argument("--layers", nargs="+", type=int, default=[2])
    parser.add_argument("--vision-layers", type=int, default=FULL_VISION_LAYERS)
    parser.add_argument("--work", type=Path, default=REPO / "target" / "bench" / "convert-memory")
    parser.add_argument("convert_args", nargs="*", help="after --: extra `export convert` arguments")
    args = parser.parse_args()
    python = sys.executable
    for preset in args.preset:
        for layers in args.layers:
            source, out = args.work / f"{preset}-L{layers}-source", args.work / f"{preset}-L{layers}-onnx"
            shutil.rmtree(source, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            tiny = ["-m", "export", "tiny", str(source), "--preset", preset, "--layers", str(layers)]
            timed([python, *tiny, "--vision-layers", str(args.vision_layers)])
            try:
                peak, seconds, log, printed = timed([python, "-m", "export", "convert", str(source), str(out), *args.convert_args])
                row = {
                    "preset": preset,
                    "text_layers": layers,
                    "vision_layers": args.vision_layers,
                    "convert_args": args.convert_args,
                    "peak_rss_gb": round(peak, 2),
                    "wall_s": round(seconds),
                    "largest_tensor_fp32_gb": round(largest_tensor_fp32(source), 2),
                    "checkpoint_gb": round(sum(p.stat().st_size for p in source.glob("*.safetensors")) / 1e9, 2),
                    "written_gb": round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9, 2),
                    "checks": [line.strip() for line in log.splitlines() if "checked against torch" in line],
                    # --validate's table and verdict
                    "validation": [line for line in printed.splitlines() if line.startswith("|") or "validation" in line],
                }
                print(json.dumps(row), flush=True)
            finally:
                shutil.rmtree(source, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
