"""`python -m export fixtures`: the greedy tokens the Rust parity tests compare against.

Steps:
 1. for each of the test configurations (`tiny.TEST_CONFIGS`) write the tiny checkpoint to
    MODELS_ROOT/<name>/source and convert it, with a random seg decoder, to MODELS_ROOT/<name>/onnx;
    a step whose stamp (spec, seed, exporter code, package versions) is unchanged is skipped;
 2. run every case as one padded batch through transformers `generate(do_sample=False)` (eager
    attention, fp32, as `validate.compare` does) and through the reference ONNX loop (`runtime.py`);
    any token difference between the two is an error, not a fixture. fp16 graphs round every
    activation, so their cases (`dtype: fp16`) hold the ONNX loop's tokens on those graphs, checked
    to start with transformers' fp32 token; they test that the Rust runtime drives fp16 graphs
    exactly as ONNX Runtime's Python API does;
 3. write tests/fixtures/expected_tokens.json, or with --check compare it with the committed file.

Image paths in the file are relative to the repository root; `model_dir` is relative to MODELS_ROOT
(the Rust tests read it from env PALIGEMMA_TEST_MODELS, default target/tiny-models).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from . import community
from .errors import ExportError
from .tiny import TEST_CONFIGS, TEST_SEEDS, write_random_vae, write_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILE = REPO_ROOT / "tests" / "fixtures" / "expected_tokens.json"
GENERATOR = "python -m export fixtures"
MAX_NEW_TOKENS = 24
VAE_SEED = 3

# Copies of ../shared/images, so the Rust tests need nothing outside the repository.
IMAGES_DIR = "tests/data/images"
CHELSEA, CAMERA, ROCKET, TEXT = (f"{IMAGES_DIR}/{f}" for f in ("chelsea.png", "camera.png", "rocket.jpg", "text.png"))
# One image per decoder path the Rust preprocessor must match: PNG RGB, PNG grayscale, JPEG.
SINGLE_IMAGES = (CHELSEA, CAMERA, ROCKET)
# Every test image: the community layout's cases run each alone.
COMMUNITY_IMAGES = tuple(sorted(f"{IMAGES_DIR}/{p.name}" for p in (REPO_ROOT / IMAGES_DIR).iterdir() if p.suffix != ".md"))
# Prompts of three different token lengths, so the batch is left-padded unevenly.
BATCH3 = (
    (TEXT, "caption en"),
    (ROCKET, "answer en what is in the image ? how many people are there"),
    (CHELSEA, "detect cat ; dog ; car"),
)
# Candidates searched, in order, for the cases that need a property of the output (early <eos>,
# a generation long enough to pass the sliding window).
SEARCH_IMAGES = (CHELSEA, CAMERA, ROCKET, TEXT)
SEARCH_PROMPTS = (
    "caption en",
    "answer en what is in the image ? how many people are there",
    "detect cat ; dog ; car",
    "ocr",
    "segment the rocket",
    "describe en",
    "question en a red car",
)
# Prompts tried first for the sliding-window cases: long enough that window40's decode can pass 40.
WINDOW_PROMPTS = (
    "answer en what is in the image ? where is the rocket standing on the launch pad",
    "answer en where is the rocket standing ? is it on the launch pad ? how many people are there",
    "question en a cup of coffee on a table the astronaut smiles",
    *SEARCH_PROMPTS,
)
# Partners for the early-<eos> row: they must keep going after it stops.
LONG_PROMPTS = ("describe en", "caption en", "answer en what is in the image ? how many people are there")
WINDOW_CONFIGS = ("window8", "window40")
# Prompts holding the special tokens a user can type: the Rust encoder must lay them out as
# transformers' processor does (same ids) or refuse what the processor refuses. An empty prompt
# (or one that is only `<image>`) is left out: the processor accepts it, paligemma refuses it.
LAYOUT_CONFIG = "gqa1"
LAYOUT_PROMPTS = (
    "caption en",
    "<image>caption en",
    "<image> caption en",
    "caption <image> en",
    "caption en<image>",
    "<image>\ncaption en",
    "<image><image>caption en",
    "caption <image> en <image>",
    "<image><image><image>",
    "<bos>caption en",
    "<image><bos>caption en",
    "caption <bos> en",
    "<eos>caption",
    "<pad>x",
    "<unk> <mask>",
    "<loc0001><loc1023> detect",
    "<seg012> segment",
    "<image",
    "< image>",
    "<IMAGE>",
    "caption en\n",
    "\r\ncaption\ten\r\n",
    "caption 😀 ü",
)
# One batch whose prompts all place <image> themselves (transformers lays out a batch mixing
# prompts with and without it differently from each prompt alone).
LAYOUT_BATCH = (
    (CHELSEA, "<image>caption en"),
    (CAMERA, "caption <image> en"),
    (ROCKET, "<image><bos>detect cat"),
)


@dataclass(frozen=True)
class Request:
    image: str  # path relative to the repository root
    prompt: str


@dataclass
class Model:
    """One converted test configuration: transformers reference, processor, ONNX loop."""

    name: str
    onnx_dir: Path
    hf: object
    processor: object
    onnx: object
    fp16_dir: Path | None = None
    onnx_fp16: object = None

    @property
    def eos(self) -> set[int]:
        return set(self.onnx.m["eos_token_id"])


def _package_versions() -> dict[str, str]:
    return {pkg: metadata.version(pkg) for pkg in ("transformers", "torch", "onnx", "onnxscript", "onnxruntime")}


# Modules that run models but never write one: editing them must not force a reconversion.
# community.py writes only the community layout, stamped with its own digest.
NOT_IN_MODELS = {"__main__.py", "fixtures.py", "runtime.py", "validate.py", "community.py"}


def _export_code_digest() -> str:
    # Any change to the exporter may change the graphs or the weights: a cache keyed on the spec alone
    # would let a stale model write a file that a fresh checkout (CI) cannot reproduce.
    return _digest(*(p for p in sorted((REPO_ROOT / "export").glob("*.py")) if p.name not in NOT_IN_MODELS))


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def stamp(name: str) -> dict:
    """What a cached checkpoint or conversion of `name` must have been made from to be reused."""
    return {
        "tiny_spec": {"seed": TEST_SEEDS[name], **asdict(TEST_CONFIGS[name])},
        "vae_seed": VAE_SEED,
        "quantize": QUANTIZE.get(name, []),
        "export_code": _export_code_digest(),
        "versions": _package_versions(),
    }


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def prepare_models(models_root: Path, log=print) -> dict[str, tuple[Path, Path]]:
    """Checkpoint and conversion for every test configuration: name -> (source dir, onnx dir).

    A step is skipped when its stamp equals `stamp(name)` (and, for the checkpoint, its
    tiny_spec.json matches). Stamps are written after a step completes, so an interrupted run redoes it.
    """
    from .convert import convert

    models_root = Path(models_root)
    out = {}
    for name in sorted(TEST_CONFIGS):
        want = stamp(name)
        source, onnx_dir = models_root / name / "source", models_root / name / "onnx"
        source_stamp, onnx_stamp = models_root / name / "source.stamp.json", models_root / name / "onnx.stamp.json"
        if _read_json(source_stamp) == want and _read_json(source / "tiny_spec.json") == want["tiny_spec"]:
            log(f"{name}: checkpoint {source} is current")
        else:
            onnx_stamp.unlink(missing_ok=True)  # a new checkpoint invalidates its conversion
            write_tiny(source, TEST_CONFIGS[name], seed=TEST_SEEDS[name])
            source_stamp.write_text(json.dumps(want, indent=2))
            log(f"{name}: wrote checkpoint {source}")
        if _read_json(onnx_stamp) == want and (onnx_dir / "manifest.json").is_file():
            log(f"{name}: conversion {onnx_dir} is current")
        else:
            vae = write_random_vae(models_root / name / "vae-oid.npz", seed=VAE_SEED)
            convert(str(source), onnx_dir, seg_vae=vae, quantize_to=QUANTIZE.get(name, []), force=True)
            onnx_stamp.write_text(json.dumps(want, indent=2))
            log(f"{name}: converted to {onnx_dir}")
        fp16_dir, fp16_stamp = models_root / name / "onnx-fp16", models_root / name / "onnx-fp16.stamp.json"
        if name in FP16_CONFIGS and not (_read_json(fp16_stamp) == want and (fp16_dir / "manifest.json").is_file()):
            convert(str(source), fp16_dir, dtype="fp16", force=True)
            fp16_stamp.write_text(json.dumps(want, indent=2))
            log(f"{name}: converted to {fp16_dir} (fp16)")
        community_dir = models_root / name / COMMUNITY_DIR
        if name in COMMUNITY_CONFIGS and not community_is_current(community_dir, name):
            community.build(source, community_dir, COMMUNITY_DTYPES)
            community_dir.with_suffix(".stamp.json").write_text(json.dumps(community_stamp(name), indent=2))
            log(f"{name}: wrote the transformers.js layout (TorchScript, no manifest) to {community_dir}")
        out[name] = (source, onnx_dir)
    return out


def community_stamp(name: str) -> dict:
    """The stamp of `name`'s community layout: its checkpoint's and export/community.py's digests."""
    return {**stamp(name), "community": _digest(Path(__file__).with_name("community.py"))}


