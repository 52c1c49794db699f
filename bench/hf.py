"""transformers' side of the benchmark, run in its own process: `python -m bench.hf ARGS` prints
one JSON object with the fields of `paligemma bench` (src/bench.rs), measured the same way.

fp32 weights, eager attention (what transformers runs for Gemma 2's softcaps), greedy, lengths
forced with min_new_tokens. Step times come from a logits processor, which transformers calls once
per forward pass; the vision encoder is timed by a separate call of the same module. With --forced it gives, instead, the
reference of `bench.agreement`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

WINDOW = 8  # steps averaged at each end of the long run, as src/bench.rs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hf")
    parser.add_argument("--source", required=True)
    parser.add_argument("--image", action="append", required=True)
    parser.add_argument("--prompt", default="caption en")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument(
        "--forced",
        help="JSON {tokens: [[...] per image]}: only report transformers' argmax teacher-forced on them "
        "(its own run: its full-vocabulary logits must not count in the timed run's memory)",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from PIL import Image
    from transformers import AutoProcessor, LogitsProcessor, LogitsProcessorList, PaliGemmaForConditionalGeneration

    class Clock(LogitsProcessor):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    started = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(args.source, attn_implementation="eager", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.source)
    load_s = time.perf_counter() - started

    def run(images: list[str], tokens: int) -> dict:
        clock = Clock()
        begin = time.perf_counter()
        pictures = [Image.open(p) for p in images]
        inputs = processor(images=pictures, text=[args.prompt] * len(images), return_tensors="pt", padding="longest")
        generate_at = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
            )
        stamps = clock.stamps
        return {
            "begin": begin,
            "generate_at": generate_at,
            "stamps": stamps,
            "steps_ms": [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])],
            "ids": out[:, inputs["input_ids"].shape[1] :].tolist(),
            "pixel_values": inputs["pixel_values"],
        }

    if args.forced:
        json.dump({"forced_argmax": forced_argmax(model, processor, args, json.load(open(args.forced))["tokens"])}, sys.stdout)
        print()
        return 0

    run(args.image[:1], 2)  # warm-up, as the Rust side
    single = run(args.image[:1], args.tokens)
    with torch.inference_mode():
        begin = time.perf_counter()
        model.model.get_image_features(single["pixel_values"])
        vision_ms = (time.perf_counter() - begin) * 1e3
    long = run(args.image[:1], args.long_tokens)
    batch_images = [args.image[i % len(args.image)] for i in range(args.batch)]
    batch = run(batch_images, args.tokens)

    def mean(xs):
        return sum(xs) / max(len(xs), 1)

    def tokens_per_s(rows, steps_ms):
        return rows * len(steps_ms) / (sum(steps_ms) / 1e3)

    late = long["steps_ms"]
    report = {
        "dtype": "fp32",
        "providers": [["transformers", [f"torch {torch.__version__} cpu, eager attention"]]],
        "load_s": load_s,
        "vision_ms": vision_ms,
        "prefill_ms": (single["stamps"][0] - single["generate_at"]) * 1e3 - vision_ms,
        "first_token_ms": (single["stamps"][0] - single["begin"]) * 1e3,
        "decode_ms_per_token": mean(single["steps_ms"]),
        "long_tokens": args.long_tokens,
        "long_early_ms": mean(late[16 - WINDOW - 1 : 16 - 1]),
        "long_late_ms": mean(late[-WINDOW:]),
        "batch": args.batch,
        "single_decode_tokens_per_s": tokens_per_s(1, single["steps_ms"]),
        "batch_decode_tokens_per_s": tokens_per_s(args.batch, batch["steps_ms"]),
        "token_ids": {"single": single["ids"][0], "long": long["ids"][0], "batch": batch["ids"]},
    }
    json.dump(report, sys.stdout)
    print()
    return 0


def forced_argmax(model, processor, args, tokens: list[list[int]]) -> list[list[int]]:
    """Per image i: the argmax after the prompt and after each of tokens[i] but the last, from one
    forward pass over the prompt plus the tokens (typed as generated tokens, as in decoding)."""
    import torch
    from PIL import Image

    out = []
    for image, row in zip(args.image, tokens):
        inputs = processor(images=[Image.open(image)], text=[args.prompt], return_tensors="pt")
        forced = torch.tensor([row])
        ids = torch.cat([inputs["input_ids"], forced], 1)
        types = torch.cat([inputs["token_type_ids"], torch.ones_like(forced)], 1)
        with torch.inference_mode():
            logits = model(
                input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids), token_type_ids=types
            ).logits
        start = inputs["input_ids"].shape[1] - 1
        out.append(logits[0, start : start + len(row)].argmax(-1).tolist())
    return out


if __name__ == "__main__":
    sys.exit(main())
