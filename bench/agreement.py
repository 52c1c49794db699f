"""Quality of a dtype, in its own process: `python -m bench.agreement ARGS` prints
{"teacher_forced": top-1 agreement, "positions": n, "distinct_reference_tokens": k}.

The graphs are fed transformers' fp32 greedy tokens (the benchmark's long run and batch run) and
their argmax is compared with the next reference token at every position. The reference ran with
min_new_tokens, so `<eos>` is excluded from the argmax here too.
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
    parser.add_argument("--reference", required=True, help="JSON: images, prompt, token_ids {long, batch} of transformers")
    args = parser.parse_args(argv)

    from PIL import Image
    from transformers import AutoProcessor

    from export.runtime import OnnxPaliGemma

    ref = json.load(open(args.reference))
    processor = AutoProcessor.from_pretrained(args.source)
    model = OnnxPaliGemma(args.model, args.dtype, threads=args.threads)
    eos = model.m["eos_token_id"]
    images = ref["images"]
    runs = [(images[:1], [ref["token_ids"]["long"]]), ([images[i % len(images)] for i in range(len(ref["token_ids"]["batch"]))], ref["token_ids"]["batch"])]
    hits = positions = 0
    for paths, tokens in runs:
        forced = np.array(tokens, dtype=np.int64)
        inputs = processor(images=[Image.open(p) for p in paths], text=[ref["prompt"]] * len(paths), return_tensors="np", padding="longest")
        out = model.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], forced.shape[1], forced=forced)
        for step, logits in enumerate(out.logits):
            logits[:, eos] = -np.inf
            hits += int((logits.argmax(axis=-1) == forced[:, step]).sum())
            positions += forced.shape[0]
    # A random checkpoint may repeat one token forever; then agreement says little, and the table shows it.
    distinct = len({t for _, rows in runs for row in rows for t in row})
    json.dump({"teacher_forced": hits / positions, "positions": positions, "distinct_reference_tokens": distinct}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
