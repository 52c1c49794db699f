"""`python -m bench.load`: a bounded load test of `paligemma serve` on loopback.

Steps, for `--max-batch N` and then `--max-batch 1` (the batching gain is their throughput ratio):
 1. start `paligemma serve` on a free port and wait for its `listening on` line;
 2. send every request of the mix once, alone: the answers each loaded request must equal;
 3. run `--clients` threads for `--seconds`, each sending the mix's requests in turn and waiting
    for each answer (closed loop); record status, latency and whether the tokens equal step 2's;
    every `--bad-every`-th request is one of BAD_MIX instead, which must get its own 400 and
    nothing else (the valid requests batched with it are unaffected);
 4. read the batch sizes the server saw from /metrics, stop it with SIGTERM and check it exits 0.

A request is lost when no HTTP answer came back at all (connection refused or reset, timeout).
"errors" counts valid requests that did not get a 200; "bad misanswered" bad requests that did
not get their 400 and code.
Prints a markdown table and writes it with the raw figures as JSON. Nothing here is asserted
by timing: bench/tests checks counts and answers only.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "tests/data/images"
# (image, prompt): the four images and the task prefixes, so rows of a batch differ in length.
MIX = (
    ("chelsea.png", "caption en"),
    ("camera.png", "detect cat ; dog"),
    ("rocket.jpg", "answer en what is in the image ?"),
    ("text.png", "ocr"),
    ("chelsea.png", "segment cat"),
    ("rocket.jpg", "describe en"),
    # The placeholder form of transformers' docs: the same layout as without it.
    ("camera.png", "<image>caption en"),
)
# (image, prompt, max_new_tokens or None for --max-new-tokens, the error code it must get).
BAD_MIX = (
    ("chelsea.png", "<image><image>caption en", None, "invalid_prompt"),
    ("chelsea.png", "<image>", None, "empty_prompt"),
    ("text.png", "\U0001f600" * 2000, None, "prompt_too_long"),
    ("rocket.jpg", "caption en", 0, "invalid_max_new_tokens"),
    (None, "caption en", None, "invalid_image"),
)
REQUEST_TIMEOUT_S = 120


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "target/tiny-models/gqa1/onnx", help="converted model directory")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--binary", type=Path, default=REPO / "target/release/paligemma")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients, each waiting for its answer before the next request")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each server configuration is loaded")
    parser.add_argument("--max-batch", type=int, default=4, help="the batched configuration (compared with --max-batch 1)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--min-new-tokens", type=int, default=16, help="fixed answer lengths make the configurations comparable")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads of the server")
    parser.add_argument("--bad-every", type=int, default=4, help="every Nth request of a client is a bad one (0: none)")
    parser.add_argument("--out", type=Path, default=REPO / "target/bench/load-results", help="results.json and results.md go here")
    return parser.parse_args(argv)


class Server:
    """A `paligemma serve` child process on a free loopback port."""

    def __init__(self, binary: Path, model: Path, *args: str):
        if not binary.is_file():
            raise SystemExit(f"error: {binary} is missing: run `cargo build --release` (bash .ci/setup does)")
        cmd = [str(binary), "serve", "--model", str(model), "--port", "0", *args]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.url = self._wait_listening()
        # Keep draining stderr so a chatty server never blocks on a full pipe.
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def _wait_listening(self) -> str:
        for line in self.process.stderr:
            self.log.append(line)
            if line.startswith("listening on "):
                return line.split()[-1]
        self.process.wait()
        raise SystemExit(f"error: paligemma serve exited with {self.process.returncode} before listening:\n{''.join(self.log)[-3000:]}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as response:
            return response.read().decode()

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def request_body(image: str | None, prompt: str, args: argparse.Namespace, max_new_tokens: int | None = None) -> bytes:
    """A /v1/generate body; `image` None sends bytes that are no image."""
    data = base64.b64encode((IMAGES / image).read_bytes() if image else b"not an image").decode()
    max_new = args.max_new_tokens if max_new_tokens is None else max_new_tokens
    return json.dumps(
        {"image": data, "prompt": prompt, "max_new_tokens": max_new, "min_new_tokens": min(args.min_new_tokens, max_new)}
    ).encode()


def post(url: str, body: bytes) -> tuple[int | None, dict | None]:
    """(status, JSON answer or error body); (None, None) when no HTTP answer came back."""
    request = urllib.request.Request(url + "/v1/generate", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.load(error)
        except ValueError:
            return error.code, None
    except (OSError, ValueError):
        return None, None


@dataclass
class Tally:
    latencies_s: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # status code (or "lost") -> count
    wrong_answers: int = 0
    bad_sent: int = 0
    bad_misanswered: int = 0


def client(
    url: str,
    bodies: list[bytes],
    expected: list[list[int]],
    bad: list[tuple[bytes, str]],
    bad_every: int,
    start: int,
    deadline: float,
    tally: Tally,
    lock: threading.Lock,
) -> None:
    i = start
    while time.monotonic() < deadline:
        if bad and bad_every and i % bad_every == bad_every - 1:
            body, code = bad[i % len(bad)]
            status, answer = post(url, body)
            with lock:
                tally.bad_sent += 1
                tally.bad_misanswered += status != 400 or (answer or {}).get("error", {}).get("code") != code
            i += 1
            continue
        k = i % len(bodies)
        began = time.monotonic()
        status, answer = post(url, bodies[k])
        took = time.monotonic() - began
        with lock:
            if status != 200:
                key = "lost" if status is None else str(status)
                tally.errors[key] = tally.errors.get(key, 0) + 1
            else:
                tally.latencies_s.append(took)
                tally.tokens += len(answer["token_ids"])
                tally.wrong_answers += answer["token_ids"] != expected[k]
        i += 1


def batch_sizes(metrics: str) -> dict[str, float]:
    """Mean batch size and batches run, from the paligemma_batch_size histogram."""
    values = {}
    for line in metrics.splitlines():
        for name in ("paligemma_batch_size_sum", "paligemma_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    count = values.get("paligemma_batch_size_count", 0.0)
    return {"batches": count, "mean_batch_size": values.get("paligemma_batch_size_sum", 0.0) / count if count else 0.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def load(args: argparse.Namespace, max_batch: int) -> dict:
    server = Server(
        args.binary,
        args.model,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--max-batch",
        str(max_batch),
        "--max-queue",
        str(2 * args.clients),
    )
    try:
        bodies = [request_body(image, prompt, args) for image, prompt in MIX]
        bad = [(request_body(image, prompt, args, max_new), code) for image, prompt, max_new, code in BAD_MIX]
        expected = []
        for body, (image, prompt) in zip(bodies, MIX):
            status, answer = post(server.url, body)
            if status != 200:
                raise SystemExit(f"error: {image} {prompt!r} alone answered {status}; server log:\n{''.join(server.log)[-3000:]}")
            expected.append(answer["token_ids"])
        before = batch_sizes(server.metrics())
        tally, lock = Tally(), threading.Lock()
        began = time.monotonic()
        deadline = began + args.seconds
        threads = [
            threading.Thread(target=client, args=(server.url, bodies, expected, bad, args.bad_every, c, deadline, tally, lock))
            for c in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - began
        after = batch_sizes(server.metrics())
    finally:
        exit_code = server.stop()
    batches = after["batches"] - before["batches"]
    answered = len(tally.latencies_s)
    return {
        "max_batch": max_batch,
        "seconds": elapsed,
        "answered": answered,
        "errors": tally.errors,
        "lost": tally.errors.get("lost", 0),
        "wrong_answers": tally.wrong_answers,
        "bad_sent": tally.bad_sent,
        "bad_misanswered": tally.bad_misanswered,
        "requests_per_s": answered / elapsed,
        "tokens_per_s": tally.tokens / elapsed,
        "p50_ms": percentile(tally.latencies_s, 0.50) * 1e3,
        "p99_ms": percentile(tally.latencies_s, 0.99) * 1e3,
        "mean_latency_ms": statistics.fmean(tally.latencies_s) * 1e3 if answered else float("nan"),
        "batches": batches,
        "mean_batch_size": (after["mean_batch_size"] * after["batches"] - before["mean_batch_size"] * before["batches"]) / batches
        if batches
        else 0.0,
        "exit_code_after_sigterm": exit_code,
    }


def markdown(runs: list[dict], args: argparse.Namespace) -> str:
    gain = runs[0]["requests_per_s"] / runs[1]["requests_per_s"] if runs[1]["requests_per_s"] else float("nan")
    model = args.model.name if args.model.name != "onnx" else args.model.parent.name
    columns = (
        "--max-batch | answered | requests/s | tokens/s | p50 ms | p99 ms | mean batch | errors | lost | wrong answers "
        "| bad sent | bad misanswered"
    )
    lines = [
        f"{args.clients} clients x {args.seconds:g} s per configuration, {len(MIX)} image/prompt pairs, "
        f"{args.min_new_tokens}-{args.max_new_tokens} new tokens, model {model}, {args.dtype}, {args.threads} threads",
        "",
        f"| {columns} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        errors = sum(r["errors"].values()) - r["lost"]
        lines.append(
            f"| {r['max_batch']} | {r['answered']} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['mean_batch_size']:.2f} | {errors} | {r['lost']} | {r['wrong_answers']} | "
            f"{r['bad_sent']} | {r['bad_misanswered']} |"
        )
    lines += ["", f"Batching gain (requests/s, --max-batch {runs[0]['max_batch']} vs 1): {gain:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [load(args, args.max_batch), load(args, 1)]
    text = markdown(runs, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=2) + "\n")
    bad = [r for r in runs if r["errors"] or r["wrong_answers"] or r["bad_misanswered"] or r["exit_code_after_sigterm"] != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
