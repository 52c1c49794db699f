"""The trainer: same seed, same weights; the model's fixed initialisation; the per-patch labels."""

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from train import scenes, tasks
from train.fit import MIN_COVER, BoxHead, PatchHead, RelevanceHead, TrainConfig, lr_at, per_task_loss, sample, target_loss, targets, train
from train.model import ModelConfig, build
from train.score import request_name

SMALL = ModelConfig(
    image_size=56,
    patch_size=14,
    hidden=32,
    layers=1,
    heads=2,
    head_dim=16,
    kv_heads=2,
    intermediate=64,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate=64,
)


def test_training_is_deterministic_for_a_seed(tmp_path):
    tc = TrainConfig(steps=3, batch=4, warmup=2)

    def weights(name: str, seed: int):
        train(SMALL, tc, seed, tmp_path / name, log_every=1)
        return load_file(tmp_path / name / "model.safetensors")

    runs = [weights("a", 0), weights("b", 0), weights("c", 1)]
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_lr_warms_up_then_decays_to_the_final_fraction():
    tc = TrainConfig(steps=100, warmup=10)
    assert lr_at(0, tc) == 0.1 and lr_at(9, tc) == 1.0
    assert abs(lr_at(99, tc) - tc.final_lr_fraction) < 1e-3


def test_position_and_loc_embeddings_start_smooth():
    model, proc = build(SMALL, 0)
    first = proc.tokenizer.convert_tokens_to_ids("<loc0000>")
    loc = model.model.language_model.embed_tokens.weight[first : first + 1024]
    cos = torch.nn.functional.cosine_similarity
    # Neighbouring bins are nearly the same row; far bins are not.
    assert cos(loc[500], loc[501], dim=0) > 0.8 > 0.3 > cos(loc[100], loc[900], dim=0)
    # Every scene word is one token.
    assert proc.tokenizer.tokenize("a red circle and a white triangle on a teal background") == [
        "a",
        "▁red",
        "▁circle",
        "▁and",
        "▁a",
        "▁white",
        "▁triangle",
        "▁on",
        "▁a",
        "▁teal",
        "▁background",
    ]


def test_patch_labels_name_shapes_and_characters():
    cfg = ModelConfig()
    head = PatchHead(cfg)
    scene = next(s for s in (scenes.generate(i, cfg.image_size) for i in range(50)) if s.text and s.text.isalpha())
    labels = head.labels(scene)
    text = [divmod(v - head.first_char, len(head.CHARS)) for v in labels.tolist() if v >= head.first_char]
    assert {head.CHARS[c] for _, c in text} == set(scene.text)
    # Each character fills its own patch column (train.scenes.TEXT_CELLS), left to right, and is
    # labelled with its place in the text.
    side = cfg.image_size // cfg.patch_size
    top = labels.reshape(side, side).max(0).values.tolist()
    columns = [divmod(v - head.first_char, len(head.CHARS)) for v in top if v >= head.first_char]
    assert [head.CHARS[c] for _, c in columns] == list(scene.text)
    assert [place for place, _ in columns] == list(range(len(scene.text)))
    shape_classes = {v for v in labels.tolist() if 0 < v < head.first_char}
    expected = {head.shape_class(o) for o in scene.objects}
    assert shape_classes <= expected and shape_classes


def owned_patches(cfg: ModelConfig, labels_of):
    """(seed, patch index, row, column, the object covering the most of the patch if it covers at
    least MIN_COVER of it else None, the patch's row of `labels_of(scene)`) for every patch of 40
    held-out scenes, the shares measured pixel by pixel."""
    p, side = cfg.patch_size, cfg.image_size // cfg.patch_size
    for seed in range(10_000_300, 10_000_340):
        scene = scenes.generate(seed, cfg.image_size)
        labels = labels_of(scene).tolist()
        for i in range(side * side):
            row, col = divmod(i, side)
            cover = [o.mask[row * p : (row + 1) * p, col * p : (col + 1) * p].mean() for o in scene.objects]
            owner = scene.objects[cover.index(max(cover))] if max(cover) >= MIN_COVER else None
            yield seed, i, row, col, owner, labels[i]