def community_is_current(community_dir: Path, name: str) -> bool:
    """Whether `community_dir` holds the layout (every `COMMUNITY_DTYPES`) this code would write for `name`."""
    return _read_json(community_dir.with_suffix(".stamp.json")) == community_stamp(name) and (community_dir / "config.json").is_file()


# Quantized decoders (manifest dtype keys) converted beside the fp32 graphs, for `--dtype` tests.
QUANTIZE = {"gqa1": ["int8", "q4"]}
# Configurations also exported in the community's transformers.js layout (export/community.py: no
# manifest, no mask inputs) to MODELS_ROOT/<name>/community, in these dtypes.
COMMUNITY_CONFIGS = ("gqa1", "gemma1")
COMMUNITY_DIR = "community"
COMMUNITY_DTYPES = ("fp32", "fp16", "q4", "q4f16", "int8", "q8")
# Configurations also converted with --dtype fp16 (MODELS_ROOT/<name>/onnx-fp16), for fp16 cases.
FP16_CONFIGS = ("gqa1",)


def load_model(name: str, source: Path, onnx_dir: Path) -> Model:
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    from .runtime import OnnxPaliGemma

    hf = PaliGemmaForConditionalGeneration.from_pretrained(source, attn_implementation="eager", dtype=torch.float32).eval()
    model = Model(name, onnx_dir, hf, AutoProcessor.from_pretrained(source), OnnxPaliGemma(onnx_dir))
    if name in FP16_CONFIGS:
        model.fp16_dir = onnx_dir.with_name("onnx-fp16")
        model.onnx_fp16 = OnnxPaliGemma(model.fp16_dir, dtype="fp16")
    return model


