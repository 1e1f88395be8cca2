"""Tensor and pipeline parallelism over two ranks on the loopback interface
(MLX's ring backend, started with ``mlx.launch``): greedy tokens must equal
one process's for every cache option and each rank must hold half the KV
cache; with tensor parallelism, weights plus cache per rank at most 0.55 of
one process's."""

import json
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from helpers import tiny_model, write_model_dir

from mlx_lm.models.cache import make_prompt_cache

HERE = Path(__file__).parent
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
        if shutil.which("mlx.launch") is None:
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
                "mlx.launch",
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
        # Model scope ranks all layers together: refused (see below).
        options = {k: v for k, v in OPTIONS.items() if "model scope" not in k}
        for name in ("llama, 4-bit weights", "phi3 (fused projections)",
                     "gemma3_text (sliding layers)"):  # fmt: skip
            with self.subTest(model=name):
                # The norms, the embedding and the head are whole on each rank.
                self.assert_split(self.folder(name), "pipeline", options, 1.0)

    def test_pipeline_refuses_model_scope(self):
        model, _ = tiny_model(seed=4, **SHAPE)
        model.pipeline(mx.distributed.init())
        with self.assertRaisesRegex(ValueError, "compact_scope='model'"):
            make_prompt_cache(model, compact_kv_budget=40, compact_scope="model")

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
        launch = ["mlx.launch", "-n", "2", "--backend", "ring", "--"]
        for flags in (
            ["--compact-scope", "layer"],
            ["--compact-scope", "layer", "--pipeline"],
        ):
            two = run(launch + command + flags)
            self.assertEqual(two.returncode, 0, two.stderr[-2000:])
            # One copy of the output (rank 0's), the same text as one process.
            self.assertEqual(two.stdout.count("=" * 10), 2, flags)
            self.assertEqual(two.stdout.split("=" * 10)[1], text, flags)


if __name__ == "__main__":
    unittest.main()
