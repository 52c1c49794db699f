"""The ONNX Runtime loop over the exported graphs gives transformers' greedy tokens exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from export.runtime import OnnxPaliGemma
from export.validate import LOGIT_TOLERANCE, compare

from .conftest import FIGURES, converted_dir, shared_images

MAX_NEW_TOKENS = 40
# Candidates for the batch test; it needs rows of different lengths and one that stops early.
PROMPTS = [
    "caption en",
    "answer en what is in the image ? how many people are there",
    "detect cat ; dog ; car",
    "ocr",
    "segment the rocket",
    "describe en",
    "question en a red car",
]


def load(path) -> Image.Image:
    return Image.open(path)


def assert_exact(rows, what: str):
    for r in rows:
        assert r.reference == r.onnx, f"{what}: tokens differ for {r.prompt!r}\nref  {r.reference}\nonnx {r.onnx}"
    worst = max(r.max_logit_diff for r in rows)
    FIGURES.append(f"{what}: {len(rows)} rows identical, max |logit diff| {worst:.2e}")
    assert worst <= LOGIT_TOLERANCE["fp32"], f"{what}: max logit difference {worst:.2e}"
    return worst


@pytest.fixture(scope="module")
def onnx_model(converted):
    return OnnxPaliGemma(converted.onnx_dir)


def test_single_prompt_on_every_shared_image(converted, reference, onnx_model):
    model, processor = reference
    for path in shared_images():
        rows = compare(model, processor, onnx_model, [load(path)], ["caption en"], MAX_NEW_TOKENS)
        assert_exact(rows, f"{converted.name} single {path.name}")


def test_left_padded_batch_of_three(converted, reference, onnx_model):
    model, processor = reference
    images = [load(p) for p in shared_images()[:3]]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    lengths = [len(processor.tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 3, "the batch must pad rows of different lengths"
    assert_exact(compare(model, processor, onnx_model, images, prompts, MAX_NEW_TOKENS), f"{converted.name} batch3")


def test_batch_rows_equal_their_single_runs(converted, reference, onnx_model):
    model, processor = reference
    images = [load(p) for p in shared_images()[3:6]]
    prompts = PROMPTS[3:6]
    batched = compare(model, processor, onnx_model, images, prompts, MAX_NEW_TOKENS)
    for image, prompt, row in zip(images, prompts, batched):
        alone = compare(model, processor, onnx_model, [image], [prompt], MAX_NEW_TOKENS)[0]
        eos = set(onnx_model.m["eos_token_id"])
        n = next((i + 1 for i, t in enumerate(alone.onnx) if t in eos), len(alone.onnx))
        assert row.onnx[:n] == alone.onnx[:n], f"{prompt!r}: batched row differs from its single run"


def test_row_that_emits_eos_early_keeps_batch_aligned(converted, reference, onnx_model):
    """One row finishes while the others go on: it is fed <pad> and the rest are unaffected."""
    model, processor = reference
    eos = set(onnx_model.m["eos_token_id"])
    images = [load(p) for p in shared_images()]
    found = None
    for i, image in enumerate(images):
        for prompt in PROMPTS:
            ref = compare(model, processor, onnx_model, [image], [prompt], MAX_NEW_TOKENS)[0]
            stop = next((k for k, t in enumerate(ref.reference) if t in eos), None)
            if stop is not None and stop < MAX_NEW_TOKENS // 2:
                found = (image, prompt)
                break
        if found:
            break
    assert found, "no image/prompt pair stops early on this checkpoint: the eos case is not exercised"
    long_image = images[(images.index(found[0]) + 1) % len(images)]
    rows = compare(model, processor, onnx_model, [found[0], long_image], [found[1], "describe en"], MAX_NEW_TOKENS)
    assert any(t in eos for t in rows[0].onnx)
    assert_exact(rows, f"{converted.name} early-eos batch")


@pytest.mark.parametrize("name", ["window8", "window40"])
def test_prompt_and_generation_cross_the_sliding_window(name, tiny_root):
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    conv = converted_dir(tiny_root, name)
    model = PaliGemmaForConditionalGeneration.from_pretrained(conv.source, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(conv.source)
    onnx_model = OnnxPaliGemma(conv.onnx_dir)
    window = conv.spec.sliding_window
    image = load(shared_images()[0])
    prompt = PROMPTS[1]
    prompt_len = len(processor(images=image, text=prompt)["input_ids"][0])
    rows = compare(model, processor, onnx_model, [image], [prompt], MAX_NEW_TOKENS)
    eos = set(onnx_model.m["eos_token_id"])
    generated = next((i for i, t in enumerate(rows[0].reference) if t in eos), len(rows[0].reference))
    assert prompt_len > window or prompt_len + generated > window, "this case never reaches past the window"
    where = "prompt longer than window" if prompt_len > window else "decoding past the window"
    assert_exact(rows, f"{name} {where} (prompt {prompt_len}, generated {generated}, window {window})")


def test_fp16_graphs_stay_close_to_fp32_reference(converted_fp16, tiny_root):
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(converted_fp16.source, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(converted_fp16.source)
    onnx_model = OnnxPaliGemma(converted_fp16.onnx_dir, dtype="fp16")
    images = [load(p) for p in shared_images()]
    rows = compare(model, processor, onnx_model, images, ["caption en"] * len(images), MAX_NEW_TOKENS)
    agree = np.mean([a == b for r in rows for a, b in zip(r.reference, r.onnx)])
    first = np.mean([r.reference[0] == r.onnx[0] for r in rows])
    worst_first_step = max(r.max_logit_diff for r in rows)
    FIGURES.append(
        f"fp16 gqa1: greedy token agreement {agree:.1%} over {len(rows)} images x {MAX_NEW_TOKENS} tokens, "
        f"first token {first:.0%}, max |logit diff| {worst_first_step:.2e} (tolerance {LOGIT_TOLERANCE['fp16']:g})"
    )
    assert first == 1.0, "fp16 changed the first generated token"
    assert worst_first_step <= LOGIT_TOLERANCE["fp16"]
