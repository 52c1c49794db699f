"""`python -m bench.matmul` on small shapes: every format runs at every row count, and its error
against fp32 is what its bits allow (times are printed, never asserted)."""

from __future__ import annotations

import json

import pytest

from bench import matmul


def test_each_format_runs_at_each_row_count_within_its_quantization_error(tmp_path, capsys):
    out = tmp_path / "matmul.json"
    code = matmul.main(
        ["--shapes", "256x96", "--rows", "1,4,7", "--formats", "int8:128:4,q4:32:4,q4:64:0", "--repeats", "2", "--out", str(out)]
    )
    assert code == 0
    results = json.loads(out.read_text())["results"]
    formats = {r["format"] for r in results}
    assert formats == {"fp32", "int8 b128 l4", "q4 b32 l4", "q4 b64 l0"}
    assert {(r["format"], r["rows"]) for r in results} == {(f, m) for f in formats for m in (1, 4, 7)}
    bound = {"fp32": 1e-5, "int8 b128 l4": 3e-2, "q4 b32 l4": 0.3, "q4 b64 l0": 0.3}
    for r in results:
        assert 0 <= r["max_error_relative"] < bound[r["format"]], r
        assert r["median_ms"] > 0 and r["gflops"] > 0, r
    # 4-bit weights lose more than 8-bit ones: the formats really differ.
    worst = {f: max(r["max_error_relative"] for r in results if r["format"] == f) for f in formats}
    assert worst["int8 b128 l4"] < worst["q4 b32 l4"], worst
    assert "| 256 x 96 | q4 b32 l4 |" in capsys.readouterr().out


def test_a_malformed_format_is_refused_with_the_expected_form():
    with pytest.raises(SystemExit, match="dtype:block_size:accuracy_level"):
        matmul.parse_formats("q4:32")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "2304"], "--shapes '2304': expected KxN"),
        (["--shapes", "0x8"], "expected KxN with K, N > 0"),
        (["--rows", "0"], "--rows '0': expected a row count > 0"),
        (["--rows", ","], "--rows is empty"),
        (["--repeats", "0"], "--repeats and --threads must be at least 1"),
        (["--rows", "\u00b2"], "expected a row count > 0"),
        (["--formats", "q4:0:4"], "MatMulNBits takes block sizes 16, 32, 64, 128, 256"),
        (["--formats", "q4:32:9"], "and accuracy levels 0-4"),
        (["--out", "/nonexistent/dir/x.json"], "its directory /nonexistent/dir does not exist"),
    ],
)
def test_bad_sizes_are_refused_before_anything_runs(argv, message):
    with pytest.raises(SystemExit, match=message):
        matmul.main(argv)
