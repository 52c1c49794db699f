"""A greedy decode loop over the exported graphs with ONNX Runtime: the reference for the Rust runtime.

It does what transformers' `generate(do_sample=False)` does, step for step: image rows spliced over
`<image>` positions, 1-based positions from the padding mask, one prefill run, then one token per
run with the KV cache; a finished row keeps receiving `<pad>` with its mask still growing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import cpu
from .manifest import read_manifest, weight_format

# Graph I/O element type per manifest dtype: quantized graphs keep float32 inputs and outputs.
NP_DTYPE = {"fp32": np.float32, "fp16": np.float16, "int8": np.float32, "q4": np.float32}


@dataclass
class Generation:
    tokens: np.ndarray  # i64[B,steps], pads after <eos> like transformers
    logits: list[np.ndarray] = field(default_factory=list)  # per step f32[B,V]


class OnnxPaliGemma:
    def __init__(self, model_dir: Path, dtype: str = "fp32", threads: int | None = None):
        self.dir = Path(model_dir)
        self.m = read_manifest(self.dir)
        self.float = NP_DTYPE[dtype]
        # int8 weights in integer MatMuls (version 1 int8) saturate on x86 CPUs without VNNI: ONNX
        # Runtime's rewrite to uint8 runs its exact kernels there, as the Rust runtime does.
        fmt = weight_format(self.m, dtype)
        saturating = fmt is not None and fmt["weight_type"] == "int8" and fmt["op"] in ("DynamicQuantizeMatMul", "MatMulInteger")
        self.exact_int8 = fmt["graphs"] if saturating and cpu.int8_weight_kernels_saturate() else []
        self.threads = threads
        self.dtype = dtype

    def _session(self, graph: str) -> ort.InferenceSession:
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        if graph in self.exact_int8:
            options.add_session_config_entry("session.x64quantprecision", "1")
        path = self.dir / self.m["graphs"][graph][self.dtype]
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    # Opened on first use; `del model.vision` releases one (`--validate` keeps one graph set at a time).
    @cached_property
    def vision(self) -> ort.InferenceSession:
        return self._session("vision_encoder")

    @cached_property
    def embed(self) -> ort.InferenceSession:
        return self._session("embed_tokens")

    @cached_property
    def decoder(self) -> ort.InferenceSession:
        return self._session("decoder")

    def prompt_embeds(self, pixel_values: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
        """Token rows with image rows spliced in at `<image>` positions: f[B,L,H]."""
        features = self.vision.run(None, {"pixel_values": pixel_values.astype(self.float)})[0]  # [B,N,H]
        is_image = input_ids == self.m["image_token_id"]
        embeds = self.embed.run(None, {"input_ids": np.where(is_image, 0, input_ids)})[0]
        counts = is_image.sum(axis=1)
        if not (counts == features.shape[1]).all():
            raise ValueError(f"prompt has {counts.tolist()} <image> tokens per row, the vision graph gives {features.shape[1]}")
        embeds[is_image] = features.reshape(-1, features.shape[-1])
        return embeds

    def generate(
        self, pixel_values, input_ids, attention_mask, max_new_tokens: int, forced: np.ndarray | None = None, embeds=None
    ) -> Generation:
        """Greedy tokens; with `forced` (i64[B,>=max_new_tokens]) those tokens are fed back instead
        of the argmax (teacher forcing), and `tokens` still records the argmax at each step. With
        `embeds` (`prompt_embeds`' result) the vision graph is not run."""
        m = self.m
        batch = input_ids.shape[0]
        if embeds is None:
            embeds = self.prompt_embeds(pixel_values, input_ids)
        mask = attention_mask.astype(np.int64)
        token_types = np.zeros_like(mask)
        positions = np.where(mask == 0, 0, np.cumsum(mask, axis=1) - 1) + 1
        past = {
            f"past_key_values.{i}.{kind}": np.zeros((batch, m["num_key_value_heads"], 0, m["head_dim"]), self.float)
            for i in range(m["num_hidden_layers"])
            for kind in ("key", "value")
        }
        eos = np.array(m["eos_token_id"])
        done = np.zeros(batch, dtype=bool)
        out = Generation(tokens=np.zeros((batch, 0), np.int64))
        for step in range(max_new_tokens):
            logits, *presents = self.decoder.run(
                None,
                {"inputs_embeds": embeds, "attention_mask": mask, "token_type_ids": token_types, "position_ids": positions, **past},
            )
            step_logits = logits[:, -1, :].astype(np.float32)
            out.logits.append(step_logits)
            token = np.where(done, m["pad_token_id"], step_logits.argmax(axis=-1))
            out.tokens = np.concatenate([out.tokens, token[:, None]], axis=1)
            fed = token if forced is None else forced[:, step]
            done |= np.isin(fed, eos)
            if done.all():
                break
            past = dict(zip(past, presents))
            embeds = self.embed.run(None, {"input_ids": fed[:, None]})[0]
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            token_types = np.concatenate([token_types, np.ones((batch, 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        return out
