"""The bundled demo model: it loads offline, generates, and copies from far back."""

import os
import subprocess
import sys
import unittest
from pathlib import Path

# Before mlx.core, so that this module run alone also gets the optimized BLAS.
import mlx_lm  # isort: skip
import mlx.core as mx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))

import eval_long_context as harness  # noqa: E402

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import KVCacheConfig, make_prompt_cache  # noqa: E402
from mlx_lm.utils import DEMO_MODEL_PATH, load  # noqa: E402


class TestDemoModel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, cls.tokenizer = load(str(DEMO_MODEL_PATH))
        # float32: the CPU's matrix products are many times faster than float16's
        cls.model.set_dtype(mx.float32)
        cls.stream = harness.heldout_stream(cls.tokenizer)

    def test_command_line_uses_it_offline(self):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run(
            [sys.executable, "-m", "mlx_lm.generate"]
            + ["--prompt", "def read_config(path):", "--max-tokens", "12"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("bundled demo model", proc.stderr)
        self.assertIn("--model", proc.stderr)
        self.assertRegex(proc.stdout, r"Generation: \d+ tokens")

    def far_passkeys(self):
        """8 prompts of 2,048 tokens, the plant at 10% and 25% depth (1,500+ back)."""
        cases = harness.make_needle_cases(
            self.tokenizer, self.stream, [2048], [10, 25], 4, seed=7
        )
        for case in cases:
            key = self.tokenizer.decode(case.answer)
            plant = self.tokenizer.encode(
                harness.corpus.PLANT.format(key=key), add_special_tokens=False
            )
            at = next(
                i
                for i in range(len(case.prompt))
                if case.prompt[i : i + len(plant)] == plant
            )
            self.assertGreaterEqual(len(case.prompt) - at, 1500)
        return cases

    def recalled(self, config=None):
        """How many far passkeys greedy decoding gets right, and tokens evicted."""
        hits, evicted = 0, 0
        for case in self.far_passkeys():
            cache = make_prompt_cache(self.model, config=config)
            steps = generate_step(
                mx.array(case.prompt),
                self.model,
                max_tokens=len(case.answer),
                prompt_cache=cache,
                kv_config=config,
            )
            hits += [tok for tok, _ in steps] == case.answer
            evicted += sum(harness.evicted_tokens(cache))
        return hits, evicted

    def test_recalls_a_passkey_planted_1500_tokens_back(self):
        hits, evicted = self.recalled()
        self.assertEqual(evicted, 0)
        self.assertGreaterEqual(hits, 7, f"{hits}/8 passkeys recalled")

    def test_default_compression_keeps_them_with_half_evicted(self):
        hits, evicted = self.recalled(KVCacheConfig(compact_kv_budget=1024))
        self.assertGreater(evicted, 0)
        self.assertGreaterEqual(hits, 7, f"{hits}/8 passkeys recalled")


if __name__ == "__main__":
    unittest.main()
