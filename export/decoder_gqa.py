"""decoder_model_gqa.onnx: the Gemma 2 decoder on ONNX Runtime's GroupQueryAttention, whose KV
cache a runtime updates in place.

The portable graph (`decoder.py`) returns `present = concat(past, new)`: every step copies the
whole cache. This flavour runs attention through `com.microsoft.GroupQueryAttention`, which writes
the new keys and values into the past buffer itself when a runtime binds the same buffer as
`past_key_values.*` and `present.*` (ONNX Runtime compares the two data pointers): the buffer is
`[B,KVH,max_len,D]` and row b holds its own `seqlens_k[b] + 1` positions from index 0, so rows of
different lengths need no padding. Run without a shared buffer (plain `run`), it behaves as the
portable graph: `present` is `past` with the new positions appended.

I/O:
    inputs_embeds          f32[B,T,H]   raw embedding rows; image rows are features / sqrt(H)
    position_ids           i64[B,T]     1-based, as the portable graph's
    seqlens_k              i32[B]       each row's length after this run, minus 1
    total_sequence_length  i32[]        the largest seqlens_k + 1 of the batch
    past_key_values.{i}.key / .value   f32[B,KVH,P,D]
 -> logits                 f32[B,1,V]   last position only, final softcap applied
    present.{i}.key / .value  f32[B,KVH,P',D]  (P' = P when shared, else total_sequence_length)

Attention is PaliGemma's without a mask input: a run of T > 1 positions is a whole prompt from
position 0 (the prefix-LM block: every prompt token sees every other, `causal=0`); a run of one
position is a generated token, which sees its row's positions before it (`causal=0` with
`seqlens_k`, ONNX Runtime's per-row key count) and, on sliding-window layers, only the last
`sliding_window` of them (an additive bias, as `local_window_size` cannot combine with
`causal=0`). ONNX Runtime applies the bias after the softcap, as transformers adds its mask
(`gqa_attention_base.h`). Query scale `query_pre_attn_scalar**-0.5` and `attn_logit_softcapping`
are the op's `scale` and `softcap`. RoPE is applied here, from `position_ids`, as transformers'
`Gemma2RotaryEmbedding` (the op's own rotary counts positions from 0).

Built node by node from the checkpoint's weights (onnxruntime-genai's builder does the same for
Gemma 2), since no exporter emits the contrib op; every MatMul weight is a constant initializer
laid out `[in, out]`, so `quantize.py` rewrites it as for the portable graph.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from .checkpoint import CheckpointTensor, TransposedTensor, Weights
from .graph import EXTERNAL_ABOVE, report_written, write_external

# transformers' ACT2FN names -> ONNX Gelu's `approximate`.
GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}
OPSET = 20
MS_DOMAIN = "com.microsoft"


def activation(text_config) -> str:
    """The MLP's activation: Gemma 2's `hidden_activation`, Gemma's (PaliGemma 1) `hidden_act`."""
    return getattr(text_config, "hidden_activation", None) or text_config.hidden_act


def is_gemma2(text_config) -> bool:
    """Gemma 2 (PaliGemma 2): norms after attention and MLP too, softcaps, sliding layers, the query
    scaled by query_pre_attn_scalar. Gemma (PaliGemma 1) has none of these."""
    return text_config.model_type == "gemma2"


