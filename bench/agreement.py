"""Quality of a dtype, in its own process: `python -m bench.agreement ARGS` prints
{"teacher_forced": top-1 agreement, "positions": n, "distinct_reference_tokens": k}.

The graphs are fed a seeded sequence of random text tokens after each image's prompt (the
benchmark's `forced.json`), one decode step per token, and their argmax at every step is compared
with transformers' fp32 argmax at the same position (`bench.hf --forced`). Random tokens rather
than greedy output: a random checkpoint's greedy output repeats one token, which says little.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agreement")
    parser.add_argument("--model", required=True, help="converted model directory")
    parser.add_argument("--source", required=True, help="the checkpoint (for its processor)")
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--reference", required=True, help="JSON: images, prompt, tokens and transformers' argmax per image")
    args = parser.parse_args(argv)

    from PIL import Image
    from transformers import AutoProcessor

    from export.runtime import OnnxPaliGemma

    ref = json.load(open(args.reference))
    processor = AutoProcessor.from_pretrained(args.source)
    model = OnnxPaliGemma(args.model, args.dtype, threads=args.threads)
    tokens = np.array(ref["tokens"], dtype=np.int64)
    expected = np.array(ref["argmax"], dtype=np.int64)
    images = [Image.open(p) for p in ref["images"]]
    inputs = processor(images=images, text=[ref["prompt"]] * len(images), return_tensors="np", padding="longest")
    got = model.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], tokens.shape[1], forced=tokens).tokens
    hits = int((got == expected).sum())
    json.dump(
        {"teacher_forced": hits / expected.size, "positions": int(expected.size), "distinct_reference_tokens": len(set(expected.flat))},
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
