"""`python -m bench` end to end on the tests' tiny shape (its figures are printed, never asserted),
and the report's arithmetic on made-up figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import checkpoint, report
from bench.__main__ import QUANTIZED
from export import cpu

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "target/release/paligemma"
TOKENS, LONG, BATCH = 6, 24, 3


# Session-scoped, and every test here on one worker (the repository's conftest.py): the whole
# benchmark runs once (a module-scoped fixture is torn down whenever the worker's next test is
# another module's).
@pytest.fixture(scope="session")
def results(tmp_path_factory):
    assert BINARY.is_file(), f"{BINARY} is missing: `cargo build --release` (bash .ci/setup does)"
    work = tmp_path_factory.mktemp("bench")
    # The baseline is the very conversion the benchmark makes (built here first, then found in its
    # cache), so its rows must repeat the main rows' tokens.
    _, converted = checkpoint.build(work, "tiny", 2, 2, QUANTIZED)
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--preset",
        "tiny",
        "--work",
        str(work),
        "--tokens",
        str(TOKENS),
        "--long-tokens",
        str(LONG),
        "--batch",
        str(BATCH),
        "--baseline",
        f"same={converted}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "tiny-L2-V2-results"
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), proc.stdout


def test_every_runtime_and_dtype_is_measured_with_the_asked_lengths(results):
    summary, markdown, stdout = results
    rows = [(r["runtime"], r["dtype"]) for r in summary["results"]]
    assert rows == [
        ("transformers", "fp32"),
        *((runtime, d) for runtime in ("paligemma", "paligemma (same)") for d in ("fp32", "int8", "q4")),
    ]
    for r in summary["results"]:
        ids = r["token_ids"]
        assert len(ids["single"]) == TOKENS and len(ids["long"]) == LONG, r["runtime"]
        assert [len(row) for row in ids["batch"]] == [TOKENS] * BATCH, r["runtime"]
        assert r["memory"]["peak_rss_gb"] > 0 and r["floor_ms"] > 0
        assert r["decode_ms_per_token"] > 0 and r["batch_decode_tokens_per_s"] > 0
    assert summary["bandwidth"]["read_gb_s"] > 0
    assert markdown.strip() in stdout
    assert markdown.count("| paligemma |") == 2 * 3
    assert markdown.count("| paligemma (same) |") == 2 * 3
    # Every figure names the CPU and each flag that picks the int8 kernels, present or not.
    assert all(flag in summary["machine"]["cpu"] for flag in cpu.INT8_FLAGS), summary["machine"]


def test_a_baseline_conversion_is_measured_beside_with_its_own_agreement(results):
    summary, _, _ = results
    ours = {r["dtype"]: r for r in summary["results"] if r["runtime"] == "paligemma"}
    baseline = {r["dtype"]: r for r in summary["results"] if r["runtime"] == "paligemma (same)"}
    for dtype, r in baseline.items():
        assert r["token_ids"] == ours[dtype]["token_ids"], dtype
        assert r.get("teacher_forced") == ours[dtype].get("teacher_forced"), dtype


def test_a_baseline_of_another_model_is_refused_before_anything_runs(results, tmp_path):
    summary, _, _ = results
    work = Path(summary["settings"]["work"])
    m = json.loads((work / "tiny-L2-V2" / "onnx" / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "num_hidden_layers": m["num_hidden_layers"] + 1}))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--preset", "tiny", "--work", str(work), "--baseline", f"other={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"--baseline other={tmp_path} is another model (num_hidden_layers 3 against 2)" in proc.stderr, proc.stderr[-2000:]
    assert "transformers fp32 ..." not in proc.stderr


def test_a_baseline_that_is_not_a_conversion_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--preset", "tiny", "--work", str(tmp_path), "--baseline", f"old={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"--baseline old={tmp_path}: give LABEL=DIR, DIR a converted model directory with manifest.json" in proc.stderr


def test_fp32_runtime_gives_transformers_tokens_with_forced_lengths(results):
    """min_new_tokens keeps <eos> out of the argmax in both runtimes: the rows stay identical."""
    summary, _, _ = results
    reference = summary["results"][0]["token_ids"]
    fp32 = summary["results"][1]
    assert fp32["token_ids"] == reference
    assert fp32["greedy"] == {"rows": 2 + BATCH, "identical_rows": 2 + BATCH, "mean_identical_prefix": 1.0}


def test_quantized_dtypes_report_teacher_forced_agreement(results):
    summary, _, _ = results
    for r in (r for r in summary["results"][1:] if r["dtype"] != "fp32"):
        forced = r["teacher_forced"]
        assert forced["positions"] == 2 * LONG
        assert forced["distinct_reference_tokens"] > 1
        # A quantized decoder is close to fp32, not a random guess (1 / vocabulary).
        assert 0.3 < forced["teacher_forced"] <= 1.0, r["dtype"]


def test_agreement_of_the_fp32_graphs_is_exact(results):
    """The control: the measurement itself gives 100% on graphs equal to transformers."""
    summary, _, _ = results
    out = Path(summary["settings"]["work"]) / "tiny-L2-V2-results"
    model = Path(summary["settings"]["work"]) / "tiny-L2-V2"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.agreement",
            "--model",
            str(model / "onnx"),
            "--source",
            str(model / "source"),
            "--dtype",
            "fp32",
            "--threads",
            "1",
            "--reference",
            str(out / "reference.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    control = json.loads(proc.stdout)
    assert control == {"teacher_forced": 1.0, "positions": 2 * LONG, "distinct_reference_tokens": control["distinct_reference_tokens"]}
    assert control["distinct_reference_tokens"] > LONG // 4


def test_greedy_agreement_counts_rows_and_prefixes():
    ref = {"single": [1, 2, 3, 4], "long": [5, 6], "batch": [[7, 8], [9, 9]]}
    ours = {"single": [1, 2, 0, 4], "long": [5, 6], "batch": [[7, 8], [0, 9]]}
    assert report.greedy_agreement(ours, ref) == {"rows": 4, "identical_rows": 2, "mean_identical_prefix": (0.5 + 1 + 1 + 0) / 4}


def test_tables_give_ratios_against_the_first_row():
    def row(runtime, dtype, decode, prefill, batch_tps):
        return {
            "runtime": runtime,
            "dtype": dtype,
            "load_s": 1.0,
            "vision_ms": 100.0,
            "prefill_ms": prefill,
            "first_token_ms": 300.0,
            "decode_ms_per_token": decode,
            "floor_ms": 10.0,
            "long_early_ms": 20.0,
            "long_late_ms": 22.0,
            "batch_decode_tokens_per_s": batch_tps,
            "single_decode_tokens_per_s": 1000 / decode,
            "memory": {"peak_rss_gb": 2.0, "peak_anon_gb": 1.0},
        }

    warned = {**row("paligemma (old)", "int8", 20.0, 100.0, 100.0), "warnings": ["int8 weights run the exact way"]}
    text = report.tables([row("transformers", "fp32", 40.0, 300.0, 50.0), row("paligemma", "q4", 10.0, 100.0, 300.0), warned])
    assert text.endswith("Warnings at load:\n- paligemma (old) int8: int8 weights run the exact way\n")
    q4 = next(line for line in text.splitlines() if line.startswith("| paligemma | q4 | 1.0 |"))
    cells = [c.strip() for c in q4.strip("|").split("|")]
    assert cells[5] == "2.00x"  # (100 + 300) / (100 + 100)
    assert cells[8] == "4.00x"  # 40 / 10 ms per token
    assert cells[10] == "1.00x"  # 10 ms against a 10 ms floor
    assert cells[13] == "3.00x"  # 300 tokens/s against 100 at batch 1
