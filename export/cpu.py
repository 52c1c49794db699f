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
    """An x86-64 CPU without AVX-512 VNNI (with the BW/DQ/VL its kernel needs) and without AVX-VNNI."""
    if platform.machine() != "x86_64":
        return False
    flags = _cpuinfo()[1]
    avx512_vnni = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= flags
    return not (avx512_vnni or "avx_vnni" in flags)


def describe() -> str:
    """e.g. "AMD EPYC (avx2 avx512f avx512_vnni; no avx_vnni amx_int8)"."""
    name, flags = _cpuinfo()
    have = [f for f in INT8_FLAGS if f in flags]
    lacks = [f for f in INT8_FLAGS if f not in flags]
    return f"{name} ({' '.join(have)}{'; ' if have and lacks else ''}{'no ' + ' '.join(lacks) if lacks else ''})"
