"""The ONNX Runtime loop over the exported graphs gives transformers' greedy tokens exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from export import fixtures
from export.runtime import OnnxPaliGemma
from export.validate import LOGIT_TOLERANCE, compare

from .conftest import FIGURES, converted_dir, shared_images

MAX_NEW_TOKENS = 40
# The bound for fp32 on the tiny checkpoints (tighter than --validate's, see validate.py).
FP32_LOGIT_TOLERANCE = 1e-4
PROMPTS = fixtures.SEARCH_PROMPTS  # rows of different lengths, some stopping early


def load(path) -> Image.Image:
    return Image.open(path)


def assert_exact(rows, what: str):
    for r in rows:
        assert r.reference == r.onnx, f"{what}: tokens differ for {r.prompt!r}\nref  {r.reference}\nonnx {r.onnx}"
    worst = max(r.max_logit_diff for r in rows)
    FIGURES.append(f"{what}: {len(rows)} rows identical, max |logit diff| {worst:.2e}")
    assert worst <= FP32_LOGIT_TOLERANCE, f"{what}: max logit difference {worst:.2e}"
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
    """One row finishes while the other goes on: it is fed <pad> and the other is unaffected."""
    model, processor = reference
    found, batch = fixtures.find_early_eos(
        {converted.name: fixtures.Model(converted.name, converted.onnx_dir, model, processor, onnx_model)}
    )
    images = [load(fixtures.REPO_ROOT / r.image) for r in batch]
    rows = compare(model, processor, onnx_model, images, [r.prompt for r in batch], fixtures.MAX_NEW_TOKENS)
    eos = set(onnx_model.m["eos_token_id"])
    assert any(t in eos for t in rows[0].onnx)
    assert_exact(rows, f"{converted.name} early-eos batch")


@pytest.mark.parametrize("name", fixtures.WINDOW_CONFIGS)
def test_prompt_and_generation_cross_the_sliding_window(name, tiny_root):
    conv = converted_dir(tiny_root, name)
    model = fixtures.load_model(name, conv.source, conv.onnx_dir)
    request = fixtures.find_beyond_window(model)  # decodes past the window, or raises
    window = conv.spec.sliding_window
    prompt_len = fixtures.prompt_length(model, request)
    rows = compare(
        model.hf, model.processor, model.onnx, [load(fixtures.REPO_ROOT / request.image)], [request.prompt], fixtures.MAX_NEW_TOKENS
    )
    where = "prompt longer than window" if prompt_len > window else "decoding past the window"
    assert_exact(rows, f"{name} {where} (prompt {prompt_len}, window {window})")


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
