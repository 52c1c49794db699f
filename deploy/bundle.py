"""Build the release bundle: `paligemma-<version>-<target>.tar.gz`, runnable unpacked anywhere.

    .venv/bin/python -m deploy.bundle [--out target/bundle] [--no-build]

It holds the binary built with Cargo's `dist` profile (stripped, LTO), ONNX Runtime's library from
the pinned `onnxruntime` wheel beside it (the binary looks there first after `--ort-lib` and
`ORT_DYLIB_PATH`: src/onnxruntime/library.rs), the licences of everything bundled (ONNX Runtime's
LICENSE and ThirdPartyNotices.txt, every Rust crate compiled into the binary) and a short README.
No Python, no checkout and no model: a model directory is given with `--model`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROFILE = "dist"
# Where the tarball goes and its contents are staged (Cargo's own target/dist holds the binary).
OUT = REPO / "target" / "bundle"
# File names a crate's licence texts go by (crates.io packages carry them at their root).
LICENCE_PREFIXES = ("license", "licence", "copying", "notice", "unlicense", "copyright")


def host_target() -> str:
    """rustc's host triple, e.g. x86_64-unknown-linux-gnu."""
    out = subprocess.run(["rustc", "-vV"], check=True, capture_output=True, text=True).stdout
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("host: "))


def onnxruntime_dir() -> Path:
    """The installed onnxruntime wheel (the pinned one in .venv when run by .venv/bin/python)."""
    try:
        import onnxruntime
    except ImportError:
        raise SystemExit("error: the onnxruntime wheel is not installed here; run `bash .ci/setup` and use .venv/bin/python") from None
    return Path(onnxruntime.__file__).parent


def runtime_library(ort: Path) -> Path:
    found = sorted((ort / "capi").glob("libonnxruntime.so.*"))
    if not found:
        raise SystemExit(f"error: no libonnxruntime.so.* in {ort / 'capi'}; reinstall the onnxruntime wheel (bash .ci/setup)")
    return found[-1]


def cargo_metadata(target: str) -> dict:
    """`cargo metadata` of the workspace, its dependency graph resolved for `target`."""
    cmd = ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", target]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout)


def package_version(meta: dict) -> str:
    """The version of the root package (paligemma) in `cargo_metadata`'s answer."""
    return next(p["version"] for p in meta["packages"] if p["id"] == meta["resolve"]["root"])


def shipped_crates(meta: dict) -> list[dict]:
    """Every package compiled into the binary: the root's normal dependencies, transitively, in
    `cargo_metadata`'s answer (build scripts and proc macros run at build time only)."""
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]

    def proc_macro(pkg: str) -> bool:
        return any("proc-macro" in t["kind"] for t in packages[pkg]["targets"])

    seen, todo = set(), [root]
    while todo:
        node = nodes[todo.pop()]
        for dep in node["deps"]:
            if any(k["kind"] is None for k in dep["dep_kinds"]) and dep["pkg"] not in seen and not proc_macro(dep["pkg"]):
                seen.add(dep["pkg"])
                todo.append(dep["pkg"])
    return sorted((packages[i] for i in seen), key=lambda p: (p["name"], p["version"]))


