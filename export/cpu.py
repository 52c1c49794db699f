"""The host CPU as quantization figures must name it: model name and the flags that choose ONNX
Runtime's int8 kernels (the Rust side of the same facts, with the kernels cited, is src/cpu.rs).

Without VNNI, int8-weight kernels on x86 sum u8 x s8 products in saturating 16-bit pairs, so an int8
figure means nothing without the CPU it was measured on.
"""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo names of the extensions that decide which int8 kernel runs.
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return name, flags


def int8_weight_kernels_saturate() -> bool:
    """An x86-64 CPU without AVX-512 VNNI (with the BW/DQ/VL its kernel needs) and without AVX-VNNI.

    AVX-512 comes from numpy's CPUID probe, as ONNX Runtime reads it, so that an emulator's CPU
    model counts (qemu-user shows the host's /proc/cpuinfo); numpy does not probe AVX-VNNI, which
    comes from /proc/cpuinfo."""
    if platform.machine() != "x86_64":
        return False
    from numpy._core._multiarray_umath import __cpu_features__ as features

    avx512_vnni = all(features.get(f) for f in ("AVX512F", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX512VNNI"))
    return not (avx512_vnni or "avx_vnni" in _cpuinfo()[1])


def describe() -> str:
    """e.g. "AMD EPYC (avx2 avx512f avx512_vnni; no avx_vnni amx_int8)"."""
    name, flags = _cpuinfo()
    have = [f for f in INT8_FLAGS if f in flags]
    lacks = [f for f in INT8_FLAGS if f not in flags]
    return f"{name} ({' '.join(have)}{'; ' if have and lacks else ''}{'no ' + ' '.join(lacks) if lacks else ''})"
