"""`python -m bench.convert_memory`'s measurements: GNU time's peak RSS and wall clock, and the
checkpoint's largest tensor in float32 (the yardstick its memory bound is read against)."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from bench import convert_memory


def test_peak_rss_and_wall_time_come_from_gnu_time():
    # 300 MB written (not just reserved), so it is resident.
    peak, seconds, _, printed = convert_memory.timed([sys.executable, "-c", "b = b'x' * 300_000_000; print(len(b))"])
    assert 0.3 <= peak < 1.0, peak
    assert seconds > 0
    assert printed == "300000000\n"


def test_a_failing_command_stops_the_run_with_its_stderr():
    with pytest.raises(SystemExit, match=r"failed \(3\):\n.*no such model"):
        convert_memory.timed([sys.executable, "-c", "import sys; print('no such model', file=sys.stderr); sys.exit(3)"])


def test_the_largest_tensor_is_counted_in_float32(tmp_path):
    # bf16 counts double, f32 as it is: 1000x500 bf16 is 2 MB in float32, above 300x1000 f32 (1.2 MB).
    save_file({"a": torch.zeros(1000, 500, dtype=torch.bfloat16), "b": torch.zeros(300, 1000)}, tmp_path / "model.safetensors")
    assert convert_memory.largest_tensor_fp32(tmp_path) == 2_000_000 / 1e9
