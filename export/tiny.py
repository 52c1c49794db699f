"""Tiny random PaliGemma 2 checkpoints for tests: real architecture and token layout, toy sizes.

The Hub is out of reach here, so every exactness test runs on checkpoints made by this module. They
must load with `PaliGemmaForConditionalGeneration` / `PaliGemmaProcessor` exactly as a real one does,
keep the real special-token layout (<pad>=0, <eos>=1, <bos>=2, "\\n" one token, then <loc>, <seg>,
<image> after the text vocabulary), and produce varied greedy output (plain random init at 0.02
gives near-flat logits, so the output repeats one token and proves little).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ExportError

LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]
IMAGE_TOKEN = "<image>"

# Text for the toy BPE: task prefixes and everyday words, so prompts tokenize into real merges.
_CORPUS = """
caption en describe en ocr answer en question en detect segment cat dog car person sky tree
what is in the image ? how many people are there ; where is the rocket standing on the launch pad
a cup of coffee on a table the astronaut smiles a motorcycle parked by the road a page of text
the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 red green blue white black
"""


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny checkpoint. Defaults: heads x head_dim != hidden and a single kv head."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 24
    intermediate_size: int = 96
    query_pre_attn_scalar: int = 24
    sliding_window: int = 4096
    image_size: int = 56
    patch_size: int = 14
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 48
    text_vocab: int = 600
    # "gemma2" (PaliGemma 2) or "gemma" (PaliGemma 1: no softcaps, no sliding window, one norm
    # before each of attention and MLP; query_pre_attn_scalar and sliding_window unused).
    text_model: str = "gemma2"
    # Weight shaping so greedy output is varied rather than a repeat of the input (see write_tiny).
    weight_scale: float = 6.0
    layer_gain: float = 3.0
    attention_sharpness: float = 2.0
    logit_gain: float = 2.0
    eos_gain: float = 3.0


# The shapes the tests run (export/tests, and the Rust parity fixtures written by
# `python -m export fixtures`); the exporter must not assume any of them away:
#  gqa1: heads x head_dim (96) != hidden (64), one kv head, window far beyond the prompt;
#  window8: a sliding window (8) shorter than every prompt, three layers (two sliding);
#  window40: prompts fit the window (40) but decoding runs past it;
#  gemma1: PaliGemma 1's text model (Gemma), multi-query attention as in its 3B release.
TEST_CONFIGS = {
    "gqa1": TinySpec(),
    "window8": TinySpec(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        intermediate_size=64,
        sliding_window=8,
    ),
    "gemma1": TinySpec(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=80,
        text_model="gemma",
    ),
    "window40": TinySpec(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        intermediate_size=80,
        sliding_window=40,
        image_size=28,
    ),
}
# Seeds of the test checkpoints: fixed, so a fixture written once is reproduced by every later run.
TEST_SEEDS = {name: len(name) for name in TEST_CONFIGS}


# Full-width shapes of the released checkpoints (REFERENCE.md), for memory and speed measurements
# with random weights; depth comes from the caller.
# Shared by every released size (REFERENCE.md): SigLIP So400m/14 and Gemma's 256,000 text tokens.
RELEASED_VISION_AND_VOCABULARY = dict(vision_hidden_size=1152, vision_heads=16, vision_intermediate_size=4304, text_vocab=256000)
PRESETS = {
    "3b-224": dict(
        hidden_size=2304,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        intermediate_size=9216,
        query_pre_attn_scalar=256,
        image_size=224,
        **RELEASED_VISION_AND_VOCABULARY,
    ),
    "10b-448": dict(
        hidden_size=3584,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        intermediate_size=14336,
        query_pre_attn_scalar=256,
        image_size=448,
        **RELEASED_VISION_AND_VOCABULARY,
    ),
    "28b-448": dict(
        hidden_size=4608,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        intermediate_size=36864,
        query_pre_attn_scalar=144,
        image_size=448,
        **RELEASED_VISION_AND_VOCABULARY,
    ),
}
# PaliGemma 2 3B at 448 and 896 px: the 224 model's shapes with 1,024 and 4,096 image tokens (896:
# the prompt passes the 4,096-token sliding window).
PRESETS["3b-448"] = {**PRESETS["3b-224"], "image_size": 448}
PRESETS["3b-896"] = {**PRESETS["3b-224"], "image_size": 896}
# PaliGemma 1 3B (paligemma-3b-mix-224): Gemma 2B, multi-query attention.
PRESETS["pg1-3b-224"] = dict(
    hidden_size=2048,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
    intermediate_size=16384,
    image_size=224,
    text_model="gemma",
    **RELEASED_VISION_AND_VOCABULARY,
)
# The released checkpoints' storage: bfloat16 safetensors in shards of at most 5 GB with an index.
RELEASED_DTYPE = "bf16"
RELEASED_SHARD_SIZE = "5GB"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def build_tokenizer(text_vocab: int, words: tuple[str, ...] = ()):
    """A Gemma-style BPE tokenizer (byte fallback, "▁" spaces) with PaliGemma's extra tokens.
    `words` makes each of those words one token, bare and with its leading "▁", as a real Gemma
    vocabulary has them (the merges are then learnt within words only).

    Ids: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>, 5 "\\n", then byte tokens and merges up to
    `text_vocab`, then <loc0000>.. <loc1023>, <seg000>.. <seg127>, <image>.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer_tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=text_vocab, special_tokens=specials + bytes_, show_progress=False)
    if words:
        trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        corpus = [_CORPUS.replace("\n", " ")] + [f"{lead}{w}" for w in words for lead in ("", " ")] * 50
    else:
        # This split never matches after the normalizer, so merges may span words (kept: the
        # committed tiny fixtures were built with it).
        trainer_tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        corpus = [_CORPUS.replace("\n", " ")] * 4
    trainer_tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    vocab = model["vocab"]
    if len(vocab) > text_vocab:
        raise ExportError(f"toy tokenizer grew to {len(vocab)} tokens, over --text-vocab {text_vocab}")
    # Fill the text vocabulary up to its stated size so <loc0000> sits at a predictable id.
    for i in range(len(vocab), text_vocab):
        vocab[f"<unused{i}>"] = i
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in LOC_TOKENS + SEG_TOKENS])
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(IMAGE_TOKEN, normalized=False, special=True)]})
    tok.add_bos_token = False
    tok.add_eos_token = False
    return tok


