"""A soak run of ``mlx_lm.server``: concurrent clients mixing valid, invalid and
abandoned requests for minutes, with the server's resident memory sampled.

The server runs as its own process (``--server-flags`` are passed to it). First
each prompt is answered once, greedily and from a fresh cache, as the reference;
then ``--clients`` threads loop for ``--minutes``, each request drawn at random:

- ``valid``: a greedy chat or text completion, streamed or not, with
  ``"cache": "fresh"``; its text must equal the reference;
- ``reused``: the same, continuing from whatever cache the server kept (with a
  bounded cache the answer may differ, so only the reply's shape is checked);
- ``invalid``: a body the server must refuse with a 4xx;
- ``abandoned``: a request whose client hangs up after a random delay.

It reports requests served by kind, replies by status, p50/p99 latency of the
valid ones, wrong answers, and resident memory at the start, after the first
minute and at the end (the goal: the end within 10% of the first minute).

    python benchmarks/bench_server_soak.py --minutes 10 --clients 8 \\
        --server-flags "--compact-kv-budget 256" --json benchmarks/results/server_soak.json
    python benchmarks/bench_server_soak.py --minutes 1   # a quick look
"""

import argparse
import collections
import http.client
import json
import random
import re
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = (Path("/usr/share/common-licenses/Apache-2.0").read_text()).split()

