"""A stand-in for the community's transformers.js exports of PaliGemma (onnx-community/paligemma2-*,
Xenova/paligemma-3b-mix-224), built the way their public conversion scripts build them, for tests.

It shares no code with this repository's exporter on purpose: the runtime must read what other
people's tools wrote, not what ours writes. TorchScript (`torch.onnx.export(dynamo=False)`) at
opset 14; no manifest.json; the transformers.js layout and names:

    onnx/vision_encoder{suffix}.onnx    pixel_values [B,3,S,S] -> image_features [B,N,H], divided by sqrt(H)
    onnx/embed_tokens{suffix}.onnx      input_ids [B,T] -> inputs_embeds [B,T,H], raw rows
    onnx/decoder_model_merged{suffix}.onnx
        inputs_embeds [B,T,H], position_ids [B,T] (1-based), past_key_values.{i}.key/.value
        -> logits [B,T,V], present.{i}.key/.value; the decoder scales by sqrt(H), and there is no
        attention_mask or token_type_ids: every cached position and the whole prompt attend each
        other both ways (exact for one unpadded request within the sliding window).

Dtypes (transformers.js suffixes): fp32 "", fp16 "_fp16" (ONNX Runtime's float16 tool, float16
I/O), q4 "_q4" (ONNX Runtime's MatMulNBits quantizer, block 64, float32 I/O), q4f16 "_q4f16"
(the q4 weights on the fp16 graph), and the 8-bit ones of transformers.js' scripts/quantize.py
(ONNX Runtime's dynamic quantizer, IntegerOps: MatMulInteger on constant weights, per tensor):
int8 "_int8" (int8 weights), uint8 "_uint8" (uint8), q8 "_quantized" (uint8 in a graph with a
Conv, int8 in the others). Config, tokenizer and processor files are copied beside.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from torch import nn

SUFFIX = {"fp32": "", "fp16": "_fp16", "q4": "_q4", "q4f16": "_q4f16", "int8": "_int8", "uint8": "_uint8", "q8": "_quantized"}
OPSET = 14
# What a transformers.js repo holds beside onnx/ (those the checkpoint has).
COPIED = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class Vision(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        hidden = self.model.model.vision_tower(pixel_values=pixel_values).last_hidden_state
        features = self.model.model.multi_modal_projector(hidden)
        return features / (self.model.config.text_config.hidden_size**0.5)


class Embed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.weight = model.get_input_embeddings().weight

    def forward(self, input_ids):
        return nn.functional.embedding(input_ids, self.weight)


class Decoder(nn.Module):
    """Gemma (1 or 2) with a tuple cache; no mask inputs: an all-zero additive mask."""

    def __init__(self, model):
        super().__init__()
        self.text = model.model.language_model
        self.lm_head = model.lm_head
        self.config = model.config.text_config

    def forward(self, inputs_embeds, position_ids, *past):
        from transformers import DynamicCache

        layers = self.config.num_hidden_layers
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)])
        # [B,1,T,P+T] zeros, sized from the inputs so the trace keeps the axes dynamic.
        keys = torch.cat([past[0][0, 0, :, 0], inputs_embeds[0, :, 0]])
        mask = torch.zeros_like(inputs_embeds[:, None, :, :1]) + torch.zeros_like(keys)[None, None, None, :]
        masks = {"full_attention": mask, "sliding_attention": mask} if getattr(self.config, "layer_types", None) else mask
        hidden = inputs_embeds * torch.tensor(self.config.hidden_size**0.5, dtype=inputs_embeds.dtype)
        out = self.text(inputs_embeds=hidden, attention_mask=masks, position_ids=position_ids, past_key_values=cache, use_cache=True)
        logits = self.lm_head(out.last_hidden_state)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        presents = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


def _export(module, args, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def _fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=False)
    onnx.save(model, str(target))


def _q4(source: Path, target: Path) -> None:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=64, is_symmetric=True)
    quantizer.process()
    onnx.save(quantizer.model.model, str(target))


def _8bit(source: Path, target: Path, dtype: str) -> None:
    """transformers.js' `quantize_q8` with its defaults (no per-channel, no reduced range; ONNX
    Runtime's activations are uint8), the weight type its `quantize` picks for `dtype`."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    if dtype == "q8":
        # The ops alone: without the external weights, which quantize_dynamic reads itself.
        ops = {n.op_type for n in onnx.load(str(source), load_external_data=False).graph.node}
        weight_type = QuantType.QUInt8 if ops & {"Conv", "GroupQueryAttention", "MultiHeadAttention"} else QuantType.QInt8
    else:
        weight_type = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[dtype]
    quantize_dynamic(
        source,
        target,
        per_channel=False,
        reduce_range=False,
        weight_type=weight_type,
        extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True},
    )


