"""`convert --quantize int8,int4`: the quantized decoders load with fp32 I/O and stay measurably close,
on this CPU and on an emulated AVX2 CPU without VNNI (`avx2.py`).

The tiny checkpoints are shaped to give varied greedy output, which also makes them chaotic: one
flipped argmax changes the rest of a row. So token identity is not expected; agreement with fp32
transformers is measured and held above the floors below (measured value, then a margin).
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from export import cpu, fixtures, manifest, quantize
from export.graph import ALIGN
from export.runtime import OnnxPaliGemma
from export.validate import Agreement, agreement, greedy_references

from . import avx2
from .conftest import FIGURES, community_layout, converted_dir, shared_images

REPO = Path(__file__).resolve().parents[2]

MAX_NEW_TOKENS = 40
QUANTIZE = ["int8", "q4"]
CONFIGS = ("gqa1", "window8")
# Measured (onnxruntime 1.31.1, 9 images x 7 prompts x 40 steps) on an AMD EPYC with avx512_vnni /
# on qemu's EPYC-Milan (avx2 only): teacher-forced top-1 agreement gqa1 int8 0.918 / 0.916, q4 0.520
# / 0.523; window8 int8 0.938 / 0.939, q4 0.542 / 0.542. Whole greedy rows identical, on both: gqa1
# int8 0.46, q4 0.14; window8 int8 0.63, q4 0.33 (29 of gqa1's 63 int8 rows: one row above its floor).
# The int8 format before MatMulNBits (int8 weights in DynamicQuantizeMatMul) measured 0.924 / 0.941
# with VNNI and 0.675 / 0.405 on AVX2: the floors are those of the VNNI machine (docs/QUANTIZATION.md).
# Both decoder flavours of a conversion are quantized (quantize.QUANTIZED_GRAPHS).
DECODERS = ("decoder", "decoder_gqa")
FLOORS = {
    "int8": {"teacher_forced": 0.90, "rows_identical": 0.45},
    "q4": {"teacher_forced": 0.45, "rows_identical": 0.10},
}


# Session-scoped: the tests of one configuration share a worker (the repository's conftest.py),
# which interleaves them with other modules' tests; a module-scoped fixture would be made again
# after each switch.
@pytest.fixture(scope="session", params=CONFIGS)
def quantized(request, tiny_root):
    conv = converted_dir(tiny_root, request.param, quantize_to=tuple(QUANTIZE))
    return conv.name, conv.source, conv.onnx_dir


@pytest.fixture(scope="session")
def references(quantized, tmp_path_factory):
    """transformers fp32 greedy tokens for every shared image with every search prompt."""
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    _, source, out = quantized
    model = PaliGemmaForConditionalGeneration.from_pretrained(source, attn_implementation="eager").eval()
    images = [Image.open(p) for p in shared_images()]
    refs = greedy_references(model, AutoProcessor.from_pretrained(source), images, fixtures.SEARCH_PROMPTS, MAX_NEW_TOKENS)
    # The same measurement on the fp32 graphs is exact: the method, not the graphs, cannot be the gap.
    control = agreement(OnnxPaliGemma(out), refs, MAX_NEW_TOKENS)
    assert (control.teacher_forced, control.rows_identical) == (1.0, 1.0), control
    # For the run under the emulated CPU, which computes no reference of its own.
    path = tmp_path_factory.mktemp("refs") / "references.pkl"
    with open(path, "wb") as f:
        pickle.dump((refs, MAX_NEW_TOKENS), f)
    return refs, path


def io_signature(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output]]


def test_manifest_lists_quantized_decoders_and_fp32_for_the_rest(quantized):
    _, _, out = quantized
    m = manifest.read_manifest(out)
    assert m["dtypes"] == ["fp32", *QUANTIZE]
    for dtype in QUANTIZE:
        for decoder in DECODERS:
            assert m["graphs"][decoder][dtype] == manifest.graph_path(decoder, dtype)
            assert (out / m["graphs"][decoder][dtype]).is_file()
        for graph in ("vision_encoder", "embed_tokens"):
            assert m["graphs"][graph][dtype] == m["graphs"][graph]["fp32"]
    assert manifest.graph_path("decoder", "q4").endswith("decoder_model_merged_q4.onnx")
    assert manifest.graph_path("decoder", "int8").endswith("decoder_model_merged_int8.onnx")
    assert manifest.graph_path("decoder_gqa", "q4").endswith("decoder_model_gqa_q4.onnx")


@pytest.mark.parametrize("decoder", DECODERS)
def test_quantized_decoders_keep_the_fp32_inputs_and_outputs(quantized, decoder):
    """Names and element types unchanged, so the runtimes' graph checks hold for every dtype."""
    _, _, out = quantized
    fp32 = io_signature(out / manifest.graph_path(decoder, "fp32"))
    for dtype in QUANTIZE:
        assert io_signature(out / manifest.graph_path(decoder, dtype)) == fp32, dtype


