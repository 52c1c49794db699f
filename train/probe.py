"""Training feasibility probe for issue 6 (not run in CI): train a small PaliGemma 2 from scratch on
CPU for a few minutes on fresh scenes, then measure greedy accuracy per task on held-out scenes.

    python -m train.probe --config a112 --minutes 10 --out target/probe

Measured on 2026-11-27 (a112, 15 minutes on the quiet 2-core machine): 2.07 M parameters (8.3 MB
fp32), 1.78 steps/s at batch 32, 1,603 steps, loss 7.15 -> 0.87. On 50 held-out scenes: caption
exact 2%, count 46%, colour 69% (16), OCR 0% (25), detect recall@0.5 1.5% (133 objects). This
recipe is far from the issue's goals; the trainer needs another one.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from . import scenes, tasks

CONFIGS = {
    # image 112 / patch 14 -> 64 image tokens
    "a112": dict(image_size=112, patch_size=14, hidden=128, layers=4, heads=4, head_dim=32, kv_heads=1,
                 inter=512, v_hidden=128, v_layers=4, v_heads=4, v_inter=512, text_vocab=512, batch=32, lr=1e-3),
    # image 224 / patch 16 -> 196 image tokens
    "b224": dict(image_size=224, patch_size=16, hidden=128, layers=4, heads=4, head_dim=32, kv_heads=1,
                 inter=512, v_hidden=128, v_layers=4, v_heads=4, v_inter=512, text_vocab=512, batch=32, lr=1e-3),
}
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 10_000_000

SCENE_WORDS = " ".join(
    list(scenes.KINDS) + list(scenes.COLOURS) + list(scenes.BACKGROUNDS) + list(scenes.WORDS)
    + ["a", "and", "on", "background", "how", "many", "shapes", "are", "there?", "what", "color", "is", "the", "circle?",
       "caption", "en", "answer", "ocr", "detect", ";", ","] + [str(i) for i in range(10)]
)


def build(cfg: dict, seed: int):
    from transformers import (Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipVisionConfig)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from export.tiny import build_tokenizer

    tok = build_tokenizer(cfg["text_vocab"], extra_corpus=(SCENE_WORDS + " ") * 40)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vocab_size = -(-(image_token_id + 1) // 64) * 64
    text = Gemma2Config(vocab_size=vocab_size, hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
                        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                        num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                        query_pre_attn_scalar=cfg["head_dim"], sliding_window=4096, max_position_embeddings=8192)
    vision = SiglipVisionConfig(hidden_size=cfg["v_hidden"], intermediate_size=cfg["v_inter"],
                                num_hidden_layers=cfg["v_layers"], num_attention_heads=cfg["v_heads"],
                                image_size=cfg["image_size"], patch_size=cfg["patch_size"], vision_use_head=False)
    n_img = (cfg["image_size"] // cfg["patch_size"]) ** 2
    config = PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
                             projection_dim=cfg["hidden"], hidden_size=cfg["hidden"], vocab_size=vocab_size)
    config.text_config.model_type = "gemma2"
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 2
    ip = SiglipImageProcessorPil(size={"height": cfg["image_size"], "width": cfg["image_size"]},
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3, rescale_factor=1 / 255)
    ip.image_seq_length = n_img
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    return model, proc, tok


def sample_batch(rng: random.Random, seed_iter, cfg, weights):
    images, prompts, targets = [], [], []
    for _ in range(cfg["batch"]):
        scene = scenes.generate(next(seed_iter), cfg["image_size"])
        pairs = tasks.tasks_for(scene)
        w = [weights.get(task_name(p), 1.0) for p, _ in pairs]
        p, t = rng.choices(pairs, weights=w)[0]
        images.append(scene.image); prompts.append(p); targets.append(t)
    return images, prompts, targets


def task_name(prompt: str) -> str:
    if prompt.startswith("detect"):
        return "detect"
    return {tasks.CAPTION_PROMPT: "caption", tasks.OCR_PROMPT: "ocr", tasks.COUNT_PROMPT: "count",
            tasks.COLOUR_PROMPT: "colour"}[prompt]


LOC = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})> ?([^;<]*)")


def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0])); iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def evaluate(model, proc, cfg, n: int):
    model.eval()
    hits = {k: [0, 0] for k in ("caption", "count", "colour", "ocr", "detect")}
    examples = {}
    with torch.no_grad():
        for i in range(n):
            scene = scenes.generate(EVAL_SEED_BASE + i, cfg["image_size"])
            for prompt, target in tasks.tasks_for(scene):
                name = task_name(prompt)
                inputs = proc(images=[scene.image], text=[prompt], return_tensors="pt")
                out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
                got = proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                examples.setdefault(name, (target, got))
                if name == "detect":
                    size = cfg["image_size"]
                    preds = [((tasks.from_bin(int(m[1]), size), tasks.from_bin(int(m[0]), size),
                               tasks.from_bin(int(m[3]), size), tasks.from_bin(int(m[2]), size)), m[4].strip())
                             for m in LOC.findall(got)]
                    used = set()
                    for o in scene.objects:
                        hits["detect"][1] += 1
                        for j, (box, label) in enumerate(preds):
                            if j not in used and label == o.label and iou(box, o.box) >= 0.5:
                                used.add(j); hits["detect"][0] += 1
                                break
                else:
                    hits[name][0] += int(got == target); hits[name][1] += 1
    model.train()
    return {k: (round(h / t, 3) if t else None, t) for k, (h, t) in hits.items()}, examples


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="a112")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--eval-scenes", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("target/probe"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    model, proc, tok = build(cfg, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    for p, t in (("caption en", "a red circle, a blue square and a green triangle on a gray background"),
                 ("answer en how many shapes are there?", "3"), ("ocr", "stop"),
                 ("detect red circle ; blue square", "<loc0114><loc0164><loc0361><loc0411> red circle")):
        print(f"tokens {len(tok(p)['input_ids'])}+{len(tok(t)['input_ids'])}: {tok.tokenize(p)} -> {tok.tokenize(t)}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / f"{args.config}-init")
    mb = sum(f.stat().st_size for f in (args.out / f"{args.config}-init").glob("*.safetensors")) / 1e6
    print(f"config {args.config}: params {n_params / 1e6:.2f} M, safetensors {mb:.1f} MB", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(args.seed)
    seed_iter = iter(range(TRAIN_SEED_BASE, EVAL_SEED_BASE))
    weights = {"detect": 2.0, "ocr": 1.5}
    model.train()
    start = time.time(); step = 0; losses = []
    log = []
    while time.time() - start < args.minutes * 60:
        images, prompts, targets = sample_batch(rng, seed_iter, cfg, weights)
        batch = proc(images=images, text=prompts, suffix=targets, return_tensors="pt", padding="longest")
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        losses.append(loss.item()); step += 1
        if step % 25 == 0:
            el = time.time() - start
            avg = sum(losses[-25:]) / 25
            log.append((step, round(el, 1), round(avg, 4)))
            print(f"step {step} t {el:.0f}s loss {avg:.3f} steps/s {step / el:.2f} seq {batch['input_ids'].shape[1]}", flush=True)
    train_s = time.time() - start
    model.save_pretrained(args.out / f"{args.config}-trained")
    t0 = time.time()
    acc, examples = evaluate(model, proc, cfg, args.eval_scenes)
    result = dict(config=args.config, cfg=cfg, params=n_params, mb_fp32=mb, steps=step, train_s=round(train_s, 1),
                  steps_per_s=round(step / train_s, 3), final_loss=log[-1][2] if log else None, eval_s=round(time.time() - t0, 1),
                  accuracy=acc, examples=examples, log=log)
    print(json.dumps(result, indent=1))
    (args.out / f"{args.config}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