def build(checkpoint: Path, out_dir: Path, dtypes=("fp32",)) -> Path:
    """Writes the community layout of `checkpoint` (a PaliGemma or PaliGemma 2 directory) to
    `out_dir` with the graphs of `dtypes` (keys of SUFFIX)."""
    from transformers import PaliGemmaForConditionalGeneration

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32).eval()
    cfg = model.config
    text = cfg.text_config
    size = cfg.vision_config.image_size
    if out_dir.exists():
        shutil.rmtree(out_dir)
    onnx_dir = out_dir / "onnx"
    graphs = {
        "vision_encoder": lambda path: _export(
            Vision(model),
            (torch.randn(1, 3, size, size),),
            path,
            ["pixel_values"],
            ["image_features"],
            {"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}},
        ),
        "embed_tokens": lambda path: _export(
            Embed(model),
            (torch.ones(1, 3, dtype=torch.int64),),
            path,
            ["input_ids"],
            ["inputs_embeds"],
            {"input_ids": {0: "batch_size", 1: "sequence_length"}, "inputs_embeds": {0: "batch_size", 1: "sequence_length"}},
        ),
        "decoder_model_merged": lambda path: _export_decoder(model, text, path),
    }
    for stem, export in graphs.items():
        fp32 = onnx_dir / f"{stem}.onnx"
        export(fp32)
        if "fp16" in dtypes or "q4f16" in dtypes:
            _fp16(fp32, onnx_dir / f"{stem}_fp16.onnx")
        if "q4" in dtypes:
            _q4(fp32, onnx_dir / f"{stem}_q4.onnx")
        if "q4f16" in dtypes:
            _q4(onnx_dir / f"{stem}_fp16.onnx", onnx_dir / f"{stem}_q4f16.onnx")
        for dtype in ("int8", "uint8", "q8"):
            if dtype in dtypes:
                _8bit(fp32, onnx_dir / f"{stem}{SUFFIX[dtype]}.onnx", dtype)
        if "fp16" not in dtypes and (onnx_dir / f"{stem}_fp16.onnx").exists():
            (onnx_dir / f"{stem}_fp16.onnx").unlink()
        if "fp32" not in dtypes:
            fp32.unlink()
    for name in COPIED:
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, out_dir / name)
    return out_dir


def _export_decoder(model, text, path: Path) -> None:
    layers = text.num_hidden_layers
    kv = (1, text.num_key_value_heads, 2, text.head_dim)
    past = tuple(torch.randn(kv) for _ in range(2 * layers))
    past_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    present_names = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    axes = {
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
        **{n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names},
        **{n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names},
    }
    args = (torch.randn(1, 3, text.hidden_size), torch.tensor([[3, 4, 5]]), *past)
    _export(Decoder(model), args, path, ["inputs_embeds", "position_ids", *past_names], ["logits", *present_names], axes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.community", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: " + ", ".join(SUFFIX))
    args = parser.parse_args(argv)
    print(build(args.checkpoint, args.out_dir, tuple(args.dtypes.split(","))))


if __name__ == "__main__":
    main()
