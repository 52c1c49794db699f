"""The scenes' mask VQ-VAE: big_vision's vae-oid architecture, trained on the scenes' object masks.

    python -m train.vqvae --out target/scenes-vae.npz [--steps 1500] [--seed 0] [--threads 2]

PaliGemma writes an object's mask as 16 `<segNNN>` tokens: a 4x4 grid of codes from a 128-entry
codebook, which big_vision's VQ-VAE decoder turns into a 64x64 mask of the object's box. This
trains that pair for the scenes model:

- the target: the object's visible mask cropped to its box as the runtime reads the box back from
  its 4 loc tokens (`int(bin / 1023 * side)`, src/segment.rs `pixel_box`), resized to 64x64 and
  mapped to {-1, 1} (big_vision trains on `2 * (mask - 0.5)`; the runtime thresholds at 0);
- the decoder: exactly the layers `--seg-vae` converts (export/segmentation.py `SegDecoder`, the
  npz key names and shapes of `vae-oid.npz`), so the file it writes converts like the released one;
- the encoder: ours (the released npz holds no encoder): strided convolutions down to 4x4 and two
  residual blocks, the decoder's mirror;
- the quantiser: nearest codebook entry with a straight-through gradient, codebook and commitment
  losses (van den Oord et al.), and entries unused for a while restarted on encoder outputs.

Deterministic for a seed and thread count. The npz holds `_vq_vae._embedding`, `decoder.*` (what
`--seg-vae` reads) and `encoder.*` (what `train.tasks` needs to write segment targets).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from export.segmentation import ResBlock, SegDecoder
from export.tiny import write_random_vae

from . import scenes, tasks

MASK_SIDE = 64
GRID = 4
CODEBOOK = 128
# Width of a code (vae-oid.npz has 512; the decoder reads it from the file). 64 keeps the file small.
CODE_DIM = 64
# Held-out scenes for the reconstruction IoU: the evaluation's seeds (train.evaluate), never trained on.
EVAL_SEEDS = range(10_000_000, 10_000_300)
# The scenes model's image side (train.model.ModelConfig): its masks are what the codes describe.
IMAGE_SIZE = 112
# Version 4 trained 1,500 steps: loss 0.0137 at step 1,000, 0.0132 at 1,500, for 220 s of the
# 90-minute build; the cosine schedule ends at the last step either way.
STEPS = 1000


def pixel_box(bins: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int] | None:
    """(x_min, y_min, x_max, y_max) in whole pixels from (y_min, x_min, y_max, x_max) bins, as
    big_vision's evaluator and src/segment.rs truncate; None when no pixel is left."""
    y0, x0, y1, x1 = (int(tasks.from_bin(b, side)) for b, side in zip(bins, (height, width, height, width)))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def box_bins(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """The loc bins of a scene box, in PaliGemma's order (y_min, x_min, y_max, x_max)."""
    x0, y0, x1, y1 = box
    return (tasks.to_bin(y0, height), tasks.to_bin(x0, width), tasks.to_bin(y1, height), tasks.to_bin(x1, width))


def crop(mask: np.ndarray, bins: tuple[int, int, int, int]) -> np.ndarray | None:
    """The training target of one object: its mask inside the box its bins give, resized to 64x64
    (Pillow BILINEAR on floats), as f32 in {-1, 1}."""
    height, width = mask.shape
    box = pixel_box(bins, width, height)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    inside = Image.fromarray(mask[y0:y1, x0:x1].astype(np.float32), mode="F")
    resized = np.asarray(inside.resize((MASK_SIDE, MASK_SIDE), Image.BILINEAR))
    return np.where(resized > 0.5, 1.0, -1.0).astype(np.float32)


def paste(mask64: np.ndarray, bins: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """A decoded 64x64 mask back at the image's size, as the runtime does (src/segment.rs
    `paste_mask`: Pillow BILINEAR into the box, threshold at 0)."""
    out = np.zeros((height, width), dtype=bool)
    box = pixel_box(bins, width, height)
    if box is None:
        return out
    x0, y0, x1, y1 = box
    inside = Image.fromarray(mask64.astype(np.float32), mode="F").resize((x1 - x0, y1 - y0), Image.BILINEAR)
    out[y0:y1, x0:x1] = np.asarray(inside) > 0.0
    return out


def answer_masks(model: VQVAE, text: str, width: int, height: int) -> list[tuple[np.ndarray, str]]:
    """The masks of a `segment` answer's text (transformers' side of the evaluation): each object's
    codes decoded and pasted into its box, as the binary does with seg_decoder.onnx."""
    from .score import parse_segments

    objects = parse_segments(text)
    if not objects:
        return []
    with torch.no_grad():
        decoded = model.decode(torch.tensor([codes for _, codes, _ in objects])).numpy()
    return [(paste(mask64, bins, width, height), label) for mask64, (bins, _, label) in zip(decoded, objects)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def objects(seeds, image_size: int = IMAGE_SIZE):
    """(scene object, its bins, its 64x64 target) for every object of the scenes of `seeds`."""
    for seed in seeds:
        scene = scenes.generate(seed, image_size)
        width, height = scene.image.size
        for obj in scene.objects:
            bins = box_bins(obj.box, width, height)
            target = crop(obj.mask, bins)
            if target is not None:
                yield obj, bins, target


class Encoder(nn.Module):
    """64x64 mask -> [D,4,4]: a 3x3 stem, four stride-2 convolutions (the decoder's four
    transposed ones, mirrored), two residual blocks, a 1x1 projection to the code width."""

    def __init__(self, dim: int = CODE_DIM):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()]
        for cin, cout in ((16, 32), (32, 64), (64, 128), (128, 128)):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        layers += [ResBlock(128), ResBlock(128), nn.Conv2d(128, dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, masks):  # f32[B,64,64] in {-1, 1} -> f32[B,D,4,4]
        return self.net(masks[:, None])


class VQVAE(nn.Module):
    def __init__(self, dim: int = CODE_DIM, seed: int = 0):
        super().__init__()
        self.encoder = Encoder(dim)
        # The decoder is the converter's own module, its weights made trainable.
        self.decoder = SegDecoder(_random_vae(dim, seed)).decoder
        self.codebook = nn.Parameter(torch.randn(CODEBOOK, dim) * 0.1)

    def codes(self, masks) -> tuple[torch.Tensor, torch.Tensor]:
        """i64[B,16] codes (row-major over the 4x4 grid) and the encoder's f32[B,16,D] outputs."""
        z = self.encoder(masks).flatten(2).transpose(1, 2)  # [B,16,D]
        distances = z.pow(2).sum(-1, keepdim=True) - 2 * z @ self.codebook.T + self.codebook.pow(2).sum(-1)
        return distances.argmin(-1), z

    def decode(self, codes):  # i64[B,16] -> f32[B,64,64], as SegDecoder.forward
        grid = self.codebook[codes].reshape(codes.shape[0], GRID, GRID, -1).permute(0, 3, 1, 2)
        return self.decoder(grid)[:, 0]

    def forward(self, masks):
        codes, z = self.codes(masks)
        quantised = self.codebook[codes]
        # Straight-through: the decoder sees the codebook entry, the encoder gets its gradient.
        st = z + (quantised - z).detach()
        grid = st.reshape(masks.shape[0], GRID, GRID, -1).permute(0, 3, 1, 2)
        recon = self.decoder(grid)[:, 0]
        codebook_loss = (quantised - z.detach()).pow(2).mean()
        commitment = (z - quantised.detach()).pow(2).mean()
        return recon, codes, z, codebook_loss, commitment


def _random_vae(dim: int, seed: int) -> dict[str, np.ndarray]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_vae(Path(tmp) / "vae.npz", seed=seed, embedding_dim=dim)
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files}


def save(model: VQVAE, path: Path) -> Path:
    """vae-oid.npz's keys (`_vq_vae._embedding`, `decoder.N.*`) plus `encoder.*`."""
    arrays = {"_vq_vae._embedding": model.codebook.detach().numpy()}
    arrays |= {f"decoder.{k}": v.detach().numpy() for k, v in model.decoder.state_dict().items()}
    arrays |= {f"encoder.{k}": v.detach().numpy() for k, v in model.encoder.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})
    return path


def load(path: Path) -> VQVAE:
    with np.load(path) as npz:
        arrays = {k: torch.from_numpy(npz[k]) for k in npz.files}
    model = VQVAE(dim=arrays["_vq_vae._embedding"].shape[1])
    model.codebook.data.copy_(arrays["_vq_vae._embedding"])
    model.decoder.load_state_dict({k[len("decoder.") :]: v for k, v in arrays.items() if k.startswith("decoder.")})
    model.encoder.load_state_dict({k[len("encoder.") :]: v for k, v in arrays.items() if k.startswith("encoder.")})
    return model.eval()


def encode(model: VQVAE, targets: list[np.ndarray]) -> list[list[int]]:
    """The 16 codes of each 64x64 target (`crop`), in one encoder call."""
    if not targets:
        return []
    with torch.no_grad():
        codes, _ = model.codes(torch.from_numpy(np.stack(targets)))
    return codes.tolist()


def objects_codes(model: VQVAE, objects: list[tuple[scenes.SceneObject, int, int]]) -> dict[int, list[int]]:
    """The codes of each (object, scene width, scene height): its mask cropped to the box its loc
    tokens give, keyed by `id(object)`; one encoder call for all (training encodes a batch's
    segment targets at once: one call per object was 6% of a step)."""
    crops = [crop(o.mask, box_bins(o.box, width, height)) for o, width, height in objects]
    codes = iter(encode(model, [c for c in crops if c is not None]))
    # A box that truncates to no pixel has no mask to describe; any codes decode to nothing there.
    return {id(o): next(codes) if c is not None else [0] * GRID * GRID for (o, _, _), c in zip(objects, crops)}


def codes_of(model: VQVAE, width: int, height: int):
    """`train.tasks.segment_target`'s `codes_of` for objects of a `width` x `height` scene
    (`objects_codes` of one object)."""

    def codes(obj: scenes.SceneObject) -> list[int]:
        return objects_codes(model, [(obj, width, height)])[id(obj)]

    return codes


def evaluate(model: VQVAE, seeds=EVAL_SEEDS, image_size: int = IMAGE_SIZE) -> dict[str, float]:
    """Mean IoU of each object's visible mask with its reconstruction through the runtime's path
    (encode, decode, paste into the box), and the share of codebook entries used."""
    ious, used = [], set()
    model.eval()
    with torch.no_grad():
        for obj, bins, target in objects(seeds, image_size):
            codes, _ = model.codes(torch.from_numpy(target)[None])
            used.update(codes[0].tolist())
            mask64 = model.decode(codes)[0].numpy()
            height, width = obj.mask.shape
            ious.append(iou(paste(mask64, bins, width, height), obj.mask))
    return {"mean_iou": float(np.mean(ious)), "objects": len(ious), "codes_used": len(used) / CODEBOOK}


def train(
    out: Path,
    steps: int = STEPS,
    seed: int = 0,
    batch: int = 64,
    lr: float = 2e-3,
    image_size: int = IMAGE_SIZE,
    log_every: int = 100,
    restart_every: int = 100,
) -> VQVAE:
    """Trains on the objects of scenes with seeds from 0 (a stream, each scene used once; the
    language model trains on the same seeds, the evaluation on none of them) and writes `out`."""
    torch.manual_seed(seed)
    model = VQVAE(seed=seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    stream = objects(range(EVAL_SEEDS.start), image_size)
    last_used = torch.zeros(CODEBOOK, dtype=torch.int64)
    started = time.time()
    # Without it, two runs in one process differ by 1e-4 after 20 steps of 64 masks (some CPU
    # kernel's reduction order; identical with it, at the same speed), so a seed did not fix the
    # VQ-VAE and every model trained on its codes.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for step in range(1, steps + 1):
            targets = torch.from_numpy(np.stack([next(stream)[2] for _ in range(batch)]))
            for group in optimiser.param_groups:
                group["lr"] = lr * min(1.0, step / 100) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / steps)))
            recon, codes, z, codebook_loss, commitment = model(targets)
            loss = (recon - targets).pow(2).mean() + codebook_loss + 0.25 * commitment
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            last_used[codes.unique()] = step
            if step % restart_every == 0 and step < steps * 0.8:
                # Entries no batch picked since the last check restart on this batch's encoder outputs.
                dead = (last_used <= step - restart_every).nonzero()[:, 0]
                if len(dead):
                    picks = torch.randperm(z.shape[0] * z.shape[1])[: len(dead)]
                    with torch.no_grad():
                        model.codebook[dead] = z.detach().reshape(-1, z.shape[-1])[picks]
                    last_used[dead] = step
            if step % log_every == 0 or step == steps:
                used = codes.unique().numel()
                print(f"step {step}/{steps} loss {loss.item():.4f} codes in batch {used} ({time.time() - started:.0f} s)", flush=True)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    save(model, out)
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.vqvae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="side of the scenes whose masks it learns")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = train(args.out, steps=args.steps, seed=args.seed, batch=args.batch, image_size=args.image_size)
    print(f"wrote {args.out}")
    print(evaluate(model, image_size=args.image_size))


if __name__ == "__main__":
    main()
