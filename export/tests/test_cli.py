"""`python -m export` on bad input: one line naming the problem, exit 2, no manifest left behind;
`--validate` passes on a faithful conversion and fails on a wrong one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export import graph
from export.convert import convert
from export.manifest import read_manifest
from export.tiny import TinySpec, write_tiny
from export.validate import validate

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("cli") / "tiny", TinySpec(), seed=7)


def test_unknown_hub_model(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("convert", "no-such-owner/no-such-model", str(out))
    assert_one_line_error(proc, "no-such-owner/no-such-model")
    assert not (out / "manifest.json").exists()


def test_path_that_is_neither_dir_nor_hub_id(tmp_path):
    assert_one_line_error(run_cli("convert", str(tmp_path / "nowhere" / "x" / "y"), str(tmp_path / "o")), "not a Hub id")


def test_missing_processor_files(tiny_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    (src / "tokenizer.json").unlink()
    out = tmp_path / "out"
    assert_one_line_error(run_cli("convert", str(src), str(out)), "tokenizer.json", "PaliGemmaProcessor")
    assert not out.exists()


def test_config_that_is_not_paligemma(tiny_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llava"
    (src / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("convert", str(src), str(tmp_path / "out")), "model_type is 'llava'")


def test_existing_out_dir_without_force(tiny_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_one_line_error(run_cli("convert", str(tiny_source), str(out)), "--force")
    assert (out / "keep.txt").read_text() == "user data"


def test_vae_with_wrong_shapes(tiny_source, tmp_path):
    bad = tmp_path / "vae.npz"
    np.savez(bad, **{"_vq_vae._embedding": np.zeros((128, 8), np.float32)})
    out = tmp_path / "out"
    assert_one_line_error(run_cli("convert", str(tiny_source), str(out), "--seg-vae", str(bad)), "missing key")
    assert not out.exists()


def test_convert_with_seg_vae_and_validate_passes(tiny_source, tmp_path):
    vae = tmp_path / "vae.npz"
    assert run_cli("tiny", str(tmp_path / "unused"), "--vae", str(vae)).returncode == 0
    out = tmp_path / "out"
    proc = run_cli("convert", str(tiny_source), str(out), "--seg-vae", str(vae), "--validate")
    assert proc.returncode == 0, proc.stderr
    assert "validation passed" in proc.stdout and "| segment cat |" in proc.stdout
    m = read_manifest(out)
    assert m["graphs"]["seg_decoder"] == {"fp32": "onnx/seg_decoder.onnx"}
    for f in m["files"]:
        assert (out / f).stat().st_size == m["file_sizes"][f]
    assert not list(tmp_path.glob(".out.partial-*")), "work directory left behind"


def test_validate_reports_agreement_for_quantized_dtypes(tiny_source, tmp_path):
    """With --quantize, --validate still demands identical fp32 tokens and reports, per quantized
    dtype, its teacher-forced and greedy agreement with the same transformers run."""
    out = tmp_path / "out"
    proc = run_cli("convert", str(tiny_source), str(out), "--quantize", "int8,int4", "--validate")
    assert proc.returncode == 0, proc.stderr
    assert "validation passed" in proc.stdout
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith(("| int8 |", "| q4 |"))}
    assert sorted(rows) == ["int8", "q4"]
    for line in rows.values():
        forced, greedy = (float(cell.strip().rstrip("%")) for cell in line.split("|")[2:4])
        assert 0 < forced <= 100 and 0 <= greedy <= 100


def test_validate_fails_on_graphs_of_another_checkpoint(tiny_source, tmp_path):
    other = write_tiny(tmp_path / "other", TinySpec(), seed=8)
    out = convert(str(other), tmp_path / "out")
    ok, report = validate(out, tiny_source)
    assert not ok
    assert "| NO |" in report


def test_graphs_over_the_limit_use_external_data(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setattr(graph, "EXTERNAL_ABOVE", 1024)  # every graph goes external
    out = convert(str(tiny_source), tmp_path / "out")
    m = read_manifest(out)
    data = [f for f in m["files"] if f.endswith(".onnx.data")]
    assert "onnx/decoder_model_merged.onnx.data" in data
    ok, report = validate(out, tiny_source)
    assert ok, report
    sess = ort.InferenceSession(str(out / m["graphs"]["decoder"]["fp32"]))
    assert sess.get_outputs()[0].name == "logits"
