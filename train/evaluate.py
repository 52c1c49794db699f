"""Accuracy of the whole pipeline on held-out scenes, through the Rust binary and through transformers.

    python -m train.evaluate --model models/scenes --reference models/scenes-hf --scenes 300

For every held-out scene (seeds from `EVAL_SEED_BASE`, never trained on) and every task it
supports (`detect` asking all its labels, left to right or with `--shuffle-labels` in another order;
with `--detect-each`, the one-label `detect LABEL` too, scored apart as `detect_each`),
transformers' greedy `generate` (one request at a time, fp32) gives the reference answer, and
`paligemma --batch ... --json` gives ours for each `--dtypes` entry. Detection is scored from the
binary's own `detections` (boxes in image pixels, as a user gets them), the other tasks from its
`text`. fp32 token ids must equal transformers' for every request, else the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from . import scenes, tasks, vqvae
from .score import Tally, rle_mask, task_name

REPO = Path(__file__).resolve().parent.parent
# Held-out scenes start here; training counts its scene seeds up from 0 (train/fit.py).
EVAL_SEED_BASE = 10_000_000
BINARY = REPO / "target" / "release" / "paligemma"
MAX_NEW_TOKENS = 48
CHUNK = 64  # requests per `paligemma --batch` run


def requests(
    count: int, image_size: int, image_dir: Path, first: int = 0, vae=None, detect_each: bool = False, shuffle_labels: bool = False
) -> list[dict]:
    """Every (scene, task) pair of `count` held-out scenes; each scene's PNG is written to image_dir.
    With `vae` (a `train.vqvae.VQVAE`), `segment` requests too (scored by mask IoU); with
    `detect_each`, `detect LABEL` for each label of a scene with several; with `shuffle_labels`,
    the `detect` of every label names them in another order than the answer's (seeded by the scene)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(first, first + count):
        scene = scenes.generate(EVAL_SEED_BASE + i, image_size)
        path = image_dir / f"scene-{i:04d}.png"
        scene.image.save(path)
        codes_of = vqvae.codes_of(vae, *scene.image.size) if vae is not None else None
        for prompt in tasks.prompts_for(scene, segment=vae is not None, detect_each=detect_each):
            if shuffle_labels and prompt == tasks.detect_prompt(scene) and len(tasks.labels_of(scene)) > 1:
                prompt = tasks.detect_prompt(scene, _another_order(tasks.labels_of(scene), random.Random(scene.seed)))
            out.append(dict(scene=scene, image=str(path), prompt=prompt, target=tasks.target_for(scene, prompt, codes_of)))
    return out


def _another_order(labels: list[str], rng: random.Random) -> list[str]:
    """A random order of two or more distinct labels, other than the given one."""
    if len(set(labels)) < 2:
        raise ValueError(f"{labels} has no other order; it needs two distinct labels or more")
    shuffled = list(labels)
    while shuffled == labels:
        rng.shuffle(shuffled)
    return shuffled


def run_transformers(reference: Path, reqs: list[dict]) -> list[dict]:
    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    model = PaliGemmaForConditionalGeneration.from_pretrained(reference, dtype=torch.float32).eval()
    return transformers_answers(model, PaliGemmaProcessor.from_pretrained(reference), reqs)


