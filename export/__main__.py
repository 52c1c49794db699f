"""Command line: `python -m export convert|tiny|fixtures ...` (see README.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ExportError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert a PaliGemma 2 checkpoint to ONNX graphs + manifest.json")
    conv.add_argument("model", help="Hub id (google/paligemma2-3b-mix-224) or a save_pretrained directory")
    conv.add_argument("out_dir", type=Path, help="output model directory")
    conv.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="weight and activation dtype")
    conv.add_argument(
        "--quantize",
        action="append",
        metavar="int8,int4",
        help="also write quantized decoders (int8: 8-bit MatMulNBits, manifest dtype int8; int4: 4-bit MatMulNBits, dtype q4); "
        "a comma list or the flag repeated",
    )
    conv.add_argument(
        "--quantize-vision",
        action="store_true",
        help="the quantized dtypes also get a quantized vision encoder (7-bit weights per column, 2.2-2.3x faster "
        "on CPU; docs/PERFORMANCE.md has its agreement)",
    )
    conv.add_argument("--seg-vae", type=Path, help="big_vision's vae-oid.npz: also export seg_decoder.onnx")
    conv.add_argument("--validate", action="store_true", help="compare with transformers afterwards; exit 1 on mismatch")
    conv.add_argument(
        "--no-check",
        action="store_true",
        help="skip the numeric check of each graph against its torch module as it is written (on by default)",
    )
    conv.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    tiny = sub.add_parser("tiny", help="write a tiny random PaliGemma 2 checkpoint for tests")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2, help="text decoder layers")
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--kv-heads", type=int, default=1)
    tiny.add_argument("--head-dim", type=int, default=24)
    tiny.add_argument("--sliding-window", type=int, default=4096)
    tiny.add_argument("--image-size", type=int, default=56)
    tiny.add_argument("--vae", type=Path, help="also write a random vae-oid.npz here")
    tiny.add_argument(
        "--preset",
        choices=["3b-224", "3b-448", "3b-896", "10b-448", "28b-448", "pg1-3b-224"],
        help="full-width shapes of a released model (size options ignored except --layers/--vision-layers), "
        "stored as released: bf16 safetensors shards of at most 5 GB",
    )
    tiny.add_argument("--dtype", choices=["fp32", "bf16"], help="weight dtype (default: bf16 with --preset, else fp32)")
    tiny.add_argument("--vision-layers", type=int, default=2)
    tiny.add_argument(
        "--text-model", choices=["gemma2", "gemma"], default="gemma2", help="gemma2: PaliGemma 2; gemma: PaliGemma 1 (no --preset)"
    )

    fix = sub.add_parser("fixtures", help="write the greedy tokens the Rust parity tests expect (tests/fixtures)")
    fix.add_argument("models_root", type=Path, help="where the tiny test models are written and converted (cached)")
    fix.add_argument("--expected", type=Path, help="the expectations file (default tests/fixtures/expected_tokens.json)")
    fix.add_argument("--check", action="store_true", help="compare with the file instead of writing it; exit 1 if stale")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "convert":
            from .convert import convert, resolve_source
            from .quantize import parse_schemes

            quantize_to = parse_schemes(args.quantize)
            out = convert(
                args.model,
                args.out_dir,
                dtype=args.dtype,
                seg_vae=args.seg_vae,
                quantize_to=quantize_to,
                quantize_vision=args.quantize_vision,
                force=args.force,
                check_graphs=not args.no_check,
            )
            print(f"wrote {out}")
            if args.validate:
                from .validate import validate

                ok, report = validate(out, resolve_source(args.model), dtype=args.dtype, quantized=tuple(quantize_to))
                print(report)
                if not ok:
                    print("validation FAILED: the graphs do not reproduce transformers", file=sys.stderr)
                    return 1
                print("validation passed")
        elif args.command == "fixtures":
            from .fixtures import fixtures

            ok, report = fixtures(args.models_root, expected=args.expected, check=args.check)
            print(report, file=sys.stdout if ok else sys.stderr)
            if not ok:
                return 1
        else:
            from .tiny import PRESETS, RELEASED_DTYPE, RELEASED_SHARD_SIZE, TinySpec, write_random_vae, write_tiny

            sizes = (
                PRESETS[args.preset]
                if args.preset
                else dict(
                    hidden_size=args.hidden_size,
                    num_attention_heads=args.heads,
                    num_key_value_heads=args.kv_heads,
                    head_dim=args.head_dim,
                    query_pre_attn_scalar=args.head_dim,
                    sliding_window=args.sliding_window,
                    image_size=args.image_size,
                    text_model=args.text_model,
                )
            )
            spec = TinySpec(**sizes, num_hidden_layers=args.layers, vision_layers=args.vision_layers)
            dtype = args.dtype or (RELEASED_DTYPE if args.preset else "fp32")
            shards = RELEASED_SHARD_SIZE if args.preset else None
            print(f"wrote {write_tiny(args.out_dir, spec, seed=args.seed, dtype=dtype, max_shard_size=shards)}")
            if args.vae:
                print(f"wrote {write_random_vae(args.vae, seed=args.seed)}")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