@pytest.mark.parametrize("decoder", DECODERS)
def test_quantized_decoders_really_hold_quantized_weights(quantized, decoder):
    """Every MatMul with a constant weight is rewritten, the vocabulary projection included."""
    _, _, out = quantized
    fp32 = onnx.load(str(out / manifest.graph_path(decoder, "fp32")))
    weights = {t.name for t in fp32.graph.initializer}
    matmul_weights = {n.input[1] for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    constant_matmuls = sum(n.op_type == "MatMul" and n.input[1] in weights for n in fp32.graph.node)
    assert constant_matmuls > 0
    for dtype, bits in (("int8", 8), ("q4", 4)):
        graph = onnx.load(str(out / manifest.graph_path(decoder, dtype))).graph
        names = {t.name for t in graph.initializer}
        rewritten = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert len(rewritten) == constant_matmuls, dtype
        assert all(helper.get_node_attr_value(n, "bits") == bits for n in rewritten), dtype
        assert manifest.read_manifest(out)["quantization"][dtype] == {**quantize.WEIGHT_FORMATS[dtype], "graphs": list(DECODERS)}
        assert not any(n.op_type == "MatMul" and n.input[1] in names for n in graph.node), dtype
        assert not names & matmul_weights, f"{dtype}: fp32 weights left behind"
    sizes = {d: (out / manifest.graph_path(decoder, d)).stat().st_size for d in ["fp32", *QUANTIZE]}
    assert sizes["q4"] < sizes["int8"], sizes
    # Not the GroupQueryAttention graph's int8 against its fp32: at window8's hidden size of 32
    # the int8 blocks of 128 are three quarters padding, and that graph holds nothing but its weights.
    assert decoder != "decoder" or sizes["int8"] < sizes["fp32"], sizes


@pytest.mark.parametrize("dtype", QUANTIZE)
def test_external_data_quantizes_to_the_same_graph(quantized, dtype, tmp_path, monkeypatch):
    """The streaming path (weights read and written one at a time through .onnx.data, page-aligned)
    gives the graph the in-memory path gives."""
    import numpy as np

    _, _, out = quantized
    src = out / manifest.graph_path("decoder", "fp32")
    inline = quantize.quantize_graph(src, tmp_path / "inline" / "d.onnx", dtype)
    monkeypatch.setattr(quantize, "EXTERNAL_ABOVE", 0)
    external = quantize.quantize_graph(src, tmp_path / "external" / "d.onnx", dtype)
    data = external.with_name("d.onnx.data")
    assert data.is_file() and not inline.with_name("d.onnx.data").exists()
    offsets = [
        int(e.value)
        for t in onnx.load(str(external), load_external_data=False).graph.initializer
        for e in t.external_data
        if e.key == "offset"
    ]
    assert offsets and all(o % ALIGN == 0 for o in offsets)
    m = manifest.read_manifest(out)
    rng = np.random.default_rng(0)
    kv = (1, m["num_key_value_heads"], 0, m["head_dim"])
    feeds = {
        "inputs_embeds": rng.standard_normal((1, 5, m["hidden_size"]), dtype=np.float32),
        "attention_mask": np.ones((1, 5), np.int64),
        "token_type_ids": np.zeros((1, 5), np.int64),
        "position_ids": np.arange(1, 6)[None],
        **{f"past_key_values.{i}.{k}": np.zeros(kv, np.float32) for i in range(m["num_hidden_layers"]) for k in ("key", "value")},
    }

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    np.testing.assert_array_equal(run(inline), run(external))


def assert_above_floors(got: Agreement, dtype: str, name: str, cpu_label: str):
    FIGURES.append(
        f"{dtype} {name} on {cpu_label}: teacher-forced top-1 {got.teacher_forced:.1%} over {got.positions} positions, "
        f"greedy tokens {got.greedy:.1%}, rows identical {got.rows_identical:.0%} of {got.rows} rows "
        f"(floors {FLOORS[dtype]['teacher_forced']:.0%} / {FLOORS[dtype]['rows_identical']:.0%})"
    )
    assert got.positions >= 500
    assert got.teacher_forced >= FLOORS[dtype]["teacher_forced"], cpu_label
    assert got.rows_identical >= FLOORS[dtype]["rows_identical"], cpu_label


@pytest.mark.parametrize("dtype", QUANTIZE)
def test_next_token_agreement_with_fp32_under_teacher_forcing(quantized, references, dtype):
    name, _, out = quantized
    assert_above_floors(agreement(OnnxPaliGemma(out, dtype=dtype), references[0], MAX_NEW_TOKENS), dtype, name, cpu.describe())


@pytest.mark.parametrize("dtype", QUANTIZE)
def test_the_same_agreement_on_an_avx2_cpu_without_vnni(quantized, references, dtype):
    """The floors hold where int8 dot products have no VNNI: the CPU the int8-weight format failed on."""
    name, _, out = quantized
    done = avx2.run([sys.executable, "-m", "export.tests.avx2", "agreement", str(out), dtype, str(references[1])])
    assert done.returncode == 0, done.stderr
    assert_above_floors(Agreement(**json.loads(done.stdout.splitlines()[-1])), dtype, name, avx2.LABEL)


def matmul_graph(path: Path, k: int, n: int, weight: np.ndarray) -> Path:
    """An fp32 graph Y = A @ W with W [k, n] constant, as the exporter writes MatMuls."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="matmul")],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def int8_weight_rewrite(node, weight_name: str, source, weight, fmt: dict, writer):
    """The int8 format of manifest version 1 (export/quantize.py until MatMulNBits): symmetric int8
    weights per output column in DynamicQuantizeMatMul, the `--quantize-vision` format at 8 bits.
    Kept here to test how the binary runs it."""
    return quantize._per_column(node, weight_name, source.array(weight), 8, writer)


def saturating_case(work: str) -> dict[str, float]:
    """A row of ones (uint8 255 after DynamicQuantizeMatMul's quantization, int8 127 after
    MatMulNBits') against weights all equal to the largest: 64 products whose pairs, summed in 16
    bits, pass 32767. The exact answer is 63 (the first input is 0)."""

    work = Path(work)
    a = np.ones((1, 64), np.float32)
    a[0, 0] = 0
    fp32 = matmul_graph(work / "fp32.onnx", 64, 4, np.ones((64, 4), np.float32))
    int8 = quantize.quantize_graph(fp32, work / "int8.onnx", "int8")
    vision = quantize.quantize_graph(fp32, work / "vision.onnx", "int8", quantize.VISION_FORMAT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "_rewrite", int8_weight_rewrite)
        version1 = quantize.quantize_graph(fp32, work / "version1.onnx", "int8")
    repaired = ort.SessionOptions()
    repaired.add_session_config_entry("session.x64quantprecision", "1")

    def run(path, options=None):
        return float(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"A": a})[0][0, 0])

    return {
        "int8": run(int8),
        "vision 7-bit": run(vision),
        "version 1 int8": run(version1),
        "version 1 int8, session.x64quantprecision": run(version1, repaired),
    }


def test_the_emulated_cpu_saturates_int8_weight_kernels_where_this_int8_format_is_exact(tmp_path):
    """The control for the tests under emulation: there, ONNX Runtime really runs the kernel that
    saturates (the version 1 int8 format turns 63 into about 32), and ONNX Runtime's rewrite to
    uint8 (session.x64quantprecision) repairs it. This converter's int8, and the 7-bit weights of
    `--quantize-vision` in that same saturating kernel, are exact on both CPUs. On
    both, export.cpu predicts what ONNX Runtime does (under qemu-user /proc/cpuinfo is the host's,
    so the probe must read CPUID)."""
    script = (
        f"from export.tests.test_quantize import saturating_case; from export import cpu; import json; "
        f"print(json.dumps({{**saturating_case({str(tmp_path)!r}), 'predicted': cpu.int8_weight_kernels_saturate()}}))"
    )
    done = avx2.run([sys.executable, "-c", script])
    assert done.returncode == 0, done.stderr
    emulated = json.loads(done.stdout.splitlines()[-1])
    assert emulated["version 1 int8"] == pytest.approx(32.37, abs=0.01), emulated
    assert emulated["version 1 int8, session.x64quantprecision"] == pytest.approx(63, rel=1e-3), emulated
    assert emulated["int8"] == pytest.approx(63, rel=1e-3), emulated
    assert emulated["vision 7-bit"] == pytest.approx(63, rel=1e-3), emulated
    assert emulated["predicted"] is True, emulated
    native = saturating_case(str(tmp_path))
    assert native["int8"] == pytest.approx(63, rel=1e-3)
    saturates = native["version 1 int8"] != pytest.approx(63, rel=1e-3)
    assert cpu.int8_weight_kernels_saturate() == saturates, (cpu.describe(), native)


def version1_copies(out: Path, dst: Path, monkeypatch) -> tuple[Path, Path]:
    """Two copies of the conversion `out` with an int8 decoder of manifest version 1: `version1`
    holds it as written then (int8 weights, no `quantization` record); `twin` holds the same integers
    as uint8 with zero point 128 and records it, which ONNX Runtime computes exactly on every CPU."""
    version1, twin = dst / "version1", dst / "twin"
    shutil.copytree(out, version1)
    decoder = version1 / manifest.graph_path("decoder", "int8")
    monkeypatch.setattr(quantize, "_rewrite", int8_weight_rewrite)
    quantize.quantize_graph(version1 / manifest.graph_path("decoder", "fp32"), decoder, "int8")
    monkeypatch.undo()
    m = manifest.read_manifest(version1)
    recorded = m.pop("quantization")
    m["format_version"] = 1
    # Version 1 had one decoder, the portable one: no GroupQueryAttention flavour (format 3).
    for file in m["graphs"].pop("decoder_gqa").values():
        (version1 / file).unlink(missing_ok=True)
    m["files"] = [f for f in m["files"] if (version1 / f).is_file()]
    m["file_sizes"] = {f: m["file_sizes"][f] for f in m["files"]}
    recorded = {q: {**record, "graphs": ["decoder"]} for q, record in recorded.items()}
    (version1 / "manifest.json").write_text(json.dumps(m, indent=2))

    shutil.copytree(version1, twin)
    model = onnx.load(str(twin / manifest.graph_path("decoder", "int8")))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DynamicQuantizeMatMul":
            weight = inits[node.input[1]]
            shifted = numpy_helper.to_array(weight).astype(np.int16) + 128
            weight.CopyFrom(numpy_helper.from_array(shifted.astype(np.uint8), weight.name))
            zero_point = numpy_helper.from_array(np.full(shifted.shape[1], 128, np.uint8), f"{weight.name}_zero_point")
            model.graph.initializer.append(zero_point)
            node.input.append(zero_point.name)
    onnx.save(model, str(twin / manifest.graph_path("decoder", "int8")))
    m = {
        **m,
        "format_version": manifest.FORMAT_VERSION,
        "quantization": {**recorded, "int8": {"op": "DynamicQuantizeMatMul", "weight_type": "uint8", "graphs": ["decoder"]}},
    }
    (twin / "manifest.json").write_text(json.dumps(m, indent=2))
    return version1, twin


def int8_caption_argv(binary: Path, model: Path, image: str) -> list[str]:
    """`paligemma` captioning `image` with the int8 graphs, MAX_NEW_TOKENS long, as JSON."""
    tokens = str(MAX_NEW_TOKENS)
    run = ["--model", str(model), "--image", image, "--prompt", "caption en", "--dtype", "int8"]
    return [str(binary), *run, "--max-new-tokens", tokens, "--min-new-tokens", tokens, "--json"]


def test_version1_int8_conversions_run_exactly_on_a_cpu_without_vnni(quantized, references, tmp_path, monkeypatch):
    """Conversions made before MatMulNBits (manifest version 1: int8 weights in DynamicQuantizeMatMul):
    on a CPU without VNNI the binary runs them with ONNX Runtime's exact kernels and warns once, and
    the Python loop runs them the same way. Their tokens are those of the same integers as uint8
    weights, which no CPU computes wrongly."""
    binary = REPO / "target" / "release" / "paligemma"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: build it with `cargo build --release` (.ci/setup does)")
    _, _, out = quantized
    version1, twin = version1_copies(out, tmp_path, monkeypatch)
    image = str(shared_images()[0])

    def caption(model, emulated: bool):
        argv = int8_caption_argv(binary, model, image)
        done = avx2.run(argv) if emulated else subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["token_ids"], [line for line in done.stderr.splitlines() if line.startswith("warning:")]

    expected, warnings = caption(twin, emulated=False)
    assert warnings == []
    assert caption(twin, emulated=True) == (expected, [])
    tokens, warnings_emulated = caption(version1, emulated=True)
    assert tokens == expected
    assert len(warnings_emulated) == 1, warnings_emulated
    for needle in (
        "decoder_model_merged_int8.onnx",
        "avx512_vnni",
        "avx_vnni",
        "session.x64quantprecision",
        "--quantize int8",
        "--dtype fp32",
    ):
        assert needle in warnings_emulated[0], (needle, warnings_emulated[0])
    tokens, warnings = caption(version1, emulated=False)
    assert tokens == expected
    assert len(warnings) == int(cpu.int8_weight_kernels_saturate()), (cpu.describe(), warnings)
    # `paligemma bench` times that path, and its report says so.
    done = avx2.run(
        [
            str(binary),
            "bench",
            "--model",
            str(version1),
            "--image",
            image,
            "--dtype",
            "int8",
            "--tokens",
            "2",
            "--long-tokens",
            "24",
            "--batch",
            "1",
        ]
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["warnings"] == [warnings_emulated[0].removeprefix("warning: ")]

    # The Python loop (the reference, and the benchmark's agreement figures), the whole search set.
    done = avx2.run([sys.executable, "-m", "export.tests.avx2", "agreement", str(version1), "int8", str(references[1])])
    assert done.returncode == 0, done.stderr
    emulated = Agreement(**json.loads(done.stdout.splitlines()[-1]))
    assert emulated == agreement(OnnxPaliGemma(twin, dtype="int8"), references[0], MAX_NEW_TOKENS)


def test_community_int8_and_q8_graphs_run_exactly_on_a_cpu_without_vnni(tiny_root):
    """transformers.js' 8-bit graphs (export/community.py builds them as its quantize script does)
    hold int8 weights in MatMulInteger, and no manifest says so: the binary reads it from the
    layout's dtype names, and where the kernels saturate runs those graphs with ONNX Runtime's
    exact uint8 kernels, warning once per graph (int8: vision encoder and decoder; q8: the decoder,
    its vision encoder has uint8 weights). On the emulated AVX2 CPU and here, its tokens are ONNX
    Runtime's Python API's with exact kernels (tests/community_reference.py)."""
    binary = REPO / "target" / "release" / "paligemma"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: build it with `cargo build --release` (.ci/setup does)")
    layout = community_layout(tiny_root, "gqa1", ("fp32", "int8", "q8"))
    image = str(shared_images()[0])
    for dtype, suffix, int8_graphs in (("int8", "_int8", 2), ("q8", "_quantized", 1)):
        script = [sys.executable, str(REPO / "tests" / "community_reference.py"), str(layout), suffix, suffix, suffix]
        done = subprocess.run([*script, str(MAX_NEW_TOKENS), image, "caption en"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        (expected,) = json.loads(done.stdout)
        argv = [str(binary), "--model", str(layout), "--image", image, "--prompt", "caption en", "--dtype", dtype]
        argv += ["--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]
        native = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        for done, saturates in ((avx2.run(argv), True), (native, cpu.int8_weight_kernels_saturate())):
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["token_ids"] == expected, (dtype, saturates)
            warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
            assert len(warnings) == (int8_graphs if saturates else 0), (dtype, warnings)
            assert all("transformers.js" in w and "--dtype q4" in w for w in warnings), warnings


def test_int8_tokens_are_the_same_on_an_avx2_cpu(quantized):
    """This converter's int8 through the binary, here and on the emulated CPU."""
    _, _, out = quantized
    assert_int8_tokens_are_the_same_on_an_avx2_cpu(out)


def assert_int8_tokens_are_the_same_on_an_avx2_cpu(out: Path):
    """The binary's int8 caption of the first shared image on `out`, here and on the emulated CPU:
    the same token ids, no warning."""
    binary = REPO / "target" / "release" / "paligemma"
    argv = int8_caption_argv(binary, out, str(shared_images()[0]))
    here = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    emulated = avx2.run(argv)
    assert here.returncode == 0 and emulated.returncode == 0, here.stderr + emulated.stderr
    assert json.loads(emulated.stdout)["token_ids"] == json.loads(here.stdout)["token_ids"]
    assert "warning:" not in here.stderr + emulated.stderr
