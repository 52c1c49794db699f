"""Train the scenes model from scratch on CPU: one command, a fixed number of steps, deterministic
for a seed (same seed, same thread count, same weights).

    python -m train.fit --out target/scenes-hf [--steps 4000] [--seed 0]

Every step draws `batch` fresh scenes (seeds counted up from 0; evaluation uses seeds from
`train.evaluate.EVAL_SEED_BASE`, so no held-out scene is ever trained on) and one task per scene.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import scenes, tasks, vqvae
from .evaluate import requests, transformers_answers
from .model import ModelConfig, build
from .score import Tally, request_name


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 8000
    batch: int = 32
    lr: float = 1.5e-3
    warmup: int = 150
    final_lr_fraction: float = 0.05
    patch_loss_weight: float = 1.0
    relevance_loss_weight: float = 1.0
    box_loss_weight: float = 1.0
    weight_decay: float = 0.01
    # Relative odds of each task when a scene has it; a task with several requests in a scene
    # (segment and detect_each, one per label) splits its odds among them. detect_each (`detect
    # LABEL`) and segment make the model find the object a label names; with all labels asked,
    # detect can list the scene left to right without reading the prompt. Version 4's OCR and
    # colour losses were below 0.03 by step 4,250 (both scored 1.000) while detect and count still
    # fell at the last step, so version 5 moved odds from OCR, colour and caption to detect and count.
    # Caption at 0.75 fell from 0.847 to 0.687 exact (colours and kinds of 3-4 shapes), so version 6
    # gives it its odds back. Version 7 (labels in any order) read 0.887 of the texts, every miss a
    # number, its OCR loss flat at 0.07 to 0.16 over its last 400 steps, so version 8 gives OCR
    # version 4's odds, from segment (IoU 0.92, goal 0.80) and colour (loss 0.001), and trains 500
    # steps longer.
    weights: tuple[tuple[str, float], ...] = (
        ("detect", 3.5),
        ("detect_each", 2.0),
        ("segment", 2.75),
        ("ocr", 2.5),
        ("count", 2.0),
        ("colour", 0.25),
        ("caption", 1.0),
    )


# Least share of a patch an object must cover to own it (`patch_owners`).
MIN_COVER = 0.1


def patch_owners(scene: scenes.Scene, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """For each patch in row-major order, (N,) each: the index in `scene.objects` of the object
    covering most of it, and whether that object covers at least `MIN_COVER` of it (owns it)."""
    p, side = cfg.patch_size, cfg.image_size // cfg.patch_size
    if not scene.objects:
        return torch.zeros(side * side, dtype=torch.long), torch.zeros(side * side, dtype=torch.bool)
    cover = torch.stack([torch.from_numpy(o.mask[: side * p, : side * p].astype("float32")) for o in scene.objects])
    cover = cover.reshape(len(scene.objects), side, p, side, p).mean(dim=(2, 4)).reshape(len(scene.objects), -1)
    share, owner = cover.max(dim=0)
    return owner, share >= MIN_COVER


class PatchHead(torch.nn.Module):
    """Auxiliary training signal, not part of the model: from each patch's vision feature, predict
    what is in the patch: background, the colour x kind of the object that owns it (`patch_owners`),
    or which character of the text and its place in the text (first, second, ...), so that reading
    in order needs no search.

    Through the language loss alone the vision tower learns slowly: after 1,500 steps the answers
    barely depended on the image. A label per patch gives every image 64 direct targets. Up to
    version 6 a patch took the object under its centre, so a small shape between centres had no
    label, and version 6's remaining detection misses were mostly a box named with a neighbour's
    colour or kind."""

    COLOURS = sorted(scenes.COLOURS)
    CHARS = sorted(set("0123456789" + "".join(scenes.WORDS)))
    PLACES = max(3, *map(len, scenes.WORDS))  # numbers have at most 3 digits

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.first_char = 1 + len(self.COLOURS) * len(scenes.KINDS)
        self.linear = torch.nn.Linear(cfg.vision_hidden, self.first_char + self.PLACES * len(self.CHARS))

    def labels(self, scene: scenes.Scene) -> torch.Tensor:
        """The class of each patch, (N,) in row-major patch order: 0 background, then colour x kind,
        then place x character from `first_char`."""
        p = self.cfg.patch_size
        side = self.cfg.image_size // p
        out = torch.zeros((side, side), dtype=torch.long)
        if scene.text_box is not None:
            # A patch row that holds a good part of the text's height; in it, each patch column
            # takes the character overlapping it most.
            _, y0, _, y1 = scene.text_box
            rows = [r for r in range(side) if min(y1, (r + 1) * p) - max(y0, r * p) >= 0.3 * (y1 - y0)]
            for col in range(side):
                spans = enumerate(scene.text_chars)
                overlap = [(min(x1, (col + 1) * p) - max(x0, col * p), place, char) for place, (char, x0, x1) in spans]
                best, place, char = max(overlap)
                if best > 0:
                    out[rows, col] = self.first_char + place * len(self.CHARS) + self.CHARS.index(char)
        out = out.reshape(-1)
        owner, owned = patch_owners(scene, self.cfg)
        classes = torch.tensor([self.shape_class(o) for o in scene.objects], dtype=torch.long)
        out[owned] = classes[owner[owned]]
        return out

    def shape_class(self, obj: scenes.SceneObject) -> int:
        """The class of a shape's patches: 1 + its colour x kind."""
        return 1 + self.COLOURS.index(obj.colour) * len(scenes.KINDS) + scenes.KINDS.index(obj.kind)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # features (B, N, Dv), labels (B, N)
        return torch.nn.functional.cross_entropy(self.linear(features).flatten(0, 1), labels.flatten())