def supported(text_config) -> str | None:
    """Why ONNX Runtime's GroupQueryAttention cannot run this text model, or None when it can: its
    CPU and CUDA kernels take head sizes that are multiples of 8 and query heads in whole groups per
    KV head (`group_query_attention_helper.h`). Every released PaliGemma 2 qualifies (head_dim 256
    or 128); a checkpoint that does not gets the portable decoder only."""
    if text_config.head_dim % 8:
        return f"head_dim {text_config.head_dim} is not a multiple of 8"
    if text_config.num_attention_heads % text_config.num_key_value_heads:
        return f"{text_config.num_attention_heads} heads do not group over {text_config.num_key_value_heads} KV heads"
    # What this builder writes; anything else keeps transformers' own modules (the portable graph).
    if activation(text_config) not in GELU:
        return f"hidden activation {activation(text_config)!r} is not one this builder writes ({', '.join(GELU)})"
    rope = (getattr(text_config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        return f"rope_type {rope!r} is not the default RoPE this builder writes"
    return None


class _Graph:
    """Nodes and initializers, with fresh value names. With `data` (an open file), initializers of
    1 KiB and more are written there as they are made, page-aligned, and the graph refers to them:
    a conversion then holds one transposed weight at a time beside the model, not a second copy of
    every weight (the 3B decoder is 10.5 GB in float32)."""

    def __init__(self, data, source: _Source) -> None:
        self.source = source
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0
        self.data = data

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, value) -> str:
        """`value`: a numpy array, or an ONNX IR tensor (a checkpoint tensor streamed to `data`)."""
        name = self.name(hint)
        if isinstance(value, ir.TensorProtocol) and (self.data is None or value.nbytes < 1024):
            value = value.numpy()
        if not isinstance(value, ir.TensorProtocol):
            value = np.ascontiguousarray(value)
            if self.data is None or value.nbytes < 1024:
                self.initializers.append(numpy_helper.from_array(value, name))
                return name
            value = ir.tensor(value)
        tensor = onnx.TensorProto(name=name, data_type=int(value.dtype), dims=list(value.shape))
        write_external(tensor, self.data, value.tofile)
        self.initializers.append(tensor)
        return name

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "", **attrs) -> str | list[str]:
        names = outputs if isinstance(outputs, list) else [self.name(op_type.lower()) for _ in range(outputs)]
        # Unique node names: quantize.py names the nodes it writes after the ones it replaces.
        node = helper.make_node(op_type, list(inputs), names, name=self.name(op_type), domain=domain or None, **attrs)
        self.nodes.append(node)
        return names[0] if len(names) == 1 else names


class _Source:
    """Float32 values of the model's parameters: read from the checkpoint (`weights`, for a model
    on the meta device) or taken from the module itself."""

    def __init__(self, weights: Weights | None):
        self.weights = weights

    def matrix(self, param):
        """A torch Linear weight `[out, in]` as the MatMul constant `[in, out]`."""
        if self.weights is not None:
            return TransposedTensor(CheckpointTensor(self.weights, param, ""), "")
        return np.ascontiguousarray(param.detach().float().numpy().T)

    def vector(self, param) -> np.ndarray:
        return (self.weights.read(param) if self.weights is not None else param.detach()).float().numpy()


def _linear(g: _Graph, x: str, linear, name: str) -> str:
    """torch's Linear: x @ W^T (+ b, with `attention_bias` in the config)."""
    y = g.op("MatMul", x, g.const(name, g.source.matrix(linear.weight)))
    return y if linear.bias is None else g.op("Add", y, g.const(f"{name}.bias", g.source.vector(linear.bias)))


def _rms_norm(g: _Graph, x: str, weight, eps: float) -> str:
    """Gemma2RMSNorm in float32: x / sqrt(mean(x^2) + eps) * (1 + w)."""
    squared = g.op("Mul", x, x)
    mean = g.op("ReduceMean", squared, g.const("axes", np.array([-1], np.int64)), keepdims=1)
    root = g.op("Sqrt", g.op("Add", mean, g.const("eps", np.array(eps, np.float32))))
    return g.op("Mul", g.op("Div", x, root), g.const("norm_scale", 1.0 + g.source.vector(weight)))


def _rotary(g: _Graph, x: str, heads: int, head_dim: int, cos: str, sin: str) -> str:
    """transformers' apply_rotary_pos_emb on x [B,T,heads*D]: x*cos + rotate_half(x)*sin."""
    shaped = g.op("Reshape", x, g.const("heads_shape", np.array([0, 0, heads, head_dim], np.int64)))
    half = head_dim // 2

    def part(start: int, end: int) -> str:
        bounds = [g.const(n, np.array([v], np.int64)) for n, v in (("start", start), ("end", end), ("axis", -1))]
        return g.op("Slice", shaped, *bounds)

    first, second = part(0, half), part(half, head_dim)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    out = g.op("Add", g.op("Mul", shaped, cos), g.op("Mul", rotated, sin))
    return g.op("Reshape", out, g.const("flat_shape", np.array([0, 0, heads * head_dim], np.int64)))


