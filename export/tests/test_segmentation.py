"""seg_decoder.onnx against an independent numpy port of big_vision's VQ-VAE mask decoder."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from export import segmentation
from export.errors import ExportError
from export.tiny import vae_shapes

from .conftest import FIGURES


def conv(x, w, b, pad):  # x [N,C,H,W], w [O,C,k,k] (PyTorch layout), stride 1
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h, wd = x.shape[2], x.shape[3]
    out = np.zeros((x.shape[0], w.shape[0], h, wd), np.float64)
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("nchw,oc->nohw", xp[:, :, dy : dy + h, dx : dx + wd], w[:, :, dy, dx])
    return out + b[None, :, None, None]


def conv_transpose(x, w, b):  # kernel 4, stride 2, padding 1: [N,C,H,W] -> [N,O,2H,2W]; w [C,O,4,4]
    n, _, h, wd = x.shape
    full = np.zeros((n, w.shape[1], 2 * h + 2, 2 * wd + 2), np.float64)
    for dy in range(4):
        for dx in range(4):
            full[:, :, dy : dy + 2 * h : 2, dx : dx + 2 * wd : 2] += np.einsum("nchw,co->nohw", x, w[:, :, dy, dx])
    return full[:, :, 1:-1, 1:-1] + b[None, :, None, None]


def numpy_decoder(vae, codes):
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    x = vae["_vq_vae._embedding"][codes].reshape(len(codes), 4, 4, -1).transpose(0, 3, 1, 2).astype(np.float64)
    x = relu(conv(x, vae["decoder.0.weight"], vae["decoder.0.bias"], 0))
    for blk in (2, 3):
        p = f"decoder.{blk}.net."
        y = relu(conv(x, vae[p + "0.weight"], vae[p + "0.bias"], 1))
        y = relu(conv(y, vae[p + "2.weight"], vae[p + "2.bias"], 1))
        x = x + conv(y, vae[p + "4.weight"], vae[p + "4.bias"], 0)
    for layer in (4, 6, 8, 10):
        x = relu(conv_transpose(x, vae[f"decoder.{layer}.weight"], vae[f"decoder.{layer}.bias"]))
    return conv(x, vae["decoder.12.weight"], vae["decoder.12.bias"], 0)[:, 0]


def test_seg_decoder_matches_numpy_big_vision_port(random_vae, tmp_path):
    vae = segmentation.load_vae(random_vae)
    path = segmentation.export(vae, tmp_path / "seg_decoder.onnx")
    codes = np.random.default_rng(0).integers(0, 128, size=(5, 16), dtype=np.int64)
    got = ort.InferenceSession(str(path)).run(None, {"codes": codes})[0]
    want = numpy_decoder(vae, codes)
    assert got.shape == (5, 64, 64)
    diff = float(np.abs(got - want).max())
    FIGURES.append(f"seg_decoder vs numpy big_vision port: max |diff| {diff:.2e} over 5 masks (range {want.min():.2f}..{want.max():.2f})")
    assert want.std() > 0.05, "random VAE gives flat masks: the comparison would prove little"
    assert diff <= 1e-5


def test_vae_with_wrong_shape_is_rejected(tmp_path, random_vae):
    with np.load(random_vae) as npz:
        arrays = dict(npz)
    arrays["decoder.6.weight"] = arrays["decoder.6.weight"][:, :32]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ExportError, match=r"decoder\.6\.weight has shape \(128, 32, 4, 4\), expected \(128, 64, 4, 4\)"):
        segmentation.load_vae(bad)


def test_vae_missing_key_is_rejected(tmp_path, random_vae):
    with np.load(random_vae) as npz:
        arrays = {k: v for k, v in npz.items() if k != "decoder.12.bias"}
    bad = tmp_path / "missing.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ExportError, match="missing key 'decoder.12.bias'"):
        segmentation.load_vae(bad)


def test_real_key_names_and_codebook_width(random_vae):
    with np.load(random_vae) as npz:
        assert {k: tuple(v.shape) for k, v in npz.items()} == vae_shapes(512)
