"""`--validate`: the converted graphs against transformers on a built-in image and each task prefix.

For every prompt: greedy tokens from `generate(do_sample=False)` and from the ONNX Runtime loop
(`runtime.py`), and the largest logit difference over all steps. Prints a table; any token
mismatch, or a logit difference over the dtype's tolerance, is a failure. Quantized dtypes are not
expected to be identical: for each, the table reports teacher-forced top-1 agreement and greedy
agreement with the same reference.

One model at a time, so a checkpoint validates where it converts: transformers runs first and
only its tokens and logits are kept; then the vision graph computes the image rows and is
released; then the embedding and decoder run (the full 3B: peak in the README).
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


@dataclass
class Reference:
    """transformers' greedy run on one padded batch: numpy inputs, tokens i64[B,T], logits per step f32[B,V]."""

    inputs: dict[str, np.ndarray]
    tokens: np.ndarray
    logits: list[np.ndarray]


def reference_of(model, processor, images, prompts, max_new_tokens: int) -> Reference:
    """transformers `model` (fp32) on one padded batch of `images` and `prompts`."""
    import torch

    inputs = processor(images=images, text=list(prompts), return_tensors="pt", padding="longest")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = ref.sequences[:, inputs["input_ids"].shape[1] :].numpy()
    return Reference({k: v.numpy() for k, v in inputs.items()}, tokens, [step.float().numpy() for step in ref.logits])


# Most image tokens validated as one padded batch of every prompt. Above it, one prompt at a time:
# eager attention holds [B, heads, L, L] scores, and at 896 px (4,096 image tokens) seven rows of the
# 3B went past 24 GB (killed); one row is about an eighth of that.
BATCHED_IMAGE_TOKENS = 1024


def reference_run(source: Path, processor, images, prompts, max_new_tokens: int, batch_size: int) -> list[Reference]:
    """`reference_of` on `prompts` in batches of `batch_size`, with the checkpoint at `source`
    loaded for it (a tensor at a time, `checkpoint.load_model`) and released on return."""
    import gc

    import torch

    from .checkpoint import load_model

    model = load_model(source, torch.float32)
    references = [
        reference_of(model, processor, images[i : i + batch_size], prompts[i : i + batch_size], max_new_tokens)
        for i in range(0, len(prompts), batch_size)
    ]
    del model
    gc.collect()
    return references


def compare_reference(onnx_model, reference: Reference, prompts, max_new_tokens: int, release_vision: bool = False) -> list[Row]:
    """The ONNX loop on the reference's batch; per-row tokens (up to <eos>) and max logit
    difference. With `release_vision`, the vision graph is closed once the image rows exist."""
    inputs = reference.inputs
    embeds = onnx_model.prompt_embeds(inputs["pixel_values"], inputs["input_ids"])
    if release_vision:
        del onnx_model.vision
    got = onnx_model.generate(None, inputs["input_ids"], inputs["attention_mask"], max_new_tokens, embeds=embeds)
    rows = []
    for b, prompt in enumerate(prompts):
        steps = min(len(reference.logits), len(got.logits))
        diff = max(float(np.abs(reference.logits[s][b] - got.logits[s][b]).max()) for s in range(steps))
        scale = max(float(np.abs(reference.logits[s][b]).max()) for s in range(steps))
        rows.append(Row(prompt, reference.tokens[b].tolist(), got.tokens[b].tolist(), diff, scale))
    return rows


def compare(model, processor, onnx_model, images, prompts, max_new_tokens: int) -> list[Row]:
    """transformers `model` and the ONNX loop on one padded batch (both in memory: the tests')."""
    return compare_reference(onnx_model, reference_of(model, processor, images, prompts, max_new_tokens), prompts, max_new_tokens)


