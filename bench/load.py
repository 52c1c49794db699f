"""`python -m bench.load`: a bounded load test of `paligemma serve` on loopback.

Two workloads:
- `closed` (the default): clients that each wait for their answer, with bad requests mixed in;
  `--max-batch N` against `--max-batch 1` (the batching gain is their throughput ratio).
- `mixed`: open-loop arrivals at `--rate` per second, each asking for a number of new tokens
  drawn from `--lengths` (default 4-128, forced with min_new_tokens), against one server with
  `--batching continuous` and one with `--batching static`, both with `--max-batch N`: the
  throughput ratio and the median latency of the short requests (at most `--short` tokens), the
  ones a static batch makes wait for its longest row. Each answer must equal the first tokens of
  the same image and prompt run alone at the longest length (greedy tokens under
  min_new_tokens do not depend on where the request stops).

Steps of `closed`, for `--max-batch N` and then `--max-batch 1`:
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
import random
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
    parser.add_argument("--workload", choices=("closed", "mixed"), default="closed")
    parser.add_argument("--rate", type=float, default=4.0, help="mixed: arrivals per second (open loop)")
    parser.add_argument("--lengths", default="4-128", help="mixed: max_new_tokens drawn uniformly from LOW-HIGH")
    parser.add_argument("--short", type=int, default=16, help="mixed: requests of at most this many tokens count as short")
    parser.add_argument("--seed", type=int, default=0, help="mixed: the arrival schedule's seed")
    args = parser.parse_args(argv)
    low, _, high = args.lengths.partition("-")
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        parser.error(f"--lengths {args.lengths}: give LOW-HIGH, e.g. 4-128")
    args.lengths = (int(low), int(high))
    return args


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


def request_body(
    image: str | None, prompt: str, args: argparse.Namespace, max_new_tokens: int | None = None, min_new_tokens: int | None = None
) -> bytes:
    """A /v1/generate body; `image` None sends bytes that are no image."""
    data = base64.b64encode((IMAGES / image).read_bytes() if image else b"not an image").decode()
    max_new = args.max_new_tokens if max_new_tokens is None else max_new_tokens
    min_new = min(args.min_new_tokens, max_new) if min_new_tokens is None else min_new_tokens
    return json.dumps({"image": data, "prompt": prompt, "max_new_tokens": max_new, "min_new_tokens": min_new}).encode()


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
    """Decoder steps run ("batches") and their mean rows, from the paligemma_batch_size histogram."""
    values = {}
    for line in metrics.splitlines():
        for name in ("paligemma_batch_size_sum", "paligemma_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    count = values.get("paligemma_batch_size_count", 0.0)
    return {"batches": count, "mean_batch_size": values.get("paligemma_batch_size_sum", 0.0) / count if count else 0.0}


def run_threads(threads: list[threading.Thread], began: float, server: Server) -> tuple[float, dict[str, float]]:
    """Runs the load's threads to their end: (seconds since `began`, the server's steps after)."""
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - began, batch_sizes(server.metrics())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start_server(args: argparse.Namespace, max_batch: int, *extra: str) -> Server:
    return Server(args.binary, args.model, "--dtype", args.dtype, "--threads", str(args.threads), "--max-batch", str(max_batch), *extra)


def load(args: argparse.Namespace, max_batch: int) -> dict:
    server = start_server(args, max_batch, "--max-queue", str(2 * args.clients))
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
        elapsed, after = run_threads(threads, began, server)
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


@dataclass
class Arrival:
    at_s: float  # after the start of the run
    pair: int  # index into MIX
    tokens: int


def schedule(args: argparse.Namespace) -> list[Arrival]:
    """The mixed workload's arrivals: one every 1/rate seconds, seeded draws of pair and length."""
    rng = random.Random(args.seed)
    low, high = args.lengths
    return [Arrival(i / args.rate, rng.randrange(len(MIX)), rng.randint(low, high)) for i in range(int(args.seconds * args.rate))]


