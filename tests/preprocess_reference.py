"""Python reference for tests/preprocess.rs: PIL + transformers' SigLIP image processor.

preprocess_reference.py generate DIR
    Writes the edge-case images (PNG modes, GIF, JPEG variants, WebP, BMP, a decompression bomb)
    to DIR.
preprocess_reference.py reference OUT SIZES DO_CONVERT_RGB IMAGE...
    For each IMAGE: OUT/<name>.rgb (uint8 [H, W, 3], `transformers.image_utils.load_image`) and
    OUT/<name>.<S>.f32 (float32 little-endian pixel_values [3, S, S]) for each S in the
    comma-separated SIZES, from a PaliGemma preprocessor_config.json whose "do_convert_rgb" is
    DO_CONVERT_RGB ("null" as in the released checkpoints, or "true"); OUT/manifest.json maps
    name -> {"size": [W, H], "transparency": the `info["transparency"]` load_image leaves}.
preprocess_reference.py resize OUT
    Pillow's BICUBIC resize of generated RGB images: OUT/resize.json lists the cases
    [{"name", "size": [W, H], "outputs": [[W', H'], ...]}]; OUT/<name>.rgb holds the input
    (uint8 [H, W, 3]) and OUT/<name>.out.rgb every output in list order, concatenated.
preprocess_reference.py damaged OUT
    Damaged JPEGs (cut short, trailing bytes, corrupt entropy data) as OUT/<name>.jpg, whether
    transformers' load_image loads each (OUT/damaged.json) and its pixels (OUT/<name>.rgb).
"""

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width, height, color_type, bit_depth, rows, plte=None, trns=None, idat=None) -> bytes:
    """A PNG written by hand, for layouts PIL cannot save (16-bit RGB, 16-bit LA, 1/4-bit)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    if plte is not None:
        out += png_chunk(b"PLTE", plte)
    if trns is not None:
        out += png_chunk(b"tRNS", trns)
    if idat is None:
        idat = zlib.compress(b"".join(b"\x00" + r for r in rows))
    return out + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Packs one row of small samples MSB first, as PNG stores sub-byte depths."""
    per_byte = 8 // bits
    padded = np.zeros(-(-len(values) // per_byte) * per_byte, dtype=np.uint8)
    padded[: len(values)] = values
    groups = padded.reshape(-1, per_byte)
    shifts = np.arange(per_byte - 1, -1, -1) * bits
    return bytes((groups << shifts).sum(axis=1).astype(np.uint8))


def scene(rng, height, width, channels=3) -> np.ndarray:
    """Smooth gradients plus noise and a hard edge: exercises the resampling filter everywhere."""
    y, x = np.mgrid[0:height, 0:width]
    planes = []
    for c in range(channels):
        base = 127 + 100 * np.sin(x / (7 + 5 * c) + y / (11 + 3 * c))
        base += rng.normal(0, 20, size=(height, width))
        base[: height // 2, : width // 3] = 255 * (c % 2)
        planes.append(base)
    return np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8)


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    Image.fromarray(np.array([[[12, 200, 77]]], dtype=np.uint8)).save(out / "tiny_1x1.png")
    Image.fromarray(scene(rng, 20, 5000)).save(out / "wide_5000x20.png")
    Image.fromarray(scene(rng, 640, 9)).save(out / "tall_9x640.png")

    rgba = scene(rng, 48, 64, 4)
    rgba[..., 3] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(out / "rgba_alpha.png")
    Image.fromarray(scene(rng, 30, 40, 2), "LA").save(out / "la.png")

    # 16-bit grey opens as "I;16", which PIL's convert("RGB") saturates at 255.
    gray16 = np.where(rng.random((21, 33)) < 0.5, rng.integers(0, 300, (21, 33)), rng.integers(0, 65536, (21, 33))).astype(">u2")
    out.joinpath("gray16.png").write_bytes(raw_png(33, 21, 0, 16, [r.tobytes() for r in gray16]))
    rgb16 = rng.integers(0, 65536, (19, 23, 3)).astype(">u2")
    out.joinpath("rgb16.png").write_bytes(raw_png(23, 19, 2, 16, [r.tobytes() for r in rgb16]))
    la16 = rng.integers(0, 65536, (19, 23, 2)).astype(">u2")
    out.joinpath("la16.png").write_bytes(raw_png(23, 19, 4, 16, [r.tobytes() for r in la16]))
    gray4 = rng.integers(0, 16, (15, 29)).astype(np.uint8)
    out.joinpath("gray4.png").write_bytes(raw_png(29, 15, 0, 4, [pack_bits(r, 4) for r in gray4]))
    gray1 = rng.integers(0, 2, (15, 29)).astype(np.uint8)
    out.joinpath("gray1.png").write_bytes(raw_png(29, 15, 0, 1, [pack_bits(r, 1) for r in gray1]))

    # Palettes: index 1 and index 4 share a colour, so PIL's "transparency colour turns white"
    # also whitens index 4 when index 1 is the transparent one.
    plte = bytes(
        [
            10,
            20,
            30,
            200,
            100,
            50,
            0,
            255,
            0,
            90,
            90,
            90,
            200,
            100,
            50,
            255,
            255,
            0,
            1,
            2,
            3,
            250,
            0,
            250,
            30,
            60,
            90,
            120,
            150,
            180,
            210,
            240,
            15,
            45,
            75,
            105,
        ]
    )
    idx = rng.integers(0, 12, (27, 31)).astype(np.uint8)
    rows8 = [r.tobytes() for r in idx]
    out.joinpath("palette.png").write_bytes(raw_png(31, 27, 3, 8, rows8, plte))
    out.joinpath("palette_trns_index.png").write_bytes(raw_png(31, 27, 3, 8, rows8, plte, trns=b"\xff\x00\xff"))
    out.joinpath("palette_trns_alpha.png").write_bytes(raw_png(31, 27, 3, 8, rows8, plte, trns=b"\xff\x00\x80\x40"))
    out.joinpath("palette4_trns.png").write_bytes(raw_png(31, 27, 3, 4, [pack_bits(r, 4) for r in idx], plte, trns=b"\xff\xff\x00"))
    gray8 = rng.integers(0, 256, (26, 24)).astype(np.uint8)
    gray8[::3, ::2] = 77
    out.joinpath("gray_trns.png").write_bytes(raw_png(24, 26, 0, 8, [r.tobytes() for r in gray8], trns=struct.pack(">H", 77)))
    rgb8 = scene(rng, 26, 24)
    rgb8[::4, ::3] = (5, 6, 7)
    out.joinpath("rgb_trns.png").write_bytes(raw_png(24, 26, 2, 8, [r.tobytes() for r in rgb8], trns=struct.pack(">HHH", 5, 6, 7)))

    p = Image.fromarray(idx, "P")
    p.putpalette(plte)
    p.save(out / "palette_trns.gif", transparency=1)
    p.save(out / "palette.gif")

    photo = Image.fromarray(scene(rng, 96, 128))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(out / "exif6.jpg", quality=90, exif=exif.tobytes())
    photo.save(out / "exif6.png", exif=exif.tobytes())
    photo.save(out / "rgb.jpg", quality=95)
    photo.convert("CMYK").save(out / "cmyk.jpg", quality=95)
    photo.convert("L").save(out / "gray.jpg", quality=95)
    photo.save(out / "lossless.webp", lossless=True)
    photo.save(out / "lossy.webp", quality=80)
    photo.save(out / "rgb.bmp")

    # JPEG: the libjpeg-turbo paths Pillow takes (chroma subsampling, progressive scans, restart
    # intervals, RGB without YCbCr, grey, Adobe CMYK and YCCK), at a size that is no multiple of
    # the MCU so the edge upsampling is exercised.
    odd = Image.fromarray(scene(rng, 61, 97))
    odd.save(out / "odd_420.jpg", quality=95)
    odd.save(out / "odd_422.jpg", quality=95, subsampling=1)
    odd.save(out / "odd_444.jpg", quality=95, subsampling=0)
    odd.save(out / "odd_q50.jpg", quality=50)
    odd.save(out / "odd_rgb_no_ycc.jpg", quality=95, keep_rgb=True)
    odd.save(out / "progressive.jpg", quality=90, progressive=True)
    odd.save(out / "progressive_444.jpg", quality=90, progressive=True, subsampling=0)
    odd.save(out / "restart.jpg", quality=90, restart_marker_blocks=3)
    odd.convert("L").save(out / "odd_gray.jpg", quality=90, progressive=True)
    cmyk = Image.fromarray(scene(rng, 61, 97, 4), "CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=95)
    out.joinpath("odd_cmyk.jpg").write_bytes(buf.getvalue())
    # The same data declared YCCK (Adobe transform 2): libjpeg converts it to CMYK first.
    adobe = buf.getvalue().index(b"Adobe")
    assert buf.getvalue()[adobe + 11] == 0, "Pillow's CMYK JPEG is no longer Adobe transform 0"
    ycck = bytearray(buf.getvalue())
    ycck[adobe + 11] = 2
    out.joinpath("odd_ycck.jpg").write_bytes(bytes(ycck))

    # Header says 100000 x 100000 (1e10 pixels); the data is a few bytes.
    out.joinpath("bomb.png").write_bytes(raw_png(100000, 100000, 0, 8, [], idat=zlib.compress(b"\x00" * 64)))


def damaged(out: Path) -> None:
    """JPEGs cut short, with trailing bytes or with corrupt entropy data, and what PIL makes of
    each: OUT/damaged.json maps name -> {"error": PIL's message or null, "size": [W, H] or null};
    OUT/<name>.rgb holds load_image's pixels (uint8 [H, W, 3]) where PIL loads it."""
    from transformers.image_utils import load_image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    odd = Image.fromarray(scene(rng, 61, 97))
    variants = {}
    for kind, options in [("baseline", {}), ("progressive", {"progressive": True})]:
        buf = io.BytesIO()
        odd.save(buf, "JPEG", quality=90, **options)
        data = buf.getvalue()
        scan = data.rindex(b"\xff\xda")
        variants[f"{kind}_no_eoi"] = data[:-2]
        variants[f"{kind}_cut_10"] = data[:-10]
        variants[f"{kind}_cut_half"] = data[: len(data) // 2]
        variants[f"{kind}_cut_in_header"] = data[:scan]
        variants[f"{kind}_trailing_bytes"] = data + b"not part of the image"
        flipped = bytearray(data)
        for at in range(scan + 40, len(data) - 40, 97):
            flipped[at] ^= 0x5A
        variants[f"{kind}_flipped_bytes"] = bytes(flipped)
    report = {}
    for name, data in variants.items():
        path = out / f"{name}.jpg"
        path.write_bytes(data)
        try:
            img = load_image(str(path))
        except Exception as e:
            report[name] = {"error": f"{type(e).__name__}: {e}", "size": None}
            continue
        (out / f"{name}.rgb").write_bytes(np.asarray(img, dtype=np.uint8).tobytes())
        report[name] = {"error": None, "size": [img.width, img.height]}
    (out / "damaged.json").write_text(json.dumps(report))


def reference(out: Path, sizes: list[int], do_convert_rgb: bool | None, images: list[str]) -> None:
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image

    out.mkdir(parents=True, exist_ok=True)
    processors = {}
    for size in sizes:
        cfg_dir = out / f"config_{size}"
        cfg_dir.mkdir(exist_ok=True)
        # The keys of google/paligemma2-*-{224,448} preprocessor_config.json.
        (cfg_dir / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "do_convert_rgb": do_convert_rgb,
                    "do_normalize": True,
                    "do_rescale": True,
                    "do_resize": True,
                    "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5],
                    "image_processor_type": "SiglipImageProcessor",
                    "image_seq_length": (size // 14) ** 2,
                    "processor_class": "PaliGemmaProcessor",
                    "resample": 3,
                    "rescale_factor": 0.00392156862745098,
                    "size": {"height": size, "width": size},
                }
            )
        )
        proc = AutoImageProcessor.from_pretrained(cfg_dir)
        if type(proc).__name__ != "SiglipImageProcessorPil":
            sys.exit(
                f"AutoImageProcessor picked {type(proc).__name__}, not SiglipImageProcessorPil: "
                "torchvision is installed, so transformers now resizes with torchvision, not PIL. "
                "The Rust port follows the PIL backend; uninstall torchvision from .venv."
            )
        processors[size] = proc

    manifest = {}
    for path in images:
        name = Path(path).name
        img = load_image(path)
        assert img.mode == "RGB", img.mode
        (out / f"{name}.rgb").write_bytes(np.asarray(img, dtype=np.uint8).tobytes())
        manifest[name] = {"size": [img.width, img.height], "transparency": img.info.get("transparency")}
        for size, proc in processors.items():
            pv = proc(images=img, return_tensors="np")["pixel_values"][0]
            assert pv.shape == (3, size, size) and pv.dtype == np.float32, (pv.shape, pv.dtype)
            (out / f"{name}.{size}.f32").write_bytes(pv.astype("<f4").tobytes())
    (out / "manifest.json").write_text(json.dumps(manifest))


def resize(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cases = []
    # Every output size up to 3x: both pass orders, both sides of Pillow 13's switch to
    # vertical-first, up- and downscales, and the one-axis resizes where a pass is skipped.
    for width, height in [(12, 12), (8, 16), (16, 8), (7, 13)]:
        outputs = [(w, h) for w in range(1, 3 * width + 1) for h in range(1, 3 * height + 1)]
        cases.append((f"grid_{width}x{height}", width, height, outputs))
    # Photo-like portrait and landscape sources at the PaliGemma sizes and a few odd ones.
    for width, height in [(480, 640), (640, 480)]:
        outputs = [(224, 224), (448, 448), (896, 896), (480, 100), (100, 640), (300, 333)]
        cases.append((f"photo_{width}x{height}", width, height, outputs))
    manifest = []
    for name, width, height, outputs in cases:
        img = Image.fromarray(scene(rng, height, width))
        (out / f"{name}.rgb").write_bytes(img.tobytes())
        resized = b"".join(img.resize(size, Image.Resampling.BICUBIC).tobytes() for size in outputs)
        (out / f"{name}.out.rgb").write_bytes(resized)
        manifest.append({"name": name, "size": [width, height], "outputs": outputs})
    (out / "resize.json").write_text(json.dumps(manifest))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "generate":
        generate(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "resize":
        resize(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "damaged":
        damaged(Path(sys.argv[2]))
    elif len(sys.argv) >= 6 and sys.argv[1] == "reference" and sys.argv[4] in ("null", "true"):
        convert = {"null": None, "true": True}[sys.argv[4]]
        reference(Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")], convert, sys.argv[5:])
    else:
        sys.exit(__doc__)
