"""decoder_model_merged.onnx: the Gemma 2 (PaliGemma 2) or Gemma (PaliGemma 1) text decoder with KV
cache, one graph for prefill and steps.

I/O (transformers.js PaliGemma convention):
    inputs_embeds   f32[B,T,H]  raw embedding rows; image rows are features / sqrt(H)
    attention_mask  i64[B,P+T]  1 = real token, 0 = left pad
    token_type_ids  i64[B,P+T]  0 = prompt (prefix-LM block), 1 = generated
    position_ids    i64[B,T]    1-based, pads 0 + 1 (see REFERENCE.md)
    past_key_values.{i}.key / .value  f32[B,KVH,P,D]
 -> logits          f32[B,1,V]  last position only, final softcap applied
    present.{i}.key / .value  f32[B,KVH,P+T,D]

The attention masks (full and sliding-window, prefix-LM block OR-ed on top) are built here from
attention_mask and token_type_ids, the same rule transformers' masking_utils applies, so the
runtime only carries two integer rows per request. The full cache is kept; the window lives in
the mask. Attention is transformers' eager arithmetic with the query heads grouped by KV head
(`grouped_attention`), so no step copies the cache to repeat its heads.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache

from .graph import GraphSpec

ATTENTION = "paligemma_onnx_grouped"


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """transformers' Gemma 2 `eager_attention_forward`, element for element, with the H query heads
    viewed as KVH groups of H/KVH instead of the KVH cached heads repeated H/KVH times. repeat_kv
    exports as an Expand of the whole cache at every step: measured on the full-width 3B at 520
    cached positions it was 2/3 of the decode time that grows with the cache.

    query f[B,H,T,D], key/value f[B,KVH,K,D], attention_mask f[B,1,T,K] -> f[B,T,H,D]
    """
    b, h, t, d = query.shape
    kvh, k = key.shape[1], key.shape[2]
    groups = h // kvh
    # Head i reads KV head i // groups (repeat_kv's order), so the groups are contiguous heads.
    weights = torch.matmul(query.reshape(b, kvh, groups * t, d), key.transpose(2, 3)) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    weights = weights.reshape(b, h, t, k)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights.reshape(b, kvh, groups * t, k), value)
    return out.reshape(b, h, t, d).transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTENTION, grouped_attention)


def attention_masks(
    attention_mask: torch.Tensor,  # i64[B,K], K = P + T
    token_type_ids: torch.Tensor,  # i64[B,K]
    query_length: int | torch.SymInt,
    sliding_window: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Additive masks f[B,1,T,K] for "full_attention" and "sliding_attention" layers."""
    kv_length = attention_mask.shape[1]
    past_length = kv_length - query_length
    k_idx = torch.arange(kv_length, device=attention_mask.device)
    q_idx = k_idx[past_length:]  # absolute cache indices of the queries, left pads included
    causal = k_idx[None, :] <= q_idx[:, None]  # [T,K]
    in_window = k_idx[None, :] > q_idx[:, None] - sliding_window
    prompt = token_type_ids == 0  # [B,K]
    # Prefix-LM: prompt tokens see each other both ways; generated tokens (type 1) never join.
    block = prompt[:, past_length:, None] & prompt[:, None, :]  # [B,T,K]
    keep = attention_mask.bool()[:, None, :]  # pads are never keys
    full = (causal[None] | block) & keep
    sliding = ((causal & in_window)[None] | block) & keep
    # finfo.min rather than -inf: a fully masked row must not turn into NaN.
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return {
        "full_attention": torch.where(full, zero, low)[:, None],
        "sliding_attention": torch.where(sliding, zero, low)[:, None],
    }


class DecoderWithPast(nn.Module):
    """Wraps transformers' Gemma 2 stack so that the exported graph runs its exact modules."""

    def __init__(self, model):
        super().__init__()
        text_config = model.config.text_config
        self.text_model = model.model.language_model
        # The wrapped model is the exporter's own copy: its text stack now runs grouped_attention.
        self.text_model.config._attn_implementation = ATTENTION
        self.lm_head = model.lm_head
        self.num_layers = text_config.num_hidden_layers
        # Gemma (PaliGemma 1) has neither a window nor softcaps, and its layers take one mask.
        self.sliding_window = getattr(text_config, "sliding_window", None) or 2**62
        self.final_logit_softcapping = getattr(text_config, "final_logit_softcapping", None)
        self.per_layer_type = getattr(text_config, "layer_types", None) is not None
        self.hidden_size = text_config.hidden_size

    def forward(self, inputs_embeds, attention_mask, token_type_ids, position_ids, past_key_values):
        dtype = inputs_embeds.dtype
        # transformers scales token rows by sqrt(H) cast to the weight dtype; image rows arrive
        # pre-divided by sqrt(H), so one scaling serves both.
        hidden = inputs_embeds * torch.tensor(self.hidden_size**0.5, dtype=dtype)
        cache = DynamicCache(ddp_cache_data=[(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)])
        masks = attention_masks(attention_mask, token_type_ids, inputs_embeds.shape[1], self.sliding_window, dtype)
        out = self.text_model(
            inputs_embeds=hidden,
            attention_mask=masks if self.per_layer_type else masks["full_attention"],
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        logits = self.lm_head(out.last_hidden_state[:, -1:, :])
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        presents = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


def spec(model, batch: int = 2, past: int = 3, seq: int = 4) -> GraphSpec:
    """Example inputs (B, P, T all > 1 so no axis is specialised) and the graph's names and axes."""
    cfg = model.config.text_config
    dtype = next(model.parameters()).dtype
    kv = (batch, cfg.num_key_value_heads, past, cfg.head_dim)
    past_tensors = tuple(torch.randn(kv, dtype=dtype) for _ in range(2 * cfg.num_hidden_layers))
    args = (
        torch.randn(batch, seq, cfg.hidden_size, dtype=dtype),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.zeros(batch, past + seq, dtype=torch.int64),
        torch.arange(past + 1, past + seq + 1, dtype=torch.int64)[None].repeat(batch, 1),
        past_tensors,
    )
    past_names = [f"past_key_values.{i}.{kind}" for i in range(cfg.num_hidden_layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(cfg.num_hidden_layers) for kind in ("key", "value")]
    b, t, p = "batch_size", "sequence_length", "past_sequence_length"
    axes = {
        "inputs_embeds": {0: b, 1: t},
        "attention_mask": {0: b, 1: "total_sequence_length"},
        "token_type_ids": {0: b, 1: "total_sequence_length"},
        "position_ids": {0: b, 1: t},
        **{n: {0: b, 2: p} for n in past_names},
        "logits": {0: b},
        **{n: {0: b, 2: "total_sequence_length"} for n in present_names},
    }
    return GraphSpec(
        module=DecoderWithPast(model),
        args=args,
        input_names=["inputs_embeds", "attention_mask", "token_type_ids", "position_ids", *past_names],
        output_names=["logits", *present_names],
        axes=axes,
    )
