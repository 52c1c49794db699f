"""vision_encoder.onnx: SigLIP tower + projector.

    pixel_values   f32[B,3,S,S]  SiglipImageProcessor output, in [-1, 1]
 -> image_features f32[B,N,H]    projector output / sqrt(H)  (N = (S / patch)^2)

The division by sqrt(H) is the transformers.js convention: the decoder multiplies every input row
by sqrt(H), so image rows arrive pre-divided and come out as the projector output.
"""

from __future__ import annotations

import torch
from torch import nn

from .graph import GraphSpec


class VisionEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model.model
        self.hidden_size = model.config.text_config.hidden_size

    def forward(self, pixel_values):
        features = self.model.get_image_features(pixel_values).pooler_output
        return features / torch.tensor(self.hidden_size**0.5, dtype=features.dtype)


def spec(model, batch: int = 2) -> GraphSpec:
    size = model.config.vision_config.image_size
    dtype = next(model.parameters()).dtype
    return GraphSpec(
        module=VisionEncoder(model),
        args=(torch.randn(batch, 3, size, size, dtype=dtype),),
        input_names=["pixel_values"],
        output_names=["image_features"],
        axes={"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}},
    )
