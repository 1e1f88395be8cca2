"""Query-aware eviction (snapkv) and compacting the prompt once (compact_mode)."""

import io
import sys
import unittest
from contextlib import redirect_stderr
from pathlib import Path

import mlx.core as mx
import numpy as np
from helpers import tiny_model

from mlx_lm.generate import cache_hook, generate_step, main
from mlx_lm.models.cache import (
    SNAPKV_SPREAD,
    SNAPKV_WINDOW,
    CompressedKVCache,
    KVCacheConfig,
    make_prompt_cache,
    score_snapkv,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_models  # noqa: E402


def naive_snapkv(keys, queries, scale, spread):
    """The score written out position by position in NumPy."""
    k, q = np.array(keys, np.float64), np.array(queries, np.float64)
    B, H, T, D = k.shape
    rep, w = q.shape[1] // H, q.shape[2]
    out = np.zeros((B, H, T))
    for b in range(B):
        for h in range(H):
            for r in range(rep):
                for j in range(w):
                    seen = T - w + j + 1  # query j is slot T - w + j
                    logits = k[b, h, :seen] @ q[b, h * rep + r, j] * scale
                    p = np.exp(logits - logits.max())
                    out[b, h, :seen] += p / p.sum()
    out /= rep * w
    spread_out = np.zeros_like(out)
    for t in range(T):
        spread_out[..., t] = out[..., max(0, t - spread + 1) : t + 1].max(-1)
    return spread_out


class TestSnapKVScore(unittest.TestCase):
    def test_matches_a_naive_implementation(self):
        mx.random.seed(0)
        keys = mx.random.normal((2, 2, 40, 8))
        queries = mx.random.normal((2, 6, 5, 8))
        got = score_snapkv(keys, queries, 0.35)
        want = np.log(naive_snapkv(keys, queries, 0.35, SNAPKV_SPREAD))
        np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-6)

    def test_the_tokens_after_an_attended_key_share_its_score(self):
        T, D = 64, 8
        keys = mx.zeros((1, 1, T, D))
        # Slot 10 is the only key aligned with the query.
        keys[0, 0, 10, 0] = 8.0
        queries = mx.zeros((1, 1, 1, D))
        queries[0, 0, 0, 0] = 1.0
        scores = mx.exp(score_snapkv(keys, queries, 1.0)[0, 0])
        top = scores[10].item()
        self.assertGreater(top, 10 * scores[9].item())
        for t in range(10, 10 + SNAPKV_SPREAD):
            self.assertEqual(scores[t].item(), top)
        self.assertLess(scores[10 + SNAPKV_SPREAD].item(), top / 10)


