"""`python -m bench.llamacpp`: llama.cpp on the same Gemma 2 text weights, for the comparison
`python -m bench --llama-cpp DIR` prints beside this runtime's figures. Not run in CI.

DIR is a llama.cpp source tree, for example the one the `llama-cpp-python` source package vendors
(`pip download --no-deps --no-binary :all: llama-cpp-python` needs a build; fetching the sdist's
tarball from PyPI and unpacking it does not): `vendor/llama.cpp`. Steps, each cached under
`WORK/llama.cpp/`:

 1. build `llama-bench` and `llama-quantize` with CMake (`pip install cmake` if it is missing);
 2. convert the checkpoint's text model to GGUF F32 with the tree's own `convert_hf_to_gguf.py`
    (its Gemma 2 path; the vision tower and projector are left out by its multimodal filter). The
    random checkpoints have no SentencePiece model, so the vocabulary is a synthetic one of the
    right size: llama-bench feeds random ids and never tokenizes;
 3. `llama-quantize` to Q8_0 and Q4_0 (the classes of int8 and q4);
 4. `llama-bench -t THREADS -o json`, twice: prompt processing of PROMPT tokens (`-p PROMPT -n 0`)
    and text generation of TOKENS tokens after PROMPT cached ones (`-p 0 -n TOKENS -d PROMPT`),
    each the mean of its repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# llama.cpp's GGUF type per dtype class of this runtime.
TYPES = {"fp32": "F32", "int8": "Q8_0", "q4": "Q4_0"}
TARGETS = ("llama-bench", "llama-quantize")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.llamacpp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--llama-cpp", type=Path, required=True, help="a llama.cpp source tree (with CMakeLists.txt, convert_hf_to_gguf.py)"
    )
    parser.add_argument("--source", type=Path, required=True, help="a PaliGemma 2 checkpoint directory (config.json, safetensors)")
    parser.add_argument("--work", type=Path, default=REPO / "target/bench", help="builds and GGUF files go under WORK/llama.cpp")
    parser.add_argument("--dtypes", default="fp32,int8,q4", help="dtype classes to run: fp32 (F32), int8 (Q8_0), q4 (Q4_0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=268, help="prompt tokens of the prefill (268: a 224 px prompt)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated after the prompt")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    return parser.parse_args(argv)


def fail(message: str) -> SystemExit:
    return SystemExit(f"error: {message}")


def build(tree: Path, build_dir: Path) -> Path:
    """`llama-bench` and `llama-quantize` built in `build_dir`; their directory."""
    bin_dir = build_dir / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None:
        raise fail("cmake is missing: `.venv/bin/pip install cmake` (PyPI), then run again")
    configure = [cmake, "-S", str(tree), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
    configure += [
        f"-D{flag}=OFF" for flag in ("LLAMA_CURL", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_EXAMPLES", "LLAMA_BUILD_SERVER", "LLAMA_OPENSSL")
    ]
    for cmd in (configure, [cmake, "--build", str(build_dir), "--target", *TARGETS, "-j", str(os.cpu_count() or 2)]):
        print("$ " + " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            raise fail(f"building llama.cpp in {build_dir} failed (its output is above)")
    return bin_dir


# Run in a child process: it patches the tree's Gemma 2 converter with a synthetic vocabulary.
CONVERT = r"""
import json, os, sys
from pathlib import Path
tree, source, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.path[:0] = [str(tree), str(tree / "gguf-py")]
import gguf
from conversion import gemma

def set_vocab(self):
    n = self.hparams["vocab_size"]
    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tokens = [special[i] if i < 4 else f"<0x{i - 4:02X}>" if i < 260 else f"\u2581t{i}" for i in range(n)]
    kinds = [gguf.TokenType.CONTROL if i < 4 else gguf.TokenType.BYTE if i < 260 else gguf.TokenType.NORMAL for i in range(n)]
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n)
    w.add_token_types(kinds)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)

gemma.Gemma2Model.set_vocab = set_vocab
text = out.with_name(out.stem + "-hf")
text.mkdir(parents=True, exist_ok=True)
config = json.loads((source / "config.json").read_text())["text_config"]
config.update(architectures=["Gemma2ForCausalLM"], model_type="gemma2")
(text / "config.json").write_text(json.dumps(config))
for f in source.glob("*.safetensors*"):
    if not (text / f.name).exists():
        os.symlink(f.resolve(), text / f.name)
