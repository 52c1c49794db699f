"""What the machine can do: memory bandwidth (STREAM-like), and the decode floor it implies.

Decode is memory-bound: each token reads every decoder weight once, so no runtime decodes faster
than (bytes of the decoder's weights) / (read bandwidth). The read figure is a multi-threaded sum
over a buffer far larger than the caches (as fast here as a dot product, a max, or ONNX Runtime
streaming a 1 GiB weight through a one-row MatMul); copy (read + write) is printed beside it. On a
shared host it moves by 10-20% from minute to minute, so a floor is an estimate, not a bound.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Best of `repeats`, GB/s (1e9 bytes), with torch on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    n = int(gib * 2**30) // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    read = 4 * n / best(lambda: a.sum()) / 1e9
    copy = 2 * 4 * n / best(lambda: b.copy_(a)) / 1e9
    return {"read_gb_s": read, "copy_gb_s": copy}


def describe() -> dict[str, str | int]:
    """The CPU with the flags that choose ONNX Runtime's int8 kernels (`export.cpu`), cores, memory."""
    from export import cpu

    mem = 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        mem = int(meminfo.read_text().split()[1]) * 1024
    return {"cpu": cpu.describe(), "cores": os.cpu_count() or 0, "memory_gb": round(mem / 1e9, 1), "system": platform.platform()}


def weight_bytes(model_dir: Path, graph_file: str) -> int:
    """Bytes of a graph: the .onnx file plus its external data files."""
    path = Path(model_dir) / graph_file
    total = path.stat().st_size
    for data in path.parent.glob(path.name + "*.data"):
        total += data.stat().st_size
    return total
