"""decoder_model_gqa.onnx against the portable decoder on the three tiny configurations: a prompt's
prefill, then decode steps of rows of different lengths (past the sliding window of 8), batched in
one buffer whose rows start at 0; logits within 1e-4 of the portable graph run row by row, and the
new keys written in place when past and present share one buffer (IOBinding)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import decoder_gqa, graph
from export.tests.conftest import FIGURES, converted_dir

STEPS = 12
PROMPTS = (23, 9, 16)  # every one longer than window8's window; window40's is passed by none
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def graphs(converted, reference, tmp_path_factory):
    model, _ = reference
    path = decoder_gqa.export(model, tmp_path_factory.mktemp("gqa") / "decoder_model_gqa.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    portable = ort.InferenceSession(str(converted.onnx_dir / "onnx/decoder_model_merged.onnx"), options, providers=["CPUExecutionProvider"])
    gqa = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return converted.name, model.config.text_config, portable, gqa


def empty_past(cfg, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, cfg.num_key_value_heads, 0, cfg.head_dim)
    return {f"past_key_values.{i}.{k}": np.zeros(shape, np.float32) for i in range(cfg.num_hidden_layers) for k in ("key", "value")}


def presents(cfg, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    names = [f"past_key_values.{i}.{k}" for i in range(cfg.num_hidden_layers) for k in ("key", "value")]
    return dict(zip(names, outputs[1:]))


def portable_run(cfg, session, embeds: np.ndarray, steps: list[np.ndarray]) -> list[np.ndarray]:
    """The portable graph alone on one row: the prefill, then one run per step embedding."""
    length = embeds.shape[1]
    outputs = session.run(
        None,
        {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((1, length), np.int64),
            "token_type_ids": np.zeros((1, length), np.int64),
            "position_ids": np.arange(1, length + 1, dtype=np.int64)[None],
            **empty_past(cfg, 1),
        },
    )
    logits, past = [outputs[0][:, -1]], presents(cfg, outputs)
    types = np.zeros((1, length), np.int64)
    for k, step in enumerate(steps):
        total = length + k + 1
        types = np.concatenate([types, np.ones((1, 1), np.int64)], axis=1)
        outputs = session.run(
            None,
            {
                "inputs_embeds": step,
                "attention_mask": np.ones((1, total), np.int64),
                "token_type_ids": types,
                "position_ids": np.array([[total]], np.int64),
                **past,
            },
        )
        logits.append(outputs[0][:, -1])
        past = presents(cfg, outputs)
    return logits


def gqa_prefill(cfg, session, embeds: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    length = embeds.shape[1]
    outputs = session.run(
        None,
        {
            "inputs_embeds": embeds,
            "position_ids": np.arange(1, length + 1, dtype=np.int64)[None],
            "seqlens_k": np.array([length - 1], np.int32),
            "total_sequence_length": np.array(length, np.int32),
            **empty_past(cfg, 1),
        },
    )
    return outputs[0][:, -1], presents(cfg, outputs)


def test_gqa_logits_equal_the_portable_graph_alone_and_batched_in_place(graphs):
    config, cfg, portable, gqa = graphs
    rng = np.random.default_rng(0)
    prompts = [rng.normal(0, 0.5, (1, n, cfg.hidden_size)).astype(np.float32) for n in PROMPTS]
    steps = [[rng.normal(0, 0.5, (1, 1, cfg.hidden_size)).astype(np.float32) for _ in range(STEPS)] for _ in PROMPTS]
    expected = [portable_run(cfg, portable, p, s) for p, s in zip(prompts, steps)]

    # Each row prefilled alone, then its positions copied to the start of its row of one buffer.
    capacity = max(PROMPTS) + STEPS
    shape = (len(PROMPTS), cfg.num_key_value_heads, capacity, cfg.head_dim)
    buffers = {name: np.full(shape, 777.0, np.float32) for name in empty_past(cfg, 1)}
    worst = 0.0
    for row, prompt in enumerate(prompts):
        first, past = gqa_prefill(cfg, gqa, prompt)
        worst = max(worst, float(np.abs(first - expected[row][0]).max()))
        for name, value in past.items():
            buffers[name][row, :, : prompt.shape[1]] = value[0]

    binding = gqa.io_binding()
    binding.bind_output("logits")  # first: copy_outputs_to_cpu lists outputs in binding order
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in buffers.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
    lengths = np.array(PROMPTS)
    for k in range(STEPS):
        embeds = np.concatenate([s[k] for s in steps], axis=0)
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("position_ids", (lengths + 1)[:, None].astype(np.int64))
        binding.bind_cpu_input("seqlens_k", lengths.astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(lengths.max() + 1, np.int32))
        gqa.run_with_iobinding(binding)
        logits = binding.copy_outputs_to_cpu()[0][:, -1]
        for row in range(len(PROMPTS)):
            worst = max(worst, float(np.abs(logits[row] - expected[row][k + 1][0]).max()))
        lengths += 1
    FIGURES.append(f"{config}: GroupQueryAttention decoder vs portable, max |logit difference| {worst:.1e}")
    assert worst < TOLERANCE, f"GroupQueryAttention decoder differs from the portable one by {worst:.2e}"

    # The steps wrote into the shared buffer itself, each row at its own positions, nothing after.
    key = values["past_key_values.0.key"].numpy()
    for row, n in enumerate(PROMPTS):
        written = key[row, :, : n + STEPS]
        assert not np.any(written == 777.0), f"row {row}: positions before {n + STEPS} not written"
        assert np.all(key[row, :, n + STEPS :] == 777.0), f"row {row}: written past its length"


def test_weights_past_the_protobuf_limit_stream_to_external_data(tiny_root, tmp_path, monkeypatch):
    """A decoder too big for one protobuf (here: any) writes each weight to `<graph>.data` as it is
    built, page-aligned, and gives the same logits as the one-file graph."""
    from transformers import PaliGemmaForConditionalGeneration

    source = converted_dir(tiny_root, "gqa1").source
    model = PaliGemmaForConditionalGeneration.from_pretrained(source, attn_implementation="eager").eval()
    cfg = model.config.text_config
    inline = ort.InferenceSession(str(decoder_gqa.export(model, tmp_path / "inline" / "decoder_model_gqa.onnx")))
    monkeypatch.setattr(decoder_gqa, "EXTERNAL_ABOVE", 0)
    path = decoder_gqa.export(model, tmp_path / "streamed" / "decoder_model_gqa.onnx")
    data = path.with_name("decoder_model_gqa.onnx.data")
    assert data.stat().st_size > path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in external]
    assert external and all(offset % graph.ALIGN == 0 for offset in offsets)
    streamed = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeds = np.random.default_rng(1).normal(0, 0.5, (1, 7, cfg.hidden_size)).astype(np.float32)
    assert np.array_equal(gqa_prefill(cfg, streamed, embeds)[0], gqa_prefill(cfg, inline, embeds)[0])


def test_layouts_the_builder_or_kernel_cannot_run_get_no_gqa_decoder(reference):
    """ONNX Runtime's GroupQueryAttention refuses head sizes that are not multiples of 8 when it
    runs, and query heads that do not group over the KV heads; the builder writes gelu and default
    RoPE only: such a checkpoint converts with the portable decoder only (convert.py asks
    `supported`)."""
    import copy

    cfg = reference[0].config.text_config
    assert decoder_gqa.supported(cfg) is None
    odd = copy.copy(cfg)
    odd.head_dim = 20
    assert "head_dim 20" in decoder_gqa.supported(odd)
    ungrouped = copy.copy(cfg)
    ungrouped.num_attention_heads, ungrouped.num_key_value_heads = 3, 2
    assert "KV heads" in decoder_gqa.supported(ungrouped)
    relu = copy.copy(cfg)
    # Gemma 2 names it hidden_activation, Gemma (PaliGemma 1) hidden_act.
    setattr(relu, "hidden_activation" if decoder_gqa.is_gemma2(cfg) else "hidden_act", "relu")
    assert "hidden activation 'relu'" in decoder_gqa.supported(relu)
    scaled = copy.copy(cfg)
    scaled.rope_parameters = {**cfg.rope_parameters, "rope_type": "linear", "factor": 2.0}
    assert "rope_type 'linear'" in decoder_gqa.supported(scaled)


def test_projection_biases_are_kept(tiny_root, tmp_path):
    """A text config with `attention_bias` (q/k/v/o biases, off in the released checkpoints): the
    built graph's prefill logits equal the exported module's (decoder.py) run in torch."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    from export import decoder

    config = PaliGemmaConfig.from_pretrained(converted_dir(tiny_root, "gqa1").source)
    config.text_config.attention_bias = True
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
                proj.bias.normal_(0, 0.5)
    cfg = config.text_config
    session = ort.InferenceSession(str(decoder_gqa.export(model, tmp_path / "decoder_model_gqa.onnx")))
    embeds = np.random.default_rng(2).normal(0, 0.5, (1, 9, cfg.hidden_size)).astype(np.float32)
    got, _ = gqa_prefill(cfg, session, embeds)
    spec = decoder.spec(model)
    past = tuple(torch.zeros(1, cfg.num_key_value_heads, 0, cfg.head_dim) for _ in range(2 * cfg.num_hidden_layers))
    with torch.no_grad():
        want = spec.module(
            torch.from_numpy(embeds),
            torch.ones(1, 9, dtype=torch.int64),
            torch.zeros(1, 9, dtype=torch.int64),
            torch.arange(1, 10)[None],
            past,
        )[0][:, -1].numpy()
    assert np.abs(got - want).max() < TOLERANCE
