"""`--validate`: the converted graphs against transformers on a built-in image and each task prefix.

For every prompt: greedy tokens from `generate(do_sample=False)` and from the ONNX Runtime loop
(`runtime.py`), and the largest logit difference over all steps. Prints a table; any token
mismatch, or a logit difference over the dtype's tolerance, is a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Tokens must be identical; logits may differ by float rounding. fp32 graphs run the same float32
# math in another order: 4e-5 on the tiny test models, 3.1e-4 on a full-width 3B (random weights,
# logits up to ~30), so 1e-3 flags a real divergence without failing a faithful 10B. fp16 rounds
# every activation.
LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-1}
TASK_PROMPTS = (
    "caption en",
    "describe en",
    "ocr",
    "answer en what is in the image?",
    "question en a cat",
    "detect cat ; dog",
    "segment cat",
)


@dataclass
class Row:
    prompt: str
    reference: list[int]
    onnx: list[int]
    max_logit_diff: float
    max_abs_logit: float

    @property
    def tokens_match(self) -> bool:
        return self.reference == self.onnx


def builtin_image():
    """A synthetic 320x240 RGB scene (gradient, disc, bars), so validation needs no file."""
    from PIL import Image

    y, x = np.mgrid[0:240, 0:320].astype(np.float32)
    rgb = np.stack([x / 320 * 255, y / 240 * 255, np.full_like(x, 96)], axis=-1)
    disc = (x - 200) ** 2 + (y - 110) ** 2 < 60**2
    rgb[disc] = (230, 40, 40)
    rgb[(y > 180) & ((x // 20) % 2 == 0)] = (20, 20, 20)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def compare(model, processor, onnx_model, images, prompts, max_new_tokens: int) -> list[Row]:
    """One padded batch through both; per-row tokens (up to <eos>) and max logit difference."""
    import torch

    inputs = processor(images=images, text=list(prompts), return_tensors="pt", padding="longest")
    with torch.no_grad():
        ref = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    ref_tokens = ref.sequences[:, inputs["input_ids"].shape[1] :].numpy()
    got = onnx_model.generate(
        inputs["pixel_values"].numpy(), inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), max_new_tokens
    )
    rows = []
    for b, prompt in enumerate(prompts):
        steps = min(len(ref.logits), len(got.logits))
        diff = max(float(np.abs(ref.logits[s][b].float().numpy() - got.logits[s][b]).max()) for s in range(steps))
        scale = max(float(ref.logits[s][b].abs().max()) for s in range(steps))
        rows.append(Row(prompt, ref_tokens[b].tolist(), got.tokens[b].tolist(), diff, scale))
    return rows


def table(rows: list[Row], dtype: str) -> str:
    tol = LOGIT_TOLERANCE[dtype]
    lines = [f"| prompt | tokens | identical | max logit diff (tol {tol:g}) | max abs logit |", "|---|---|---|---|---|"]
    for r in rows:
        ok = "yes" if r.tokens_match else "NO"
        lines.append(f"| {r.prompt} | {len(r.reference)} | {ok} | {r.max_logit_diff:.2e} | {r.max_abs_logit:.1f} |")
    return "\n".join(lines)


def validate(model_dir: Path, source: Path, dtype: str = "fp32", max_new_tokens: int = 24) -> tuple[bool, str]:
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    from .runtime import OnnxPaliGemma

    processor = AutoProcessor.from_pretrained(source)
    # The reference is always fp32: fp16 graphs are judged by how close they stay to it.
    model = PaliGemmaForConditionalGeneration.from_pretrained(source, attn_implementation="eager", dtype=torch.float32).eval()
    onnx_model = OnnxPaliGemma(model_dir, dtype=dtype)
    image = builtin_image()
    rows = compare(model, processor, onnx_model, [image] * len(TASK_PROMPTS), TASK_PROMPTS, max_new_tokens)
    ok = all(r.tokens_match and r.max_logit_diff <= LOGIT_TOLERANCE[dtype] for r in rows)
    return ok, table(rows, dtype)
