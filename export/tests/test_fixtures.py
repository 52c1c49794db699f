"""tests/fixtures/expected_tokens.json is what a fresh `python -m export fixtures` run gives.

One regeneration in the shared cache (its conversions reused when their stamps are current: `.ci/run`
makes them from scratch just before) serves every test here; the pure comparison is tested on
altered copies of it.
"""

from __future__ import annotations

import copy
import json

import pytest

from export import fixtures as fx
from export.__main__ import main


@pytest.fixture(scope="module")
def models_root():
    # The shared cache: `.ci/run` has just made it with `python -m export fixtures --check`, from
    # scratch on a fresh machine, and a stamp that is not current reconverts here.
    from .conftest import shared_models_root

    return shared_models_root()


@pytest.fixture(scope="module")
def current(models_root) -> dict:
    return fx.build_document(models_root, log=lambda _: None)


@pytest.fixture(scope="module")
def committed() -> dict:
    assert fx.EXPECTED_FILE.is_file(), f"{fx.EXPECTED_FILE} is missing: run python -m export fixtures target/tiny-models"
    return json.loads(fx.EXPECTED_FILE.read_text())


def test_committed_expectations_equal_a_fresh_run(committed, current):
    diff = fx.differences(committed, current)
    assert not diff, "fixtures are stale: run python -m export fixtures target/tiny-models\n" + "\n".join(diff)


def test_changed_token_is_reported_with_its_case_and_position(current, tmp_path):
    altered = copy.deepcopy(current)
    case = next(c for c in altered["cases"] if len(c["expected"][0]) > 3)
    case["expected"][0][2] += 1
    path = tmp_path / "expected_tokens.json"
    path.write_text(fx.render(altered))
    ok, report = fx.check_file(path, current, tmp_path)
    assert not ok
    assert report.startswith("fixtures are stale")
    assert f"{case['name']} row 0" in report and "first difference at token 2" in report


def test_missing_or_dropped_cases_are_reported(current, tmp_path):
    ok, report = fx.check_file(tmp_path / "absent.json", current, tmp_path)
    assert not ok and "does not exist" in report
    fewer = copy.deepcopy(current)
    dropped = fewer["cases"].pop()
    assert fx.differences(fewer, current) == [f"{dropped['name']}: case is new"]


def test_version_suffix_alone_is_not_stale(current, tmp_path):
    other_build = dict(current, torch=current["torch"] + ".other-build")
    path = tmp_path / "expected_tokens.json"
    path.write_text(fx.render(other_build))
    ok, report = fx.check_file(path, current, tmp_path)
    assert ok and "note: written with torch" in report


def test_rendered_file_parses_back_to_the_document(current):
    assert json.loads(fx.render(current)) == current


def test_second_run_reuses_checkpoints_and_conversions(models_root, current):
    manifests = {p: p.stat().st_mtime_ns for p in models_root.glob("*/onnx/manifest.json")}
    weights = {p: p.stat().st_mtime_ns for p in models_root.glob("*/source/*.safetensors")}
    assert len(manifests) == len(weights) == len(fx.TEST_CONFIGS)
    lines = []
    fx.prepare_models(models_root, log=lines.append)
    assert {p: p.stat().st_mtime_ns for p in manifests} == manifests
    assert {p: p.stat().st_mtime_ns for p in weights} == weights
    assert all(line.endswith("is current") for line in lines), lines


def test_every_case_names_images_and_models_that_exist(committed, models_root):
    for case in committed["cases"]:
        # A conversion has manifest.json; the community layout (export/community.py) has none.
        model_dir = models_root / case["model_dir"]
        assert (model_dir / "manifest.json").is_file() or (model_dir / "onnx/decoder_model_merged.onnx").is_file(), case["name"]
        assert len(case["expected"]) == len(case["expected_text"]) == len(case["requests"]), case["name"]
        for request in case["requests"]:
            assert (fx.REPO_ROOT / request["image"]).is_file(), f"{case['name']}: {request['image']}"


def test_cases_cover_early_eos_and_both_sliding_windows(committed):
    names = {c["name"]: c for c in committed["cases"]}
    assert {"window8/beyond_window", "window40/beyond_window"} <= set(names)
    (early,) = [c for n, c in names.items() if n.endswith("/early_eos")]
    short, long = early["expected"]
    limit = committed["max_new_tokens"]
    assert len(short) < limit // 2 and len(long) >= len(short) + 3, (len(short), len(long))


def test_cli_check_exits_1_when_stale_and_0_when_current(current, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fx, "build_document", lambda root, log=print: current)
    path = tmp_path / "expected_tokens.json"
    assert main(["fixtures", str(tmp_path), "--expected", str(path)]) == 0
    assert main(["fixtures", str(tmp_path), "--expected", str(path), "--check"]) == 0
    stale = copy.deepcopy(current)
    stale["max_new_tokens"] += 1
    path.write_text(fx.render(stale))
    assert main(["fixtures", str(tmp_path), "--expected", str(path), "--check"]) == 1
    assert "fixtures are stale" in capsys.readouterr().err


def test_changed_prompt_layout_is_reported(current, committed):
    altered = copy.deepcopy(current)
    altered["prompt_layouts"]["prompts"][1]["input_ids"].insert(0, 2)
    assert fx.differences(altered, current) == ["prompt_layouts: the processor's ids or errors for LAYOUT_PROMPTS changed"]
    # The processor refuses more <image> placeholders than images; the fixture keeps its words.
    errors = [p for p in committed["prompt_layouts"]["prompts"] if "error" in p]
    assert [p["prompt"] for p in errors] == ["<image><image>caption en", "caption <image> en <image>", "<image><image><image>"]
    assert all("number of <image> tokens" in p["error"] for p in errors)