def _open(image: str):
    from PIL import Image

    with Image.open(REPO_ROOT / image) as im:
        im.load()
        return im


def until_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """Generated ids up to, without, the first <eos> (transformers pads after it), and whether it came."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i], True
    return tokens, False


# Where a case's expected tokens come from, per dtype.
REFERENCES = {
    "fp32": "transformers generate (fp32, eager); the ONNX loop agrees",
    COMMUNITY_DIR: "transformers generate (fp32, eager), one request at a time",
    "fp16": "the ONNX loop (export/runtime.py) on the fp16 graphs; first token = transformers fp32",
}


def generate(model: Model, requests: list[Request], what: str, dtype: str = "fp32") -> list[tuple[list[int], bool]]:
    """One padded batch through transformers and the ONNX loop; per row (ids before <eos>, stopped).
    The community layout's rows come from transformers alone (the ONNX loop reads manifests)."""
    from .validate import compare, reference_of

    images = [_open(r.image) for r in requests]
    if dtype == COMMUNITY_DIR:
        reference = reference_of(model.hf, model.processor, images, [r.prompt for r in requests], MAX_NEW_TOKENS)
        return [until_eos(row.tolist(), model.eos) for row in reference.tokens]
    onnx = model.onnx_fp16 if dtype == "fp16" else model.onnx
    rows = compare(model.hf, model.processor, onnx, images, [r.prompt for r in requests], MAX_NEW_TOKENS)
    for i, row in enumerate(rows):
        # fp16 may drift from fp32 after the first token, never at it (test_parity holds this too).
        agrees = row.tokens_match if dtype == "fp32" else row.onnx[:1] == row.reference[:1]
        if not agrees:
            raise ExportError(
                f"{what}: row {i} ({row.prompt!r}): the {dtype} ONNX loop gives {row.onnx}, transformers {row.reference}; "
                "the export is broken, not the fixture: run pytest export/tests/test_parity.py"
            )
    return [until_eos(row.reference if dtype == "fp32" else row.onnx, model.eos) for row in rows]


