"""The committed scenes model, end to end: a slice of the held-out evaluation through the Rust binary
and transformers (fp32 tokens identical), and every answer the model was released getting right
is still right."""

import json
import re

import pytest

from train import scenes, tasks
from train.evaluate import BINARY, REPO, evaluate, requests
from train.release import CI_SLICE, VAE_FILE
from train.score import Tally, mask_rle, parse_boxes, request_name

MODEL = REPO / "models" / "scenes"
REFERENCE = REPO / "models" / "scenes-hf"


@pytest.fixture(scope="module")
def released():
    return json.loads((MODEL / "evaluation.json").read_text())


@pytest.fixture(scope="module")
def slice_report(tmp_path_factory):
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: build it with `cargo build --release` (.ci/setup does)")
    vae = REFERENCE / VAE_FILE  # a model released with segmentation: its segment requests run too
    seg_vae = vae if vae.is_file() else None
    return evaluate(MODEL, REFERENCE, CI_SLICE, ["fp32", "int8", "q4"], tmp_path_factory.mktemp("eval"), seg_vae=seg_vae)


def test_fp32_tokens_equal_transformers_on_the_slice(slice_report):
    fp32 = slice_report["results"]["rust fp32"]
    assert fp32["fp32_identical"], fp32["same_tokens_as_transformers"]


def test_answers_known_right_at_release_are_still_right(released, slice_report):
    now = {(a["image"], a["prompt"]): a for a in slice_report["answers"]}
    known = [a for a in released["answers"] if a["fp32_right"]]
    assert len(known) >= len(released["answers"]) // 2, "the released slice should be mostly right"
    for a in known:
        got = now[(a["image"], a["prompt"])]
        assert got["target"] == a["target"], "the scene generator changed: run python -m train.release again"
        assert got["fp32_right"], f"{a['image']} {a['prompt']!r}: now {got['fp32']!r}, released {a['fp32']!r}"
        assert got["fp32"] == a["fp32"]


# Requests of the slice whose tokens equal transformers' fp32 ones. Measured on the released model
# (version 2, with segment requests) on an AMD EPYC with AVX2 and no AVX-512: int8 54 and q4 38 of
# 58; over the 300 released scenes int8 1715 and q4 1260 of 1861 (0.92, 0.68).
QUANTIZED_FLOORS = {"int8": 0.85, "q4": 0.6}


@pytest.mark.parametrize("dtype", sorted(QUANTIZED_FLOORS))
def test_quantized_answers_agree_with_transformers_above_a_floor(slice_report, dtype):
    """Lossy dtypes are held to agreement, not to the answers one CPU once gave."""
    same, total = map(int, slice_report["results"][f"rust {dtype}"]["same_tokens_as_transformers"].split("/"))
    assert same / total >= QUANTIZED_FLOORS[dtype], f"{dtype}: {same} of {total} requests give transformers' tokens"


def test_example_scene_matches_its_record():
    example = json.loads((MODEL / "example.json").read_text())
    scene = scenes.generate(example["seed"], scenes.Image.open(MODEL / "example.png").size[0])
    assert scene.image.tobytes() == scenes.Image.open(MODEL / "example.png").convert("RGB").tobytes()
    assert example["caption"] == tasks.caption(scene)
    assert example["detect_prompt"] == tasks.detect_prompt(scene)
    assert [o["mask"] for o in example["objects"]] == [mask_rle(o.mask) for o in scene.objects]
    largest = max(scene.objects, key=lambda o: o.mask.sum())
    assert example["segment_prompt"] == tasks.segment_prompt(largest.label)


def test_tally_scores_a_perfect_and_a_shifted_detection():
    scene = scenes.generate(3, 112)
    target = tasks.detect_target(scene)
    tally = Tally()
    assert tally.add(scene, tasks.detect_prompt(scene), target, target)
    shifted = re.sub(r"<loc(\d{4})>", lambda m: f"<loc{min(1023, int(m[1]) + 300):04d}>", target)
    assert not tally.add(scene, tasks.detect_prompt(scene), target, shifted)
    assert len(parse_boxes(shifted, 112, 112)) == len(scene.objects)
    summary = tally.summary()
    assert summary["detect_recall@0.5"] == 0.5 and summary["detect_exact"] == 0.5


def test_tally_scores_one_label_detect_apart_and_refuses_a_listed_scene():
    scene = scenes.generate(3, 112)
    label = tasks.labels_of(scene)[1]
    prompt = tasks.detect_prompt(scene, [label])
    assert request_name(scene, prompt) == "detect_each" and request_name(scene, tasks.detect_prompt(scene)) == "detect"
    target = tasks.target_for(scene, prompt)
    tally = Tally()
    assert tally.add(scene, prompt, target, target)
    # Every object of the scene, the named one among them: found, but not an answer to the prompt.
    assert not tally.add(scene, prompt, target, tasks.detect_target(scene))
    summary = tally.summary()
    assert summary["detect_each_recall@0.5"] == 1.0 and summary["detect_each_exact"] == 0.5
    assert summary["answers"]["detect_each"] == 2 and summary["detect_objects"] == 0


def test_shuffled_labels_ask_every_label_in_another_order_for_the_same_answer(tmp_path):
    plain = requests(12, 112, tmp_path / "plain")
    shuffled = requests(12, 112, tmp_path / "shuffled", shuffle_labels=True)
    assert len(plain) == len(shuffled)
    changed = 0
    for p, s in zip(plain, shuffled):
        scene = p["scene"]
        if p["prompt"] == tasks.detect_prompt(scene) and len(tasks.labels_of(scene)) > 1:
            assert s["prompt"] != p["prompt"] and sorted(tasks.prompt_labels(s["prompt"])) == sorted(tasks.labels_of(scene))
            assert request_name(scene, s["prompt"]) == "detect"
            changed += 1
        else:
            assert s["prompt"] == p["prompt"]
        assert s["target"] == p["target"]
    assert changed >= 6
    # Seeded by the scene: the same prompts again.
    assert [r["prompt"] for r in requests(12, 112, tmp_path / "again", shuffle_labels=True)] == [r["prompt"] for r in shuffled]


# The slice's multi-label detection recall with the labels in another order than the answer's,
# measured on version 8: 22 of 23 objects (version 7, the first trained on random orders: 21); version 6, which
# copied each box's label from the prompt by position, found 9 (0.474 over the 300 scenes).
SHUFFLED_RECALL_FLOOR = 0.85


def test_detect_finds_the_objects_whatever_the_order_of_the_labels(tmp_path):
    report = evaluate(MODEL, REFERENCE, CI_SLICE, ["fp32"], tmp_path, shuffle_labels=True)
    fp32 = report["results"]["rust fp32"]
    assert fp32["fp32_identical"], fp32["same_tokens_as_transformers"]
    scene_of = {a["image"]: scenes.generate(report["seed_base"] + int(a["image"][6:10]), 112) for a in report["answers"]}
    detects = [a for a in report["answers"] if a["prompt"].startswith("detect ")]
    assert sum(a["prompt"] != tasks.detect_prompt(scene_of[a["image"]]) for a in detects) >= len(detects) // 2
    assert fp32["detect_recall@0.5"] >= SHUFFLED_RECALL_FLOOR, fp32["detect_recall@0.5"]
