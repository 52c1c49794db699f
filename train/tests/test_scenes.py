"""Scene generator and task targets: determinism, geometry, colours and target round trips."""

import re

import numpy as np
import pytest

from train import scenes, tasks
from train.scenes import COLOURS, KINDS, generate

SEEDS = range(60)
SIZE = 224


@pytest.fixture(scope="module")
def generated():
    return [generate(seed, SIZE) for seed in SEEDS]


def parse_detect(text: str, width: int, height: int):
    """Labels and (x_min, y_min, x_max, y_max) pixel boxes, inverted as src/detect.rs does."""
    out = []
    for obj in text.split(" ; "):
        m = re.fullmatch(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})> ([a-z ]+)", obj)
        assert m, obj
        y0, x0, y1, x1 = (int(g) for g in m.groups()[:4])
        box = (tasks.from_bin(x0, width), tasks.from_bin(y0, height), tasks.from_bin(x1, width), tasks.from_bin(y1, height))
        out.append((m.group(5), box))
    return out


def test_same_seed_gives_identical_pixels_and_targets():
    a, b = generate(7, SIZE), generate(7, SIZE)
    assert np.array_equal(np.array(a.image), np.array(b.image))
    assert tasks.tasks_for(a) == tasks.tasks_for(b)


def test_different_seeds_give_different_scenes(generated):
    images = {np.array(s.image).tobytes() for s in generated}
    assert len(images) == len(generated)


def test_shape_counts_run_from_one_to_four_and_all_occur(generated):
    counts = [len(s.objects) for s in generated]
    assert set(counts) == {1, 2, 3, 4}


def test_every_shape_is_mostly_visible_and_its_box_is_its_mask_extent(generated):
    for s in generated:
        for o in s.objects:
            assert o.mask.shape == (SIZE, SIZE) and o.mask.dtype == bool
            side = scenes.SIZES[o.size] * SIZE
            # A triangle covers half its square; MIN_VISIBLE of that must stay visible.
            assert o.mask.sum() >= scenes.MIN_VISIBLE * 0.45 * side * side, (s.seed, o.label)
            assert o.box == scenes.mask_box(o.mask)


def test_visible_shape_pixels_are_exactly_the_named_colour(generated):
    for s in generated:
        pixels = np.array(s.image)
        for o in s.objects:
            assert (pixels[o.mask] == COLOURS[o.colour]).all(), (s.seed, o.label)


def test_masks_are_disjoint_and_background_never_equals_a_shape_colour(generated):
    for s in generated:
        pixels = np.array(s.image)
        shapes = np.zeros((SIZE, SIZE), dtype=bool)
        for o in s.objects:
            assert not (shapes & o.mask).any()
            shapes |= o.mask
        rest = ~shapes
        if s.text_box is not None:
            x0, y0, x1, y1 = s.text_box
            rest[y0:y1, x0:x1] = False
        for rgb in COLOURS.values():
            assert not (pixels[rest] == rgb).all(axis=1).any(), (s.seed, rgb)


def test_some_scenes_overlap_and_some_have_text(generated):
    overlapping = sum(any(o.mask.sum() < 0.99 * _full_area(o) for o in s.objects) for s in generated)
    with_text = sum(s.text is not None for s in generated)
    assert 0 < overlapping < len(generated) / 2
    assert len(generated) / 4 < with_text < 3 * len(generated) / 4


def _full_area(o):
    side = round(scenes.SIZES[o.size] * SIZE)
    return {"circle": 0.785, "square": 1.0, "triangle": 0.5}[o.kind] * side * side * 0.97


def test_text_box_does_not_touch_any_shape(generated):
    for s in generated:
        if s.text_box is None:
            continue
        x0, y0, x1, y1 = s.text_box
        for o in s.objects:
            assert not o.mask[y0:y1, x0:x1].any()


def test_ocr_target_only_when_text_is_drawn(generated):
    for s in generated:
        ocr = [t for p, t in tasks.tasks_for(s) if p == tasks.OCR_PROMPT]
        assert ocr == ([s.text] if s.text is not None else [])


def test_count_and_colour_answers_match_the_objects(generated):
    for s in generated:
        pairs = dict(tasks.tasks_for(s))
        assert pairs[tasks.COUNT_PROMPT] == str(len(s.objects))
        circles = [o for o in s.objects if o.kind == "circle"]
        if len(circles) == 1:
            assert pairs[tasks.COLOUR_PROMPT] == circles[0].colour
        else:
            assert tasks.COLOUR_PROMPT not in pairs


def test_caption_lists_shapes_left_to_right_then_background():
    s = next(s for s in (generate(seed, SIZE) for seed in SEEDS) if len(s.objects) == 3)
    a, b, c = (o.label for o in s.objects)
    assert tasks.caption(s) == f"a {a}, a {b} and a {c} on a {s.background} background"
    centres = [(o.box[0] + o.box[2]) / 2 for o in s.objects]
    assert centres == sorted(centres)


