"""manifest.json: the one description of a converted model directory that the runtimes read.

Every shape, id and file name the Rust runtime needs is here, so it never guesses. Written last
and atomically: a directory without manifest.json is not a finished conversion.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

from .quantize import VISION_FORMAT, WEIGHT_FORMATS

FORMAT = "paligemma-onnx"
# 2: adds `quantization` (what each quantized dtype's graphs hold; int8 weights became uint8).
# 3: adds `graphs.decoder_gqa` (the GroupQueryAttention decoder, fp32 conversions; see decoder_gqa.py).
FORMAT_VERSION = 3

# transformers.js file-name suffixes per dtype (model.onnx, model_fp16.onnx, ...).
DTYPE_SUFFIX = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "q4": "_q4"}
GRAPH_STEMS = {
    "vision_encoder": "vision_encoder",
    "embed_tokens": "embed_tokens",
    "decoder": "decoder_model_merged",
    "decoder_gqa": "decoder_model_gqa",
}
# Graphs every conversion has; decoder_gqa is listed only where it was built.
REQUIRED_GRAPHS = ("vision_encoder", "embed_tokens", "decoder")


def graph_path(graph: str, dtype: str) -> str:
    return f"onnx/{GRAPH_STEMS[graph]}{DTYPE_SUFFIX[dtype]}.onnx"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("transformers", "torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def model_facts(config, processor, generation_config) -> dict:
    """Shapes and ids from the Hugging Face config, tokenizer and processor."""
    text = config.text_config
    vision = config.vision_config
    tok = processor.tokenizer
    eos = generation_config.eos_token_id if generation_config.eos_token_id is not None else tok.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    image_size = processor.image_processor.size["height"]
    return {
        "image_size": image_size,
        "patch_size": vision.patch_size,
        "num_image_tokens": processor.image_seq_length,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": text.head_dim,
        # Gemma (PaliGemma 1): no window, no softcaps, every layer full attention.
        "sliding_window": getattr(text, "sliding_window", None),
        "layer_types": list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers),
        "max_position_embeddings": text.max_position_embeddings,
        "final_logit_softcapping": getattr(text, "final_logit_softcapping", None),
        "attn_logit_softcapping": getattr(text, "attn_logit_softcapping", None),
        "image_token_id": config.image_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": eos,
        "loc_token_start": tok.convert_tokens_to_ids("<loc0000>"),
        "seg_token_start": tok.convert_tokens_to_ids("<seg000>"),
    }


def write_manifest(
    out_dir: Path,
    *,
    source: str,
    facts: dict,
    dtype: str,
    seg_decoder: str | None,
    quantized: dict[str, tuple[str, ...]] | None = None,
    quantized_vision: str | None = None,
    decoder_gqa: bool = False,
) -> Path:
    """`quantized`: dtype key ("int8", "q4") -> the graphs that have a file of their own in it; the
    others of that dtype run the `dtype` file. The seg decoder has one float32 file for every dtype.
    `quantization` records each quantized dtype's weight format and the graphs that hold it.
    `quantized_vision`: the quantized vision encoder's file, which every quantized dtype then runs
    (its format under `quantization.<dtype>.vision_encoder`)."""
    quantized = quantized or {}
    dtypes = [dtype, *quantized]
    graphs = {
        g: {dtype: graph_path(g, dtype), **{q: graph_path(g, q if g in own else dtype) for q, own in quantized.items()}}
        for g in (*REQUIRED_GRAPHS, *(("decoder_gqa",) if decoder_gqa else ()))
    }
    vision = {"vision_encoder": {**VISION_FORMAT, "file": quantized_vision}} if quantized_vision else {}
    for q in quantized if quantized_vision else ():
        graphs["vision_encoder"][q] = quantized_vision
    if seg_decoder:
        graphs["seg_decoder"] = {d: seg_decoder for d in dtypes}
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        **facts,
        "dtypes": dtypes,
        "graphs": graphs,
        "quantization": {q: {**WEIGHT_FORMATS[q], "graphs": list(own), **vision} for q, own in quantized.items()},
        "files": files,
        "file_sizes": {f: (out_dir / f).stat().st_size for f in files},
        "producer": _versions(),
    }
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / "manifest.json")
    return out_dir / "manifest.json"


def read_manifest(model_dir: Path) -> dict:
    m = json.loads((Path(model_dir) / "manifest.json").read_text())
    if m.get("format") != FORMAT or not 1 <= m.get("format_version", 0) <= FORMAT_VERSION:
        raise ValueError(
            f"{model_dir}/manifest.json: format {m.get('format')!r} version {m.get('format_version')!r}, this "
            f"exporter reads {FORMAT!r} versions 1-{FORMAT_VERSION}: a newer manifest needs a newer checkout"
        )
    return m


def weight_format(m: dict, dtype: str) -> dict | None:
    """What the graphs of a quantized `dtype` hold (`quantization`); version 1 manifests predate the
    record, and their int8 decoders hold int8 weights in DynamicQuantizeMatMul. As src/config.rs."""
    if dtype in m.get("quantization", {}):
        return m["quantization"][dtype]
    if m["format_version"] == 1 and dtype == "int8":
        return {"op": "DynamicQuantizeMatMul", "weight_type": "int8", "graphs": ["decoder"]}
    return None