def table(rows: list[Row], dtype: str) -> str:
    tol = LOGIT_TOLERANCE[dtype]
    lines = [f"| prompt | tokens | identical | max logit diff (tol {tol:g}) | max abs logit |", "|---|---|---|---|---|"]
    for r in rows:
        ok = "yes" if r.tokens_match else "NO"
        lines.append(f"| {r.prompt} | {len(r.reference)} | {ok} | {r.max_logit_diff:.2e} | {r.max_abs_logit:.1f} |")
    return "\n".join(lines)


def validate(
    model_dir: Path, source: Path, dtype: str = "fp32", max_new_tokens: int = 24, quantized: tuple[str, ...] = ()
) -> tuple[bool, str]:
    """`dtype`'s graphs must reproduce transformers (the reference is always fp32: fp16 graphs are
    judged by how close they stay to it); each of `quantized` gets its agreement reported."""
    from transformers import AutoProcessor

    from .runtime import OnnxPaliGemma

    processor = AutoProcessor.from_pretrained(source)
    images = [builtin_image()] * len(TASK_PROMPTS)
    batch = len(TASK_PROMPTS) if processor.image_seq_length <= BATCHED_IMAGE_TOKENS else 1
    references = reference_run(source, processor, images, TASK_PROMPTS, max_new_tokens, batch)
    onnx = OnnxPaliGemma(model_dir, dtype=dtype)
    rows = []
    for i, reference in enumerate(references):
        prompts = TASK_PROMPTS[i * batch : (i + 1) * batch]
        rows += compare_reference(onnx, reference, prompts, max_new_tokens, release_vision=i == len(references) - 1)
    ok = all(r.tokens_match and r.max_logit_diff <= LOGIT_TOLERANCE[dtype] for r in rows)
    report = [table(rows, dtype)]
    if quantized:
        header = "| dtype | teacher-forced top-1 agreement | greedy agreement | rows identical | positions |"
        report += ["", header, "|---|---|---|---|---|"]
    for q in quantized:
        a = agreement(OnnxPaliGemma(model_dir, dtype=q), [(r.inputs, r.tokens) for r in references], max_new_tokens)
        report.append(f"| {q} | {a.teacher_forced:.1%} | {a.greedy:.1%} | {a.rows_identical:.0%} | {a.positions} |")
    return ok, "\n".join(report)


@dataclass
class Agreement:
    """How often a graph set picks fp32 transformers' greedy token (positions up to the reference <eos>)."""

    teacher_forced: float  # argmax equals the reference token when fed the reference prefix
    greedy: float  # free-running greedy token equals the reference token at the same position
    rows_identical: float  # whole greedy rows equal
    positions: int
    rows: int


def greedy_references(model, processor, images, prompts, max_new_tokens: int) -> list[tuple[dict, np.ndarray]]:
    """Every image with every prompt (one batch per prompt): (numpy inputs, transformers fp32 greedy i64[B,T])."""
    import torch

    out = []
    for prompt in prompts:
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding="longest")
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(({k: v.numpy() for k, v in inputs.items()}, ref[:, inputs["input_ids"].shape[1] :].numpy()))
    return out


def agreement(onnx_model, references: list[tuple[dict, np.ndarray]], max_new_tokens: int) -> Agreement:
    """The ONNX loop against `greedy_references`, fed the reference tokens and free-running."""
    eos = set(onnx_model.m["eos_token_id"])
    forced_hits = free_hits = positions = identical = rows = 0
    for inputs, ref in references:
        args = (inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], max_new_tokens)
        forced = onnx_model.generate(*args, forced=ref).tokens
        free = onnx_model.generate(*args).tokens
        for b, row in enumerate(ref.tolist()):
            n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            forced_hits += int((forced[b, :n] == ref[b, :n]).sum())
            got = free[b, :n].tolist()
            free_hits += sum(a == r for a, r in zip(got, row[:n]))
            identical += got == row[:n]
            positions += n
            rows += 1
    return Agreement(forced_hits / positions, free_hits / positions, identical / rows, positions, rows)