def transformers_answers(model, proc, reqs: list[dict]) -> list[dict]:
    """Greedy token ids (up to and without `<eos>`) and text of each request, one at a time."""
    import torch
    from PIL import Image

    eos = set(
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    answers = []
    with torch.no_grad():
        for r in reqs:
            # `<image>` spelt out, as train.fit does: the processor's own layout, without its warning per call.
            inputs = proc(images=[Image.open(r["image"]).convert("RGB")], text=["<image>" + r["prompt"]], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            ids = out[0, inputs["input_ids"].shape[1] :].tolist()
            ids = ids[: next((k for k, t in enumerate(ids) if t in eos), len(ids))]
            answers.append(dict(token_ids=ids, text=proc.tokenizer.decode(ids, skip_special_tokens=True).strip()))
    return answers


def run_binary(binary: Path, model: Path, dtype: str, reqs: list[dict], work: Path) -> list[dict]:
    answers = []
    for start in range(0, len(reqs), CHUNK):
        batch_file = work / f"batch-{dtype}.jsonl"
        batch_file.write_text(
            "".join(
                json.dumps(dict(image=r["image"], prompt=r["prompt"], max_new_tokens=MAX_NEW_TOKENS)) + "\n"
                for r in reqs[start : start + CHUNK]
            )
        )
        proc = subprocess.run(
            [str(binary), "--model", str(model), "--dtype", dtype, "--batch", str(batch_file), "--json"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"error: {binary} failed ({proc.returncode}) on {batch_file}:\n{proc.stderr.strip()}")
        answers += [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if len(answers) != len(reqs):
        raise SystemExit(f"error: {binary} answered {len(answers)} of {len(reqs)} requests")
    return answers


def rust_boxes(answer: dict):
    return [(tuple(d["box"]), d["label"]) for d in answer.get("detections", [])]


def rust_masks(answer: dict):
    return [(rle_mask(s["mask"]), s["label"]) for s in answer.get("segments", [])]


def evaluate(
    model: Path,
    reference: Path | None,
    count: int,
    dtypes: list[str],
    work: Path,
    binary: Path = BINARY,
    first: int = 0,
    seg_vae: Path | None = None,
    detect_each: bool = False,
    shuffle_labels: bool = False,
) -> dict:
    """With `seg_vae` (the model's mask VQ-VAE, `train.vqvae`), segment requests are scored too:
    the binary's masks as it returns them, transformers' codes decoded by the VAE's decoder."""
    manifest = json.loads((model / "manifest.json").read_text())
    vae = vqvae.load(seg_vae) if seg_vae is not None else None
    if vae is not None and "seg_decoder" not in manifest["graphs"]:
        raise SystemExit(f"error: --seg-vae given but {model} has no seg_decoder; convert it with --seg-vae")
    reqs = requests(count, manifest["image_size"], work / "scenes", first, vae, detect_each, shuffle_labels)
    report: dict = dict(
        scenes=count,
        first_scene=first,
        requests=len(reqs),
        seed_base=EVAL_SEED_BASE,
        detect_each=detect_each,
        shuffle_labels=shuffle_labels,
        results={},
        answers=[],
    )
    per_request = [dict(image=Path(r["image"]).name, prompt=r["prompt"], target=r["target"]) for r in reqs]
    reference_ids = None
    if reference is not None:
        t0 = time.time()
        ref = run_transformers(reference, reqs)
        tally = Tally()
        for r, a, row in zip(reqs, ref, per_request):
            row["transformers"] = a["text"]
            masks = None
            if task_name(r["prompt"]) == "segment":
                masks = vqvae.answer_masks(vae, a["text"], *r["scene"].image.size)
            row["transformers_right"] = tally.add(r["scene"], r["prompt"], r["target"], a["text"], masks=masks)
        report["results"]["transformers fp32"] = tally.summary() | dict(seconds=round(time.time() - t0, 1))
        reference_ids = [a["token_ids"] for a in ref]
    for dtype in dtypes:
        t0 = time.time()
        ours = run_binary(binary, model, dtype, reqs, work)
        tally = Tally()
        for r, a, row in zip(reqs, ours, per_request):
            boxes = rust_boxes(a) if r["prompt"].startswith("detect ") else None
            masks = rust_masks(a) if task_name(r["prompt"]) == "segment" else None
            row[dtype] = a["text"]
            row[f"{dtype}_right"] = tally.add(r["scene"], r["prompt"], r["target"], a["text"], boxes, masks)
        summary = tally.summary() | dict(seconds=round(time.time() - t0, 1))
        if reference_ids is not None:
            same = sum(a["token_ids"] == ids for a, ids in zip(ours, reference_ids))
            summary["same_tokens_as_transformers"] = f"{same}/{len(reqs)}"
            if dtype == "fp32":
                summary["fp32_identical"] = same == len(reqs)
        report["results"][f"rust {dtype}"] = summary
    report["answers"] = per_request
    return report


def table(report: dict) -> str:
    cols = [
        "detect_recall@0.5",
        "detect_mean_iou",
        "ocr_exact",
        "count_exact",
        "colour_exact",
        "caption_exact",
        "segment_mean_iou",
        "same_tokens_as_transformers",
    ]
    if any("detect_each_recall@0.5" in s for s in report["results"].values()):
        cols.insert(2, "detect_each_recall@0.5")
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, s in report["results"].items():
        lines.append(f"| {name} | " + " | ".join(str(s.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="Score the scenes model on held-out scenes through the Rust binary and transformers.")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "scenes", help="converted model directory")
    ap.add_argument(
        "--reference",
        type=Path,
        default=REPO / "models" / "scenes-hf",
        help="the transformers checkpoint it was converted from ('none' to skip transformers)",
    )
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--first", type=int, default=0, help="index of the first held-out scene")
    ap.add_argument("--dtypes", default="fp32,int8,q4", help="comma list of manifest dtypes to run through the binary")
    ap.add_argument("--binary", type=Path, default=BINARY)
    ap.add_argument("--work", type=Path, default=REPO / "target" / "eval", help="scene PNGs and batch files")
    ap.add_argument("--out", type=Path, help="write the full report (figures and every answer) as JSON")
    ap.add_argument("--seg-vae", type=Path, help="the model's mask VQ-VAE (train.vqvae npz): adds segment requests")
    ap.add_argument("--detect-each", action="store_true", help="adds `detect LABEL` for each label of a scene with several (scored apart)")
    ap.add_argument("--shuffle-labels", action="store_true", help="`detect` of every label names them in another order than left to right")
    args = ap.parse_args()
    reference = None if str(args.reference) == "none" else args.reference
    dtypes = [d for d in args.dtypes.split(",") if d]
    report = evaluate(
        args.model, reference, args.scenes, dtypes, args.work, args.binary, args.first, args.seg_vae, args.detect_each, args.shuffle_labels
    )
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    fp32 = report["results"].get("rust fp32", {})
    if fp32.get("fp32_identical") is False:
        print(f"error: fp32 tokens differ from transformers ({fp32['same_tokens_as_transformers']} identical)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
