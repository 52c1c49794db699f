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


DETECT_PREFIX = "detect "
LABEL_SEPARATOR = " ; "


def labels_of(scene: Scene) -> list[str]:
    """Each distinct label once, in the canonical (left to right) order of first sight."""
    return list(dict.fromkeys(o.label for o in scene.objects))


def detect_prompt(scene: Scene, labels: list[str] | None = None) -> str:
    """`detect` with `labels` (default: every label of the scene, `labels_of`)."""
    return DETECT_PREFIX + LABEL_SEPARATOR.join(labels if labels is not None else labels_of(scene))


def detect_target(scene: Scene, labels: list[str] | None = None) -> str:
    """Every object whose label is one of `labels` (default: all), left to right: 4 `<locNNNN>`
    tokens and the label, joined by " ; "."""
    width, height = scene.image.size
    wanted = set(labels if labels is not None else labels_of(scene))
    return LABEL_SEPARATOR.join(f"{loc_tokens(o.box, width, height)} {o.label}" for o in scene.objects if o.label in wanted)


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
    return LABEL_SEPARATOR.join(parts)


def prompts_for(scene: Scene, segment: bool = False, detect_each: bool = False) -> list[str]:
    """The prompts of every task the scene supports, in a fixed order: caption, count, detect (all
    labels), colour (one circle), OCR (text); with `detect_each`, `detect LABEL` for each label of a
    scene with several (PaliGemma's one-class form); with `segment`, `segment LABEL` for each label."""
    labels = labels_of(scene)
    prompts = [CAPTION_PROMPT, COUNT_PROMPT, detect_prompt(scene)]
    if sum(o.kind == "circle" for o in scene.objects) == 1:
        prompts.append(COLOUR_PROMPT)
    if scene.text is not None:
        prompts.append(OCR_PROMPT)
    if detect_each and len(labels) > 1:
        prompts += [detect_prompt(scene, [label]) for label in labels]
    if segment:
        prompts += [segment_prompt(label) for label in labels]
    return prompts


def target_for(scene: Scene, prompt: str, codes_of: Callable[[SceneObject], list[int]] | None = None) -> str:
    """The target of one of `prompts_for`'s prompts (`codes_of` is needed for `segment`)."""
    if prompt == CAPTION_PROMPT:
        return caption(scene)
    if prompt == COUNT_PROMPT:
        return str(len(scene.objects))
    if prompt == COLOUR_PROMPT:
        circles = [o.colour for o in scene.objects if o.kind == "circle"]
        if len(circles) != 1:
            raise ValueError(f"scene {scene.seed} has {len(circles)} circles; the colour question needs exactly one")
        return circles[0]
    if prompt == OCR_PROMPT:
        if scene.text is None:
            raise ValueError(f"scene {scene.seed} has no text to read")
        return scene.text
    if prompt.startswith(DETECT_PREFIX):
        return detect_target(scene, _scene_labels(scene, prompt))
    if prompt.startswith(SEGMENT_PREFIX):
        if codes_of is None:
            raise ValueError("a segment target needs the mask VQ-VAE's codes_of")
        (label,) = _scene_labels(scene, prompt)
        return segment_target(scene, label, codes_of)
    raise ValueError(f"no task has the prompt {prompt!r}")


def prompt_labels(prompt: str) -> list[str]:
    """The labels a `detect` prompt asks (" ; "-separated) or the one a `segment` prompt names."""
    if prompt.startswith(DETECT_PREFIX):
        return prompt[len(DETECT_PREFIX) :].split(LABEL_SEPARATOR)
    if prompt.startswith(SEGMENT_PREFIX):
        return [prompt[len(SEGMENT_PREFIX) :]]
    raise ValueError(f"{prompt!r} is neither a detect nor a segment prompt")


def _scene_labels(scene: Scene, prompt: str) -> list[str]:
    # An empty target would train "answer nothing"; the scenes' prompts only ask what is there.
    labels, present = prompt_labels(prompt), labels_of(scene)
    missing = [label for label in labels if label not in present]
    if missing:
        raise ValueError(f"scene {scene.seed} has no object labelled {missing}; its labels are {present}")
    return labels


def tasks_for(scene: Scene, codes_of: Callable[[SceneObject], list[int]] | None = None) -> list[tuple[str, str]]:
    """(prompt, target) pairs for every task the scene supports (`prompts_for`); with `codes_of`
    (the mask VQ-VAE's codes of an object), a `segment` pair for each distinct label too."""
    return [(p, target_for(scene, p, codes_of)) for p in prompts_for(scene, segment=codes_of is not None)]
