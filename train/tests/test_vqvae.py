"""The mask VQ-VAE: same seed same weights, a file `--seg-vae` converts to the decoder it trained,
and the crop/paste convention of the runtime (the bound any decoder is held to)."""

import numpy as np
import torch

from export.segmentation import SegDecoder, load_vae
from train import vqvae


def test_training_is_deterministic_for_a_seed(tmp_path):
    def weights(name: str, seed: int):
        # 20 steps of 64 masks: without deterministic kernels two runs in one process differ.
        vqvae.train(tmp_path / f"{name}.npz", steps=20, seed=seed, batch=64, image_size=112, log_every=10)
        with np.load(tmp_path / f"{name}.npz") as npz:
            return {k: npz[k] for k in npz.files}

    a, b, c = weights("a", 0), weights("b", 0), weights("c", 1)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_the_file_converts_to_the_decoder_it_trained(tmp_path):
    model = vqvae.train(tmp_path / "vae.npz", steps=2, batch=8, log_every=1)
    converted = SegDecoder(load_vae(tmp_path / "vae.npz"))  # the keys and shapes --seg-vae checks
    codes = torch.arange(32).reshape(2, 16) * 37 % vqvae.CODEBOOK
    with torch.no_grad():
        assert torch.allclose(converted(codes), model.decode(codes), atol=1e-6)
    reloaded = vqvae.load(tmp_path / "vae.npz")
    target = next(vqvae.objects([5]))[2]
    assert vqvae.encode(reloaded, [target]) == vqvae.encode(model, [target])


def test_pixel_boxes_truncate_as_the_runtime_does():
    # src/segment.rs pixel_box: int(bin / 1023 * side); (y_min, x_min, y_max, x_max) bins.
    assert vqvae.pixel_box((0, 0, 1023, 1023), 224, 112) == (0, 0, 224, 112)
    assert vqvae.pixel_box((512, 100, 520, 200), 224, 224) == (21, 112, 43, 113)
    assert vqvae.pixel_box((512, 100, 513, 200), 224, 224) is None


def test_a_perfect_code_gives_back_the_mask_within_the_resize_bound():
    # The target pasted back as if decoded exactly: what the 64x64 crop and the box bins lose.
    # Measured on these 20 scenes (47 objects): mean IoU 0.985, lowest 0.945; on the 300 held-out
    # scenes (751 objects): 0.982, lowest 0.940.
    ious = []
    for obj, bins, target in vqvae.objects(range(20)):
        height, width = obj.mask.shape
        ious.append(vqvae.iou(vqvae.paste(target, bins, width, height), obj.mask))
    assert np.mean(ious) > 0.97 and min(ious) > 0.85, (np.mean(ious), min(ious))


def test_segment_answers_score_by_mask_iou(tmp_path):
    from train import scenes, tasks
    from train.score import Tally, mask_rle, parse_segments, rle_mask

    # COCO uncompressed RLE: column-major, the first run counts zeros: (0,0) off, (1,0) (0,1) on, the rest off.
    assert rle_mask({"size": [2, 3], "counts": [1, 2, 3]}).tolist() == [[False, True, False], [True, False, False]]
    assert mask_rle(rle_mask({"size": [2, 3], "counts": [1, 2, 3]})) == {"size": [2, 3], "counts": [1, 2, 3]}
    assert mask_rle(np.array([[True, False], [True, True]])) == {"size": [2, 2], "counts": [0, 2, 1, 1]}
    model = vqvae.train(tmp_path / "vae.npz", steps=1, batch=4, log_every=1)
    scene = scenes.generate(7, vqvae.IMAGE_SIZE)
    width, height = scene.image.size
    label = scene.objects[0].label
    codes_of = vqvae.codes_of(model, width, height)
    target = tasks.segment_target(scene, label, codes_of)
    parsed = parse_segments(target)
    same = [o for o in scene.objects if o.label == label]
    assert [codes for _, codes, _ in parsed] == [codes_of(o) for o in same]
    assert [lbl for _, lbl in vqvae.answer_masks(model, target, width, height)] == [label] * len(same)
    tally = Tally()
    prompt = tasks.segment_prompt(label)
    assert tally.add(scene, prompt, target, target, masks=[(o.mask, label) for o in same])
    assert not tally.add(scene, prompt, target, "", masks=[])
    summary = tally.summary()
    assert summary["segment_objects"] == 2 * len(same) and summary["segment_mean_iou"] == 0.5
    assert summary["segment_exact"] == 0.5
