"""The RULER-style suite: task construction, shared prefills, eviction checks."""

import sys
import unittest
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
from helpers import tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eval_ruler  # noqa: E402
import ruler  # noqa: E402

from mlx_lm.models.cache import KVCacheConfig, make_prompt_cache  # noqa: E402


class TestTasks(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tokenizer = tiny_tokenizer()

    def test_every_task_has_about_the_length_asked(self):
        for length in (512, 1024):
            tasks = ruler.build_tasks(self.tokenizer, False, length, 1, seed=3)
            self.assertEqual([t.name for t in tasks], list(ruler.TASKS))
            for task in tasks:
                self.assertLess(abs(len(task.prompt) - length), 0.2 * length, task.name)

    def test_the_answers_are_in_the_prompt(self):
        tasks = ruler.build_tasks(self.tokenizer, False, 1024, 2, seed=1)
        for task in tasks:
            text = self.tokenizer.decode(task.prompt)
            for value in task.expected:
                self.assertIn(value, text, task.name)

    def test_needle_depth(self):
        for depth in (10, 50, 90):
            (task,) = ruler.build_tasks(
                self.tokenizer, False, 1024, 1, 0, ["niah_essay_number"], (depth,)
            )
            text = self.tokenizer.decode(task.prompt)
            where = text.index(task.expected[0]) / len(text)
            self.assertLess(abs(where - depth / 100), 0.15, depth)

    def test_seeded(self):
        a = ruler.build_tasks(self.tokenizer, False, 512, 2, seed=5)
        b = ruler.build_tasks(self.tokenizer, False, 512, 2, seed=5)
        c = ruler.build_tasks(self.tokenizer, False, 512, 2, seed=6)
        self.assertEqual([t.prompt for t in a], [t.prompt for t in b])
        self.assertNotEqual([t.prompt for t in a], [t.prompt for t in c])

    def test_score_is_the_share_of_expected_strings(self):
        task = ruler.Task("x", [], ["1234", "Moreau"], 8)
        self.assertEqual(task.score("it was 1234 and moreau."), 1.0)
        self.assertEqual(task.score("it was 1234"), 0.5)
        self.assertEqual(task.score("nothing"), 0.0)


class TestSharedPrefill(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, _ = tiny_model(seed=4)
        cls.tokenizer = tiny_tokenizer()
        cls.tasks = ruler.build_tasks(
            cls.tokenizer, False, 400, 1, 0, ["niah_essay_number", "qa"]
        )
        for task in cls.tasks:
            task.max_tokens = 6

    def test_forked_once_caches_answer_as_a_fresh_run(self):
        run = eval_ruler.Run(self.model, self.tokenizer, self.tasks, [], 1, 64)
        for budget, policy in ((200, "snapkv"), (120, "keydiff"), (200, "keydiff")):
            config = KVCacheConfig(
                compact_kv_budget=budget, compact_policy=policy, compact_mode="once"
            )
            for i, task in enumerate(self.tasks):
                tokens = mx.array(task.prompt)
                cache, ready = run._cache(config, ("task", i), tokens)
                self.assertTrue(ready)
                shared = eval_ruler.answer(
                    self.model, self.tokenizer, cache, config, tokens[-1:], task
                )
                fresh_cache = make_prompt_cache(self.model, config=config)
                fresh = eval_ruler.answer(
                    self.model, self.tokenizer, fresh_cache, config, tokens, task
                )
                self.assertEqual(shared, fresh, (budget, policy))
                self.assertEqual(
                    [c.size() for c in cache], [c.size() for c in fresh_cache]
                )
        # One prefill per prompt, whatever the budget.
        self.assertEqual(len(run.shared), len(self.tasks))

    def test_a_setup_that_never_evicts_fails_the_run(self):
        args = SimpleNamespace(
            trials=1,
            seed=0,
            tasks=["niah_essay_number"],
            docs=1,
            score_tokens=8,
            prefill_step=128,
            pass_score=0.0,
        )
        with self.assertRaises(eval_ruler.NoEvictionError):
            # A bound of 150% of the context never fills.
            eval_ruler.evaluate_length(
                self.model, self.tokenizer, False, 300, ["keydiff"], [-50], args, len
            )
        records, kept, dropped = eval_ruler.evaluate_length(
            self.model, self.tokenizer, False, 300, ["snapkv once"], [50], args, len
        )
        self.assertEqual(kept, ["niah_essay_number"])
        self.assertEqual([r["name"] for r in records], ["full", "snapkv once 50%"])
        self.assertGreater(records[1]["evicted"], 100)
        self.assertLess(records[1]["kv_bytes"], 0.75 * records[0]["kv_bytes"])
        self.assertGreater(records[1]["kl"], 0.0)


if __name__ == "__main__":
    unittest.main()