def case_record(model: Model, models_root: Path, case_name: str, requests: list[Request], dtype: str = "fp32") -> dict:
    rows = generate(model, requests, case_name, dtype)
    # The Rust tests also run each row alone against its batch row; left padding must not move an
    # argmax, or that test would fail on the fixture rather than on the runtime.
    for i, (request, row) in enumerate(zip(requests, rows)):
        if len(requests) > 1 and generate(model, [request], f"{case_name} row {i} alone", dtype) != [row]:
            raise ExportError(f"{case_name}: row {i} ({request.prompt!r}) gives other tokens alone than in its batch; pick other requests")
    tok = model.processor.tokenizer
    onnx_dir = {"fp16": model.fp16_dir, COMMUNITY_DIR: model.onnx_dir.with_name(COMMUNITY_DIR)}.get(dtype, model.onnx_dir)
    return {
        "name": case_name,
        "config": model.name,
        "model_dir": onnx_dir.relative_to(models_root).as_posix(),
        "dtype": "fp32" if dtype == COMMUNITY_DIR else dtype,
        "reference": REFERENCES[dtype],
        "requests": [asdict(r) for r in requests],
        "expected": [ids for ids, _ in rows],
        "expected_text": [tok.decode(ids, skip_special_tokens=True) for ids, _ in rows],
    }


def prompt_layouts(model: Model) -> list[dict]:
    """Each of LAYOUT_PROMPTS through the processor: its input_ids, or the error it raises."""
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    out = []
    for prompt in LAYOUT_PROMPTS:
        try:
            ids = model.processor(images=image, text=prompt)["input_ids"][0]
            out.append({"prompt": prompt, "input_ids": [int(i) for i in ids]})
        except ValueError as e:
            out.append({"prompt": prompt, "error": str(e)})
    return out


def prompt_length(model: Model, request: Request) -> int:
    return len(model.processor(images=_open(request.image), text=request.prompt)["input_ids"][0])


def find_beyond_window(model: Model) -> Request:
    """A request whose decode steps attend past the sliding window.

    The prefill never exercises the window (prefix tokens see the whole prefix); a decode query at
    cache index q drops key 0 once q >= window. With P prompt tokens and n produced tokens (<eos>
    counted: it is computed too), the last query sits at P + n - 2.
    """
    window = TEST_CONFIGS[model.name].sliding_window
    for prompt in WINDOW_PROMPTS:
        for image in SEARCH_IMAGES:
            request = Request(image, prompt)
            ((ids, stopped),) = generate(model, [request], f"{model.name} window search")
            produced = len(ids) + stopped
            if produced >= 2 and prompt_length(model, request) + produced - 2 >= window:
                return request
    raise ExportError(
        f"{model.name}: no image/prompt pair decodes past the sliding window of {window} in {MAX_NEW_TOKENS} tokens: "
        "add a longer prompt to WINDOW_PROMPTS"
    )


