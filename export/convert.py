"""`python -m export convert`: a PaliGemma 2 checkpoint -> a model directory the runtimes load.

Steps:
 1. check the arguments and the inputs that are cheap to check (OUT_DIR, the VAE npz, the config)
    before any weight is read;
 2. build the model on the meta device with eager attention (sdpa drops Gemma 2's attention
    softcap) and match every parameter to a checkpoint tensor (checkpoint.py: missing, extra,
    misshapen or truncated tensors are refused here), then check the disk has room for the output;
 3. export each graph into a sibling work directory, traced without weights and written a tensor
    at a time from the checkpoint (graph.py; fp32: also the GroupQueryAttention decoder,
    decoder_gqa.py), copy the tokenizer and processor files;
 4. with --quantize, write int8 / q4 copies of the fp32 graphs (quantize.py);
 5. write manifest.json last, then move the directory into place, so a crash never leaves an
    OUT_DIR that looks complete.

Memory: about the largest weight in the checkpoint's dtype plus 1 GB (the 28B: 3.5 GB), whatever
the depth; the README has the measured figures.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import check, checkpoint, decoder, decoder_gqa, embedding, manifest, quantize, segmentation, vision
from .errors import ExportError
from .graph import export_graph

DTYPES = ("fp32", "fp16")
COPIED_FILES = ("tokenizer.json", "config.json", "generation_config.json", "preprocessor_config.json")
# What a Hub download needs: weights, config, tokenizer and processor files.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


def resolve_source(model: str) -> Path:
    """A local `save_pretrained` directory, or a Hub id downloaded through huggingface_hub's cache."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"{model} is a file; give a checkpoint directory or a Hub id such as google/paligemma2-3b-mix-224")
        return path
    if model.count("/") != 1 or model.startswith(("/", ".")):
        raise ExportError(f"{model}: no such directory, and not a Hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(model, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise ExportError(f"{model} is gated: accept its licence on the Hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ExportError(f"{model}: no such model on the Hub (or it is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise ExportError(
            f"{model} is not in the local Hugging Face cache and the Hub cannot be reached (HF_HUB_OFFLINE or no network)"
        ) from None
    except HfHubHTTPError as e:
        raise ExportError(f"{model}: download failed: {str(e).splitlines()[0]}") from None


def check_source(src: Path) -> dict:
    """The config must be PaliGemma with a Gemma 2 (PaliGemma 2) or Gemma (PaliGemma 1) text model,
    and the processor files present."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{src} has no config.json: not a checkpoint written by save_pretrained")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type != "paligemma":
        raise ExportError(f"{config_path}: model_type is {model_type!r}, expected 'paligemma' (a PaliGemma 2 checkpoint)")
    # PaliGemmaConfig reads a text_config without model_type as Gemma's.
    text_type = config.get("text_config", {}).get("model_type", "gemma")
    if text_type not in ("gemma2", "gemma"):
        raise ExportError(
            f"{config_path}: text_config.model_type is {text_type!r}, expected 'gemma2' (PaliGemma 2) or 'gemma' (PaliGemma 1)"
        )
    missing = [f for f in ("tokenizer.json",) if not (src / f).is_file()]
    if not any((src / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json")
    if missing:
        raise ExportError(
            f"{src} lacks processor files {', '.join(missing)}: save them with "
            "PaliGemmaProcessor.from_pretrained(ID).save_pretrained(DIR) beside the model"
        )
    return config


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty: pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is a file")


def convert(
    model: str,
    out_dir: Path,
    *,
    dtype: str = "fp32",
    seg_vae: Path | None = None,
    quantize_to: Sequence[str] = (),
    quantize_vision: bool = False,
    force: bool = False,
    check_graphs: bool = True,
) -> Path:
    """`quantize_to`: manifest dtype keys ("int8", "q4", see `quantize.parse_schemes`) to add;
    `quantize_vision`: their vision encoder is quantized too (`quantize.VISION_FORMAT`);
    `check_graphs`: each graph is checked against its torch module once written (check.py)."""
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if quantize_vision and not quantize_to:
        raise ExportError(
            "--quantize-vision quantizes the vision encoder of the quantized dtypes, from the fp32 graphs: "
            "add --quantize int8 (or int4)" + (f" and drop --dtype {dtype}" if dtype != "fp32" else "")
        )
    if quantize_to and dtype != "fp32":
        raise ExportError(f"--quantize starts from the fp32 graphs: drop --dtype {dtype} (or convert twice)")
    prepare_out_dir(out_dir, force)
    vae = segmentation.load_vae(seg_vae) if seg_vae else None
    src = resolve_source(model)
    check_source(src)

    import torch
    from transformers import AutoProcessor, GenerationConfig

    processor = AutoProcessor.from_pretrained(src)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    hf, weights = checkpoint.load_meta_model(src, torch_dtype)
    try:
        generation_config = GenerationConfig.from_pretrained(src)
    except OSError:
        generation_config = GenerationConfig.from_model_config(hf.config)
    gqa = dtype == "fp32" and decoder_gqa.supported(hf.config.text_config) is None
    check_disk(out_dir, output_bytes(hf, torch_dtype.itemsize, gqa, quantize_to, quantize_vision))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the finished model directory should not be
    try:
        for graph, make_spec in (("vision_encoder", vision.spec), ("embed_tokens", embedding.spec), ("decoder", decoder.spec)):
            spec = make_spec(hf)
            path = export_graph(spec, work / manifest.graph_path(graph, dtype), weights)
            if check_graphs:
                check.check_graph(path, check.spec_feeds(spec), spec.module, spec.args, weights)
        # The in-place-cache flavour, fp32 only (float16 GroupQueryAttention is a GPU build's concern),
        # where ONNX Runtime's kernel takes the model's head layout.
        if gqa:
            path = decoder_gqa.export(hf, work / manifest.graph_path("decoder_gqa", dtype), weights)
            if check_graphs:
                feeds, module, args = decoder_gqa.check_case(hf)
                check.check_graph(path, feeds, module, args, weights)
        del hf
        quantized = {}
        for q in quantize_to:
            quantized[q] = quantize.QUANTIZED_GRAPHS[q]
            for graph in quantized[q]:
                quantize.quantize_graph(work / manifest.graph_path(graph, dtype), work / manifest.graph_path(graph, q), q)
        vision_file = None
        if quantize_vision:
            vision_file = manifest.graph_path("vision_encoder", quantize.VISION_DTYPE)
            source_file = work / manifest.graph_path("vision_encoder", dtype)
            quantize.quantize_graph(source_file, work / vision_file, quantize.VISION_DTYPE, quantize.VISION_FORMAT)
        seg_path = None
        if vae is not None:
            seg_path = "onnx/seg_decoder.onnx"
            segmentation.export(vae, work / seg_path, check_graph=check_graphs)
        for name in ("tokenizer.json", "config.json"):
            shutil.copy2(src / name, work / name)
        generation_config.to_json_file(work / "generation_config.json")
        processor.image_processor.to_json_file(work / "preprocessor_config.json")
        facts = manifest.model_facts(hf_config(src), processor, generation_config)
        manifest.write_manifest(
            work,
            source=model,
            facts=facts,
            dtype=dtype,
            seg_decoder=seg_path,
            quantized=quantized,
            quantized_vision=vision_file,
            decoder_gqa=gqa,
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out_dir


# Bytes a quantized decoder stores per weight: int8 is 1 byte plus a float32 scale per 128, q4 half
# a byte plus one per 32; the vision encoder's 7-bit weights 1 byte (scales per column: nothing).
QUANTIZED_BYTES = {"int8": 1 + 4 / 128, "q4": 0.5 + 4 / 32}
DISK_MARGIN = 1024**3  # tokenizer, manifest, alignment, the segmentation decoder


def output_bytes(model, itemsize: int, gqa: bool, quantize_to: Sequence[str], quantize_vision: bool) -> dict[str, int]:
    """What each part of the conversion writes, in bytes, from the parameter counts: the vision
    encoder and projector, the embedding, one decoder per flavour (the text model with the tied
    projection in place of the embedding), the quantized copies."""

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    vision = count(model.model.vision_tower) + count(model.model.multi_modal_projector)
    text = count(model.model.language_model)
    decoders = 2 if gqa else 1
    parts = {
        "vision encoder": vision * itemsize,
        "embedding": model.model.language_model.embed_tokens.weight.numel() * itemsize,
        "decoders": decoders * text * itemsize,
    }
    for q in quantize_to:
        parts[f"{q} decoders"] = int(decoders * text * QUANTIZED_BYTES[q])
    if quantize_vision:
        parts["quantized vision encoder"] = vision
    return parts


def check_disk(out_dir: Path, parts: dict[str, int]) -> None:
    """Refuse before writing anything when the file system of OUT_DIR has too little room."""
    existing = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    need = sum(parts.values()) + DISK_MARGIN
    if free < need:
        listed = ", ".join(f"{name} {size / 1e9:.1f}" for name, size in parts.items())
        raise ExportError(
            f"not enough disk for {out_dir}: the conversion writes about {need / 1e9:.1f} GB ({listed} GB, plus "
            f"{DISK_MARGIN / 1e9:.1f} GB of other files) and {existing} has {free / 1e9:.1f} GB free; free some space "
            "or give an OUT_DIR on another disk"
        )


def hf_config(src: Path):
    from transformers import PaliGemmaConfig

    return PaliGemmaConfig.from_pretrained(src)
