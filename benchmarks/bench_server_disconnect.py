"""How soon the server's worker is free after a non-streaming client leaves.

Starts ``mlx_lm.server`` in this process on a loopback port, sends a request that
would generate for minutes (end-of-sequence tokens banned), closes the socket
after ``--wait`` seconds and times until the worker counts it as cancelled,
against the time of one decode step (from a short streamed request first).

    python benchmarks/bench_server_disconnect.py --trials 5
    python benchmarks/bench_server_disconnect.py --model M --trials 3 --json out.json
"""

# Before mlx.core, so that matrix products use the optimized BLAS on Linux.
import mlx_lm  # noqa: F401 isort: skip

import argparse
import http.client
import json
import socket
import statistics
import threading
import time

from mlx_lm.server import build_server, setup_arg_parser


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    reply = json.loads(conn.getresponse().read())
    conn.close()
    return reply


def abandon(port: int, body: bytes, wait: float, limit: float) -> float:
    """Seconds from closing the socket to the worker's cancellation."""
    before = health(port)["requests"]["cancelled"]
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
        b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    time.sleep(wait)
    closed = time.perf_counter()
    s.close()
    while health(port)["requests"]["cancelled"] == before:
        if time.perf_counter() - closed > limit:
            raise RuntimeError(f"the worker was still busy {limit} s after")
        time.sleep(0.005)
    return time.perf_counter() - closed


def decode_steps(port: int, body: dict, tokens: int = 32) -> list:
    """Seconds between the streamed tokens of one request, after the first."""
    data = json.dumps({**body, "max_tokens": tokens, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
    reply = conn.getresponse()
    arrivals = []
    for line in reply:
        if line.startswith(b"data: {"):
            arrivals.append(time.perf_counter())
    conn.close()
    # The first two events are the role chunk and the first token (prefill).
    return [b - a for a, b in zip(arrivals[2:], arrivals[3:])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled demo model")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--wait", type=float, default=1.5, help="seconds before leaving")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.trials < 1 or a.wait <= 0:
        p.error("--trials must be >= 1 and --wait > 0")
    flags = ["--port", "0"] + (["--model", a.model] if a.model else [])
    server = build_server(setup_arg_parser().parse_args(flags))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    tokenizer = server.models.get(server.models.default_id)[1]
    body = {
        "prompt": "Keep talking",
        "max_tokens": 30000,
        "logit_bias": {str(i): -100 for i in tokenizer.eos_token_ids},
    }
    try:
        steps = [1000 * s for s in decode_steps(port, body)]
        data = json.dumps(body).encode()
        seconds = [abandon(port, data, a.wait, 60.0) for _ in range(a.trials)]
    finally:
        server.shutdown()
        server.close()
    ms = [1000 * s for s in seconds]
    step = max(steps)
    print(
        f"decode step: median {statistics.median(steps):.0f} ms (max {step:.0f})\n"
        f"worker free after the client left: median {statistics.median(ms):.0f} ms "
        f"(min {min(ms):.0f}, max {max(ms):.0f}) over {len(ms)} trials\n"
        f"goal (every trial within the slowest step + 500 ms = {step + 500:.0f} ms): "
        + ("met" if max(ms) <= step + 500 else "not met")
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ms": ms, "decode_step_ms": steps}, f, indent=1)


if __name__ == "__main__":
    main()
