"""Build the container image and check it as a user would: `/health` answers, the HEALTHCHECK passes,
one `/v1/generate` gives the checkout build's tokens, and SIGTERM ends it with exit code 0.

    .venv/bin/python -m deploy.check_image [--engine podman] [--make-base] [--run-arg ARG ...]

Needs a container engine (podman from Debian's packages here) and the staged bundle
(`python -m deploy.bundle`, which this runs with --no-build if target/bundle/paligemma is missing
but the dist binary exists). Not part of CI: it needs root, an engine and a base image, which CI's
machine does not have; docs/DEPLOY.md reports its run.

- `--make-base`: where no registry is reachable (this machine reaches Debian's mirror only), build
  the base from Debian packages, `mmdebstrap --variant=minbase bookworm`, imported under the
  Containerfile's BASE name. It is larger than the registry's slim image (about 170 against
  75 MB) and otherwise the same Debian 12.
- `--run-arg`: extra `run` flags for the engine. Default, what podman 4.3 needs on this machine:
  `--runtime runc` (crun cannot set up the container on its hybrid cgroups) and `--ulimit`
  values at most the host's (podman copies the host's rlimits, which this sandbox may not raise).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import time
import urllib.request

from deploy import bundle

REPO = bundle.REPO
BASE = "docker.io/library/debian:bookworm-slim"
TAG = "localhost/paligemma:check"
NAME = "paligemma-check"
MODEL = REPO / "models" / "scenes"
CHECKOUT_BINARY = REPO / "target" / "release" / "paligemma"
DEFAULT_RUN_ARGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def sh(*cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {run.returncode}:\n{run.stderr.strip()}")
    return run


def make_base(engine: str) -> None:
    rootfs = bundle.OUT / "bookworm-minbase.tar"
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    sh("mmdebstrap", "--variant=minbase", "--quiet", "bookworm", str(rootfs), "deb http://deb.debian.org/debian bookworm main")
    sh(engine, "import", str(rootfs), BASE)
    rootfs.unlink()


def http(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.check_image", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="podman")
    ap.add_argument("--make-base", action="store_true", help=f"build {BASE} from Debian packages (mmdebstrap)")
    ap.add_argument("--run-arg", action="append", help="extra flag for `ENGINE run` (repeat; replaces the defaults)")
    ap.add_argument("--port", type=int, default=18080)
    args = ap.parse_args(argv)
    engine = args.engine
    run_args = args.run_arg if args.run_arg is not None else DEFAULT_RUN_ARGS
    if not (bundle.OUT / "paligemma" / "paligemma").is_file():
        bundle.build(bundle.OUT, cargo_build=False)
    if args.make_base:
        make_base(engine)
    elif sh(engine, "image", "exists", BASE, check=False).returncode != 0:
        raise SystemExit(f"error: no {BASE} image here: pull it, or build it from Debian packages with --make-base")
    started = time.monotonic()
    sh(engine, "build", "--format", "docker", "-f", "deploy/Containerfile", "-t", TAG, str(REPO))
    build_s = time.monotonic() - started
    size = int(sh(engine, "image", "inspect", TAG, "--format", "{{.Size}}").stdout.strip())
    sh(engine, "rm", "-f", NAME, check=False)
    sh(engine, "run", "-d", "--name", NAME, *run_args, "-p", f"127.0.0.1:{args.port}:8080", "-v", f"{MODEL}:/model:ro", TAG)
    report: dict = {"engine": sh(engine, "--version").stdout.strip(), "build_seconds": round(build_s, 1), "image_bytes": size}
    try:
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                health = http(url + "/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"error: /health did not answer in 120 s; logs:\n{sh(engine, 'logs', NAME, check=False).stderr}"
                    ) from None
                time.sleep(1)
        report["health"] = health["onnxruntime"]
        if health["onnxruntime"]["source"] != "next to the executable":
            raise SystemExit(f"error: the image's server loaded another ONNX Runtime: {health['onnxruntime']}")
        report["healthcheck_exit"] = sh(engine, "healthcheck", "run", NAME, check=False).returncode
        image = MODEL / "example.png"
        encoded = base64.b64encode(image.read_bytes()).decode()
        for prompt in bundle.example_prompts(MODEL):
            got = http(url + "/v1/generate", {"image": encoded, "prompt": prompt})
            want = bundle.cli_answer(CHECKOUT_BINARY, MODEL, image, prompt)
            same = all(got.get(k) == want.get(k) for k in ("token_ids", "detections", "segments"))
            report.setdefault("answers", []).append({"prompt": prompt, "text": got["text"], "same_as_checkout": same})
        stopped = time.monotonic()
        sh(engine, "stop", "--time", "60", NAME)
        report["stop_seconds"] = round(time.monotonic() - stopped, 1)
        report["exit_code"] = int(sh(engine, "inspect", NAME, "--format", "{{.State.ExitCode}}").stdout.strip())
    finally:
        sh(engine, "rm", "-f", NAME, check=False)
    print(json.dumps(report, indent=1))
    ok = report["healthcheck_exit"] == 0 and report["exit_code"] == 0 and all(a["same_as_checkout"] for a in report["answers"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
