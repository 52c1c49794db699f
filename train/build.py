"""The scenes model from nothing, by one command: the mask VQ-VAE, the model trained with segment
targets in its mix, and its release (conversion with the seg decoder, evaluation, example, card).

    python -m train.build [--work target/scenes-build] [--seed 0] [--threads 2] [--models models]

Each step is the module's own (train.vqvae, train.fit, train.release) with its defaults; the
release replaces `--models`/scenes-hf and `--models`/scenes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import fit, release, vqvae
from .evaluate import REPO
from .model import ModelConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "target" / "scenes-build")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    ap.add_argument("--vae-steps", type=int, default=vqvae.STEPS)
    ap.add_argument("--steps", type=int, default=fit.TrainConfig.steps)
    ap.add_argument("--scenes", type=int, default=300, help="held-out scenes the release evaluates")
    ap.add_argument("--models", type=Path, default=REPO / "models")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ModelConfig()
    started = time.time()
    vae_path = args.work / "vae.npz"
    vae = vqvae.train(vae_path, steps=args.vae_steps, seed=args.seed, image_size=cfg.image_size)
    vae_report = vqvae.evaluate(vae, image_size=cfg.image_size) | {"seconds": round(time.time() - started, 1)}
    print(json.dumps({"vqvae": vae_report}), flush=True)
    fit.train(cfg, fit.TrainConfig(steps=args.steps), args.seed, args.work / "hf", seg_vae=vae_path)
    training = json.loads((args.work / "hf" / "training.json").read_text())
    training["vqvae"] = vae_report | {"steps": args.vae_steps}
    training["build_seconds"] = round(time.time() - started, 1)
    (args.work / "hf" / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    release.release(args.work / "hf", args.scenes, args.models, seg_vae=vae_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
