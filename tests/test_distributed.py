"""Tensor and pipeline parallelism over two ranks on the loopback interface
(MLX's ring backend, started with ``mlx.launch``): greedy tokens must equal
one process's for every cache option and each rank must hold half the KV
cache; with tensor parallelism, weights plus cache per rank at most 0.55 of
one process's."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import uuid
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from helpers import tiny_model, write_model_dir

from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import load_tokenizer

HERE = Path(__file__).parent
# MLX's launcher: the one installed beside this interpreter, else on PATH.
_BESIDE = Path(sys.executable).with_name("mlx.launch")
LAUNCH = str(_BESIDE) if _BESIDE.exists() else shutil.which("mlx.launch")
WORKER = HERE / "tensor_parallel_worker.py"
COMPACT = {"compact_kv_budget": 40, "compact_keep_recent": 4}
OPTIONS = {
    "full": {},
    "kv_bits 8": {"kv_bits": 8, "quantized_kv_start": 0},
    "budget, head scope": COMPACT,
    "budget, layer scope": {**COMPACT, "compact_scope": "layer"},
    "budget, model scope": {**COMPACT, "compact_scope": "model"},
    "window": {"window_size": 32},
    "max_kv_size": {"max_kv_size": 32},
}
SHAPE = dict(hidden_size=128, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "llama with biases": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "llama, 4-bit weights": dict(model_type="llama"),
    "qwen3": dict(model_type="qwen3"),
    "phi3 (fused projections)": dict(model_type="phi3"),
    "gemma3_text (sliding layers)": dict(
        model_type="gemma3_text",
        num_hidden_layers=4,
        query_pre_attn_scalar=64,
        sliding_window=16,
        sliding_window_pattern=2,
    ),
}


def run(args, timeout=180):
    return subprocess.run(
        args, cwd=HERE, capture_output=True, text=True, timeout=timeout
    )


class TestTensorParallel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if LAUNCH is None:
            raise unittest.SkipTest("mlx.launch is not installed")
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def results(self, folder, ranks, mode="tensor", options=OPTIONS):
        out = Path(self.tmp.name) / f"{folder.name}-{ranks}-{mode}"
        command = [sys.executable, str(WORKER), str(folder), json.dumps(options)]
        command += [str(out), mode]
        if ranks > 1:
            command = [
                LAUNCH,
                "-n",
                str(ranks),
                "--backend",
                "ring",
                "--",
            ] + command
        done = run(command)
        if done.returncode != 0 and ranks > 1 and "ddress" in done.stderr:
            self.skipTest(f"the ring backend cannot bind here: {done.stderr[-300:]}")
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(ranks)]

    def folder(self, name):
        model, config = tiny_model(seed=4, **SHAPE, **MODELS[name])
        if "4-bit" in name:
            nn.quantize(model, 64, 4)
            config["quantization"] = {"group_size": 64, "bits": 4}
        folder = Path(self.tmp.name) / f"{name.split()[0]}-{len(name)}"
        return write_model_dir(folder, model, config)

    def assert_split(self, folder, mode, options, memory):
        """Two ranks give one process's tokens under every option, each with
        half its KV bytes and below ``memory`` times its weights + KV bytes."""
        (single,) = self.results(folder, 1, mode, options)
        ranks = self.results(folder, 2, mode, options)
        self.assertEqual([r["size"] for r in ranks], [2, 2])
        for option in options:
            want = single["results"][option]
            for rank in ranks:
                got = rank["results"][option]
                self.assertEqual(got["tokens"], want["tokens"], option)
                self.assertEqual(got["kv_bytes"] * 2, want["kv_bytes"], option)
                held = got["weights"] + got["kv_bytes"]
                self.assertLess(held, memory * (want["weights"] + want["kv_bytes"]))

    def test_pipeline_matches_one_process(self):
        for name in ("llama, 4-bit weights", "phi3 (fused projections)",
                     "gemma3_text (sliding layers)"):  # fmt: skip
            with self.subTest(model=name):
                # The norms, the embedding and the head are whole on each rank.
                self.assert_split(self.folder(name), "pipeline", OPTIONS, 1.0)

    def test_two_ranks_match_one_process(self):
        for name in MODELS:
            with self.subTest(model=name):
                # Only the norms are whole on every rank.
                self.assert_split(self.folder(name), "tensor", OPTIONS, 0.55)

    def test_generate_command_line(self):
        model, config = tiny_model(seed=6, **SHAPE)
        folder = write_model_dir(Path(self.tmp.name) / "cli", model, config)
        command = [sys.executable, "-m", "mlx_lm.generate", "--model", str(folder)]
        command += ["--prompt", "the lazy dog " * 10, "--max-tokens", "16"]
        command += ["--compact-kv-budget", "40", "--compact-keep-recent", "4"]
        alone = run(command + ["--compact-scope", "layer"])
        self.assertEqual(alone.returncode, 0, alone.stderr[-2000:])
        text = alone.stdout.split("=" * 10)[1]
        launch = [LAUNCH, "-n", "2", "--backend", "ring", "--"]
        for flags in (
            ["--compact-scope", "layer"],
            ["--compact-scope", "layer", "--pipeline"],
        ):
            two = run(launch + command + flags)
            self.assertEqual(two.returncode, 0, two.stderr[-2000:])
            # One copy of the output (rank 0's), the same text as one process.
            self.assertEqual(two.stdout.count("=" * 10), 2, flags)
            self.assertEqual(two.stdout.split("=" * 10)[1], text, flags)

    def test_server_across_ranks(self):
        model, config = tiny_model(seed=7, **SHAPE)
        folder = write_model_dir(Path(self.tmp.name) / "served", model, config)
        for flags in ([], ["--pipeline"]):
            with self.subTest(flags=flags):
                self.serve_across_ranks(model, folder, flags)

    def serve_across_ranks(self, model, folder, flags):
        """Rank 0 serves, rank 1 follows: the answers of one process, a
        client's departure stops both ranks, SIGTERM to rank 0 ends both."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        marker = uuid.uuid4().hex
        launcher = subprocess.Popen(
            [LAUNCH, "-n", "2", "--backend", "ring", "--", sys.executable]
            + ["-m", "mlx_lm.server", "--model", str(folder), "--port", str(port)]
            + flags,
            cwd=HERE,
            env={**os.environ, "TP_SERVER_TEST": marker},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(launcher.kill)
        ranks = self.ranks_of(marker, 2)
        self.addCleanup(
            lambda: [os.kill(p, signal.SIGKILL) for p in ranks_alive(ranks)]
        )
        deadline = time.monotonic() + 120
        while not ask(port, "GET", "/health"):
            self.assertLess(time.monotonic(), deadline, "the server did not start")
            time.sleep(0.5)

        tokenizer = load_tokenizer(folder)
        prompt = "the lazy dog " * 8
        options = {"compact_kv_budget": 40, "compact_keep_recent": 4}
        for extra in ({}, {**options, "compact_scope": "layer"}, {"window_size": 32}):
            body = {"prompt": prompt, "max_tokens": 12, "cache": "fresh", **extra}
            reply = ask(port, "POST", "/v1/completions", body)
            cache = make_prompt_cache(model, **extra)
            want = "".join(
                r.text
                for r in stream_generate(
                    model, tokenizer, mx.array(tokenizer.encode(prompt)),
                    max_tokens=12, prompt_cache=cache, **extra,
                )
            )  # fmt: skip
            self.assertIn("choices", reply, reply)
            self.assertEqual(reply["choices"][0]["text"], want, extra)
            # The report is the whole model's, not rank 0's part.
            report = reply["kv_cache"]
            self.assertEqual(report["kv_bytes"], sum(c.nbytes for c in cache))
            held = sum(c.size() for c in cache)
            self.assertEqual(report["tokens_held"], held, extra)
        # A client that leaves mid-generation: every rank stops with rank 0.
        body = json.dumps({"prompt": prompt, "max_tokens": 3000}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            time.sleep(1.0)
        deadline = time.monotonic() + 60
        while ask(port, "GET", "/health")["requests"]["cancelled"] < 1:
            self.assertLess(time.monotonic(), deadline, "the request ran on")
            time.sleep(0.2)
        reply = ask(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 4})
        self.assertEqual(reply["usage"]["completion_tokens"], 4)
        # SIGTERM to rank 0 stops both ranks cleanly.
        os.kill(ranks[0], signal.SIGTERM)
        self.assertEqual(launcher.wait(60), 0)

    def ranks_of(self, marker, count):
        """Process ids of the ranks started with ``marker``, by rank."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = {}
            for proc in Path("/proc").iterdir():
                try:
                    env = (proc / "environ").read_bytes().split(b"\0")
                except (OSError, ValueError):
                    continue
                if f"TP_SERVER_TEST={marker}".encode() in env:
                    for item in env:
                        if item.startswith(b"MLX_RANK="):
                            found[int(item[9:])] = int(proc.name)
            if len(found) == count:
                return [found[r] for r in range(count)]
            time.sleep(0.2)
        self.fail("the ranks did not start")


def ranks_alive(pids):
    return [p for p in pids if Path(f"/proc/{p}").exists()]


def ask(port, method, path, body=None):
    """The JSON reply, or None when the server cannot be reached yet."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())
    except (ConnectionError, OSError):
        return None
    finally:
        conn.close()


if __name__ == "__main__":
    unittest.main()