def find_early_eos(models: dict[str, Model]) -> tuple[Model, list[Request]]:
    """A batch of two where row 0 emits <eos> in the first half and row 1 goes on after it.

    Row 0 is fed its <eos> on the next step and <pad> from the one after: row 1 must still be
    generating then, or the batch never shows that a finished row leaves the others alone.
    """
    for name in sorted(models):
        model = models[name]
        for image in SEARCH_IMAGES:
            for prompt in SEARCH_PROMPTS:
                ((ids, stopped),) = generate(model, [Request(image, prompt)], f"{name} eos search")
                if not stopped or len(ids) >= MAX_NEW_TOKENS // 2:
                    continue
                for partner_image in (i for i in SEARCH_IMAGES if i != image):
                    for partner_prompt in LONG_PROMPTS:
                        batch = [Request(image, prompt), Request(partner_image, partner_prompt)]
                        (short, short_stopped), (long, _) = generate(model, batch, f"{name} eos search")
                        if short_stopped and len(long) >= len(short) + 3:
                            return model, batch
    raise ExportError(
        "no image/prompt pair stops early next to a longer row on any test checkpoint: "
        "the early <eos> case is not exercised; add candidates to SEARCH_PROMPTS or SEARCH_IMAGES"
    )


def build_document(models_root: Path, log=print) -> dict:
    """Every case, run through transformers and checked against the ONNX loop."""
    import transformers

    models_root = Path(models_root)
    dirs = prepare_models(models_root, log=log)
    # The processor warns on every call that prompts lack <image> tokens; it then adds them, as
    # `validate.compare` relies on, so hundreds of identical warnings would only hide real output.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return _build_document(models_root, dirs)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build_document(models_root: Path, dirs: dict[str, tuple[Path, Path]]) -> dict:
    import torch
    import transformers

    models = {name: load_model(name, *dirs[name]) for name in sorted(dirs)}
    cases = []
    for name, model in models.items():
        for image in SINGLE_IMAGES:
            cases.append(case_record(model, models_root, f"{name}/single/{Path(image).stem}", [Request(image, "caption en")]))
        batch = [Request(*pair) for pair in BATCH3]
        lengths = {prompt_length(model, r) for r in batch}
        if len(lengths) != len(batch):
            raise ExportError(f"{name}/batch3: prompts tokenize to lengths {sorted(lengths)}; the batch must pad rows of different lengths")
        cases.append(case_record(model, models_root, f"{name}/batch3", batch))
        if model.onnx_fp16 is not None:
            for image in SINGLE_IMAGES:
                cases.append(case_record(model, models_root, f"{name}/fp16/{Path(image).stem}", [Request(image, "caption en")], "fp16"))
            cases.append(case_record(model, models_root, f"{name}/fp16/batch3", batch, "fp16"))
        if name in COMMUNITY_CONFIGS:
            for image in COMMUNITY_IMAGES:
                case = f"{name}/community/{Path(image).stem}"
                cases.append(case_record(model, models_root, case, [Request(image, "caption en")], COMMUNITY_DIR))
            cases.append(case_record(model, models_root, f"{name}/community/batch3", batch, COMMUNITY_DIR))
        if name in WINDOW_CONFIGS:
            cases.append(case_record(model, models_root, f"{name}/beyond_window", [find_beyond_window(model)]))
    model, batch = find_early_eos(models)
    cases.append(case_record(model, models_root, f"{model.name}/early_eos", batch))
    layout_model = models[LAYOUT_CONFIG]
    cases.append(case_record(layout_model, models_root, f"{LAYOUT_CONFIG}/prompt_layouts", [Request(*pair) for pair in LAYOUT_BATCH]))
    return {
        "generator": GENERATOR,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "max_new_tokens": MAX_NEW_TOKENS,
        "cases": cases,
        "prompt_layouts": {"config": LAYOUT_CONFIG, "prompts": prompt_layouts(layout_model)},
    }


def _dump(value, indent: str) -> str:
    # Token rows and requests on one line each: one id per line would bury the cases.
    flat = (isinstance(value, list) and all(isinstance(v, int) for v in value)) or (
        isinstance(value, dict) and all(isinstance(v, (str, int)) for v in value.values())
    )
    if flat or not isinstance(value, (list, dict)) or not value:
        return json.dumps(value, ensure_ascii=False)
    inner = indent + "  "
    if isinstance(value, list):
        items = [inner + _dump(v, inner) for v in value]
        return "[\n" + ",\n".join(items) + f"\n{indent}]"
    items = [f"{inner}{json.dumps(k)}: {_dump(v, inner)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + f"\n{indent}}}"