def write_tiny(out_dir: Path, spec: TinySpec, seed: int = 0, dtype: str = "fp32", max_shard_size: str | None = None) -> Path:
    """Write a tiny random PaliGemma 2 checkpoint (model, tokenizer, processor) to `out_dir`, its
    weights in `dtype` ("fp32" or "bf16"; the model is built in it, so a full-width preset holds
    2 bytes a parameter), in safetensors shards of `max_shard_size` (transformers' default when
    None) named and indexed as `save_pretrained` writes them, in the released key layout."""
    import torch
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from .checkpoint import default_dtype

    out_dir = Path(out_dir)
    tok = build_tokenizer(spec.text_vocab)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if tok.convert_tokens_to_ids("\n") != 5 or image_token_id != spec.text_vocab + 1024 + 128:
        raise ExportError("toy tokenizer id layout is off; this is a bug in export/tiny.py")
    # Like the real 257216 = 257152 + 64: the embedding is padded past <image> to a multiple of 64.
    vocab_size = -(-(image_token_id + 1) // 64) * 64

    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=8192,
        initializer_range=0.02 * spec.weight_scale,
    )
    if spec.text_model == "gemma2":
        text = Gemma2Config(**sizes, query_pre_attn_scalar=spec.query_pre_attn_scalar, sliding_window=spec.sliding_window)
    elif spec.text_model == "gemma":
        text = GemmaConfig(**sizes)
    else:
        raise ExportError(f"text_model {spec.text_model!r}: choose gemma2 (PaliGemma 2) or gemma (PaliGemma 1)")
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,
    )
    num_image_tokens = (spec.image_size // spec.patch_size) ** 2
    config = PaliGemmaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        projection_dim=spec.hidden_size,
        hidden_size=spec.hidden_size,
        vocab_size=vocab_size,
    )
    config.text_config.model_type = spec.text_model

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    torch.manual_seed(seed)
    with default_dtype(getattr(torch, DTYPES[dtype])):
        model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        text_model = model.model.language_model
        for name, p in text_model.named_parameters():
            if "norm" in name and p.dim() == 1:
                # Gemma norms scale by (1 + w) with w initialised to 0; random offsets test that form.
                p.normal_(0.0, 0.1)
            if "post_attention_layernorm" in name or "post_feedforward_layernorm" in name:
                # Layers must outweigh the residual embedding, or the tied head echoes the input token
                # (Gemma's post_attention_layernorm is the MLP's input norm: it widens the MLP's output).
                p.add_(spec.layer_gain)
            if "q_proj" in name or "k_proj" in name:
                p.mul_(spec.attention_sharpness)  # peaked attention: outputs depend on the image and prompt
        text_model.norm.weight.mul_(spec.logit_gain).add_(spec.logit_gain - 1.0)  # wider top-1 margins
        eos = tok.convert_tokens_to_ids("<eos>")
        text_model.embed_tokens.weight[eos].mul_(spec.eos_gain)  # rows that finish early, for batch tests
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<eos>")
    model.generation_config.pad_token_id = tok.convert_tokens_to_ids("<pad>")
    model.generation_config.bos_token_id = tok.convert_tokens_to_ids("<bos>")

    image_processor = SiglipImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,
        rescale_factor=1 / 255,
    )
    image_processor.image_seq_length = num_image_tokens
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    processor.save_pretrained(out_dir)
    # Hub repos carry preprocessor_config.json beside the processor config; so do ours.
    image_processor.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps({"seed": seed, **asdict(spec)}, indent=2))
    return out_dir


