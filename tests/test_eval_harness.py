import inspect
import io
import json
import math
import sys
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "benchmarks")]

import eval_long_context as harness  # noqa: E402
from helpers import tiny_model, tiny_tokenizer, write_model_dir  # noqa: E402

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import (  # noqa: E402
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
)

FULL = harness.CacheSetup("full")


def rotating(size, evicts=True):
    return harness.CacheSetup(f"max_kv_size={size}", {"max_kv_size": size}, evicts)


class TestEvalHarness(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, cls.config = tiny_model(seed=3)
        mx.random.seed(4)
        vocab = cls.config["vocab_size"]
        cls.docs = [mx.random.randint(0, vocab, (80,)) for _ in range(2)]

    def test_eviction_counter_is_tokens_fed_minus_budget(self):
        config = rotating(40).config
        cache = make_prompt_cache(self.model, config=config)
        self.assertIsInstance(cache[0], RotatingKVCache)
        steps = harness.forced_logprobs(self.model, cache, config, self.docs[0], 50, 8)
        self.assertEqual(len(list(steps)), 50)
        fed = len(self.docs[0]) - 1
        self.assertEqual([c.offset for c in cache], [fed] * len(cache))
        self.assertEqual(harness.evicted_tokens(cache), [fed - 40] * len(cache))

        # Continuing by five greedy tokens feeds the last document token and four
        # greedy ones.
        record, _, _ = harness.evaluate_setup(
            self.model, rotating(40), self.docs, [], 50, 5, 16
        )
        self.assertEqual(record["tokens_fed"], fed + 5)
        self.assertEqual(record["evicted"], fed + 5 - 40)
        self.assertAlmostEqual(record["kept_fraction"], 40 / (fed + 5))

        full, _, _ = harness.evaluate_setup(self.model, FULL, self.docs, [], 50, 5, 16)
        self.assertEqual(full["evicted"], 0)
        self.assertEqual(full["kept_fraction"], 1.0)

    def test_setup_meant_to_evict_that_never_does_fails(self):
        with self.assertRaisesRegex(harness.NoEvictionError, "max_kv_size=500"):
            harness.evaluate(self.model, [rotating(500)], self.docs, n_generate=8)
        # The same budget is fine when nothing claims it evicts.
        records = harness.evaluate(
            self.model, [rotating(500, evicts=False)], self.docs, n_generate=8
        )
        self.assertEqual(records[1]["evicted"], 0)

    def test_full_cache_perplexity_matches_one_forward_pass(self):
        n_scored = 50
        (record,) = harness.evaluate(
            self.model, [FULL], self.docs, n_scored=n_scored, prefill_step=8
        )
        total = 0.0
        for doc in self.docs:
            logits = self.model(doc[None])[0].astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            rows = mx.arange(len(doc) - n_scored - 1, len(doc) - 1)
            total -= logprobs[rows, doc[-n_scored:]].sum().item()
        expected = math.exp(total / (n_scored * len(self.docs)))
        self.assertLess(abs(record["perplexity"] / expected - 1), 1e-4)
        self.assertEqual(record["ppl_ratio"], 1.0)

    def test_agreement_and_kl_against_full_cache(self):
        setups = [FULL, rotating(1000, evicts=False), rotating(12)]
        full, roomy, small = harness.evaluate(
            self.model, setups, self.docs, n_scored=30, n_generate=16, prefill_step=8
        )
        self.assertEqual(full["kl"], 0.0)
        self.assertEqual(full["agreement"], 1.0)
        # A rotating cache that never fills is a full cache.
        self.assertEqual(roomy["agreement"], 1.0)
        self.assertLess(abs(roomy["kl"]), 1e-5)
        self.assertLess(abs(roomy["ppl_ratio"] - 1), 1e-4)
        # A cache of 12 tokens sees different context and must disagree somewhere.
        self.assertGreater(small["kl"], 1e-4)
        self.assertGreater(small["evicted"], 0)

    def test_greedy_extension_matches_generate_step(self):
        prompt = self.docs[0][:40]
        config = FULL.config
        cache = make_prompt_cache(self.model, config=config)
        ours = list(
            harness.forced_logprobs(self.model, cache, config, prompt, 1, 8, 12)
        )
        theirs = list(generate_step(prompt, self.model, max_tokens=12))
        self.assertEqual(
            [mx.argmax(lp).item() for lp in ours[1:]], [t for t, _ in theirs]
        )
        for lp, (_, their_lp) in zip(ours[1:], theirs):
            self.assertTrue(mx.allclose(lp, their_lp, atol=1e-4).item())

    def test_generation_hooks_run_between_steps(self):
        # kv_bits makes generation swap in quantized layers after a model call.
        model, _ = tiny_model(seed=5, hidden_size=128, num_attention_heads=2)
        setup = harness.CacheSetup("kv_bits=8", {"kv_bits": 8})
        cache = make_prompt_cache(model, config=setup.config)
        list(harness.forced_logprobs(model, cache, setup.config, self.docs[0], 4, 16))
        self.assertIsInstance(cache[0], QuantizedKVCache)

        full, quantized = harness.evaluate(
            model, [FULL, setup], self.docs, n_scored=8, n_generate=8, prefill_step=16
        )
        self.assertEqual(quantized["evicted"], 0)
        self.assertLess(quantized["kv_bytes"], full["kv_bytes"])
        self.assertGreater(quantized["kl"], 0.0)

    def test_parse_setups(self):
        spec = (
            "full, max_kv_size=25%,kv_bits=4+kv_group_size=32,max_kv_size=100+kv_bits=8"
        )
        setups = harness.parse_setups(spec, 400)
        names = [
            "full",
            "max_kv_size=100",
            "kv_bits=4+kv_group_size=32",
            "max_kv_size=100+kv_bits=8",
        ]
        self.assertEqual([s.name for s in setups], names)
        self.assertEqual(setups[1].kwargs, {"max_kv_size": 100})
        self.assertEqual(setups[2].kwargs, {"kv_bits": 4, "kv_group_size": 32})
        self.assertEqual([s.evicts for s in setups], [False, True, False, True])
        defaults = harness.default_setups(2048)
        self.assertEqual(defaults[0].kwargs, {})
        sizes = [s.kwargs["max_kv_size"] for s in defaults if "max_kv_size" in s.kwargs]
        self.assertEqual(sizes, [512, 1024, 1536])
        self.assertEqual(
            [s.evicts for s in defaults], [s.config.evicts for s in defaults]
        )
        with self.assertRaisesRegex(ValueError, "no_such_option"):
            harness.parse_setups("full,no_such_option=3", 400)
        with self.assertRaisesRegex(ValueError, "max_kv_size"):
            harness.parse_setups("max_kv_size", 400)

    def test_needle_cases_follow_training_format(self):
        tokenizer = tiny_tokenizer()
        text = inspect.getsource(json.decoder) * 2
        stream = tokenizer.encode(text, add_special_tokens=False, verbose=False)
        cases = harness.make_needle_cases(tokenizer, stream, [120], [10, 90], 2, seed=1)
        self.assertEqual(
            [(c.length, c.depth) for c in cases], [(120, 10)] * 2 + [(120, 90)] * 2
        )
        question = tokenizer.encode(harness.corpus.QUESTION, add_special_tokens=False)
        where = []
        for case in cases:
            self.assertEqual(len(case.prompt), 120)
            self.assertEqual(case.prompt[-len(question) :], question)
            key = tokenizer.decode(case.answer)
            self.assertRegex(key, r"^\d{%d}$" % harness.corpus.KEY_DIGITS)
            text = tokenizer.decode(case.prompt)
            self.assertIn(harness.corpus.PLANT.format(key=key) + "\n", text)
            where.append(text.index("# passkey:") / len(text))
        self.assertLess(max(where[:2]), min(where[2:]))

    def test_command_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_model_dir(Path(tmp) / "model", self.model, self.config)
            out_json, out_png = Path(tmp) / "r.json", Path(tmp) / "r.png"
            base = ["--model", str(folder), "--context", "96", "--docs", "1"]
            base += ["--retrieval-trials", "1", "--lengths", "96", "--depths", "50"]
            base += ["--score-tokens", "24", "--generate-tokens", "8"]
            stdout, stderr = io.StringIO(), io.StringIO()
            with redirect_stdout(stdout), redirect_stderr(stderr):
                status = harness.main(
                    base
                    + ["--configs", "max_kv_size=50%"]
                    + ["--json", str(out_json), "--plot", str(out_png)]
                )
            self.assertEqual(status, 0, stderr.getvalue())
            self.assertIn("max_kv_size=48", stdout.getvalue())
            results = json.loads(out_json.read_text())["results"]
            self.assertEqual([r["name"] for r in results], ["full", "max_kv_size=48"])
            self.assertEqual(results[1]["retrieval"].keys(), {"96"})
            self.assertEqual(out_png.read_bytes()[:4], b"\x89PNG")

            stderr = io.StringIO()
            with redirect_stdout(io.StringIO()), redirect_stderr(stderr):
                status = harness.main(base + ["--configs", "full,max_kv_size=5000"])
            self.assertEqual(status, 1)
            self.assertIn("FAIL", stderr.getvalue())
            self.assertIn("max_kv_size=5000", stderr.getvalue())


if __name__ == "__main__":
    unittest.main()
