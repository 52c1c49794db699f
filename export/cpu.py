"""The host CPU as quantization figures must name it: model name and the flags that choose ONNX
Runtime's int8 kernels (the Rust side of the same facts, with the kernels cited, is src/cpu.rs).

Without VNNI, int8-weight kernels on x86 sum u8 x s8 products in saturating 16-bit pairs, so an int8
figure means nothing without the CPU it was measured on.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
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

    Both come from CPUID, as ONNX Runtime reads them, so that an emulator's CPU model counts
    (qemu-user shows the host's /proc/cpuinfo): AVX-512 from numpy's probe, AVX-VNNI, which numpy
    does not probe, from CPUID itself."""
    if platform.machine() != "x86_64":
        return False
    from numpy._core._multiarray_umath import __cpu_features__ as features

    avx512_vnni = all(features.get(f) for f in ("AVX512F", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX512VNNI"))
    return not (avx512_vnni or (bool(features.get("AVX2")) and _avx_vnni()))


# A System V function `cpuid(leaf, subleaf, uint32_t out[4])`: push rbx; mov eax, edi; mov ecx, esi;
# mov r8, rdx; cpuid; mov [r8], eax; mov [r8+4], ebx; mov [r8+8], ecx; mov [r8+12], edx; pop rbx; ret.
_CPUID_CODE = bytes.fromhex("53 89f8 89f1 4989d0 0fa2 418900 41895804 41894808 4189500c 5b c3")


@functools.cache
def _cpuid_function():
    # The code is x86-64: a 32-bit Python on a 64-bit kernel (machine() still says x86_64) must not run it.
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        # A kernel policy that refuses writable executable pages.
        return None
    page.write(_CPUID_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(address)
    # The page must stay mapped while the function can be called: the cache keeps both.
    return function, page


def _cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int] | None:
    """EAX, EBX, ECX, EDX of CPUID(leaf, subleaf) on the CPU this process runs on, or None."""
    loaded = _cpuid_function()
    if loaded is None:
        return None
    out = (ctypes.c_uint32 * 4)()
    loaded[0](leaf, subleaf, ctypes.addressof(out))
    return tuple(out)


def _avx_vnni() -> bool:
    """CPUID.(EAX=7, ECX=1):EAX[bit 4], as ONNX Runtime's `core/mlas/lib/platform.cpp` tests it; where
    CPUID cannot be run, /proc/cpuinfo's `avx_vnni`."""
    basic = _cpuid(0)
    if basic is None:
        return "avx_vnni" in _cpuinfo()[1]
    if basic[0] < 7 or _cpuid(7, 0)[0] < 1:
        return False
    return bool(_cpuid(7, 1)[0] >> 4 & 1)


def describe() -> str:
    """e.g. "AMD EPYC (avx2 avx512f avx512_vnni; no avx_vnni amx_int8)"."""
    name, flags = _cpuinfo()
    have = [f for f in INT8_FLAGS if f in flags]
    lacks = [f for f in INT8_FLAGS if f not in flags]
    return f"{name} ({' '.join(have)}{'; ' if have and lacks else ''}{'no ' + ' '.join(lacks) if lacks else ''})"
