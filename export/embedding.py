"""embed_tokens.onnx: the token embedding table, unscaled.

    input_ids     i64[B,T]
 -> inputs_embeds f32[B,T,H]  raw rows (the decoder applies sqrt(H))

Ids must be inside the table: the runtime looks `<image>` up as 0 and overwrites those rows with
image features, as transformers does for an out-of-vocabulary image id.
"""

from __future__ import annotations

import torch
from torch import nn

from .graph import GraphSpec


class TokenEmbedding(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.weight = model.model.language_model.embed_tokens.weight

    def forward(self, input_ids):
        return nn.functional.embedding(input_ids, self.weight)


def spec(model, batch: int = 2, seq: int = 3) -> GraphSpec:
    return GraphSpec(
        module=TokenEmbedding(model),
        args=(torch.zeros(batch, seq, dtype=torch.int64),),
        input_names=["input_ids"],
        output_names=["inputs_embeds"],
        axes={"input_ids": {0: "batch_size", 1: "sequence_length"}, "inputs_embeds": {0: "batch_size", 1: "sequence_length"}},
    )
