"""Turn a trained checkpoint into the committed default model: the transformers checkpoint, its
conversion (fp32, int8, q4), the evaluation on held-out scenes, an example scene and the model card.

    python -m train.release target/scenes-hf [--scenes 300] [--seg-vae target/scenes-vae.npz]

Writes models/scenes-hf/ (the reference for transformers; with `--seg-vae`, the mask VQ-VAE as
`vae.npz` beside it) and models/scenes/ (what `paligemma` runs when no --model is given; with the
VAE, its `seg_decoder.onnx` too), replacing both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import scenes, tasks
from .evaluate import EVAL_SEED_BASE, REPO, evaluate, table
from .score import mask_rle

HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "training.json",
)
# The example scene is the first held-out scene past the evaluated ones on which the fp32 model
# answers every request right (caption, every box, and with the VAE every mask), so the README's
# commands show correct answers.
EXAMPLE_SEARCH = 200
# Scenes whose answers evaluation.json keeps: the slice train/tests/test_release.py reruns in CI.
CI_SLICE = 10
# The mask VQ-VAE beside the transformers checkpoint (`--seg-vae`), as vae-oid.npz is beside a
# released PaliGemma: the converter and the evaluation read it from there.
VAE_FILE = "vae.npz"


def pick_example(model: Path, first: int, work: Path, vae: Path | None = None) -> dict:
    for i in range(first, first + EXAMPLE_SEARCH):
        report = evaluate(model, None, 1, ["fp32"], work, first=i, seg_vae=vae)
        if all(a["fp32_right"] for a in report["answers"]):
            scene = scenes.generate(EVAL_SEED_BASE + i, json.loads((model / "manifest.json").read_text())["image_size"])
            example = dict(
                seed=EVAL_SEED_BASE + i,
                caption=tasks.caption(scene),
                detect_prompt=tasks.detect_prompt(scene),
                objects=[dict(label=o.label, box=list(o.box), mask=mask_rle(o.mask)) for o in scene.objects],
                image=scene.image,
            )
            if vae is not None:
                # The largest object whose label names it alone (the tests expect one mask), as
                # its mask shows best.
                alone = [o for o in scene.objects if sum(p.label == o.label for p in scene.objects) == 1]
                if not alone:
                    continue
                example["segment_prompt"] = tasks.segment_prompt(max(alone, key=lambda o: o.mask.sum()).label)
            return example
    raise SystemExit(f"error: none of {EXAMPLE_SEARCH} scenes is fully right; the model is not fit to ship")


def release(checkpoint: Path, scenes_count: int = 300, models: Path = REPO / "models", seg_vae: Path | None = None) -> dict:
    """Copies, converts and evaluates `checkpoint` into `models`; the evaluation report."""
    hf, onnx = models / "scenes-hf", models / "scenes"
    if checkpoint.resolve() != hf.resolve():
        shutil.rmtree(hf, ignore_errors=True)
        hf.mkdir(parents=True)
        for name in HF_FILES:
            shutil.copy2(checkpoint / name, hf / name)
    if seg_vae is not None:
        shutil.copy2(seg_vae, hf / VAE_FILE)
    vae = hf / VAE_FILE if (hf / VAE_FILE).is_file() else None
    # The conversion replaces the directory; the model card is written by hand and stays.
    card = (onnx / "README.md").read_text() if (onnx / "README.md").is_file() else None
    # Paths relative to the checkout: the manifest records its source as given.
    rel = [os.path.relpath(path.resolve(), REPO) for path in (hf, onnx)]
    convert = [sys.executable, "-m", "export", "convert", *rel, "--quantize", "int8,int4", "--force"]
    subprocess.run(convert + (["--seg-vae", os.path.relpath(vae.resolve(), REPO)] if vae else []), check=True, cwd=REPO)
    if card is not None:
        (onnx / "README.md").write_text(card)
    work = REPO / "target" / "release-eval"
    report = evaluate(onnx, hf, scenes_count, ["fp32", "int8", "q4"], work, seg_vae=vae)
    report["answers"] = [a for a in report["answers"] if int(a["image"][6:10]) < CI_SLICE]
    (onnx / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
    example = pick_example(onnx, scenes_count, work, vae)
    example.pop("image").save(onnx / "example.png")
    (onnx / "example.json").write_text(json.dumps(example, indent=1) + "\n")
    print(table(report))
    print(f"example scene: seed {example['seed']}; {example['caption']}")
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description="Convert, evaluate and write the card of the scenes model.")
    ap.add_argument("checkpoint", type=Path, help="directory written by python -m train.fit")
    ap.add_argument("--scenes", type=int, default=300, help="held-out scenes to evaluate")
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--seg-vae", type=Path, help="the mask VQ-VAE it was trained with (train.vqvae): segmentation ships too")
    args = ap.parse_args()
    release(args.checkpoint, args.scenes, args.models, args.seg_vae)
    return 0


if __name__ == "__main__":
    sys.exit(main())