# Real shapes of big_vision's vae-oid.npz, with D the codebook width (512 in the released file).
def vae_shapes(embedding_dim: int = 512) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "_vq_vae._embedding": (128, embedding_dim),
        "decoder.0.weight": (128, embedding_dim, 1, 1),
        "decoder.0.bias": (128,),
    }
    for block in (2, 3):
        for conv, (cin, cout, k) in zip((0, 2, 4), ((128, 128, 3), (128, 128, 3), (128, 128, 1))):
            shapes[f"decoder.{block}.net.{conv}.weight"] = (cout, cin, k, k)
            shapes[f"decoder.{block}.net.{conv}.bias"] = (cout,)
    cin = 128
    for layer, cout in zip((4, 6, 8, 10), (128, 64, 32, 16)):
        # ConvTranspose2d weights are (in, out, kh, kw) in PyTorch layout.
        shapes[f"decoder.{layer}.weight"] = (cin, cout, 4, 4)
        shapes[f"decoder.{layer}.bias"] = (cout,)
        cin = cout
    shapes["decoder.12.weight"] = (1, 16, 1, 1)
    shapes["decoder.12.bias"] = (1,)
    return shapes


def write_random_vae(path: Path, seed: int = 0, embedding_dim: int = 512) -> Path:
    """A random vae-oid.npz with the real key names and shapes (He-style scale, so masks vary)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape in vae_shapes(embedding_dim).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if key.startswith("decoder.") and key.split(".")[1] in ("4", "6", "8", "10") and key.endswith("weight"):
            fan_in = shape[0] * 4  # transposed conv: each output sees about in x (k/stride)^2 inputs
        std = 1.0 if key == "_vq_vae._embedding" else (0.1 if key.endswith("bias") else (2.0 / fan_in) ** 0.5)
        if key == "decoder.12.weight":
            std = 0.05  # keeps the 64x64 output near the released decoder's range of about [-1, 1]
        arrays[key] = (rng.standard_normal(shape) * std).astype(np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path
