"""`python -m bench.serve_memory`: the server's memory before, during and after one long prompt.

Starts `paligemma serve` on a model, sends a small request (warm-up), reads the process's RSS,
sends one request whose prompt is about `--prompt-tokens` tokens (emoji: four byte-fallback
tokens each) while sampling RSS every 50 ms, then reads RSS after it and after one more small
request. Prints one JSON object; nothing here is asserted anywhere.

    python -m bench.serve_memory --model models/scenes --prompt-tokens 8000
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=str(REPO / "target/release/paligemma"))
    parser.add_argument("--model", default=str(REPO / "models/scenes"))
    parser.add_argument("--image", default=str(REPO / "models/scenes/example.png"))
    parser.add_argument("--prompt-tokens", type=int, default=8000)
    args = parser.parse_args()

    cap = str(args.prompt_tokens + 100)
    command = [args.binary, "serve", "--model", args.model, "--port", "0", "--max-prompt-tokens", cap, "--max-body-bytes", "50000000"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stderr:
            if found := re.search(r"listening on (\S+)", line):
                url = found.group(1)
                break
        if url is None:
            raise SystemExit("the server exited before listening")
        threading.Thread(target=lambda: server.stderr.read(), daemon=True).start()
        image = base64.b64encode(Path(args.image).read_bytes()).decode()

        def post(prompt: str) -> dict:
            body = json.dumps({"image": image, "prompt": prompt, "max_new_tokens": 4}).encode()
            request = urllib.request.Request(f"{url}/v1/generate", body, {"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=3600) as answer:
                return json.loads(answer.read())

        post("caption en")
        time.sleep(0.5)
        before = rss_mb(server.pid)
        peak, running = [before], [True]

        def sample() -> None:
            while running[0]:
                peak[0] = max(peak[0], rss_mb(server.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.time()
        post("caption en " + "\U0001f600" * (args.prompt_tokens // 4 - 4))
        seconds = time.time() - started
        running[0] = False
        sampler.join()
        time.sleep(1.0)
        after = rss_mb(server.pid)
        post("caption en")
        time.sleep(0.5)
        print(
            json.dumps(
                {
                    "model": args.model,
                    "prompt_tokens": args.prompt_tokens,
                    "seconds": round(seconds, 1),
                    "rss_mb": {
                        "before": round(before),
                        "peak": round(peak[0]),
                        "after": round(after),
                        "after_next_request": round(rss_mb(server.pid)),
                    },
                }
            )
        )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