def _window_bias(g: _Graph, seqlens: str, total: str, seq_len: str, window: int) -> str:
    """f32[B,1,T,total]: finfo.min where a generated token (T = 1) is past the sliding window of
    a key (key index <= query index - window), 0 elsewhere. Prompt runs (T > 1) see everything."""
    zero, one = g.const("zero", np.array(0, np.int64)), g.const("one", np.array(1, np.int64))
    total64 = g.op("Cast", total, to=TensorProto.INT64)
    keys = g.op("Range", zero, total64, one)  # [total]
    queries_offset = g.op("Range", zero, seq_len, one)  # [T]
    seq64 = g.op("Unsqueeze", g.op("Cast", seqlens, to=TensorProto.INT64), g.const("axes", np.array([1], np.int64)))  # [B,1]
    first_query = g.op("Add", g.op("Sub", seq64, seq_len), one)  # [B,1]
    queries = g.op("Add", first_query, queries_offset)  # [B,T]
    limit = g.op("Unsqueeze", g.op("Sub", queries, g.const("window", np.array(window, np.int64))), g.const("axes", np.array([2], np.int64)))
    far = g.op("LessOrEqual", keys, limit)  # [B,T,total]
    generated = g.op("Equal", seq_len, one)
    masked = g.op("And", far, generated)
    low = g.const("finfo_min", np.array(np.finfo(np.float32).min, np.float32))
    bias = g.op("Where", masked, low, g.const("zero_f", np.array(0.0, np.float32)))
    return g.op("Unsqueeze", bias, g.const("axes", np.array([1], np.int64)))