def test_detect_target_parses_back_to_the_boxes_within_half_a_bin(generated):
    for s in generated:
        width, height = s.image.size
        prompt, target = next((p, t) for p, t in tasks.tasks_for(s) if p.startswith("detect "))
        parsed = parse_detect(target, width, height)
        assert [label for label, _ in parsed] == [o.label for o in s.objects]
        assert set(prompt[len("detect ") :].split(" ; ")) == {o.label for o in s.objects}
        for (_, box), o in zip(parsed, s.objects):
            for got, want, side in zip(box, o.box, (width, height, width, height)):
                assert abs(got - want) <= side / 1023 / 2 + 1e-9


def test_one_label_detect_targets_hold_only_that_labels_objects(generated):
    many = [s for s in generated if len(tasks.labels_of(s)) > 1]
    assert many
    for s in many:
        each = [p for p in tasks.prompts_for(s, detect_each=True) if p not in tasks.prompts_for(s)]
        assert each == [f"detect {label}" for label in tasks.labels_of(s)]
        for label, prompt in zip(tasks.labels_of(s), each):
            parsed = parse_detect(tasks.target_for(s, prompt), *s.image.size)
            named = [o for o in s.objects if o.label == label]
            assert [got for got, _ in parsed] == [label] * len(named)
            for (_, box), o in zip(parsed, named):
                assert all(abs(got - want) <= SIZE / 1023 / 2 + 1e-9 for got, want in zip(box, o.box))
    single = next(s for s in generated if len(tasks.labels_of(s)) == 1)
    # One label: `detect LABEL` is the full detect request, asked once.
    assert tasks.prompts_for(single, detect_each=True) == tasks.prompts_for(single)


def test_target_for_names_what_a_prompt_lacks(generated):
    plain = next(s for s in generated if s.text is None)
    with pytest.raises(ValueError, match="no text"):
        tasks.target_for(plain, tasks.OCR_PROMPT)
    with pytest.raises(ValueError, match="codes_of"):
        tasks.target_for(plain, tasks.segment_prompt(plain.objects[0].label))
    with pytest.raises(ValueError, match="no task"):
        tasks.target_for(plain, "describe en")
    absent = next(label for label in (f"{c} {k}" for c in COLOURS for k in KINDS) if label not in tasks.labels_of(plain))
    for prompt in (f"detect {absent}", tasks.segment_prompt(absent)):
        with pytest.raises(ValueError, match="no object labelled"):
            tasks.target_for(plain, prompt, codes_of=lambda o: [0] * 16)
    uncircled = next(s for s in generated if not any(o.kind == "circle" for o in s.objects))
    with pytest.raises(ValueError, match="0 circles"):
        tasks.target_for(uncircled, tasks.COLOUR_PROMPT)


@pytest.mark.parametrize("side", [56, 112, 224, 448, 640])
def test_binning_round_trips_every_pixel_edge_within_half_a_bin(side):
    for v in range(side + 1):
        b = tasks.to_bin(v, side)
        assert 0 <= b <= 1023
        assert abs(tasks.from_bin(b, side) - v) <= side / 1023 / 2 + 1e-9
    assert tasks.to_bin(0, side) == 0 and tasks.to_bin(side, side) == 1023


def test_segment_targets_hold_box_codes_and_label_per_object():
    scene = next(s for s in (generate(seed, SIZE) for seed in range(100)) if len({o.label for o in s.objects}) < len(s.objects))
    codes_of = lambda o: [len(o.label) + i for i in range(16)]  # noqa: E731 (stands in for the VQ-VAE)
    pairs = dict(tasks.tasks_for(scene, codes_of))
    width, height = scene.image.size
    for label in {o.label for o in scene.objects}:
        target = pairs[tasks.segment_prompt(label)]
        same = [o for o in scene.objects if o.label == label]
        assert target.count(" ; ") == len(same) - 1
        for part, o in zip(target.split(" ; "), same):
            codes = "".join(f"<seg{c:03d}>" for c in codes_of(o))
            assert part == f"{tasks.loc_tokens(o.box, width, height)}{codes} {label}"
    assert not any(p.startswith("segment") for p, _ in tasks.tasks_for(scene))


def test_scenes_render_at_other_sizes():
    s = generate(3, 112)
    assert s.image.size == (112, 112)
    assert all(o.mask.shape == (112, 112) and o.mask.any() for o in s.objects)


def test_sample_sheet_is_written(tmp_path):
    from pathlib import Path

    out = Path(__file__).resolve().parents[2] / "target" / "artifacts" / "scenes-sample.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet = scenes.sample_sheet(seed=0, count=8)
    sheet.save(out)
    assert sheet.size[0] == 4 * scenes.DEFAULT_IMAGE_SIZE


def test_missing_font_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(scenes, "FONT_PATH", scenes.Path("/nonexistent/DejaVuSans-Bold.ttf"))
    with pytest.raises(FileNotFoundError, match="fonts-dejavu-core"):
        scenes.load_font(12)