def test_box_labels_give_each_patch_the_box_of_the_object_covering_most_of_it():
    cfg = ModelConfig()
    head = BoxHead(cfg)
    p, side = cfg.patch_size, cfg.image_size // cfg.patch_size
    for seed, i, row, col, owner, (*edges, owned) in owned_patches(cfg, head.labels):
        assert owned == (owner is not None), (seed, i)
        if owner is not None:
            x0, y0, x1, y1 = owner.box
            expected = [x0 / p - col - 0.5, y0 / p - row - 0.5, x1 / p - col - 0.5, y1 / p - row - 0.5]
            assert edges == pytest.approx(expected, abs=1e-5), (seed, i)
        else:
            assert edges == [0, 0, 0, 0]
    # The scene of the README's example: the yellow triangle (41, 1, 68, 28) owns the top row's 4th patch.
    example = head.labels(scenes.generate(10_000_300, cfg.image_size))
    assert example[3].tolist() == pytest.approx([41 / p - 3.5, 1 / p - 0.5, 68 / p - 3.5, 28 / p - 0.5, 1])
    # A shape no patch centre falls on still owns patches, and PatchHead names it on them.
    scene, small = next(
        (s, o)
        for s in (scenes.generate(i, cfg.image_size) for i in range(300))
        for o in s.objects
        if not o.mask[p // 2 :: p, p // 2 :: p].any()
    )
    owned = [
        [row[0] + col, row[1] + r, row[2] + col, row[3] + r]
        for (r, col), row in zip(((i // side + 0.5, i % side + 0.5) for i in range(side * side)), head.labels(scene).tolist())
        if row[4] == 1
    ]
    assert any(box == pytest.approx([v / p for v in small.box]) for box in owned)
    patches = PatchHead(cfg)
    assert patches.shape_class(small) in patches.labels(scene).tolist()


def test_patch_labels_name_the_shape_that_owns_each_patch():
    cfg = ModelConfig()
    head = PatchHead(cfg)
    for seed, i, _, _, owner, label in owned_patches(cfg, head.labels):
        if owner is not None:
            assert label == head.shape_class(owner), (seed, i)
        else:
            assert label == 0 or label >= head.first_char, (seed, i)
    # A scene without shapes: background and text only, and its `detect` is no one-label form.
    empty = dataclasses.replace(scenes.generate(10_000_300, cfg.image_size), objects=[])
    assert all(v == 0 or v >= head.first_char for v in head.labels(empty).tolist())
    assert request_name(empty, tasks.detect_prompt(empty)) == "detect"


def test_a_detect_of_every_label_names_them_in_any_order_and_answers_left_to_right():
    rng = random.Random(0)
    weights = {"detect": 1.0}
    drawn = [sample(rng, seed, 112, weights, segment=False) for seed in range(200)]
    several = [(s, p) for s, p in drawn if len(tasks.labels_of(s)) > 2]
    shuffled = [(s, p) for s, p in several if p != tasks.detect_prompt(s)]
    # Three labels or more come in the canonical order a sixth of the time or less.
    assert len(shuffled) >= len(several) // 2, (len(shuffled), len(several))
    for (scene, prompt), target in zip(shuffled, targets(shuffled)):
        assert sorted(tasks.prompt_labels(prompt)) == sorted(tasks.labels_of(scene))
        assert target == tasks.detect_target(scene)
        assert request_name(scene, prompt) == "detect"


def test_a_batch_s_segment_targets_hold_each_object_s_own_codes():
    from train import vqvae

    # The committed model's VAE: trained, so different masks get different codes.
    vae = vqvae.load(Path(__file__).resolve().parents[2] / "models" / "scenes-hf" / "vae.npz")

    def own_codes(o: scenes.SceneObject, width: int, height: int) -> list[int]:
        target = vqvae.crop(o.mask, vqvae.box_bins(o.box, width, height))
        with torch.no_grad():
            return vae.codes(torch.from_numpy(target)[None])[0][0].tolist()

    batch = []
    for seed in range(20):
        scene = scenes.generate(seed, vqvae.IMAGE_SIZE)
        batch += [(scene, tasks.segment_prompt(label)) for label in tasks.labels_of(scene)] + [(scene, tasks.CAPTION_PROMPT)]
    expected = [tasks.target_for(s, prompt, lambda o, s=s: own_codes(o, *s.image.size)) for s, prompt in batch]
    assert targets(batch, vae) == expected
    assert sum(prompt.startswith(tasks.SEGMENT_PREFIX) for _, prompt in batch) > 20
    assert len({t for t in expected if "<seg" in t}) > 20
    # A box that truncates to no pixel gets the codes of nothing and takes no other object's codes.
    scene = scenes.generate(3, vqvae.IMAGE_SIZE)
    dot = scenes.SceneObject("circle", "red", "small", (50, 50, 50, 50), np.zeros((112, 112), dtype=bool))
    objects = [(scene.objects[0], 112, 112), (dot, 112, 112), (scene.objects[-1], 112, 112)]
    codes = vqvae.objects_codes(vae, objects)
    assert codes[id(dot)] == [0] * 16
    assert [codes[id(o)] for o, _, _ in objects[::2]] == [own_codes(o, 112, 112) for o, _, _ in objects[::2]]


def test_relevance_labels_cover_the_named_objects_only():
    cfg = ModelConfig()
    head = RelevanceHead(cfg)
    scene = next(s for s in (scenes.generate(i, cfg.image_size) for i in range(50)) if len(tasks.labels_of(s)) > 2)
    side, area = cfg.image_size // cfg.patch_size, cfg.patch_size**2

    def covered(labels):
        union = sum(o.mask.astype(int) for o in scene.objects if o.label in labels).clip(max=1)
        return int(union.sum())

    first, *rest = tasks.labels_of(scene)
    for prompt, named in [
        (tasks.segment_prompt(first), [first]),
        (tasks.detect_prompt(scene, rest), rest),
        (tasks.detect_prompt(scene), tasks.labels_of(scene)),
    ]:
        labels = head.labels(scene, prompt)
        assert labels.shape == (side * side,) and 0 <= labels.min() and labels.max() <= 1
        # Fractions of a patch's pixels: they add up to the named objects' visible area.
        assert round(float(labels.sum()) * area) == covered(named), prompt
    assert head.labels(scene, tasks.CAPTION_PROMPT) is None and head.labels(scene, tasks.OCR_PROMPT) is None
    # Half the decoder's layers: what follows reads the marks out.
    assert head.layer == 2 and RelevanceHead(SMALL).layer == 1


def test_a_mask_vqvae_adds_segment_targets_to_the_mix(tmp_path):
    from train import vqvae

    vqvae.train(tmp_path / "vae.npz", steps=1, batch=4, image_size=SMALL.image_size, log_every=1)
    # segment alone, so every row of every step is one.
    tc = TrainConfig(steps=2, batch=4, warmup=1, weights=(("segment", 1.0),))
    report = train(SMALL, tc, 0, tmp_path / "model", log_every=1, seg_vae=tmp_path / "vae.npz")
    assert all(set(entry["tasks"]) == {"segment", "patches", "boxes", "relevance"} for entry in report["log"]), report["log"]
    assert report["seg_vae"] == str(tmp_path / "vae.npz")


def test_target_loss_is_transformers_loss_with_the_head_on_target_tokens_only():
    model, proc = build(SMALL, 0)
    scene = scenes.generate(0, SMALL.image_size)
    prompts = tasks.prompts_for(scene)
    inputs = proc(
        images=[scene.image] * len(prompts),
        text=["<image>" + p for p in prompts],
        suffix=[tasks.target_for(scene, p) for p in prompts],
        return_tensors="pt",
        padding="longest",
    )
    with torch.no_grad():
        reference = model(**inputs)
        loss, per_token = target_loss(model, inputs)
    assert torch.allclose(loss, reference.loss, atol=1e-5)
    # Per row, the mean over that row's target tokens of transformers' token losses.
    logits, labels = reference.logits[:, :-1], inputs["labels"][:, 1:]
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    rows = ((token * (labels != -100)).sum(1) / (labels != -100).sum(1)).tolist()
    names = [f"row{i}" for i in range(len(prompts))]
    got = per_task_loss(per_token, names)
    assert all(abs(got[n] - want) < 1e-4 for n, want in zip(names, rows))
    # Rows of one task average together.
    pooled = per_task_loss(per_token, ["a"] * 2 + ["b"] * (len(prompts) - 2))
    assert abs(pooled["a"] - sum(rows[:2]) / 2) < 1e-4 and abs(pooled["b"] - sum(rows[2:]) / (len(rows) - 2)) < 1e-4