sys.argv = ["convert_hf_to_gguf.py", str(text), "--outfile", str(out), "--outtype", "f32"]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def gguf_files(tree: Path, source: Path, work: Path, bin_dir: Path, dtypes: list[str]) -> dict[str, Path]:
    """dtype class -> its GGUF file, converted or quantized once (cached by the checkpoint's config)."""
    stamp = work / "source.json"
    config = (source / "config.json").read_text()
    if not stamp.is_file() or stamp.read_text() != config:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    f32 = work / "text-F32.gguf"
    if not f32.is_file():
        partial = f32.with_suffix(".partial.gguf")
        if subprocess.run([sys.executable, "-c", CONVERT, str(tree), str(source), str(partial)]).returncode != 0:
            raise fail(f"converting {source} to GGUF failed (its output is above)")
        partial.rename(f32)
    stamp.write_text(config)
    files = {}
    for dtype in dtypes:
        kind = TYPES[dtype]
        path = work / f"text-{kind}.gguf"
        if not path.is_file():
            done = subprocess.run([str(bin_dir / "llama-quantize"), str(f32), str(path), kind], capture_output=True, text=True)
            if done.returncode != 0:
                raise fail(f"llama-quantize to {kind} failed: {done.stderr.strip()[-500:]}")
        files[dtype] = path
    return files


def parse_llama_bench(text: str) -> dict[str, float]:
    """llama-bench's `-o json` (one entry per test) -> prompt tokens/s, generation ms/token and the
    cached positions the generation started from, of whichever tests it holds."""
    out = {}
    for test in json.loads(text):
        if test["n_prompt"] > 0 and test["n_gen"] == 0:
            out["prompt_tokens_per_s"] = test["avg_ts"]
            out["prompt_tokens"] = test["n_prompt"]
        elif test["n_gen"] > 0 and test["n_prompt"] == 0:
            out["decode_ms_per_token"] = 1e3 / test["avg_ts"]
            out["decode_tokens"] = test["n_gen"]
            out["decode_depth"] = test.get("n_depth", 0)
    if not out:
        raise fail(f"llama-bench's JSON holds no prompt or generation test: {text[:300]}")
    return out


def measure(
    tree: Path, source: Path, work: Path, dtypes: list[str], threads: int, prompt: int, tokens: int, repetitions: int
) -> list[dict]:
    """One row per dtype class: llama.cpp's figures on `source`'s text weights."""
    if not (tree / "CMakeLists.txt").is_file() or not (tree / "convert_hf_to_gguf.py").is_file():
        raise fail(f"--llama-cpp {tree}: not a llama.cpp source tree (no CMakeLists.txt and convert_hf_to_gguf.py)")
    unknown = [d for d in dtypes if d not in TYPES]
    if unknown:
        raise fail(f"dtype {', '.join(unknown)}: llama.cpp rows exist for {', '.join(TYPES)}")
    root = work / "llama.cpp"
    bin_dir = build(tree, root / "build")
    files = gguf_files(tree, source, root / "gguf", bin_dir, dtypes)
    rows = []
    for dtype, path in files.items():
        row = {"runtime": "llama.cpp", "dtype": dtype, "type": TYPES[dtype], "gguf_bytes": path.stat().st_size}
        for test in (["-p", str(prompt), "-n", "0"], ["-p", "0", "-n", str(tokens), "-d", str(prompt)]):
            cmd = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(threads), *test, "-r", str(repetitions), "-o", "json"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise fail(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
            row |= parse_llama_bench(done.stdout)
        rows.append(row)
    return rows


def prompt_tokens(model_dir: Path, prompt: str) -> int:
    """Tokens of this runtime's prefill for `prompt`: the image tokens, `<bos>`, the prompt and `\n`
    (the processor's layout), so llama.cpp processes a prompt of the same length."""
    from tokenizers import Tokenizer

    manifest = json.loads((model_dir / "manifest.json").read_text())
    text = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(prompt + "\n", add_special_tokens=False)
    return manifest["num_image_tokens"] + 1 + len(text.ids)


def beside(results: list[dict], rows: list[dict]) -> str:
    """Markdown: this runtime's decode and prefill per dtype next to llama.cpp's same class."""
    lines = [
        "| dtype | llama.cpp type | decode ms/token: paligemma / llama.cpp | prefill tokens/s: paligemma / llama.cpp (prompt tokens) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        ours = next((x for x in results if x["runtime"] == "paligemma" and x["dtype"] == r["dtype"]), None)
        if ours is None:
            continue
        prefill = r["prompt_tokens"] / (ours["prefill_ms"] / 1e3)
        lines.append(
            f"| {r['dtype']} | {r['type']} | {ours['decode_ms_per_token']:.1f} / {r['decode_ms_per_token']:.1f} "
            f"({ours['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x) | {prefill:.1f} / {r['prompt_tokens_per_s']:.1f} "
            f"({prefill / r['prompt_tokens_per_s']:.2f}x) ({r['prompt_tokens']}) |"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| runtime | dtype (type) | prefill tokens/s (prompt) | decode ms/token (tokens after cached) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['runtime']} | {r['dtype']} ({r['type']}) | {r['prompt_tokens_per_s']:.1f} ({r['prompt_tokens']}) "
            f"| {r['decode_ms_per_token']:.1f} ({r['decode_tokens']} after {r['decode_depth']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not (args.source / "config.json").is_file():
        raise fail(f"--source {args.source}: no config.json (a PaliGemma 2 checkpoint directory)")
    rows = measure(args.llama_cpp, args.source, args.work, dtypes, args.threads, args.prompt, args.tokens, args.repetitions)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
