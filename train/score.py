"""Scoring one answer against its scene: the metrics of the issue (detection IoU and recall at 0.5,
mask IoU for segmentation, exact match for OCR, counting, colour and caption)."""

from __future__ import annotations

import re

import numpy as np

from . import tasks
from .scenes import Scene

LOC = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})> ?([^;<]*)")
# An object of a segment answer: 4 loc bins (y_min, x_min, y_max, x_max), 16 codes, the label.
SEGMENT = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>((?:<seg\d{3}>){16}) ?([^;<]*)")


def parse_segments(text: str) -> list[tuple[tuple[int, int, int, int], list[int], str]]:
    """(bins, 16 codes, label) of each well-formed object of a `segment` answer, as src/detect.rs reads them."""
    return [
        ((int(y0), int(x0), int(y1), int(x1)), [int(c) for c in re.findall(r"<seg(\d{3})>", codes)], label.strip())
        for y0, x0, y1, x1, codes, label in SEGMENT.findall(text)
    ]


def rle_mask(rle: dict) -> np.ndarray:
    """A COCO uncompressed RLE (`{"size": [h, w], "counts": [...]}`, column-major, first run of
    zeros), as the binary's `segments` carry it, to a bool [h, w] mask."""
    height, width = rle["size"]
    flat = np.zeros(height * width, dtype=bool)
    position, value = 0, False
    for run in rle["counts"]:
        flat[position : position + run] = value
        position += run
        value = not value
    return flat.reshape(width, height).T


def mask_rle(mask: np.ndarray) -> dict:
    """The inverse of `rle_mask`: a bool [h, w] mask as COCO uncompressed RLE."""
    flat = mask.T.reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    counts = ([0] if flat.size and flat[0] else []) + runs.tolist()
    return {"size": list(mask.shape), "counts": counts}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def match_masks(scene: Scene, label: str, predicted: list[tuple[np.ndarray, str]]) -> list[float]:
    """Per object of the scene labelled `label`, the mask IoU of the best unused predicted mask
    with that label (0 if none)."""
    return _best_matches([o for o in scene.objects if o.label == label], predicted, lambda o, mask: mask_iou(mask, o.mask))


def task_name(prompt: str) -> str:
    if prompt.startswith(tasks.DETECT_PREFIX):
        return "detect"
    if prompt.startswith(tasks.SEGMENT_PREFIX):
        return "segment"
    return {tasks.CAPTION_PROMPT: "caption", tasks.OCR_PROMPT: "ocr", tasks.COUNT_PROMPT: "count", tasks.COLOUR_PROMPT: "colour"}[prompt]


def request_name(scene: Scene, prompt: str) -> str:
    """`task_name`, except that a `detect` asking fewer labels than the scene has (PaliGemma's
    one-label form, `detect LABEL`) is `detect_each`: a task of its own in training's mix and here.
    A `detect` naming every label, in any order (or the scene's own prompt), is `detect`."""
    name = task_name(prompt)
    if name != "detect" or prompt == tasks.detect_prompt(scene):
        return name
    return "detect" if set(tasks.prompt_labels(prompt)) == set(tasks.labels_of(scene)) else "detect_each"


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_boxes(text: str, width: int, height: int) -> list[tuple[tuple[float, float, float, float], str]]:
    """`<loc>`x4 + label answers as ((x_min, y_min, x_max, y_max) pixels, label), as src/detect.rs reads them."""
    return [
        (
            (
                tasks.from_bin(int(x0), width),
                tasks.from_bin(int(y0), height),
                tasks.from_bin(int(x1), width),
                tasks.from_bin(int(y1), height),
            ),
            label.strip(),
        )
        for y0, x0, y1, x1, label in LOC.findall(text)
    ]


def match_boxes(scene: Scene, predicted, labels: list[str] | None = None) -> list[float]:
    """Per ground-truth object (those labelled one of `labels`, default all), the IoU of the best
    unused predicted box with the same label (0 if none)."""
    objects = [o for o in scene.objects if labels is None or o.label in labels]
    return _best_matches(objects, predicted, lambda o, box: iou(box, o.box))


def _best_matches(objects, predicted, similarity) -> list[float]:
    """Per object, the best `similarity(object, prediction)` among the (prediction, label) pairs
    with its label not matched yet (0 if none); each prediction matches one object at most."""
    used: set[int] = set()
    out = []
    for o in objects:
        best, best_j = 0.0, None
        for j, (value, label) in enumerate(predicted):
            if j not in used and label == o.label:
                v = similarity(o, value)
                if v > best:
                    best, best_j = v, j
        if best_j is not None:
            used.add(best_j)
        out.append(best)
    return out


class Tally:
    """Running totals per task; `summary()` gives the figures the model card reports."""

    def __init__(self):
        self.exact = {k: [0, 0] for k in ("caption", "count", "colour", "ocr", "detect", "segment")}
        self.ious: list[float] = []
        self.mask_ious: list[float] = []
        # The one-label `detect LABEL` (`request_name`), scored apart; its `exact` entry appears
        # with its first request.
        self.each_ious: list[float] = []

    def add(self, scene: Scene, prompt: str, target: str, answer: str, boxes=None, masks=None) -> bool:
        """Record one answer; returns whether it was right (for detect: every object at IoU >= 0.5;
        for segment: every object of the label at mask IoU >= 0.5). `boxes` ((x_min, y_min, x_max,
        y_max), label) pairs replace parsing the answer's loc tokens; `masks` (bool [h, w], label)
        pairs are a segment answer's masks at the image's size (required for segment)."""
        name = request_name(scene, prompt)
        if name == "segment":
            (label,) = tasks.prompt_labels(prompt)
            ious = match_masks(scene, label, masks or [])
            self.mask_ious += ious
            ok = all(v >= 0.5 for v in ious)
        elif name in ("detect", "detect_each"):
            predicted = boxes if boxes is not None else parse_boxes(answer, *scene.image.size)
            ious = match_boxes(scene, predicted, tasks.prompt_labels(prompt))
            ok = all(v >= 0.5 for v in ious)
            if name == "detect":
                self.ious += ious
            else:
                self.each_ious += ious
                # Right only with no other box: listing the whole scene is not an answer to it.
                ok = ok and len(predicted) == len(ious)
        else:
            ok = answer == target
        counts = self.exact.setdefault(name, [0, 0])
        counts[0] += int(ok)
        counts[1] += 1
        return ok

    def summary(self) -> dict:
        out = {f"{k}_exact": round(h / n, 4) if n else None for k, (h, n) in self.exact.items()}
        n = len(self.ious)
        out["detect_objects"] = n
        out["detect_recall@0.5"] = round(sum(v >= 0.5 for v in self.ious) / n, 4) if n else None
        out["detect_mean_iou"] = round(sum(self.ious) / n, 4) if n else None
        m = len(self.mask_ious)
        out["segment_objects"] = m
        out["segment_mean_iou"] = round(sum(self.mask_ious) / m, 4) if m else None
        out["answers"] = {k: n for k, (_, n) in self.exact.items()}
        if self.each_ious:
            out["detect_each_objects"] = len(self.each_ious)
            out["detect_each_recall@0.5"] = round(sum(v >= 0.5 for v in self.each_ious) / len(self.each_ious), 4)
        return out
