"""big_vision's mask post-processing, run by tests/segment.rs as the reference for src/segment.rs and src/resample.rs.

Follows google-research/big_vision
big_vision/evaluators/proj/paligemma/transfers/segmentation.py (Evaluator.run) line for line:
box bins / 1023, int() to pixels, PIL "F" BILINEAR resize into the box, threshold > 0.0, paste.

Usage: segment_reference.py DIR
  reads  DIR/cases.json  [{"bins": [y_min, x_min, y_max, x_max], "width": w, "height": h}, ...]
         DIR/masks.f32   little-endian f32[K, 64, 64]
         DIR/sizes.json  [[w, h], ...]: plain resizes of mask k % K, both pass orders of Pillow 13
  writes DIR/resized_{k}.f32 (f32[box_h, box_w]) and DIR/mask_{k}.u8 (u8[h, w], 0 or 1)
         DIR/plain_{i}.f32 (f32[h, w]) for each entry of sizes.json
  prints JSON: per case [x_min, y_min, x_max, y_max] in pixels, or null when the box is empty.
"""

import json
import pathlib
import sys

import numpy as np
import PIL.Image


def main(work: pathlib.Path) -> None:
    cases = json.loads((work / "cases.json").read_text())
    masks = np.fromfile(work / "masks.f32", dtype="<f4").reshape(len(cases), 64, 64)
    boxes = []
    for k, (case, m64) in enumerate(zip(cases, masks)):
        h, w = case["height"], case["width"]
        tokens = np.array(case["bins"], np.int32)
        y1, x1, y2, x2 = tokens / 1023  # Back to [0.0 ... 1.0], float64 as in big_vision.
        y1, x1, y2, x2 = map(int, (y1 * h, x1 * w, y2 * h, x2 * w))
        if x2 <= x1 or y2 <= y1:
            boxes.append(None)
            continue
        mi = np.asarray(PIL.Image.fromarray(np.ascontiguousarray(m64)).resize([x2 - x1, y2 - y1], resample=PIL.Image.BILINEAR))
        assert mi.dtype == np.float32, mi.dtype
        mi.astype("<f4").tofile(work / f"resized_{k}.f32")
        full = np.zeros([h, w], np.uint8)
        full[y1:y2, x1:x2] = mi > 0.0
        full.tofile(work / f"mask_{k}.u8")
        boxes.append([x1, y1, x2, y2])
    sizes = json.loads((work / "sizes.json").read_text())
    for i, (w, h) in enumerate(sizes):
        m64 = np.ascontiguousarray(masks[i % len(masks)])
        out = np.asarray(PIL.Image.fromarray(m64).resize([w, h], resample=PIL.Image.BILINEAR))
        out.astype("<f4").tofile(work / f"plain_{i}.f32")
    print(json.dumps(boxes))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