def write_licences(dest: Path, ort: Path, meta: dict) -> int:
    """LICENSES/: ours, ONNX Runtime's, and each shipped crate's texts with an index; the crate count."""
    dest.mkdir(parents=True)
    shutil.copy2(REPO / "LICENSE", dest / "paligemma-LICENSE")
    (dest / "onnxruntime").mkdir()
    for name in ("LICENSE", "ThirdPartyNotices.txt"):
        shutil.copy2(ort / name, dest / "onnxruntime" / name)
    rows = []
    for crate in shipped_crates(meta):
        root = Path(crate["manifest_path"]).parent
        texts = sorted(f for f in root.iterdir() if f.is_file() and f.name.lower().startswith(LICENCE_PREFIXES))
        folder = dest / "crates" / f"{crate['name']}-{crate['version']}"
        folder.mkdir(parents=True)
        for f in texts:
            shutil.copy2(f, folder / f.name)
        files = ", ".join(f.name for f in texts) or "none in the package: see its licence expression"
        rows.append(f"| {crate['name']} | {crate['version']} | {crate['license'] or crate.get('license_file') or '?'} | {files} |")
    (dest / "README.md").write_text(
        "# Licences of what this bundle holds\n\n"
        "- `paligemma-LICENSE`: paligemma itself (Apache-2.0).\n"
        "- `onnxruntime/`: ONNX Runtime (`libonnxruntime.so.*`, from the onnxruntime wheel): its LICENSE (MIT) "
        "and ThirdPartyNotices.txt.\n"
        "- `crates/`: the Rust crates compiled into `paligemma`, each with the licence files its package carries:\n\n"
        "| crate | version | licence | files |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    return len(rows)


BUNDLE_README = """# paligemma {version} ({target})

PaliGemma 2 vision-language models on ONNX Runtime: captions, OCR, answers, detection boxes and
segmentation masks, from one binary. This bundle runs on its own: no Python, no checkout.

- `paligemma`: the binary (CLI, batch mode, `paligemma serve` HTTP server with an OpenAI-compatible API).
- `{ort_lib}`: ONNX Runtime {ort_version} (CPU), from the onnxruntime wheel. `paligemma`
  loads the `libonnxruntime.so*` beside itself unless `--ort-lib` or `ORT_DYLIB_PATH` names another.
- `LICENSES/`: the licences of everything above.

A model is a directory converted by the project's `python -m export convert` (or a
transformers.js-layout export), given with `--model`:

    ./paligemma --model /path/to/model --image photo.jpg --prompt "detect cat"
    ./paligemma serve --model /path/to/model --host 0.0.0.0 --port 8080

GPU: this bundle's ONNX Runtime is the CPU build. For CUDA or TensorRT, install the
`onnxruntime-gpu=={ort_version}` wheel's libraries with CUDA 12 and cuDNN 9 on the host and pass
`--ort-lib .../onnxruntime/capi/libonnxruntime.so.{ort_version}` (its provider libraries,
`libonnxruntime_providers_cuda.so` and `_tensorrt.so`, must sit beside that library), then
`--provider cuda` or `--provider tensorrt`.

Glibc: built on Debian 12 (glibc 2.36); hosts need glibc 2.36 or newer.
"""


def example_prompts(model: Path) -> list[str]:
    """The prompts a shipped build is checked with on `model`'s example (example.json): a caption,
    its detect prompt and, where the model segments, its segment prompt."""
    example = json.loads((model / "example.json").read_text())
    return ["caption en", example["detect_prompt"]] + [example[k] for k in ("segment_prompt",) if k in example]


def cli_answer(binary: Path, model: Path, image: Path, prompt: str, cwd: Path | None = None, env: dict | None = None) -> dict:
    """The CLI's `--json` answer (api::Generation) to one prompt; SystemExit with its stderr if it fails."""
    run = subprocess.run(
        [str(binary), "--model", str(model), "--image", str(image), "--prompt", prompt, "--json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode != 0:
        raise SystemExit(f"error: {binary} {prompt!r} exited {run.returncode}:\n{run.stderr.strip()}")
    return json.loads(run.stdout)


def build(out: Path, cargo_build: bool = True) -> Path:
    """Builds the binary (unless told not to) and writes `out`/paligemma-VERSION-TARGET.tar.gz; its path."""
    target = host_target()
    if cargo_build:
        subprocess.run(["cargo", "build", "--profile", PROFILE, "--locked", "--bin", "paligemma"], check=True, cwd=REPO)
    binary = REPO / "target" / PROFILE / "paligemma"
    if not binary.is_file():
        raise SystemExit(f"error: {binary} is missing; build it with `cargo build --profile {PROFILE}` (or drop --no-build)")
    ort = onnxruntime_dir()
    library = runtime_library(ort)
    meta = cargo_metadata(target)
    version = package_version(meta)
    name = f"paligemma-{version}-{target}"
    # Staged under a fixed name (the image build copies it: deploy/Containerfile's BUNDLE); the
    # tarball's top folder carries the version and target.
    stage = out / "paligemma"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    shutil.copy2(binary, stage / "paligemma")
    shutil.copy2(library, stage / library.name)
    crates = write_licences(stage / "LICENSES", ort, meta)
    ort_version = library.name.removeprefix("libonnxruntime.so.")
    (stage / "README.md").write_text(BUNDLE_README.format(version=version, target=target, ort_lib=library.name, ort_version=ort_version))
    archive = out / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(stage, arcname=name)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (out / f"{name}.tar.gz.sha256").write_text(f"{digest}  {archive.name}\n")
    sizes = {p.name: p.stat().st_size for p in (stage / "paligemma", stage / library.name, archive)}
    print(json.dumps(dict(bundle=str(archive), sha256=digest, crates=crates, bytes=sizes)))
    return archive


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.bundle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="directory for the tarball (and its staging folder)")
    ap.add_argument("--no-build", action="store_true", help=f"use the binary already in target/{PROFILE}")
    args = ap.parse_args(argv)
    build(args.out, cargo_build=not args.no_build)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CARGO_TERM_COLOR", "never")
    sys.exit(main())
