"""A checkpoint's weights, read one tensor at a time: what lets `convert` run in bounded memory.

A released PaliGemma 2 is bf16 safetensors shards (`model-0000N-of-0000M.safetensors` and
`model.safetensors.index.json`; the 28B is about 56 GB). `transformers.from_pretrained` would hold
every weight in float32 (about 112 GB for the 28B); here each tensor is read from its shard with a
plain `read` (no memory map: mapped pages count as resident), converted with torch (the same
rounding `from_pretrained(dtype=...)` does) and handed to the writer, so a conversion holds about
one tensor at a time.

Checkpoint keys are matched to the model's parameter names with transformers' own renaming rules
(`conversion_mapping.py`: the released layout's `language_model.model.*` is the module's
`model.language_model.*`) and its tied weights (`lm_head.weight` is the embedding). A checkpoint
with a tensor the model lacks, a parameter the checkpoint lacks, a shape that differs or a shard
shorter than its header says is refused before anything is written.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from .errors import ExportError

# safetensors dtype names -> torch dtypes a PaliGemma checkpoint can hold.
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CHUNK_BYTES = 64 * 1024**2  # what one read or one converted slice holds


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard: `offset` is absolute in `file`."""

    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ExportError(f"{path}: {size} bytes, not a safetensors file (download it again)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ExportError(f"{path}: truncated: its header needs {length + 8} bytes, the file has {size}; download it again")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise ExportError(f"{path}: unreadable safetensors header ({e}); download it again") from None
    return header, 8 + length


class Checkpoint:
    """The tensors of a `save_pretrained` directory (one `model.safetensors` or indexed shards)."""

    def __init__(self, src: Path):
        src = Path(src)
        if (src / INDEX).is_file():
            weight_map = json.loads((src / INDEX).read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise ExportError(f"{src}: {INDEX} names shards that are not there: {', '.join(missing)}; download them")
        elif (src / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise ExportError(f"{src} has no {SINGLE} or {INDEX}: only safetensors checkpoints are read (save with save_pretrained)")
        self.entries: dict[str, Entry] = {}
        for name in files:
            path = src / name
            header, base = _header(path)
            size = path.stat().st_size
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                if base + end > size:
                    raise ExportError(f"{path}: truncated: tensor {key} ends at byte {base + end}, the file has {size}; download it again")
                if info["dtype"] not in DTYPES:
                    raise ExportError(f"{path}: tensor {key} is {info['dtype']}; expected one of {', '.join(DTYPES)}")
                self.entries[key] = Entry(key, path, info["dtype"], tuple(info["shape"]), base + begin, end - begin)
        if weight_map is not None:
            absent = sorted(k for k in weight_map if k not in self.entries)
            if absent:
                raise ExportError(f"{src}: {INDEX} lists tensors its shards lack: {_some(absent)}; download the shards again")

    def read(self, key: str, dtype: torch.dtype, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `key` (rows `[start, end)` of its first axis when given) converted to `dtype`,
        read and converted CHUNK_BYTES at a time into the result, so a bf16 -> fp32 read holds the
        result and one chunk, not the stored copy as well."""
        entry = self.entries[key]
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape else entry.nbytes
        start, end = rows if rows is not None else (0, entry.shape[0] if entry.shape else 1)
        out = torch.empty((end - start, *entry.shape[1:]), dtype=dtype)
        with open(entry.file, "rb") as f:
            f.seek(entry.offset + start * row_bytes)
            for first, last in _row_ranges(end - start, row_bytes):
                buffer = bytearray((last - first) * row_bytes)
                if f.readinto(buffer) != len(buffer):
                    raise ExportError(f"{entry.file}: ended inside tensor {key}; download it again")
                if buffer:
                    stored = torch.frombuffer(buffer, dtype=DTYPES[entry.dtype])
                    out[first:last] = stored.reshape(last - first, *entry.shape[1:])
        return out if entry.shape else out.reshape(())

    def row_chunks(self, key: str, row_bytes: int) -> Iterator[tuple[int, int]]:
        """`[start, end)` row ranges of `key` whose converted size is about CHUNK_BYTES."""
        yield from _row_ranges(self.entries[key].shape[0] if self.entries[key].shape else 1, row_bytes)


def _row_ranges(rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    """`[start, end)` ranges over `rows` rows of `row_bytes` each, about CHUNK_BYTES a range."""
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@contextmanager
def parameters_on_meta():
    """Modules built inside this block get their parameters on the meta device and their buffers
    as usual (accelerate's `init_empty_weights(include_buffers=False)`): the buffers (SigLIP's
    position ids, Gemma 2's inverse RoPE frequencies) are computed from the config, not stored."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class Weights:
    """The checkpoint tensor behind each parameter of a model built on the meta device.

    `source(param)` is the checkpoint key of a parameter (a tied one gives its source's key);
    `buffers` holds the real values of the model's buffers by name."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, buffers: dict[str, torch.Tensor], dtype: torch.dtype):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.checkpoint = checkpoint
        self.dtype = dtype
        self.buffers = buffers
        params = dict(model.named_parameters(remove_duplicate=False))
        tied = model.get_expanded_tied_weights_keys() if hasattr(model, "get_expanded_tied_weights_keys") else {}
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        if converters:
            raise ExportError(f"{type(model).__name__}: transformers converts some of its weights on load; this reader only renames")
        meta = model.state_dict()
        by_name: dict[str, str] = {}
        extra = []
        for key in checkpoint.entries:
            name, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if name in params:
                by_name[name] = key
            elif name not in buffers:
                extra.append(key)
        for target, source in tied.items():
            if source in by_name:
                by_name[target] = by_name[source]
        missing = sorted(n for n in params if n not in by_name)
        if extra:
            raise ExportError(
                f"the checkpoint has tensors this model does not: {_some(sorted(extra))}; is config.json the one it was saved with?"
            )
        if missing:
            raise ExportError(f"the checkpoint lacks tensors the model needs: {_some(missing)}; download the missing shards again")
        wrong = [
            f"{key} {list(checkpoint.entries[key].shape)} (expected {list(params[name].shape)})"
            for name, key in by_name.items()
            if tuple(params[name].shape) != checkpoint.entries[key].shape
        ]
        if wrong:
            raise ExportError(f"checkpoint tensors whose shape does not match config.json: {_some(wrong)}")
        self._keys = {id(params[name]): key for name, key in by_name.items()}
        self._buffers = {id(b): buffers[name] for name, b in model.named_buffers(remove_duplicate=False)}

    def key(self, param: torch.Tensor) -> str:
        return self._keys[id(param)]

    def read(self, param: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.checkpoint.read(self.key(param), self.dtype, rows)

    def buffer(self, meta: torch.Tensor) -> torch.Tensor:
        """The real value of one of the meta model's buffers."""
        return self._buffers[id(meta)]


class CheckpointTensor(ir.LazyTensor):
    """A parameter's checkpoint tensor in the conversion dtype, read when ONNX IR writes it: in
    slices of about CHUNK_BYTES to a file, whole when asked for its values."""

    def __init__(self, weights: Weights, param: torch.Tensor, name: str):
        self.weights, self.param = weights, param
        dtype = ir.DataType.from_numpy(np.dtype(str(weights.dtype).removeprefix("torch.")))
        super().__init__(self._load, dtype=dtype, shape=ir.Shape(param.shape), name=name)

    def _load(self) -> ir.TensorProtocol:
        return ir.tensor(self.weights.read(self.param).numpy())

    def tofile(self, file) -> None:
        key = self.weights.key(self.param)
        row_bytes = self.nbytes // self.shape[0] if len(self.shape) else self.nbytes
        for rows in self.weights.checkpoint.row_chunks(key, row_bytes):
            file.write(self.weights.read(self.param, rows).numpy().tobytes())


class TransposedTensor(ir.LazyTensor):
    """`source` (a 2-D `CheckpointTensor`) transposed: a Linear weight `[out, in]` as the MatMul
    constant `[in, out]`. Written in column slices from the source held in the checkpoint's own
    dtype, so the largest weight (the tied vocabulary projection) never exists twice in float32."""

    def __init__(self, source: CheckpointTensor, name: str):
        self.source = source
        rows, cols = source.shape
        super().__init__(self._load, dtype=source.dtype, shape=ir.Shape([cols, rows]), name=name)

    def _load(self) -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(self.source.numpy().T))

    def tofile(self, file) -> None:
        weights, param = self.source.weights, self.source.param
        key = weights.key(param)
        stored = weights.checkpoint.read(key, DTYPES[weights.checkpoint.entries[key].dtype])
        rows, cols = stored.shape
        step = max(1, CHUNK_BYTES // (rows * int(self.dtype.itemsize)))
        for start in range(0, cols, step):
            chunk = stored[:, start : start + step].T.to(weights.dtype).contiguous()
            file.write(chunk.numpy().tobytes())


@contextmanager
def default_dtype(dtype: torch.dtype):
    """`from_pretrained(dtype=...)` builds the model under this default dtype: parameters and
    buffers made with the default (Gemma 2's embed_scale) take it, explicit float32 ones keep it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_meta_model(src: Path, dtype: torch.dtype):
    """PaliGemmaForConditionalGeneration of `src`'s config with eager attention, its parameters on
    the meta device (buffers too: tracing needs one device), and the `Weights` that read them and
    hold the real buffers."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig.from_pretrained(src)
    config._attn_implementation = "eager"  # sdpa drops Gemma 2's attention softcap
    checkpoint = Checkpoint(src)
    with default_dtype(dtype):
        with parameters_on_meta():
            buffers = dict(PaliGemmaForConditionalGeneration(config).named_buffers())
        with torch.device("meta"):
            model = PaliGemmaForConditionalGeneration(config).eval()
    return model, Weights(model, checkpoint, buffers, dtype)


def load_model(src: Path, dtype: torch.dtype):
    """PaliGemmaForConditionalGeneration of `src` with eager attention and its weights read by
    `Weights` (each tensor converted into its parameter, tied ones shared) instead of
    `from_pretrained`, which also holds the checkpoint's mapped shards (the 3B: 6 GB of bf16
    beside 12 GB of float32). Same values: the same conversion, the same buffers."""
    from transformers import GenerationConfig

    model, weights = load_meta_model(src, dtype)
    real: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in real:
                    real[id(param)] = nn.Parameter(weights.read(param), requires_grad=False)
                module._parameters[name] = real[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = weights.buffer(buffer)
    try:
        model.generation_config = GenerationConfig.from_pretrained(src)
    except OSError:
        pass
    return model
