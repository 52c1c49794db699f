"""The scenes model: a small PaliGemma 2 (transformers' Gemma 2 text + SigLIP vision classes, a
tokenizer in the real id layout) and the initialisation that lets it learn boxes quickly on CPU.

Two embeddings start from fixed sine/cosine features instead of noise (both stay trainable):
- the vision tower's patch positions get 2D features of (row, column), as MAE does;
- the `<locNNNN>` rows of the tied text embedding get 1D features of the bin number.
With random rows every one of the 1,024 bins is its own class that must be learnt from the
examples that hit it; with smooth rows, an output that points at bin b also scores bins near b
highly, so a near miss costs little and what is learnt for one bin carries over to its neighbours.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from . import scenes

# Every word a prompt or target uses, so each is one token (see export.tiny.build_tokenizer).
WORDS = tuple(
    dict.fromkeys(
        list(scenes.KINDS)
        + list(scenes.COLOURS)
        + list(scenes.BACKGROUNDS)
        + list(scenes.WORDS)
        + [
            "a",
            "and",
            "on",
            "background",
            "how",
            "many",
            "shapes",
            "are",
            "there?",
            "what",
            "color",
            "is",
            "the",
            "circle?",
            "caption",
            "en",
            "answer",
            "ocr",
            "detect",
            ";",
            ",",
        ]
    )
)


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 112
    patch_size: int = 14
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    kv_heads: int = 4
    intermediate: int = 512
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    text_vocab: int = 512

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def sincos(positions: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """(n,) positions -> (n, dim) features [sin(p w_k), cos(p w_k)], periods from max_period down to 4."""
    half = dim // 2
    periods = max_period * (4.0 / max_period) ** (torch.arange(half, dtype=torch.float64) / max(1, half - 1))
    angles = positions.double()[:, None] * (2 * math.pi / periods)[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def build(cfg: ModelConfig, seed: int):
    """(model, processor) with fresh weights for `seed`."""
    from transformers import Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from export.tiny import build_tokenizer

    tok = build_tokenizer(cfg.text_vocab, words=WORDS)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vocab_size = -(-(image_token_id + 1) // 64) * 64
    text = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        query_pre_attn_scalar=cfg.head_dim,
        sliding_window=4096,
        max_position_embeddings=8192,
    )
    vision = SiglipVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vision_use_head=False,
    )
    config = PaliGemmaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        projection_dim=cfg.hidden,
        hidden_size=cfg.hidden,
        vocab_size=vocab_size,
    )
    config.text_config.model_type = "gemma2"
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 2
    _init_positions(model, cfg, tok)
    ip = SiglipImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        resample=3,
        rescale_factor=1 / 255,
    )
    ip.image_seq_length = cfg.image_tokens
    return model, PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


@torch.no_grad()
def _init_positions(model, cfg: ModelConfig, tok) -> None:
    side = cfg.image_size // cfg.patch_size
    pos = model.model.vision_tower.embeddings.position_embedding.weight  # (side*side, Dv)
    grid = torch.arange(side * side)
    quarter = cfg.vision_hidden // 2
    feats = torch.cat([sincos(grid // side, quarter, 4 * side), sincos(grid % side, quarter, 4 * side)], dim=1)
    # As strong as a patch's content (its embedding has about unit scale), so where is as visible as what.
    pos.copy_(feats * 0.5 / feats.pow(2).mean().sqrt())

    emb = model.model.language_model.embed_tokens.weight  # (vocab, D), tied to lm_head
    first = tok.convert_tokens_to_ids("<loc0000>")
    feats = sincos(torch.arange(1024), cfg.hidden, 4096.0)
    emb[first : first + 1024] = feats * emb.std() / feats.std()