def render(document: dict) -> str:
    return _dump(document, "") + "\n"


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def differences(committed: dict, current: dict) -> list[str]:
    """What a regeneration changes in the committed document, one line per change (empty: current).

    Package versions are not compared: requirements.txt pins them, and local builds of the same
    release differ in their suffix (2.15.0+cpu, 2.15.0+cu132) without changing a token.
    """
    cases = committed.get("cases") if isinstance(committed, dict) else None
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        return ["the committed file has no list of cases"]
    out = []
    for key in ("generator", "max_new_tokens"):
        if committed.get(key) != current[key]:
            out.append(f"{key}: committed {committed.get(key)!r}, now {current[key]!r}")
    old = {c.get("name"): c for c in cases}
    new = {c["name"]: c for c in current["cases"]}
    out += [f"{n}: case is new" for n in new if n not in old]
    out += [f"{n}: case no longer generated" for n in old if n not in new]
    for n in (n for n in new if n in old):
        for field in ("config", "model_dir", "dtype", "reference", "requests"):
            if old[n].get(field) != new[n][field]:
                out.append(f"{n}: {field} committed {old[n].get(field)!r}, now {new[n][field]!r}")
        was, now = old[n].get("expected", []), new[n]["expected"]
        if len(was) != len(now):
            out.append(f"{n}: {len(was)} expected rows committed, now {len(now)}")
        for row, (a, b) in enumerate(zip(was, now)):
            if not isinstance(a, list):
                out.append(f"{n} row {row}: committed {a!r} is not a list of ids")
            elif a != b:
                at = _first_difference(a, b)
                out.append(
                    f"{n} row {row}: {len(a)} ids committed, now {len(b)}; "
                    f"first difference at token {at}: {a[at : at + 4]} -> {b[at : at + 4]}"
                )
        if old[n].get("expected_text") != new[n]["expected_text"] and was == now:
            out.append(f"{n}: expected_text changed with the same ids (tokenizer decoding changed)")
    if committed.get("prompt_layouts") != current["prompt_layouts"]:
        out.append("prompt_layouts: the processor's ids or errors for LAYOUT_PROMPTS changed")
    return out


def check_file(expected: Path, current: dict, models_root: Path) -> tuple[bool, str]:
    """(is the committed file current, report)."""
    fix = f"run {GENERATOR} {models_root} --expected {expected} and commit the file"
    try:
        committed = json.loads(Path(expected).read_text())
    except FileNotFoundError:
        return False, f"fixtures are stale: {expected} does not exist: {fix}"
    except json.JSONDecodeError as e:
        return False, f"fixtures are stale: {expected} is not JSON ({e}): {fix}"
    diff = differences(committed, current)
    if diff:
        shown = "\n".join(f"  {line}" for line in diff[:20])
        more = f"\n  ... {len(diff) - 20} more" if len(diff) > 20 else ""
        return False, f"fixtures are stale: {expected} differs from a fresh run in {len(diff)} places:\n{shown}{more}\n{fix}"
    report = f"{expected} is current ({len(current['cases'])} cases)"
    for pkg in ("transformers", "torch"):
        if committed.get(pkg) != current[pkg]:
            report += f"\nnote: written with {pkg} {committed.get(pkg)}, this run has {current[pkg]}; every token agrees"
    return True, report


def fixtures(models_root: Path, *, expected: Path | None = None, check: bool = False, log=print) -> tuple[bool, str]:
    """Write `expected` (default tests/fixtures/expected_tokens.json), or with `check` compare it
    with a fresh run; (ok, report)."""
    expected = Path(expected) if expected else EXPECTED_FILE
    document = build_document(models_root, log=log)
    if check:
        return check_file(expected, document, models_root)
    expected.parent.mkdir(parents=True, exist_ok=True)
    expected.write_text(render(document))
    return True, f"wrote {expected} ({len(document['cases'])} cases)"
