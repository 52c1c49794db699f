"""`python -m bench`: transformers fp32 and this project's runtime in every dtype, one run, one machine.

Steps:
 1. build and convert the model once (cached under --work; `checkpoint.py`);
 2. measure the machine's memory bandwidth, before and after the runs, for each dtype's decode
    floor (`machine.py`);
 3. run transformers (`bench.hf`) and `paligemma bench` per dtype, each in its own process, sampling
    its memory; the same threads, image(s), prompt and token counts for all;
 4. for each quantized dtype, top-1 agreement with transformers' fp32 argmax, teacher-forced on
    seeded random tokens (`bench.agreement`, its own process);
    `--baseline LABEL=DIR` adds another conversion of the same checkpoint (one made by an earlier
    version of the converter, say) with the same dtypes, so a format change is measured before and
    after in one run;
 5. print the markdown tables (`report.py`) and write them with the raw figures as JSON.

No figure here is asserted anywhere: timings are reported, never tested.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from export.manifest import read_manifest

from . import checkpoint, llamacpp, machine, report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = [REPO / "tests/data/images" / n for n in ("chelsea.png", "camera.png", "rocket.jpg", "text.png")]
QUANTIZED = ("int8", "q4")  # manifest dtypes of `convert --quantize int8,int4`
# A baseline must be a conversion of the same checkpoint; these catch another shape or tokenizer.
SAME_MODEL_KEYS = (
    "image_size",
    "num_image_tokens",
    "hidden_size",
    "vocab_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "image_token_id",
    "eos_token_id",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="3b-224", choices=["3b-224", "3b-448", "tiny"], help="model width and image size (tiny: the tests' shape)"
    )
    parser.add_argument("--layers", type=int, default=2, help="text decoder layers (26: the full 3B)")
    parser.add_argument("--vision-layers", type=int, help="SigLIP layers (default: 27 with --layers 26, the full 3B, else 2)")
    parser.add_argument("--dtypes", default="fp32,int8,q4", help="this runtime's dtypes to measure")
    parser.add_argument(
        "--quantize-vision", action="store_true", help="convert with --quantize-vision: the quantized dtypes run a quantized vision encoder"
    )
    parser.add_argument(
        "--decoders",
        default="auto",
        help="this runtime's decoder graphs to measure, each its own rows: auto (what `paligemma` picks), or any of gqa, "
        "portable (rows `paligemma [gqa]`, `paligemma [portable]`)",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for every runtime (torch and ONNX Runtime intra-op)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", default="caption en")
    parser.add_argument("--image", type=Path, action="append", help="image(s); default four of tests/data/images")
    parser.add_argument("--work", type=Path, default=REPO / "target/bench", help="cache of checkpoints and conversions")
    parser.add_argument("--out", type=Path, help="write results .json and .md here (default WORK/<model>-results)")
    parser.add_argument("--binary", type=Path, default=REPO / "target/release/paligemma")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers (ratios then use the first dtype)")
    parser.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="DIR",
        help="also run llama.cpp from this source tree on the same text weights (bench/llamacpp.py: F32, Q8_0, Q4_0 "
        "beside fp32, int8, q4); not in CI",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also run the dtypes its manifest lists of another conversion of the same checkpoint (e.g. by an earlier "
        "version: `git worktree add /tmp/old COMMIT`, then its `python -m export convert "
        "WORK/<model>/source DIR --quantize int8,int4`), rows labelled `paligemma (LABEL)`",
    )
    return parser.parse_args(argv)


def measured(cmd: list[str], log: Path) -> tuple[dict, dict]:
    """Runs `cmd`, sampling its memory every 50 ms; (its JSON stdout, memory peaks).
    Peak RSS is the kernel's high-water mark of the process (VmHWM); peak anonymous leaves out the
    file pages ONNX Runtime maps from the graphs' data files, which the kernel can drop and which
    processes share."""
    with open(log, "a") as err:
        err.write(f"$ {' '.join(cmd)}\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        peaks = {"VmHWM:": 0, "RssAnon:": 0}
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key = line.split(maxsplit=1)[0] if line else ""
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                pass
            time.sleep(0.05)
        out = proc.stdout.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"error: {cmd[0]} {cmd[1]} ... exited with {code}; its stderr is in {log}")
    memory = {"peak_rss_gb": peaks["VmHWM:"] / 1e9, "peak_anon_gb": peaks["RssAnon:"] / 1e9}
    return json.loads(out.strip().splitlines()[-1]), memory


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    full = checkpoint.FULL_DEPTH.get(args.preset)
    vision_layers = args.vision_layers or (full[1] if full and args.layers == full[0] else 2)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d != "fp32" and d not in QUANTIZED]
    if unknown:
        raise SystemExit(f"error: --dtypes {','.join(unknown)}: choose from fp32, {', '.join(QUANTIZED)}")
    decoders = [d.strip() for d in args.decoders.split(",") if d.strip()]
    if not decoders or any(d not in ("auto", "gqa", "portable") for d in decoders):
        raise SystemExit(f"error: --decoders {args.decoders}: choose auto, or any of gqa, portable (comma-separated)")
    if not args.binary.is_file():
        raise SystemExit(f"error: {args.binary} is missing: build it with `cargo build --release`")
    images = [str(p) for p in (args.image or DEFAULT_IMAGES)]
    python = sys.executable
    baselines = []
    for item in args.baseline:
        label, sep, path = item.partition("=")
        if not sep or not label or not (Path(path) / "manifest.json").is_file():
            raise SystemExit(f"error: --baseline {item}: give LABEL=DIR, DIR a converted model directory with manifest.json")
        baselines.append((label, Path(path)))

    print(f"model: {args.preset}, {args.layers} text / {vision_layers} vision layers (building and converting once) ...", file=sys.stderr)
    source, model_dir = checkpoint.build(
        args.work, args.preset, args.layers, vision_layers, QUANTIZED, quantize_vision=args.quantize_vision
    )
    # The quantized vision encoder changes the int8/q4 rows: its results are kept apart.
    name = f"{args.preset}-L{args.layers}-V{vision_layers}" + ("-quantized-vision" if args.quantize_vision else "")
    out = args.out or args.work / f"{name}-results"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "stderr.log"
    log.write_text("")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for label, path in baselines:
        theirs = read_manifest(path)
        differ = [k for k in SAME_MODEL_KEYS if theirs.get(k) != manifest[k]]
        if differ:
            raise SystemExit(
                f"error: --baseline {label}={path} is another model "
                f"({', '.join(f'{k} {theirs.get(k)} against {manifest[k]}' for k in differ)}): "
                f"convert {source} with the earlier converter"
            )
    # (row label, model directory) for every conversion measured: this converter's, then the baselines.
    conversions = [("paligemma", model_dir), *((f"paligemma ({label})", path) for label, path in baselines)]

    print("memory bandwidth ...", file=sys.stderr)
    # Measured before and after the runs: neighbours on a shared host move it by 10-15%, and the
    # floor must be what the machine can do, so each figure is the better of the two.
    before = machine.bandwidth(args.threads)

    def annotate(result: dict, runtime: str, dtype: str, memory: dict, directory: Path = model_dir) -> dict:
        graphs = json.loads((directory / "manifest.json").read_text())["graphs"]
        decoder = "decoder_gqa" if result.get("decoder") == "gqa" else "decoder"
        decoder_bytes = machine.weight_bytes(directory, graphs[decoder][dtype])
        all_bytes = sum(machine.weight_bytes(directory, graphs[g][dtype]) for g in ("vision_encoder", "embed_tokens", decoder))
        return {
            **result,
            "runtime": runtime,
            "model_dir": str(directory),
            "memory": memory,
            "decoder_bytes": decoder_bytes,
            "graph_gb": all_bytes / 1e9 if runtime != "transformers" else None,
        }

    # Teacher forcing for the agreement figures: seeded random text ids (below the <loc> tokens),
    # the long run's length after each of the first two images.
    rng = np.random.default_rng(0)
    forced_images = images[:2]
    forced = {
        "images": forced_images,
        "prompt": args.prompt,
        "tokens": rng.integers(3, manifest["loc_token_start"], (len(forced_images), args.long_tokens)).tolist(),
    }
    forced_file = out / "forced.json"
    forced_file.write_text(json.dumps(forced))

    common = [
        "--prompt",
        args.prompt,
        "--tokens",
        str(args.tokens),
        "--long-tokens",
        str(args.long_tokens),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
    ]
    for image in images:
        common += ["--image", image]
    results = []
    if not args.no_transformers:
        print("transformers fp32 ...", file=sys.stderr)
        hf, memory = measured([python, "-m", "bench.hf", "--source", str(source), *common], log)
        results.append(annotate(hf, "transformers", "fp32", memory))
    for runtime, directory in conversions:
        listed = read_manifest(directory)
        for dtype in (d for d in dtypes if d in listed["dtypes"]):
            for decoder in decoders:
                if decoder == "gqa" and dtype not in listed["graphs"].get("decoder_gqa", {}):
                    continue
                label = runtime if decoder == "auto" else f"{runtime} [{decoder}]"
                print(f"{label} {dtype} ...", file=sys.stderr)
                cmd = [str(args.binary), "bench", "--model", str(directory), "--dtype", dtype, "--decoder", decoder, *common]
                ours, memory = measured(cmd, log)
                results.append(annotate(ours, label, dtype, memory, directory))

    if not args.no_transformers:
        reference = results[0]
        ref_file = out / "reference.json"
        argmax, _ = measured([python, "-m", "bench.hf", "--source", str(source), *common, "--forced", str(forced_file)], log)
        ref_file.write_text(json.dumps({**forced, "argmax": argmax["forced_argmax"]}))
        for r in results[1:]:
            r["greedy"] = report.greedy_agreement(r["token_ids"], reference["token_ids"])
            if r["dtype"] != "fp32":
                print(f"teacher-forced agreement {r['runtime']} {r['dtype']} ...", file=sys.stderr)
                r["teacher_forced"], _ = measured(
                    [
                        python,
                        "-m",
                        "bench.agreement",
                        "--model",
                        r["model_dir"],
                        "--source",
                        str(source),
                        "--dtype",
                        r["dtype"],
                        "--threads",
                        str(args.threads),
                        "--reference",
                        str(ref_file),
                    ],
                    log,
                )

    llama_rows = []
    if args.llama_cpp:
        print("llama.cpp ...", file=sys.stderr)
        prompt_tokens = llamacpp.prompt_tokens(model_dir, args.prompt)
        classes = [d for d in dtypes if d in llamacpp.TYPES]
        llama_rows = llamacpp.measure(args.llama_cpp, source, args.work, classes, args.threads, prompt_tokens, args.tokens, 3)

    after = machine.bandwidth(args.threads)
    bandwidth = {key: max(before[key], after[key]) for key in before} | {"before": before, "after": after}
    for r in results:
        r["floor_ms"] = r["decoder_bytes"] / (bandwidth["read_gb_s"] * 1e9) * 1e3

    summary = {
        "model": name,
        "machine": machine.describe(),
        "bandwidth": bandwidth,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "image"} | {"images": images},
        "results": results,
        "llama_cpp": llama_rows,
    }
    text = (
        f"Model {name} (random weights), {args.threads} threads, prompt {args.prompt!r}, {args.tokens} tokens "
        f"(long run {args.long_tokens}), batch {args.batch}. Machine: {summary['machine']['cpu']}, "
        f"{summary['machine']['cores']} cores, {summary['machine']['memory_gb']} GB; read bandwidth "
        f"{bandwidth['read_gb_s']:.1f} GB/s, copy {bandwidth['copy_gb_s']:.1f} GB/s.\n\n" + report.tables(results)
    )
    if llama_rows:
        text += "\n\n" + llamacpp.beside(results, llama_rows)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(text)
    print(text)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
