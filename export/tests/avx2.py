"""Commands run on an emulated x86-64 CPU with AVX2 and neither AVX-512 nor VNNI, whatever the host.

ONNX Runtime picks its int8 kernels from CPUID, so an int8 graph can be right on one CPU and wrong
on another; the only way to see it is to run on both kinds. qemu's user-mode emulator (Debian's
qemu-user, installed by .ci/setup) runs this venv's Python or the release binary with the CPUID of
an AMD EPYC-Milan (Zen 3: AVX2, FMA, F16C), and its TCG implements no AVX-512 at all, so ONNX
Runtime takes its AVX2 kernels. Timings under emulation mean nothing; results are exact.

`python -m export.tests.avx2 agreement MODEL_DIR DTYPE REFERENCES.pkl` prints the agreement of
`export.validate.agreement` as JSON (run it under `command()`).
"""

from __future__ import annotations

import json
import pickle
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest

CPU = "EPYC-Milan"
LABEL = f"qemu-x86_64 -cpu {CPU} (avx2; no avx512f avx512_vnni avx_vnni amx_int8)"


def command(argv: list[str]) -> list[str]:
    """`argv` prefixed to run under the emulated CPU; fails the test where that cannot run."""
    if platform.machine() != "x86_64":
        pytest.skip(f"x86-64 int8 kernels: this host is {platform.machine()}")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.fail("qemu-x86_64 is missing: install Debian's qemu-user (bash .ci/setup does)")
    return [qemu, "-cpu", CPU, *argv]


def run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `argv` under the emulated CPU; qemu's notes on CPUID bits TCG lacks are dropped from stderr."""
    done = subprocess.run(command(argv), capture_output=True, text=True, timeout=timeout)
    done.stderr = "\n".join(line for line in done.stderr.splitlines() if "TCG doesn't support requested feature" not in line)
    return done


def main(argv: list[str]) -> int:
    from export.runtime import OnnxPaliGemma
    from export.validate import agreement

    cmd, model_dir, dtype, references = argv
    assert cmd == "agreement", cmd
    with open(references, "rb") as f:
        refs, max_new_tokens = pickle.load(f)
    print(json.dumps(asdict(agreement(OnnxPaliGemma(model_dir, dtype=dtype), refs, max_new_tokens))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