def mixed(args: argparse.Namespace, batching: str) -> dict:
    """One open-loop run of the mixed workload against a server with `--batching batching`."""
    arrivals = schedule(args)
    longest = args.lengths[1]
    cap = ("--max-queue", str(len(arrivals) + 1), "--max-new-tokens-cap", str(longest))
    server = start_server(args, args.max_batch, "--batching", batching, *cap)
    try:
        expected = []
        for image, prompt in MIX:
            status, answer = post(server.url, request_body(image, prompt, args, longest, longest))
            if status != 200:
                raise SystemExit(f"error: {image} {prompt!r} alone answered {status}; server log:\n{''.join(server.log)[-3000:]}")
            expected.append(answer["token_ids"])
        before = batch_sizes(server.metrics())
        results: list[tuple[Arrival, int | None, float, bool]] = []
        lock = threading.Lock()
        began = time.monotonic()

        def send(arrival: Arrival) -> None:
            image, prompt = MIX[arrival.pair]
            body = request_body(image, prompt, args, arrival.tokens, arrival.tokens)
            time.sleep(max(0.0, began + arrival.at_s - time.monotonic()))
            status, answer = post(server.url, body)
            # Latency from the scheduled arrival: a late sender does not hide queueing.
            took = time.monotonic() - began - arrival.at_s
            right = status == 200 and answer["token_ids"] == expected[arrival.pair][: arrival.tokens]
            with lock:
                results.append((arrival, status, took, right))

        elapsed, after = run_threads([threading.Thread(target=send, args=(a,)) for a in arrivals], began, server)
    finally:
        exit_code = server.stop()
    ok = [(a, took) for a, status, took, _ in results if status == 200]
    steps = after["batches"] - before["batches"]
    errors: dict[str, int] = {}
    for _, status, _, _ in results:
        if status != 200:
            key = "lost" if status is None else str(status)
            errors[key] = errors.get(key, 0) + 1
    return {
        "batching": batching,
        "max_batch": args.max_batch,
        "sent": len(arrivals),
        "answered": len(ok),
        "errors": errors,
        "lost": errors.get("lost", 0),
        "wrong_answers": sum(1 for _, status, _, right in results if status == 200 and not right),
        "seconds": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "tokens_per_s": sum(a.tokens for a, _ in ok) / elapsed,
        "p50_ms": percentile([t for _, t in ok], 0.50) * 1e3,
        "p99_ms": percentile([t for _, t in ok], 0.99) * 1e3,
        "short_requests": sum(1 for a, _ in ok if a.tokens <= args.short),
        "p50_short_ms": percentile([t for a, t in ok if a.tokens <= args.short], 0.50) * 1e3,
        "steps": steps,
        "mean_rows_per_step": (after["mean_batch_size"] * after["batches"] - before["mean_batch_size"] * before["batches"]) / steps
        if steps
        else 0.0,
        "exit_code_after_sigterm": exit_code,
    }


def model_name(model: Path) -> str:
    """The model's directory name, or its parent's for a conversion's `onnx` directory."""
    return model.name if model.name != "onnx" else model.parent.name


def mixed_markdown(runs: list[dict], args: argparse.Namespace) -> str:
    continuous, static = runs
    model = model_name(args.model)
    lines = [
        f"Open loop: {args.rate:g} requests/s for {args.seconds:g} s, max_new_tokens {args.lengths[0]}-{args.lengths[1]} "
        f"(seed {args.seed}), --max-batch {args.max_batch}, model {model}, {args.dtype}, {args.threads} threads; "
        f"short: at most {args.short} tokens",
        "",
        "| --batching | sent | answered | requests/s | tokens/s | p50 ms | p99 ms | short | p50 short ms | rows/step | errors | lost "
        "| wrong answers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        errors = sum(r["errors"].values()) - r["lost"]
        lines.append(
            f"| {r['batching']} | {r['sent']} | {r['answered']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['short_requests']} | {r['p50_short_ms']:.0f} | "
            f"{r['mean_rows_per_step']:.2f} | {errors} | {r['lost']} | {r['wrong_answers']} |"
        )
    throughput = continuous["tokens_per_s"] / static["tokens_per_s"] if static["tokens_per_s"] else float("nan")
    short = continuous["p50_short_ms"] / static["p50_short_ms"] if static["p50_short_ms"] else float("nan")
    lines += [
        "",
        f"Continuous vs static: throughput (tokens/s) {throughput:.2f}x, p50 latency of short requests {short:.2f}x",
    ]
    return "\n".join(lines)


def markdown(runs: list[dict], args: argparse.Namespace) -> str:
    gain = runs[0]["requests_per_s"] / runs[1]["requests_per_s"] if runs[1]["requests_per_s"] else float("nan")
    model = model_name(args.model)
    columns = (
        "--max-batch | answered | requests/s | tokens/s | p50 ms | p99 ms | rows/step | errors | lost | wrong answers "
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
    if args.workload == "mixed":
        runs = [mixed(args, "continuous"), mixed(args, "static")]
        text = mixed_markdown(runs, args)
    else:
        runs = [load(args, args.max_batch), load(args, 1)]
        text = markdown(runs, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=2) + "\n")
    bad = [r for r in runs if r["errors"] or r["wrong_answers"] or r.get("bad_misanswered") or r["exit_code_after_sigterm"] != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
