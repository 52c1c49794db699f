"""Seeded synthetic scenes: 1 to 4 flat shapes on a named background, optionally with a word or number.

Everything a task target needs is recorded per scene: each shape's kind, colour, visible mask and the
box of that mask, the text and its box. Same seed, same pixels: a scene depends only on `seed` and the
image size (`random.Random(seed)` and `numpy.random.default_rng(seed)`, no global state).

Rules the tests check:
- shapes are drawn without anti-aliasing in one of `COLOURS`, so every visible pixel of a shape is
  exactly its colour; no background pixel ever equals a shape colour (see `BACKGROUNDS`);
- a shape may be drawn over an earlier one (`OVERLAP_PROBABILITY` per placement) only while every
  earlier shape keeps at least `MIN_VISIBLE` of its own area visible; otherwise boxes stay apart;
- text never touches a shape, so OCR and shape pixels do not mix; each character is centred in its
  own cell of the top or bottom row of an 8 x 8 grid (`TEXT_CELLS`);
- a box is the extent of the visible mask, `(x_min, y_min, x_max, y_max)` in pixels with the max
  edges exclusive (a mask covering columns 3..7 has x_min 3, x_max 8).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("circle", "square", "triangle")
# Six saturated colours, far apart in RGB so a small model (and a bicubic resize) keeps them apart.
COLOURS = {
    "red": (230, 25, 25),
    "green": (20, 160, 40),
    "blue": (25, 60, 225),
    "yellow": (245, 215, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
# Backgrounds: muted colours at least 60 apart (max over channels) from every shape colour; the
# gradient and noise styles move a channel by at most BACKGROUND_SPREAD, so no background pixel can
# equal a shape colour.
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "purple": (120, 70, 150),
    "teal": (40, 130, 140),
    "pink": (230, 150, 185),
    "brown": (130, 90, 50),
}
BACKGROUND_STYLES = ("solid", "gradient", "noise")
BACKGROUND_SPREAD = 24
# Fractions of the image side for a shape's bounding square.
SIZES = {"small": 0.16, "medium": 0.24, "large": 0.32}
WORDS = ("cat", "dog", "sun", "tree", "map", "stop", "open", "exit", "book", "milk", "fish", "star")
TEXT_PROBABILITY = 0.5
# Font size as a fraction of the image side: 18 px at 112 (a digit is 13 x 13 px).
TEXT_HEIGHT = 0.16
# Text sits on a grid of TEXT_CELLS x TEXT_CELLS cells, one character centred in each cell of a row:
# at 112 px a cell is one 14-px patch of the scenes model, so each patch holds one whole character.
# With proportional spacing (version 1) characters straddled patches and digits were read at chance.
TEXT_CELLS = 8
OVERLAP_PROBABILITY = 0.25
MIN_VISIBLE = 0.6
FONT_PATH = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
FONT_PACKAGE = "fonts-dejavu-core"
DEFAULT_IMAGE_SIZE = 224


@dataclass
class SceneObject:
    kind: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x_min, y_min, x_max, y_max of the visible mask, max exclusive
    mask: np.ndarray  # bool, (height, width), visible pixels only

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Scene:
    seed: int
    image: Image.Image
    objects: list[SceneObject]  # canonical order: left to right by box centre, then top to bottom
    background: str
    background_style: str
    text: str | None
    text_box: tuple[int, int, int, int] | None  # same convention as SceneObject.box
    # Each character of `text` with the columns its advance spans, (char, x_start, x_end) in pixels.
    text_chars: tuple[tuple[str, float, float], ...] = ()


def load_font(size: int) -> ImageFont.FreeTypeFont:
    if not FONT_PATH.exists():
        raise FileNotFoundError(
            f"font {FONT_PATH} is missing; install the Debian package {FONT_PACKAGE} (apt-get install {FONT_PACKAGE}, done by .ci/setup)"
        )
    return ImageFont.truetype(str(FONT_PATH), size)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The extent of a non-empty mask as (x_min, y_min, x_max, y_max), max exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _background(rng: np.random.Generator, name: str, style: str, size: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[name], dtype=np.int16)
    if style == "solid":
        offset = np.zeros((size, size, 1), dtype=np.int16)
    elif style == "gradient":
        ramp = np.linspace(-BACKGROUND_SPREAD, BACKGROUND_SPREAD, size).round().astype(np.int16)
        offset = (ramp[:, None] if rng.integers(2) else ramp[None, :]) * np.ones((size, size), np.int16)
        offset = offset[..., None]
    else:
        offset = rng.integers(-BACKGROUND_SPREAD, BACKGROUND_SPREAD + 1, (size, size, 3), dtype=np.int16)
    return np.clip(base + offset, 0, 255).astype(np.uint8)


def _shape_mask(kind: str, x: int, y: int, side: int, size: int) -> np.ndarray:
    """The full (unoccluded) mask of a shape whose bounding square has top-left (x, y)."""
    layer = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    box = (x, y, x + side - 1, y + side - 1)
    if kind == "circle":
        draw.ellipse(box, fill=1)
    elif kind == "square":
        draw.rectangle(box, fill=1)
    else:
        draw.polygon([(x + (side - 1) / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=1)
    return np.array(layer, dtype=bool)


def _draw_text(rng: random.Random, size: int, background: np.ndarray) -> tuple[str, tuple, tuple, tuple]:
    """Pick a word or number and draw it on the top or bottom row of the text grid, one character
    centred in each cell (see `TEXT_CELLS`); returns text, (alpha, fill), box and the cell columns of
    each character."""
    text = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(0, 999))
    font = load_font(max(12, round(size * TEXT_HEIGHT)))
    cell = size / TEXT_CELLS
    first = rng.randint(0, TEXT_CELLS - len(text))
    _, top, _, bottom = font.getbbox(text)
    # The text's own extent centred in its row, kept inside the image (a bottom-row descender moves it up).
    row_top = 0 if rng.random() < 0.5 else size - cell
    y = min(max(1, round(row_top + (cell - (bottom - top)) / 2)), size - 1 - (bottom - top)) - top
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    chars = []
    for i, c in enumerate(text):
        x0, x1 = (first + i) * cell, (first + i + 1) * cell
        draw.text(((x0 + x1 - font.getlength(c)) / 2, y), c, font=font, fill=255)
        chars.append((c, x0, x1))
    # Black or white text, whichever contrasts with the background's mean luminance.
    luminance = float(background.reshape(-1, 3).mean(0) @ np.array([0.299, 0.587, 0.114]))
    fill = (0, 0, 0) if luminance > 110 else (255, 255, 255)
    alpha = np.array(layer)
    return text, (alpha, fill), mask_box(alpha > 0), tuple(chars)


def generate(seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> Scene:
    """The scene for `seed`; the same seed and size always give the same pixels."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    size = image_size
    background = rng.choice(sorted(BACKGROUNDS))
    style = rng.choice(BACKGROUND_STYLES)
    pixels = _background(nrng, background, style, size)

    text = text_box = None
    text_chars: tuple = ()
    blocked = np.zeros((size, size), dtype=bool)  # where shapes may not go (text plus a margin)
    if rng.random() < TEXT_PROBABILITY:
        text, (alpha, fill), text_box, text_chars = _draw_text(rng, size, pixels)
        a = alpha[..., None].astype(np.float32) / 255
        pixels = (pixels * (1 - a) + np.array(fill, np.float32) * a).round().astype(np.uint8)
        margin = max(2, size // 50)
        x0, y0, x1, y1 = text_box
        blocked[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = True

    count = rng.randint(1, 4)
    full: list[np.ndarray] = []  # full masks, in drawing order
    placed: list[dict] = []
    for _ in range(count):
        for _attempt in range(200):
            kind = rng.choice(KINDS)
            size_name = rng.choice(sorted(SIZES))
            side = max(6, round(SIZES[size_name] * size))
            x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
            mask = _shape_mask(kind, x, y, side, size)
            if (mask & blocked).any():
                continue
            covered = np.zeros_like(mask)
            for m in full:
                covered |= m
            if (mask & covered).any():
                if rng.random() >= OVERLAP_PROBABILITY:
                    continue
                # Drawing this shape on top must leave every earlier shape mostly visible.
                ok = True
                for i, m in enumerate(full):
                    visible = m.copy()
                    for later in full[i + 1 :] + [mask]:
                        visible &= ~later
                    if visible.sum() < MIN_VISIBLE * m.sum():
                        ok = False
                        break
                if not ok:
                    continue
            else:
                # Apart: keep a one-pixel gap so touching shapes do not merge into one blob.
                grown = np.zeros_like(covered)
                grown[1:] |= covered[:-1]
                grown[:-1] |= covered[1:]
                grown[:, 1:] |= covered[:, :-1]
                grown[:, :-1] |= covered[:, 1:]
                if (mask & grown).any():
                    continue
            full.append(mask)
            placed.append(dict(kind=kind, size=size_name, colour=rng.choice(sorted(COLOURS))))
            break
        # A scene that cannot fit another shape after 200 tries keeps the shapes it has.

    objects = []
    for i, (m, p) in enumerate(zip(full, placed)):
        visible = m.copy()
        for later in full[i + 1 :]:
            visible &= ~later
        pixels[m] = COLOURS[p["colour"]]  # later shapes overwrite, in drawing order
        objects.append(SceneObject(kind=p["kind"], colour=p["colour"], size=p["size"], box=mask_box(visible), mask=visible))
    objects.sort(key=lambda o: ((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2))
    return Scene(
        seed=seed,
        image=Image.fromarray(pixels, "RGB"),
        objects=objects,
        background=background,
        background_style=style,
        text=text,
        text_box=text_box,
        text_chars=text_chars,
    )


def sample_sheet(seed: int, count: int = 8, image_size: int = DEFAULT_IMAGE_SIZE, columns: int = 4) -> Image.Image:
    """`count` scenes from consecutive seeds in a grid, each with its caption below, for a look."""
    from .tasks import caption

    rows = -(-count // columns)
    pad = 34
    sheet = Image.new("RGB", (columns * image_size, rows * (image_size + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = load_font(10)
    for i in range(count):
        scene = generate(seed + i, image_size)
        x, y = (i % columns) * image_size, (i // columns) * (image_size + pad)
        sheet.paste(scene.image, (x, y))
        for o in scene.objects:
            bx0, by0, bx1, by1 = o.box
            draw.rectangle((x + bx0, y + by0, x + bx1 - 1, y + by1 - 1), outline=(255, 0, 255))
        words = caption(scene).split(" on ")
        draw.text((x + 2, y + image_size + 2), words[0][:44], font=font, fill=(0, 0, 0))
        draw.text(
            (x + 2, y + image_size + 13), f"on {words[1]}" + (f"  text={scene.text!r}" if scene.text else ""), font=font, fill=(0, 0, 0)
        )
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a sheet of sample scenes with their boxes and captions.")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first scene; the rest follow")
    parser.add_argument("--count", type=int, default=8, help="number of scenes")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="side of each square scene")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sample_sheet(args.seed, args.count, args.image_size).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
