"""seg_decoder.onnx: big_vision's VQ-VAE mask decoder (vae-oid.npz) as a graph.

    codes i64[K,16]  the 16 <segNNN> values (0..127) of K objects
 -> masks f32[K,64,64]  about [-1, 1]; the runtime resizes each into its box and thresholds at 0

Port of big_vision `evaluators/proj/paligemma/transfers/segmentation.py`: codebook lookup to a 4x4
grid, conv1x1 + ReLU, two residual blocks, four stride-2 transposed convs (+ReLU) up to 64x64, and
a conv1x1 to one channel. The npz holds PyTorch-layout weights, so torch layers take them as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ExportError
from .graph import GraphSpec, export_graph
from .tiny import vae_shapes

NUM_CODES = 16
UPSAMPLE_LAYERS = (4, 6, 8, 10)


def load_vae(path: Path) -> dict[str, np.ndarray]:
    """Read and check vae-oid.npz: every key present with the released shapes (D read from the file)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--seg-vae {path}: no such file (big_vision's vae-oid.npz)")
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:  # np.load raises several unrelated types for a bad file
        raise ExportError(f"--seg-vae {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    codebook = arrays.get("_vq_vae._embedding")
    if codebook is None or codebook.ndim != 2:
        raise ExportError(f"--seg-vae {path}: missing the codebook '_vq_vae._embedding' (128 x D)")
    for key, shape in vae_shapes(codebook.shape[1]).items():
        if key not in arrays:
            raise ExportError(f"--seg-vae {path}: missing key {key!r} (expected shape {shape})")
        if tuple(arrays[key].shape) != shape:
            raise ExportError(f"--seg-vae {path}: {key} has shape {tuple(arrays[key].shape)}, expected {shape}")
    return {k: v.astype(np.float32) for k, v in arrays.items()}


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x):
        return x + self.net(x)


class SegDecoder(nn.Module):
    def __init__(self, vae: dict[str, np.ndarray]):
        super().__init__()
        codebook = torch.from_numpy(vae["_vq_vae._embedding"])
        self.register_buffer("codebook", codebook)
        dim = codebook.shape[1]
        layers: dict[str, nn.Module] = {"0": nn.Conv2d(dim, 128, 1), "1": nn.ReLU(), "2": ResBlock(128), "3": ResBlock(128)}
        cin = 128
        for index, cout in zip(UPSAMPLE_LAYERS, (128, 64, 32, 16)):
            layers[str(index)] = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
            layers[str(index + 1)] = nn.ReLU()
            cin = cout
        layers["12"] = nn.Conv2d(16, 1, 1)
        self.decoder = nn.Sequential(*[layers[str(i)] for i in range(13)])
        state = {k: torch.from_numpy(v) for k, v in vae.items() if k.startswith("decoder.")}
        self.load_state_dict({"codebook": codebook, **state})

    def forward(self, codes):  # i64[K,16] -> f32[K,64,64]
        grid = self.codebook[codes].reshape(codes.shape[0], 4, 4, -1).permute(0, 3, 1, 2)  # [K,D,4,4]
        return self.decoder(grid)[:, 0]


def export(vae: dict[str, np.ndarray], path: Path, check_graph: bool = False) -> Path:
    """Write seg_decoder.onnx; with `check_graph`, check it against the module (check.py)."""
    spec = GraphSpec(
        module=SegDecoder(vae),
        # Varied codes (the check compares masks; the trace does not depend on the values).
        args=(torch.arange(2 * NUM_CODES, dtype=torch.int64).reshape(2, NUM_CODES) * 37 % 128,),
        input_names=["codes"],
        output_names=["masks"],
        axes={"codes": {0: "num_objects"}, "masks": {0: "num_objects"}},
    )
    export_graph(spec, path)
    if check_graph:
        from . import check

        check.check_graph(path, check.spec_feeds(spec), spec.module, spec.args, None)
    return path