INVALID = [
    (b"{", "application/json"),
    (b'{"prompt": 5}', "application/json"),
    (b'{"prompt": "hi", "max_tokens": 1e999}', "application/json"),
    (b'{"prompt": "hi", "max_tokens": 10000000}', "application/json"),
    (b'{"prompt": "hi", "kv_bits": 4.0}', "application/json"),
    (b'{"prompt": "hi", "temperature": "hot"}', "application/json"),
    (b'{"prompt": "hi", "compact_kv_budget": -3}', "application/json"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', "application/json"),
    (b'{"prompt": "\\ud800"}', "application/json"),
    (b'{"prompt": "hi"}', "text/plain"),
    (b'{"prompt": "hi", "model": "/etc/passwd"}', "application/json"),
]


def prompts(count, words, seed=0):
    """``count`` natural-text prompts of about ``words`` words each."""
    rng = random.Random(seed)
    found = []
    for _ in range(count):
        start = rng.randrange(len(TEXT) - words)
        found.append(" ".join(TEXT[start : start + words]))
    return found


def rss_mib(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def start_server(flags):
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm.server", "--port", "0", *flags],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    for line in process.stderr:
        if line.startswith("Serving"):
            port = int(re.search(r"http://[^ ]+:(\d+)/v1", line).group(1))
            # Keep reading its log so that the pipe never fills.
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, port
    raise RuntimeError("the server did not start")


def body_of(kind, prompt, stream, max_tokens):
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def ask(port, body, content_type="application/json", timeout=600):
    """``(status, text or error body)``; a stream is read to its end."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(
        "POST",
        "/v1/chat/completions" if b'"messages"' in data else "/v1/completions",
        data,
        {"Content-Type": content_type},
    )
    reply = conn.getresponse()
    if reply.status != 200:
        out = reply.status, json.loads(reply.read())
    elif reply.getheader("Content-Type") == "text/event-stream":
        pieces = []
        for line in reply:
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"]
                if choice:
                    c = choice[0]
                    pieces.append(
                        c.get("text") or c.get("delta", {}).get("content") or ""
                    )
        out = 200, "".join(pieces)
    else:
        choice = json.loads(reply.read())["choices"][0]
        out = 200, choice.get("text", choice.get("message", {}).get("content"))
    conn.close()
    return out


def abandon(port, body, rng):
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data
        )
        time.sleep(rng.uniform(0, 0.5))


class Soak:
    def __init__(self, port, cases, references, max_tokens):
        self.port = port
        self.cases = cases
        self.references = references
        self.max_tokens = max_tokens
        self.lock = threading.Lock()
        self.kinds = collections.Counter()
        self.statuses = collections.Counter()
        self.latency = []
        self.wrong = []
        self.failures = []

    def one(self, rng):
        kind = rng.choices(
            ["valid", "reused", "invalid", "abandoned"], weights=[5, 2, 2, 1]
        )[0]
        began = time.perf_counter()
        status = None
        try:
            if kind == "invalid":
                data, content_type = rng.choice(INVALID)
                status, _ = ask(self.port, data, content_type)
                ok = 400 <= status < 500
            elif kind == "abandoned":
                case = rng.randrange(len(self.cases))
                body = body_of("text", self.cases[case][1], True, self.max_tokens)
                abandon(self.port, body, rng)
                ok = True
            else:
                case = rng.randrange(len(self.cases))
                chat, prompt = self.cases[case]
                body = body_of(chat, prompt, rng.random() < 0.5, self.max_tokens)
                if kind == "valid":
                    body["cache"] = "fresh"
                status, text = ask(self.port, body)
                ok = status == 200 and isinstance(text, str)
                if ok and kind == "valid" and text != self.references[case]:
                    with self.lock:
                        self.wrong.append(case)
        except (OSError, http.client.HTTPException, ValueError) as e:
            ok = False
            with self.lock:
                self.failures.append(f"{kind}: {e!r}")
        seconds = time.perf_counter() - began
        with self.lock:
            self.kinds[kind] += 1
            if status is not None:
                self.statuses[status] += 1
            if kind in ("valid", "reused") and ok:
                self.latency.append(seconds)
            if not ok and status is not None:
                self.failures.append(f"{kind}: status {status}")

    def client(self, seed, until):
        rng = random.Random(seed)
        while time.monotonic() < until:
            self.one(rng)


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--server-flags", default="", help="passed to mlx_lm.server")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--words", type=int, default=300, help="words per prompt")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.clients < 1 or a.prompts < 1:
        p.error("--minutes must be > 0, --clients and --prompts >= 1")
    flags = shlex.split(a.server_flags)
    process, port = start_server(flags)
    try:
        texts = prompts(a.prompts, a.words)
        cases = [("chat" if i % 2 else "text", t) for i, t in enumerate(texts)]
        references = []
        for chat, prompt in cases:
            body = body_of(chat, prompt, False, a.max_tokens)
            status, text = ask(port, {**body, "cache": "fresh"})
            if status != 200:
                raise RuntimeError(f"reference request failed: {status} {text}")
            references.append(text)
        soak = Soak(port, cases, references, a.max_tokens)
        began = time.monotonic()
        until = began + 60 * a.minutes
        samples = [(0.0, rss_mib(process.pid))]
        threads = [
            threading.Thread(target=soak.client, args=(i, until), daemon=True)
            for i in range(a.clients)
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(a.sample_seconds)
            samples.append((time.monotonic() - began, rss_mib(process.pid)))
        for t in threads:
            t.join()
    finally:
        process.terminate()
        exit_code = process.wait(60)

    after_minute = next((m for s, m in samples if s >= 60), samples[-1][1])
    end = samples[-1][1]
    growth = end / after_minute - 1
    lat = soak.latency or [float("nan")]
    result = {
        "server_flags": flags,
        "minutes": a.minutes,
        "clients": a.clients,
        "requests": dict(soak.kinds),
        "statuses": {str(k): v for k, v in sorted(soak.statuses.items())},
        "latency_s": {
            "p50": statistics.median(lat),
            "p99": percentile(lat, 0.99),
            "max": max(lat),
        },
        "wrong_answers": len(soak.wrong),
        "failures": soak.failures[:50],
        "rss_mib": {"start": samples[0][1], "after_1_min": after_minute, "end": end},
        "rss_samples": samples,
        "rss_growth_after_1_min": growth,
        "exit_code_after_sigterm": exit_code,
    }
    fivexx = sum(v for k, v in soak.statuses.items() if k >= 500)
    print(
        f"server flags: {' '.join(flags) or '(none)'}; {a.clients} clients, {a.minutes} min"
    )
    print(f"requests: {dict(soak.kinds)}  (total {sum(soak.kinds.values())})")
    print(f"replies by status: {result['statuses']}  (5xx: {fivexx})")
    print(
        f"valid latency: p50 {result['latency_s']['p50']:.2f} s, "
        f"p99 {result['latency_s']['p99']:.2f} s, max {result['latency_s']['max']:.2f} s"
    )
    print(f"wrong answers: {len(soak.wrong)}; other failures: {len(soak.failures)}")
    print(
        f"server RSS: start {samples[0][1]:.0f} MiB, after 1 min {after_minute:.0f}, "
        f"end {end:.0f} ({100 * growth:+.1f}%), max {max(m for _, m in samples):.0f}"
    )
    print(f"exit code after SIGTERM: {exit_code}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