class BoxHead(torch.nn.Module):
    """Auxiliary training signal, not part of the model: from each patch's vision feature, the box
    of the object that covers most of the patch, as its edges' offsets from the patch centre in
    patches (FCOS's dense box regression), L1 loss over the patches an object covers.

    Version 5 missed 21 of 255 objects of multi-label `detect` on 100 scenes, 10 of them with a
    box below IoU 0.5: the language loss teaches where an edge is only through one 1,024-way token
    per edge; this head through every patch of every object, from every task's images. Patches
    go by coverage (`patch_owners`), so a small triangle between patch centres still gets some."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.linear = torch.nn.Linear(cfg.vision_hidden, 4)

    def labels(self, scene: scenes.Scene) -> torch.Tensor:
        """(N, 5) in row-major patch order: the owning object's (x_min, y_min, x_max, y_max) minus
        the patch centre, in patches, and 1 where an object owns the patch (else all 0)."""
        p, side = self.cfg.patch_size, self.cfg.image_size // self.cfg.patch_size
        out = torch.zeros((side * side, 5))
        if not scene.objects:
            return out
        owner, owned = patch_owners(scene, self.cfg)
        centre = (torch.arange(side * side) % side + 0.5, torch.arange(side * side) // side + 0.5)
        boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32)[owner] / p
        out[:, 0], out[:, 2] = boxes[:, 0] - centre[0], boxes[:, 2] - centre[0]
        out[:, 1], out[:, 3] = boxes[:, 1] - centre[1], boxes[:, 3] - centre[1]
        out[:, 4] = owned.float()
        return out * out[:, 4:]

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # features (B, N, Dv), labels (B, N, 5)
        owned = labels[..., 4] > 0
        if not owned.any():
            return features.new_zeros(())
        return torch.nn.functional.l1_loss(self.linear(features[owned]), labels[..., :4][owned])


class RelevanceHead(torch.nn.Module):
    """Auxiliary training signal, not part of the model: from the decoder's hidden state at each
    image position after half its layers, predict how much of the patch the objects a
    `detect` or `segment` prompt names cover. PaliGemma's prefix attends both ways, so an image
    position can see the prompt and mark itself as asked for; the answer's first loc token must
    then only find the marked patches.

    Version 3 answered `detect LABEL` with the named object's box 55% of the time after 7,800
    steps (the multi-label form reads its label after the box, so needs no such binding); the
    language loss teaches binding through a single 1,024-way token per object, this head through
    every patch of every such request."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # After this many decoder layers (1-based): half, so the rest can read the marks out.
        self.layer = max(1, cfg.layers // 2)
        self.linear = torch.nn.Linear(cfg.hidden, 1)

    def labels(self, scene: scenes.Scene, prompt: str) -> torch.Tensor | None:
        """The fraction of each patch (N,) the named objects' visible masks cover, in row-major
        patch order; None for a prompt that names no objects."""
        if not prompt.startswith((tasks.DETECT_PREFIX, tasks.SEGMENT_PREFIX)):
            return None
        named = set(tasks.prompt_labels(prompt))
        p, side = self.cfg.patch_size, self.cfg.image_size // self.cfg.patch_size
        union = torch.zeros((side * p, side * p))
        for o in scene.objects:
            if o.label in named:
                union += torch.from_numpy(o.mask[: side * p, : side * p].astype("float32"))
        return union.clamp(max=1).reshape(side, p, side, p).mean(dim=(1, 3)).reshape(-1)

    def loss(self, hidden: torch.Tensor, image: torch.Tensor, labels: list[torch.Tensor | None]) -> torch.Tensor:
        # hidden (B, L, D), image (B, L) bool with N image positions per row
        rows = [i for i, t in enumerate(labels) if t is not None]
        if not rows:
            return hidden.new_zeros(())
        feats = hidden[rows][image[rows]].reshape(len(rows), -1, hidden.shape[-1])
        target = torch.stack([labels[i] for i in rows])
        return torch.nn.functional.binary_cross_entropy_with_logits(self.linear(feats).squeeze(-1), target)


def sample(rng: random.Random, seed: int, image_size: int, weights: dict[str, float], segment: bool) -> tuple[scenes.Scene, str]:
    """One scene and the prompt of one of its tasks; `segment` tasks only when `segment`. A
    `detect` of every label names them in a random order (its target stays left to right)."""
    scene = scenes.generate(seed, image_size)
    prompts = tasks.prompts_for(scene, segment=segment, detect_each=weights.get("detect_each", 0.0) > 0)
    names = [request_name(scene, p) for p in prompts]
    # Tasks with a request per label (segment, detect_each) share the task's odds among them, as
    # detect's objects share one request, so the mix does not tilt to them in crowded scenes.
    odds = [weights.get(n, 0.0) / names.count(n) for n in names]
    prompt = rng.choices(prompts, weights=odds)[0]
    if request_name(scene, prompt) == "detect":
        # Up to version 6 the prompt listed the labels in the target's order, so a box's label
        # could be copied from the prompt by position, and version 6 did: asked with the labels
        # in another order (train.evaluate --shuffle-labels) it found 0.474 of the objects.
        labels = tasks.prompt_labels(prompt)
        rng.shuffle(labels)
        prompt = tasks.detect_prompt(scene, labels)
    return scene, prompt


def targets(batch: list[tuple[scenes.Scene, str]], vae=None) -> list[str]:
    """The target of each (scene, prompt); the segment targets' masks go through the mask VQ-VAE's
    encoder (`train.vqvae`) in one call."""
    if vae is None:
        return [tasks.target_for(s, p) for s, p in batch]
    named = [
        (o, *s.image.size) for s, p in batch if p.startswith(tasks.SEGMENT_PREFIX) for o in s.objects if o.label in tasks.prompt_labels(p)
    ]
    codes = vqvae.objects_codes(vae, named)
    return [tasks.target_for(s, p, lambda o: codes[id(o)]) for s, p in batch]


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine down to `final_lr_fraction` of the peak at the last step."""
    if step < tc.warmup:
        return (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.final_lr_fraction + (1 - tc.final_lr_fraction) * 0.5 * (1 + torch.cos(torch.tensor(t * torch.pi)).item())


def target_loss(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The language loss transformers computes with `labels` (next-token cross-entropy over the
    target tokens, Gemma 2's final logit soft-capping), with the LM head applied only where a
    target token is predicted: the (vocab x hidden) head over every image and prompt position was
    a sixth of a step. Returns the mean loss and each predicted token's loss with its row, (T, 2)."""
    labels = inputs["labels"]
    hidden = model.model(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state
    keep = labels[:, 1:] != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    cap = getattr(model.config.text_config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    per_token = torch.nn.functional.cross_entropy(logits, labels[:, 1:][keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    return per_token.mean(), torch.stack([per_token.detach(), rows.to(per_token.dtype)], dim=1)


def per_task_loss(per_token: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Mean per-token loss of each row, averaged over the rows of each task name."""
    loss, rows = per_token[:, 0], per_token[:, 1].long()
    per_row = torch.zeros(len(names)).index_add_(0, rows, loss) / torch.bincount(rows, minlength=len(names)).clamp(min=1)
    out: dict[str, list[float]] = {}
    for name, v in zip(names, per_row.tolist()):
        out.setdefault(name, []).append(v)
    return {k: sum(v) / len(v) for k, v in out.items()}


def quick_eval(model, proc, cfg: ModelConfig, n: int) -> dict:
    """transformers' scores on the first `n` held-out scenes, as train.evaluate scores them."""
    model.eval()
    tally = Tally()
    with tempfile.TemporaryDirectory() as work:
        reqs = requests(n, cfg.image_size, Path(work))
        for r, answer in zip(reqs, transformers_answers(model, proc, reqs)):
            tally.add(r["scene"], r["prompt"], r["target"], answer["text"])
    model.train()
    return tally.summary()


def train(
    cfg: ModelConfig, tc: TrainConfig, seed: int, out: Path, eval_scenes: int = 0, log_every: int = 50, seg_vae: Path | None = None
) -> dict:
    """With `seg_vae` (a `train.vqvae` npz), `segment` targets join the mix."""
    model, proc = build(cfg, seed)
    vae = vqvae.load(seg_vae) if seg_vae else None
    head = PatchHead(cfg)
    boxes = BoxHead(cfg)
    relevance = RelevanceHead(cfg)
    captured = {}
    model.model.vision_tower.register_forward_hook(lambda _m, _i, out: captured.update(features=out.last_hidden_state))
    model.model.language_model.layers[relevance.layer - 1].register_forward_hook(
        lambda _m, _i, out: captured.update(hidden=out[0] if isinstance(out, tuple) else out)
    )
    weights = dict(tc.weights)
    heads = [*head.parameters(), *boxes.parameters(), *relevance.parameters()]
    opt = torch.optim.AdamW(list(model.parameters()) + heads, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, tc))
    rng = random.Random(seed)
    model.train()
    log = []
    start = time.time()
    running: dict[str, list[float]] = {}
    losses = []
    for step in range(tc.steps):
        batch = [sample(rng, step * tc.batch + j, cfg.image_size, weights, vae is not None) for j in range(tc.batch)]
        inputs = proc(
            images=[s.image for s, _ in batch],
            # The processor's own layout, spelt out: it warns on every call about prompts without it.
            text=["<image>" + p for _, p in batch],
            suffix=targets(batch, vae),
            return_tensors="pt",
            padding="longest",
        )
        loss, per_token = target_loss(model, inputs)
        features = captured.pop("features")
        aux = head.loss(features, torch.stack([head.labels(s) for s, _ in batch]))
        box = boxes.loss(features, torch.stack([boxes.labels(s) for s, _ in batch]))
        image = inputs["input_ids"] == model.config.image_token_id
        rel = relevance.loss(captured.pop("hidden"), image, [relevance.labels(s, p) for s, p in batch])
        (loss + tc.patch_loss_weight * aux + tc.box_loss_weight * box + tc.relevance_loss_weight * rel).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + heads, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        running.setdefault("patches", []).append(aux.item())
        running.setdefault("boxes", []).append(box.item())
        running.setdefault("relevance", []).append(rel.item())
        for k, v in per_task_loss(per_token, [request_name(s, p) for s, p in batch]).items():
            running.setdefault(k, []).append(v)
        if (step + 1) % log_every == 0 or step + 1 == tc.steps:
            el = time.time() - start
            entry = dict(
                step=step + 1,
                seconds=round(el, 1),
                loss=round(sum(losses) / len(losses), 4),
                tasks={k: round(sum(v) / len(v), 3) for k, v in sorted(running.items())},
            )
            log.append(entry)
            print(json.dumps(entry), flush=True)
            losses, running = [], {}
    train_s = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    report = dict(
        model=cfg.to_dict(),
        train=asdict(tc),
        seed=seed,
        seg_vae=str(seg_vae) if seg_vae else None,
        threads=torch.get_num_threads(),
        parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=round(train_s, 1),
        log=log,
    )
    if eval_scenes:
        t0 = time.time()
        report["quick_eval"] = quick_eval(model, proc, cfg, eval_scenes)
        report["quick_eval"]["scenes"] = eval_scenes
        report["quick_eval"]["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(report["quick_eval"]), flush=True)
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the scenes model (a small PaliGemma 2) from scratch on CPU.")
    ap.add_argument("--out", type=Path, required=True, help="directory for the transformers checkpoint")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch", type=int, default=TrainConfig.batch)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    ap.add_argument("--eval-scenes", type=int, default=0, help="held-out scenes for a quick transformers check at the end")
    ap.add_argument("--seg-vae", type=Path, help="a train.vqvae npz: adds segment targets to the mix")
    for f in ("image_size", "patch_size", "hidden", "layers", "kv_heads", "vision_layers", "text_vocab"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(ModelConfig, f))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden=args.hidden,
        layers=args.layers,
        kv_heads=args.kv_heads,
        vision_layers=args.vision_layers,
        text_vocab=args.text_vocab,
    )
    tc = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr)
    train(cfg, tc, args.seed, args.out, args.eval_scenes, seg_vae=args.seg_vae)


if __name__ == "__main__":
    main()
