"""bench.llamacpp without llama.cpp (which CI does not build): reading llama-bench's JSON (two
outputs recorded from llama-bench 0c1e570 on the tiny gqa1 text weights), the table beside this
runtime's figures, the prompt length, and the refusals that come before any build."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import llamacpp

DATA = Path(__file__).parent / "data"
MODEL = llamacpp.REPO / "target/tiny-models/gqa1/onnx"


def recorded() -> dict:
    row = {"runtime": "llama.cpp", "dtype": "fp32", "type": "F32"}
    for name in ("llama_bench_pp.json", "llama_bench_tg.json"):
        row |= llamacpp.parse_llama_bench((DATA / name).read_text())
    return row


def test_prompt_and_generation_tests_are_read_from_llama_bench_json():
    row = recorded()
    assert row["prompt_tokens"] == 23 and row["prompt_tokens_per_s"] == pytest.approx(50232.852645)
    assert row["decode_tokens"] == 8 and row["decode_depth"] == 23
    assert row["decode_ms_per_token"] == pytest.approx(1e3 / 6081.612635)


def test_output_without_a_test_is_refused():
    with pytest.raises(SystemExit, match="holds no prompt or generation test"):
        llamacpp.parse_llama_bench("[]")


def test_the_comparison_puts_each_class_beside_this_runtime():
    ours = {"runtime": "paligemma", "dtype": "fp32", "decode_ms_per_token": 0.4, "prefill_ms": 1.0}
    text = llamacpp.beside([ours], [recorded()])
    # 23 prompt tokens in 1 ms: 23,000 tokens/s against llama.cpp's 50,233.
    assert "| fp32 | F32 | 0.4 / 0.2 (2.43x) | 23000.0 / 50232.9 (0.46x) (23) |" in text


def test_the_prompt_length_is_the_processors_layout():
    # gqa1: 16 image tokens, <bos>, then "caption en\n" in its tokenizer.
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(str(MODEL / "tokenizer.json")).encode("caption en\n", add_special_tokens=False)
    assert llamacpp.prompt_tokens(MODEL, "caption en") == 16 + 1 + len(text.ids)


def test_a_directory_that_is_not_llama_cpp_is_refused_before_any_build(tmp_path):
    with pytest.raises(SystemExit, match="not a llama.cpp source tree"):
        llamacpp.measure(tmp_path, MODEL, tmp_path / "work", ["fp32"], 2, 23, 8, 1)
    assert not (tmp_path / "work").exists()
