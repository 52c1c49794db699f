"""PaliGemma task prompts and target strings for a synthetic scene.

Prompts are exactly what a user types (PaliGemma's prefixes `caption en`, `ocr`, `answer en ...`,
`detect ...`); targets follow the formats the released checkpoints emit. Detection boxes use
big_vision's binning, which src/detect.rs inverts: a coordinate `v` pixels along a side of `side`
pixels becomes bin `round(v / side * 1023)`, and the runtime maps bin `b` back to `b / 1023 * side`
(`BoxBins::to_pixels`, `bin_fraction`), so a box comes back within half a bin (side / 2046 pixels).
"""

from __future__ import annotations

from collections.abc import Callable

from .scenes import Scene, SceneObject

LOC_BINS = 1024

CAPTION_PROMPT = "caption en"
OCR_PROMPT = "ocr"
COUNT_PROMPT = "answer en how many shapes are there?"
COLOUR_PROMPT = "answer en what color is the circle?"


def to_bin(coordinate: float, side: int) -> int:
    """big_vision's bin for a pixel coordinate: round(v / side * 1023), clamped to 0..1023."""
    return min(LOC_BINS - 1, max(0, round(coordinate / side * (LOC_BINS - 1))))


def from_bin(bin_: int, side: int) -> float:
    """The inverse src/detect.rs applies (`bin_fraction(bin) * side`)."""
    return bin_ / (LOC_BINS - 1) * side


def loc_tokens(box: tuple[float, float, float, float], width: int, height: int) -> str:
    """Four `<locNNNN>` tokens for an (x_min, y_min, x_max, y_max) box, y before x as PaliGemma emits."""
    x0, y0, x1, y1 = box
    bins = (to_bin(y0, height), to_bin(x0, width), to_bin(y1, height), to_bin(x1, width))
    return "".join(f"<loc{b:04d}>" for b in bins)


def caption(scene: Scene) -> str:
    """'a red circle, a blue square and a green triangle on a gray background', shapes left to right."""
    parts = [f"a {o.label}" for o in scene.objects]
    shapes = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{shapes} on a {scene.background} background"


def detect_prompt(scene: Scene) -> str:
    """`detect` with each distinct label once, in the canonical (left to right) order of first sight."""
    labels = list(dict.fromkeys(o.label for o in scene.objects))
    return "detect " + " ; ".join(labels)


def detect_target(scene: Scene) -> str:
    width, height = scene.image.size
    return " ; ".join(f"{loc_tokens(o.box, width, height)} {o.label}" for o in scene.objects)


SEGMENT_PREFIX = "segment "


def segment_prompt(label: str) -> str:
    """`segment red circle`: PaliGemma's prefix and one label of the scene."""
    return SEGMENT_PREFIX + label


def segment_target(scene: Scene, label: str, codes_of: Callable[[SceneObject], list[int]]) -> str:
    """Every object labelled `label`, left to right: its 4 `<locNNNN>` tokens, its 16 `<segNNN>`
    codes (`codes_of`, the mask VQ-VAE's encoder: `train.vqvae`), then the label; objects joined by
    " ; " as in detect (big_vision's segmentation target)."""
    width, height = scene.image.size
    parts = []
    for o in scene.objects:
        if o.label == label:
            codes = "".join(f"<seg{c:03d}>" for c in codes_of(o))
            parts.append(f"{loc_tokens(o.box, width, height)}{codes} {o.label}")
    return " ; ".join(parts)


def tasks_for(scene: Scene, codes_of: Callable[[SceneObject], list[int]] | None = None) -> list[tuple[str, str]]:
    """(prompt, target) pairs for every task the scene supports, in a fixed order; with `codes_of`
    (the mask VQ-VAE's codes of an object), a `segment` pair for each distinct label too."""
    pairs = [
        (CAPTION_PROMPT, caption(scene)),
        (COUNT_PROMPT, str(len(scene.objects))),
        (detect_prompt(scene), detect_target(scene)),
    ]
    circles = [o for o in scene.objects if o.kind == "circle"]
    if len(circles) == 1:
        pairs.append((COLOUR_PROMPT, circles[0].colour))
    if scene.text is not None:
        pairs.append((OCR_PROMPT, scene.text))
    if codes_of is not None:
        for label in dict.fromkeys(o.label for o in scene.objects):
            pairs.append((segment_prompt(label), segment_target(scene, label, codes_of)))
    return pairs