def build(model, data=None, weights: Weights | None = None) -> onnx.ModelProto:
    """The GroupQueryAttention decoder of a PaliGemma 2 `model` (PaliGemmaForConditionalGeneration);
    its large initializers written to the open file `data` when given (see `_Graph`); its weights
    read from `weights` when the model is on the meta device."""
    cfg = model.config.text_config
    text = model.model.language_model
    layers = cfg.num_hidden_layers
    heads, kv_heads, head_dim, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    eps = cfg.rms_norm_eps
    gemma2 = is_gemma2(cfg)
    window = cfg.sliding_window if gemma2 else None
    sliding = [t == "sliding_attention" for t in cfg.layer_types] if gemma2 else [False] * layers
    theta = cfg.rope_parameters["rope_theta"]
    g = _Graph(data, _Source(weights))

    b, t, p = "batch_size", "sequence_length", "past_sequence_length"
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [b, t, hidden]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [b, t]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [b]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [b, 1, cfg.vocab_size])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, [b, kv_heads, p, head_dim]))
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, [b, kv_heads, "total_sequence_length", head_dim])
            )

    # transformers scales token rows by sqrt(H) in the weight dtype; image rows arrive divided by it.
    h = g.op("Mul", "inputs_embeds", g.const("embed_scale", np.array(hidden**0.5, np.float32)))
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))).astype(np.float32)
    positions = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.const("axes", np.array([-1], np.int64)))
    freqs = g.op("Mul", positions, g.const("inv_freq", inv_freq))  # [B,T,D/2]
    angles = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const("axes", np.array([2], np.int64)))  # [B,T,1,D]
    cos, sin = g.op("Cos", angles), g.op("Sin", angles)
    seq_len = g.op("Gather", g.op("Shape", "inputs_embeds"), g.const("index", np.array(1, np.int64)), axis=0)
    bias = None
    if window and any(sliding):
        bias = _window_bias(g, "seqlens_k", "total_sequence_length", seq_len, window)

    # transformers' Gemma2Attention / GemmaAttention scaling.
    scale = (cfg.query_pre_attn_scalar if gemma2 else head_dim) ** -0.5
    softcap = (cfg.attn_logit_softcapping if gemma2 else None) or 0.0
    for i, layer in enumerate(text.layers):
        attn = layer.self_attn
        x = _rms_norm(g, h, layer.input_layernorm.weight, eps)
        q, k, v = (
            _linear(g, x, proj, f"layers.{i}.{name}")
            for name, proj in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj))
        )
        q, k = _rotary(g, q, heads, head_dim, cos, sin), _rotary(g, k, kv_heads, head_dim, cos, sin)
        gqa_inputs = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length"]
        if bias is not None and sliding[i]:
            gqa_inputs += ["", "", "", bias]  # cos_cache, sin_cache, position_ids unused: no rotary in the op
        out, _, _ = g.op(
            "GroupQueryAttention",
            *gqa_inputs,
            outputs=[g.name("attention"), f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN,
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=float(scale),
            softcap=float(softcap),
            causal=0,
            do_rotary=0,
            local_window_size=-1,
        )
        o = _linear(g, out, attn.o_proj, f"layers.{i}.o_proj")
        if gemma2:
            h = g.op("Add", h, _rms_norm(g, o, layer.post_attention_layernorm.weight, eps))
            x = _rms_norm(g, h, layer.pre_feedforward_layernorm.weight, eps)
        else:  # Gemma: the attention output joins the residual as it is; the MLP's norm is "post_attention"
            h = g.op("Add", h, o)
            x = _rms_norm(g, h, layer.post_attention_layernorm.weight, eps)
        gate = g.op("MatMul", x, g.const(f"layers.{i}.gate_proj", g.source.matrix(layer.mlp.gate_proj.weight)))
        up = g.op("MatMul", x, g.const(f"layers.{i}.up_proj", g.source.matrix(layer.mlp.up_proj.weight)))
        act = g.op("Mul", g.op("Gelu", gate, approximate=GELU[activation(cfg)]), up)
        down = g.op("MatMul", act, g.const(f"layers.{i}.down_proj", g.source.matrix(layer.mlp.down_proj.weight)))
        h = g.op("Add", h, _rms_norm(g, down, layer.post_feedforward_layernorm.weight, eps) if gemma2 else down)

    h = _rms_norm(g, h, text.norm.weight, eps)
    last = g.op(
        "Slice",
        h,
        g.const("start", np.array([-1], np.int64)),
        g.const("end", np.array([np.iinfo(np.int64).max], np.int64)),
        g.const("axis", np.array([1], np.int64)),
    )
    logits = g.op("MatMul", last, g.const("lm_head", g.source.matrix(model.lm_head.weight)))
    cap = cfg.final_logit_softcapping if gemma2 else None
    if cap:
        capped = g.op("Tanh", g.op("Div", logits, g.const("final_cap", np.array(cap, np.float32))))
        logits = g.op("Mul", capped, g.const("final_cap", np.array(cap, np.float32)))
    g.op("Identity", logits, outputs=["logits"])

    graph = helper.make_graph(g.nodes, "paligemma_decoder_gqa", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10, producer_name="paligemma-onnx")


def check_case(model, length: int = 5):
    """A prompt of `length` positions from position 0 for `check.check_graph`: this graph's feeds,
    and the portable decoder's module and arguments that compute the same outputs (no padding,
    every position a prompt token)."""
    import torch

    from .decoder import DecoderWithPast

    cfg = model.config.text_config
    embeds = torch.randn(1, length, cfg.hidden_size)
    positions = torch.arange(1, length + 1)[None]
    past = tuple(torch.zeros(1, cfg.num_key_value_heads, 0, cfg.head_dim) for _ in range(2 * cfg.num_hidden_layers))
    feeds = {
        "inputs_embeds": embeds.numpy(),
        "position_ids": positions.numpy(),
        "seqlens_k": np.array([length - 1], np.int32),
        "total_sequence_length": np.array(length, np.int32),
        **{f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": p.numpy() for i, p in enumerate(past)},
    }
    ones = torch.ones(1, length, dtype=torch.int64)
    return feeds, DecoderWithPast(model), (embeds, ones, torch.zeros_like(ones), positions, past)


def export(model, path: Path, weights: Weights | None = None) -> Path:
    """Build and save, the weights in `<name>.data` beside the graph when they pass
    `graph.EXTERNAL_ABOVE` (the text model's parameters, in float32, are the graph's weights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    weight_bytes = 4 * sum(p.numel() for p in model.model.language_model.parameters())
    if weight_bytes <= EXTERNAL_ABOVE:
        onnx.save_model(build(model, weights=weights), str(path))
    else:
        with open(path.with_name(path.name + ".data"), "wb") as data:
            proto = build(model, data, weights)
        onnx.save_model(proto, str(path))
    report_written(path, start)
    return path