class TestQueryAwareCache(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, _ = tiny_model(seed=2, hidden_size=64)

    def test_attention_hands_over_the_newest_queries(self):
        cache = make_prompt_cache(
            self.model, compact_kv_budget=48, compact_policy="snapkv"
        )
        self.assertEqual(cache[0].query_window, SNAPKV_WINDOW)
        tokens = mx.arange(100) % 50
        self.model(tokens[None, :30], cache=cache)
        self.assertEqual(cache[0]._queries.shape[2], 30)
        self.model(tokens[None, 30:100], cache=cache)
        self.assertEqual(cache[0]._queries.shape[2], SNAPKV_WINDOW)
        n_heads = self.model.args.num_attention_heads
        self.assertEqual(cache[0]._queries.shape[1], n_heads)
        cache[0].compact()
        self.assertEqual(cache[0].size(), 48)
        # A key-only policy reads no queries.
        plain = make_prompt_cache(
            self.model, compact_kv_budget=48, compact_policy="keydiff"
        )
        self.assertEqual(plain[0].query_window, 0)

    def test_compaction_without_observed_queries_is_refused(self):
        cache = CompressedKVCache(8, keep_recent=2, policy="snapkv")
        cache.update_and_fetch(mx.ones((1, 1, 12, 4)), mx.ones((1, 1, 12, 4)))
        with self.assertRaisesRegex(ValueError, "snapkv"):
            cache.compact()

    def test_trim_drops_the_trimmed_queries(self):
        cache = make_prompt_cache(
            self.model, compact_kv_budget=48, compact_policy="snapkv"
        )
        self.model(mx.arange(20)[None], cache=cache)
        self.assertEqual(cache[0].trim(5), 5)
        self.assertEqual(cache[0]._queries.shape[2], 15)

    def test_generation_within_budget_under_snapkv(self):
        cache = make_prompt_cache(
            self.model, compact_kv_budget=40, compact_policy="snapkv"
        )
        prompt = mx.arange(150) % 37
        steps = generate_step(
            prompt,
            self.model,
            max_tokens=30,
            prompt_cache=cache,
            prefill_step_size=32,
            compact_kv_budget=40,
            compact_policy="snapkv",
            compact_mode="stream",
        )
        self.assertEqual(len(list(steps)), 30)
        self.assertGreater(cache[0].compactions, 3)
        self.assertLessEqual(cache[0].size(), 40 + cache[0].margin)


class TestCompactOnce(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, _ = tiny_model(seed=3, hidden_size=64)

    def sizes_during(self, mode, prompt_len=200, budget=64):
        config = KVCacheConfig(compact_kv_budget=budget, compact_mode=mode)
        cache = make_prompt_cache(self.model, config=config)
        sizes = []

        def progress(done, total):
            sizes.append(cache[0].size())

        tokens = []
        for token, _ in generate_step(
            mx.arange(prompt_len) % 41,
            self.model,
            max_tokens=40,
            prompt_cache=cache,
            prefill_step_size=32,
            kv_config=config,
            prompt_progress_callback=progress,
        ):
            tokens.append(token)
            sizes.append(cache[0].size())
        return sizes, cache

    def test_once_holds_the_prompt_then_compacts_it_to_the_budget(self):
        sizes, cache = self.sizes_during("once")
        # Progress reports come after each prefill chunk: the prompt is whole.
        self.assertEqual(max(sizes), 199)
        margin = cache[0].margin
        # After the first token the prompt is down to the budget.
        first_token = sizes.index(199) + 1
        while sizes[first_token] == 199:
            first_token += 1
        # (The next step is already queued when a token is handed out.)
        self.assertIn(sizes[first_token], (64, 65))
        self.assertLessEqual(max(sizes[first_token:]), 64 + margin)
        self.assertEqual(cache[0].offset, 200 + 39)

    def test_stream_never_exceeds_budget_plus_margin(self):
        sizes, cache = self.sizes_during("stream")
        self.assertLessEqual(max(sizes), 64 + cache[0].margin + 32)
        self.assertGreater(cache[0].compactions, 3)

    def test_hook_holds_prompt_chunks_in_once_mode(self):
        config = KVCacheConfig(
            compact_kv_budget=16, compact_keep_recent=4, compact_mode="once"
        )
        cache = make_prompt_cache(self.model, config=config)
        hook = cache_hook(config, cache)
        self.model(mx.arange(60)[None], cache=cache)
        hook(cache, prompt=True)
        self.assertEqual(cache[0].size(), 60)
        self.model(mx.arange(1)[None], cache=cache)
        hook(cache)
        # Compacted to the budget, no slack; later steps stream with the margin.
        self.assertEqual([c.size() for c in cache], [16] * len(cache))
        for _ in range(5):
            self.model(mx.arange(1)[None], cache=cache)
            hook(cache)
        self.assertEqual(cache[0].size(), 21)

    def test_bad_mode_is_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "compact_mode.*'later'"):
            KVCacheConfig(compact_kv_budget=64, compact_mode="later")
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit):
            main(
                ["--model", "/nonexistent", "--compact-kv-budget", "64"]
                + ["--compact-mode", "later"]
            )
        self.assertIn("--compact-mode", err.getvalue())
        self.assertNotIn("nonexistent", err.getvalue())


@unittest.skipIf(real_models.path("smollm2") is None, "SmolLM2 not fetched")
class TestQuestionAwareOnSmolLM2(unittest.TestCase):
    """Half the prompt evicted; the needle is still found."""

    def test_needle_survives_half_the_prompt_evicted(self):
        import ruler

        from mlx_lm.utils import load

        model, tokenizer = load(str(real_models.path("smollm2")))
        task = ruler.build_tasks(
            tokenizer, True, 1024, 1, 0, names=["niah_essay_number"], depths=(50,)
        )[0]
        budget = len(task.prompt) // 2
        config = KVCacheConfig(
            compact_kv_budget=budget, compact_policy="snapkv", compact_mode="once"
        )
        cache = make_prompt_cache(model, config=config)
        out = [
            t
            for t, _ in generate_step(
                mx.array(task.prompt),
                model,
                max_tokens=10,
                prompt_cache=cache,
                kv_config=config,
            )
        ]
        reply = tokenizer.decode(out)
        self.assertEqual(task.score(reply), 1.0, reply)
        self.assertGreaterEqual(cache[0].offset - cache[0].size(), budget - 10)


if __name__ == "__main__":
    unittest.main()
