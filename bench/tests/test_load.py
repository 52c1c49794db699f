"""`python -m bench.load` on the tiny model: a short loopback load against `paligemma serve` that
must lose nothing and answer every request as it answers it alone. Counts only: no timing asserted."""

from __future__ import annotations

import json

from bench import load

CLIENTS = 6


def test_short_load_answers_every_request_as_alone_and_batches(tmp_path):
    model = load.REPO / "target/tiny-models/gqa1/onnx"
    assert (model / "manifest.json").is_file(), f"{model} is missing: run `.venv/bin/python -m export fixtures target/tiny-models`"
    code = load.main(["--clients", str(CLIENTS), "--seconds", "4", "--max-batch", "4", "--out", str(tmp_path)])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["max_batch"] for r in runs] == [4, 1]
    for r in runs:
        assert r["answered"] > CLIENTS, r
        assert r["errors"] == {} and r["lost"] == 0 and r["wrong_answers"] == 0, r
        # Every fourth request was a bad one (BAD_MIX): each got its own 400, nothing else did.
        assert r["bad_sent"] > 0 and r["bad_misanswered"] == 0, r
        assert r["exit_code_after_sigterm"] == 0, r
    # Six closed-loop clients keep the queue full: the batched server must run batches of several.
    assert runs[0]["mean_batch_size"] > 1.5, runs[0]
    assert runs[1]["mean_batch_size"] == 1.0, runs[1]
    assert code == 0
    assert "Batching gain" in (tmp_path / "results.md").read_text()


def test_mixed_open_loop_load_is_answered_as_alone_under_both_policies(tmp_path):
    # Fast enough arrivals and long enough answers that requests overlap on the tiny model.
    code = load.main(
        ["--workload", "mixed", "--rate", "50", "--seconds", "2", "--lengths", "16-200", "--max-batch", "4", "--out", str(tmp_path)]
    )
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["batching"] for r in runs] == ["continuous", "static"]
    for r in runs:
        assert r["sent"] == 100 and r["answered"] == r["sent"], r
        assert r["errors"] == {} and r["lost"] == 0 and r["wrong_answers"] == 0, r
        assert r["short_requests"] > 0 and r["exit_code_after_sigterm"] == 0, r
    # Arrivals overlap, so requests decode together under either policy.
    assert all(r["mean_rows_per_step"] > 1.0 for r in runs), runs
    assert code == 0
    assert "Continuous vs static" in (tmp_path / "results.md").read_text()
