"""Sliding-window KV caches: which tokens survive, masks, quantization, files."""

import io
import os
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import mlx.core as mx
from helpers import tiny_model, tiny_tokenizer, write_model_dir

from mlx_lm.generate import (
    batch_generate,
    generate,
    generate_step,
    main,
    speculative_generate_step,
)
from mlx_lm.models.base import create_causal_mask, scaled_dot_product_attention
from mlx_lm.models.cache import (
    ChunkedKVCache,
    CompressedKVCache,
    KVCache,
    KVCacheConfig,
    QuantizedKVCache,
    RotatingKVCache,
    SlidingWindowKVCache,
    cache_eviction_stats,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

VOCAB = 64
HEAD_DIM = 32


def marked(start, count, heads=2):
    """Keys [1, heads, count, HEAD_DIM] whose first entry is the token position."""
    pos = mx.arange(start, start + count, dtype=mx.float32)
    keys = mx.zeros((1, heads, count, HEAD_DIM))
    keys[..., 0] = mx.broadcast_to(pos, (1, heads, count))
    return keys


def held(cache):
    """Positions held by each KV head of a window over a plain cache, in slot order."""
    keys = cache.inner.keys[..., : cache.size(), 0]
    return [row.astype(mx.int32).tolist() for row in keys[0]]


def visible(cache, n_new):
    """Positions the newest of ``n_new`` incoming tokens sees (head 0)."""
    mask = cache.make_mask(n_new, return_array=True)
    cache.update_and_fetch(marked(cache.offset, n_new), marked(cache.offset, n_new))
    slots = held(cache)[0]
    if mask is None:
        return slots
    return [p for p, seen in zip(slots, mask[-1].tolist()) if seen]


def window_model(seed=1, **overrides):
    model, _ = tiny_model(seed=seed, vocab_size=VOCAB, head_dim=HEAD_DIM, **overrides)
    return model


def feed(model, cache, tokens, chunks):
    """Logits for every token of ``tokens`` [1, T], fed in pieces of ``chunks``."""
    out, start = [], 0
    for n in chunks:
        out.append(model(tokens[:, start : start + n], cache=cache))
        start += n
    assert start == tokens.shape[1]
    return mx.concatenate(out, axis=1)


def windows(model, size, strategy="fifo", prefix=0, span=3, quantized=False):
    inner = (lambda: QuantizedKVCache(32, 8)) if quantized else KVCache
    return [
        SlidingWindowKVCache(inner(), size, strategy, prefix, span)
        for _ in model.layers
    ]


TOKENS = mx.random.randint(0, VOCAB, (1, 48), key=mx.random.key(7))


class TestSurvivors(unittest.TestCase):
    def test_fifo_query_sees_exactly_the_newest_window(self):
        cache = SlidingWindowKVCache(KVCache(), 4, "fifo", eviction_attention_window=2)
        for t in range(20):
            self.assertEqual(visible(cache, 1), list(range(max(0, t - 3), t + 1)))
            self.assertLessEqual(cache.size(), 6)
            # What is held beyond the window is the next-oldest tokens, in order.
            self.assertEqual(held(cache)[0], list(range(t + 1 - cache.size(), t + 1)))
        self.assertEqual(cache.offset, 20)

    def test_fixed_keeps_the_prefix_and_the_newest_rest(self):
        cache = SlidingWindowKVCache(KVCache(), 5, "fixed", 2, 3)
        for t in range(25):
            newest = list(range(max(2, t - 2), t + 1))
            self.assertEqual(
                visible(cache, 1), sorted({0, 1} & set(range(t + 1))) + newest
            )
            self.assertEqual(held(cache)[0][:2], [0, 1][: t + 1])
        self.assertLessEqual(cache.size(), 8)

    def test_chunk_longer_than_the_window(self):
        cache = SlidingWindowKVCache(KVCache(), 4, "fixed", 1, 2)
        for _ in range(9):
            visible(cache, 1)
        # Evicted at tokens 7 and 9 (6 held, one more arriving) down to 4.
        self.assertEqual(held(cache)[0], [0, 5, 6, 7, 8])
        mask = cache.make_mask(7, return_array=True)
        cache.update_and_fetch(marked(9, 7), marked(9, 7))
        # The update evicted first (5 + 7 > 4 + 2), then appended the chunk.
        self.assertEqual(held(cache)[0], [0, 6, 7, 8] + list(range(9, 16)))
        slots = held(cache)[0]
        for i, row in enumerate(mask.tolist()):
            q = 9 + i
            seen = [p for p, ok in zip(slots, row) if ok]
            self.assertEqual(seen, [0] + list(range(q - 2, q + 1)))

    def test_attention_keeps_most_attended_tokens_per_head(self):
        size, prefix, span = 6, 1, 2
        cache = SlidingWindowKVCache(KVCache(), size, "attention", prefix, span)
        # At most size - prefix - span = 3 heavy tokens per head, so all stay.
        heavy = [{2, 5, 9}, {3, 11}]
        # A plain re-implementation of the policy, one list of positions per head.
        ref_slots, ref_scores = [[], []], [{}, {}]
        for t in range(30):
            if len(ref_slots[0]) > size and len(ref_slots[0]) + 1 > size + span:
                for h in range(2):
                    slots = ref_slots[h]
                    middle = slots[prefix:-span]
                    ranked = sorted(middle, key=lambda p: ref_scores[h].get(p, 0.0))
                    drop = set(ranked[: len(slots) - size])
                    ref_slots[h] = [p for p in slots if p not in drop]
                    ref_scores[h] = {}
            for h in range(2):
                ref_slots[h].append(t)
            cache.update_and_fetch(marked(t, 1), marked(t, 1))
            self.assertEqual(held(cache), ref_slots)
            # Heavy tokens draw weight 1; every token a little more, growing
            # with position so that no two candidates tie.
            weights = []
            for h in range(2):
                row = [(p in heavy[h]) + 1e-3 * p for p in ref_slots[h]]
                for p, w in zip(ref_slots[h], row):
                    ref_scores[h][p] = ref_scores[h].get(p, 0.0) + w
                weights.append(row)
            cache.observe_attention(mx.array([weights]))
        # At the arrival of token 8 (8 held) and then every second token.
        self.assertEqual(cache.evictions, 11)
        for h in range(2):
            self.assertEqual(set(heavy[h]) - set(held(cache)[h]), set())

    def test_rotating_to_quantized_keeps_the_same_tokens(self):
        rotating = RotatingKVCache(6, keep=2)
        rotating.update_and_fetch(marked(0, 5), marked(0, 5))
        for t in range(5, 13):
            rotating.update_and_fetch(marked(t, 1), marked(t, 1))
        window = rotating.to_quantized(group_size=32, bits=8)
        self.assertIsInstance(window, SlidingWindowKVCache)
        self.assertIsInstance(window.inner, QuantizedKVCache)
        self.assertEqual(
            (window.eviction_strategy, window.fixed_prefix_size), ("fixed", 2)
        )
        self.assertEqual((window.offset, window.size()), (13, 6))
        keys = mx.dequantize(*window.inner.state[0], group_size=32, bits=8)
        self.assertEqual(
            keys[0, 0, :, 0].round().astype(mx.int32).tolist(), [0, 1, 9, 10, 11, 12]
        )
        self.assertEqual(window.eviction_stats()["tokens_evicted"], 7)


class TestAttentionBookkeeping(unittest.TestCase):
    def setUp(self):
        mx.random.seed(3)
        self.q = mx.random.normal((1, 4, 5, HEAD_DIM))
        self.k = mx.random.normal((1, 2, 9, HEAD_DIM))
        self.v = mx.random.normal((1, 2, 9, HEAD_DIM))

    def manual_weights(self, q, mask):
        grouped = q.reshape(1, 2, 2, q.shape[2], HEAD_DIM) * 0.2
        scores = grouped @ self.k[:, :, None].swapaxes(-1, -2)
        scores = mx.where(mask, scores, -1e9)
        return mx.softmax(scores, axis=-1)

    def test_only_the_attention_strategy_asks(self):
        self.assertEqual(SlidingWindowKVCache(KVCache(), 8).observed_queries, 0)
        fixed = SlidingWindowKVCache(KVCache(), 8, "fixed", 2)
        self.assertEqual(fixed.observed_queries, 0)
        attention = SlidingWindowKVCache(KVCache(), 8, "attention", 1, 4)
        self.assertEqual(attention.observed_queries, 4)

    def test_weights_grouped_onto_kv_heads_and_output_unchanged(self):
        mask = create_causal_mask(5, 4)
        expected = mx.fast.scaled_dot_product_attention(
            self.q, self.k, self.v, scale=0.2, mask=mask
        )
        for span, observed in ((8, 5), (3, 3)):  # all queries / a long chunk's last 3
            cache = SlidingWindowKVCache(KVCache(), 16, "attention", 0, span)
            out = scaled_dot_product_attention(self.q, self.k, self.v, cache, 0.2, mask)
            self.assertTrue(mx.allclose(out, expected, atol=1e-5))
            weights = self.manual_weights(self.q, mask)[..., -observed:, :]
            expect = weights.sum(axis=(2, 3))
            self.assertTrue(mx.allclose(cache._scores, expect, atol=1e-5))
            # Every query row sums to one: per KV head, 2 heads x observed rows.
            self.assertTrue(
                mx.allclose(cache._scores.sum(-1), mx.full((1, 2), 2.0 * observed))
            )

    def test_quantized_inner_reports_weights_too(self):
        cache = SlidingWindowKVCache(QuantizedKVCache(32, 8), 16, "attention", 0, 8)
        plain = QuantizedKVCache(32, 8)
        k1, v1 = cache.update_and_fetch(self.k, self.v)
        k2, v2 = plain.update_and_fetch(self.k, self.v)
        q = self.q[:, :, -1:]
        out = scaled_dot_product_attention(q, k1, v1, cache, 0.2, None)
        ref = scaled_dot_product_attention(q, k2, v2, plain, 0.2, None)
        self.assertTrue(mx.allclose(out, ref))
        self.assertEqual(cache._scores.shape, (1, 2, 9))
        self.assertTrue(mx.allclose(cache._scores.sum(-1), mx.full((1, 2), 2.0)))

    def test_scores_accumulate_and_reset_at_eviction(self):
        cache = SlidingWindowKVCache(KVCache(), 4, "attention", 0, 2)
        cache.update_and_fetch(marked(0, 6), marked(0, 6))
        cache.observe_attention(mx.ones((1, 2, 6)))
        cache.observe_attention(mx.ones((1, 2, 6)))
        self.assertEqual(cache._scores.tolist(), [[[2.0] * 6] * 2])
        cache.update_and_fetch(marked(6, 1), marked(6, 1))  # evicts first
        self.assertIsNone(cache._scores)
        self.assertEqual((cache.size(), cache.evictions), (5, 1))
        cache.observe_attention(mx.ones((1, 2, 5)))
        self.assertEqual(cache._scores.tolist(), [[[1.0] * 5] * 2])

    def test_model_decode_matches_full_cache_until_eviction(self):
        model = window_model()
        full = feed(model, None, TOKENS[:, :20], [20])
        cache = windows(model, 40, "attention", 2, 4)
        out = feed(model, cache, TOKENS[:, :20], [7] + [1] * 13)
        self.assertTrue(mx.allclose(out, full, atol=1e-4))
        self.assertEqual(cache[0]._scores.shape, (1, 2, 20))


class TestChunkedPrefill(unittest.TestCase):
    """fifo: a full-attention model with a windowed causal mask is the reference."""

    @classmethod
    def setUpClass(cls):
        cls.size = 6
        sliding = ["sliding_attention"] * 2
        cls.reference = window_model(sliding_window=cls.size, layer_types=sliding)
        cls.model = window_model()
        cls.expected = cls.reference(TOKENS)

    def test_reference_differs_from_full_attention(self):
        self.assertGreater(mx.abs(self.model(TOKENS) - self.expected).max().item(), 0.1)

    def test_fifo_single_steps_and_chunks(self):
        schedules = [
            [1] * 48,
            [10, 1, 1, 9, 2, 1, 16, 1, 7],  # chunks longer than the window
            [3] * 16,
            [7] + [1] * 12 + [21, 8],  # a long chunk right after evictions
            [48],
        ]
        for chunks in schedules:
            cache = windows(self.model, self.size)
            out = feed(self.model, cache, TOKENS, chunks)
            self.assertTrue(mx.allclose(out, self.expected, atol=1e-4), chunks)
            self.assertEqual(cache[0].offset, 48)
            if len(chunks) > 1:
                self.assertGreater(cache[0].tokens_evicted, 0, chunks)

    def test_fixed_chunks_match_single_steps(self):
        single = feed(self.model, windows(self.model, 7, "fixed", 2), TOKENS, [1] * 48)
        for chunks in ([10, 1, 1, 9, 2, 1, 16, 1, 7], [20, 20, 8]):
            cache = windows(self.model, 7, "fixed", 2)
            out = feed(self.model, cache, TOKENS, chunks)
            self.assertTrue(mx.allclose(out, single, atol=1e-4), chunks)

    def test_attention_chunk_sees_everything_kept_and_its_past(self):
        cache = windows(self.model, 8, "attention", 1, 3)
        feed(self.model, cache, TOKENS[:, :20], [1] * 20)
        self.assertGreater(cache[0].evictions, 0)
        mask = cache[0].make_mask(12, return_array=True)
        self.assertEqual(mask.tolist(), create_causal_mask(12, 8).tolist())
        self.assertEqual(cache[0].make_mask(12), "causal")
        # The chunk's first query sees what a single step from here would see.
        twin = [SlidingWindowKVCache.from_state(c.state, c.meta_state) for c in cache]
        chunk = self.model(TOKENS[:, 20:32], cache=cache)
        step = self.model(TOKENS[:, 20:21], cache=twin)
        self.assertTrue(mx.allclose(chunk[:, :1], step, atol=1e-4))
        self.assertEqual(cache[0].size(), 8 + 12)


class TestQuantized(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = window_model()

    def test_window_over_quantized_inner(self):
        for strategy, prefix in (("fifo", 0), ("fixed", 2), ("attention", 1)):
            plain = windows(self.model, 9, strategy, prefix)
            quant = windows(self.model, 9, strategy, prefix, quantized=True)
            a = feed(self.model, plain, TOKENS, [10, 1, 1, 1, 13, 1, 1, 1, 1, 1, 17])
            b = feed(self.model, quant, TOKENS, [10, 1, 1, 1, 13, 1, 1, 1, 1, 1, 17])
            self.assertTrue(mx.allclose(a, b, atol=0.1), strategy)
            self.assertEqual(plain[0].eviction_stats(), quant[0].eviction_stats())
            self.assertLess(quant[0].nbytes, plain[0].nbytes / 2)
            self.assertEqual(quant[0].bits, 8)
            self.assertFalse(hasattr(plain[0], "bits"))

    def test_to_quantized_keeps_bookkeeping(self):
        cache = windows(self.model, 9, "attention", 1)
        feed(self.model, cache, TOKENS[:, :20], [5] + [1] * 15)
        layer = cache[0]
        quantized = layer.to_quantized(group_size=32, bits=4)
        self.assertIsNot(quantized, layer)
        self.assertIsInstance(quantized.inner, QuantizedKVCache)
        self.assertEqual(quantized.eviction_stats(), layer.eviction_stats())
        self.assertEqual(quantized.offset, layer.offset)
        self.assertIs(quantized._scores, layer._scores)
        self.assertIs(quantized.to_quantized(group_size=32, bits=4), quantized)
        with self.assertRaisesRegex(ValueError, "bits=8"):
            quantized.to_quantized(group_size=32, bits=8)

    def test_generate_step_switches_inner_cache(self):
        options = dict(
            window_size=10,
            window_strategy="fixed",
            window_prefix=2,
            window_attention_span=4,
        )
        cache = make_prompt_cache(self.model, **options)
        plain = make_prompt_cache(self.model, **options)
        prompt = TOKENS[0, :14]
        kwargs = dict(max_tokens=24, prefill_step_size=5, **options)
        steps = generate_step(
            prompt,
            self.model,
            prompt_cache=cache,
            kv_bits=8,
            kv_group_size=32,
            quantized_kv_start=20,
            **kwargs,
        )
        quantized_tokens = [t for t, _ in steps]
        plain_tokens = [
            t
            for t, _ in generate_step(prompt, self.model, prompt_cache=plain, **kwargs)
        ]
        for layer in cache:
            self.assertIsInstance(layer, SlidingWindowKVCache)
            self.assertEqual((layer.bits, layer.group_size), (8, 32))
            self.assertGreater(layer.evictions, 0)
        self.assertEqual(cache_eviction_stats(cache), cache_eviction_stats(plain))
        self.assertEqual(quantized_tokens[:4], plain_tokens[:4])

    def test_max_kv_size_with_kv_bits(self):
        prompt = TOKENS[0, :10]
        base = make_prompt_cache(self.model, max_kv_size=12)
        quant = make_prompt_cache(self.model, max_kv_size=12)
        for c in (base, quant):
            feed(self.model, c, prompt[None], [10])
        quant = [c.to_quantized(group_size=32, bits=8) for c in quant]
        a = feed(self.model, base, TOKENS[:, 10:], [1] * 38)
        b = feed(self.model, quant, TOKENS[:, 10:], [1] * 38)
        self.assertTrue(mx.allclose(a, b, atol=0.1))
        self.assertEqual([c.fixed_prefix_size for c in quant], [4, 4])
        # Evicted at token 45 (12 + 32 held, one more arriving): 16 held after 48.
        self.assertEqual(cache_eviction_stats(quant)["tokens_evicted"], 2 * (48 - 16))
        steps = generate_step(
            prompt,
            self.model,
            max_tokens=20,
            max_kv_size=12,
            kv_bits=8,
            kv_group_size=32,
        )
        self.assertEqual(len(list(steps)), 20)


class TestSpeculative(unittest.TestCase):
    def test_fifo_window_gives_the_same_tokens(self):
        # The verify pass is a chunk, which under fifo sees exactly the window,
        # and the tokens it rejects were appended after any eviction.
        model = window_model()
        draft = window_model(seed=2, num_hidden_layers=1)
        options = dict(window_size=7, window_attention_span=3, prefill_step_size=5)
        prompt = TOKENS[0, :20]
        plain = list(generate_step(prompt, model, max_tokens=30, **options))
        fast = list(
            speculative_generate_step(
                prompt, model, draft, max_tokens=30, num_draft_tokens=3, **options
            )
        )
        self.assertEqual([t for t, *_ in fast], [t for t, _ in plain])
        for (_, lp, _), (_, ref) in zip(fast, plain):
            self.assertTrue(mx.allclose(lp, ref, atol=1e-4))


class TestModelsWithOwnCaches(unittest.TestCase):
    def check_layers(self, model, native, window):
        kinds = [type(c) for c in model.make_cache()]
        bounded = make_prompt_cache(model, max_kv_size=12)
        windowed = make_prompt_cache(
            model, window_size=12, window_strategy="fixed", window_prefix=1
        )
        for kind, b, w in zip(kinds, bounded, windowed):
            if kind is RotatingKVCache:
                # Native sliding layers keep their own window, whatever was asked.
                self.assertEqual(
                    (type(b), b.max_size, b.keep), (RotatingKVCache, native, 0)
                )
                self.assertEqual((type(w), w.max_size), (RotatingKVCache, native))
            else:
                self.assertEqual(
                    (type(b), b.max_size, b.keep), (RotatingKVCache, 12, 4)
                )
                self.assertIsInstance(w, SlidingWindowKVCache)
                self.assertEqual(w.window_size, 12)
        self.assertIn(RotatingKVCache, kinds)
        self.assertIn(KVCache, kinds)
        for cache in (bounded, windowed):
            feed(model, cache, TOKENS, [9, 1, 1, 20] + [1] * 17)
            for c in cache:
                self.assertGreater(c.offset - c.size(), 0)
                self.assertLessEqual(c.size(), 12 + 32)

    def test_llama_with_sliding_layers(self):
        model = window_model(
            layer_types=["sliding_attention", "full_attention"], sliding_window=5
        )
        self.check_layers(model, 5, 12)

    def test_gemma3_text(self):
        model, _ = tiny_model(
            seed=2,
            model_type="gemma3_text",
            vocab_size=VOCAB,
            num_hidden_layers=4,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=32,
            sliding_window=6,
            sliding_window_pattern=2,
        )
        self.check_layers(model, 6, 12)
        # kv_bits on native windows: their converted caches keep the model's window.
        base = make_prompt_cache(model)
        quant = make_prompt_cache(model)
        feed(model, base, TOKENS[:, :10], [10])
        feed(model, quant, TOKENS[:, :10], [10])
        quant = [c.to_quantized(group_size=32, bits=8) for c in quant]
        a = feed(model, base, TOKENS[:, 10:], [1] * 10 + [12] + [1] * 16)
        b = feed(model, quant, TOKENS[:, 10:], [1] * 10 + [12] + [1] * 16)
        self.assertTrue(mx.allclose(a, b, atol=0.1))

    def test_every_layer_sliding(self):
        # Mistral 7B v0.1's shape: every layer has a window of 8 of its own. A
        # bound at least that wide changes nothing; a narrower one applies as a
        # window of the newest tokens plus the ones the bound always keeps.
        model = window_model(model_type="mistral", sliding_window=8)
        cases = [
            (dict(max_kv_size=16), 8, 0),
            (dict(max_kv_size=6), 6, 4),
            (dict(window_size=8), 8, 0),
            (dict(window_size=6, window_strategy="fixed", window_prefix=1), 6, 1),
            (dict(compact_kv_budget=16, compact_keep_recent=2), 8, 0),
            (
                dict(compact_kv_budget=6, compact_keep_recent=2, compact_sink_tokens=2),
                6,
                2,
            ),
        ]
        for options, size, keep in cases:
            with self.subTest(**options):
                cache = make_prompt_cache(model, **options)
                for c in cache:
                    self.assertEqual(
                        (type(c), c.max_size, c.keep), (RotatingKVCache, size, keep)
                    )
                out = list(
                    generate_step(TOKENS[0, :20], model, max_tokens=12, **options)
                )
                self.assertEqual(len(out), 12)
                cache = make_prompt_cache(model, **options)
                list(
                    generate_step(TOKENS[0, :20], model, prompt_cache=cache, **options)
                )
                self.assertTrue(all(c.size() <= size for c in cache))

    def test_narrower_bound_keeps_the_model_window(self):
        # max_kv_size 6 under a window of 8: each step sees the first 4 tokens
        # while they are inside the window, and the newest 2.
        model = window_model(model_type="mistral", sliding_window=8)
        n = 20
        query, key = mx.arange(n)[:, None], mx.arange(n)[None]
        distance = query - key
        seen = (distance >= 0) & (distance < 8) & ((key < 4) | (distance < 2))
        expected = masked_logits(model, TOKENS[:, :n], seen)
        cache = make_prompt_cache(model, max_kv_size=6)
        out = feed(model, cache, TOKENS[:, :n], [1] * n)
        self.assertTrue(mx.allclose(out, expected, atol=1e-4))
        # Quantized on the way, the first 4 drop out of sight the same way.
        cache = make_prompt_cache(model, max_kv_size=6)
        head = feed(model, cache, TOKENS[:, :5], [1] * 5)
        cache = [c.to_quantized(group_size=32, bits=8) for c in cache]
        tail = feed(model, cache, TOKENS[:, 5:n], [1] * (n - 5))
        out = mx.concatenate([head, tail], axis=1)
        self.assertTrue(mx.allclose(out, expected, atol=0.1))

    def test_narrower_bound_on_gemma3_sliding_layers(self):
        model, _ = tiny_model(
            seed=2,
            model_type="gemma3_text",
            vocab_size=VOCAB,
            num_hidden_layers=4,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=32,
            sliding_window=12,
            sliding_window_pattern=2,
        )
        cache = make_prompt_cache(model, max_kv_size=8)
        self.assertEqual([(c.max_size, c.keep) for c in cache], [(8, 4)] * 4)
        cache = make_prompt_cache(model, compact_kv_budget=8, compact_keep_recent=2)
        kinds = [type(c) for c in cache]
        self.assertEqual(kinds, [RotatingKVCache, CompressedKVCache] * 2)
        self.assertEqual((cache[0].max_size, cache[0].keep), (8, 0))
        out = list(
            generate_step(
                TOKENS[0, :20],
                model,
                max_tokens=6,
                compact_kv_budget=8,
                compact_keep_recent=2,
            )
        )
        self.assertEqual(len(out), 6)

    def test_speculative_refuses_a_wrapped_ring(self):
        # A ring past its window cannot drop rejected proposals: an error, never
        # a cache that silently keeps them.
        model = window_model(model_type="mistral", sliding_window=8)
        draft = window_model(seed=2, model_type="mistral", sliding_window=8)
        steps = speculative_generate_step(
            TOKENS[0, :20], model, draft, max_tokens=30, num_draft_tokens=3
        )
        with self.assertRaisesRegex(
            ValueError, r"\(RotatingKVCache\) of the prompt cache refused"
        ):
            list(steps)

    def test_batch_compression_needs_a_layer_to_compress(self):
        model = window_model(model_type="mistral", sliding_window=8)
        with self.assertRaisesRegex(ValueError, "no layer to compress"):
            batch_generate(
                model,
                tiny_tokenizer(),
                [[1, 2, 3], [4, 5]],
                max_tokens=2,
                compact_kv_budget=16,
                compact_keep_recent=2,
            )


def masked_logits(model, tokens, mask):
    """Logits of a Llama-family ``model`` with ``mask`` [T, T] on every layer."""
    h = model.model.embed_tokens(tokens)
    for layer in model.model.layers:
        h = layer(h, mask)
    h = model.model.norm(h)
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


class TestStats(unittest.TestCase):
    def test_counts_and_no_per_token_allocation(self):
        cache = SlidingWindowKVCache(KVCache(), 4, "fifo", eviction_attention_window=2)
        for t in range(10):
            cache.update_and_fetch(marked(t, 1), marked(t, 1))
        # Evictions at tokens 7 and 9 (6 held, one more arrives), two tokens each.
        expected = {"total_evictions": 2, "tokens_evicted": 4, "current_size": 6}
        self.assertEqual(cache.eviction_stats(), expected)
        allocations = cache.inner.allocations
        for t in range(10, 1000):
            cache.update_and_fetch(marked(t, 1), marked(t, 1))
        self.assertEqual(cache.inner.allocations, allocations)
        self.assertEqual(cache.evictions, 2 + 990 // 2)
        self.assertEqual(cache.offset - cache.size(), cache.tokens_evicted)

    def test_aggregate_over_layers(self):
        window = SlidingWindowKVCache(KVCache(), 4, eviction_attention_window=2)
        rotating = RotatingKVCache(5)
        plain = KVCache()
        for c in (window, rotating, plain):
            c.update_and_fetch(marked(0, 9, heads=1), marked(0, 9, heads=1))
            c.update_and_fetch(marked(9, 1, heads=1), marked(9, 1, heads=1))
        stats = cache_eviction_stats([window, rotating, plain])
        self.assertEqual(stats["current_size"], 5 + 5 + 10)
        self.assertEqual(stats["tokens_evicted"], 5 + 5)
        self.assertEqual(stats["total_evictions"], 1 + 5)

    def test_generate_verbose_prints_them(self):
        model, _ = tiny_model(seed=4)
        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(io.StringIO()):
            generate(
                model,
                tiny_tokenizer(),
                "import os, sys, json, time, re",
                max_tokens=20,
                verbose=True,
                window_size=8,
                window_strategy="attention",
                window_attention_span=4,
            )
        lines = [l for l in out.getvalue().splitlines() if l.startswith("KV cache:")]
        self.assertEqual(len(lines), 1)
        self.assertRegex(lines[0], r"[1-9]\d* tokens evicted in [1-9]\d* evictions")


class TestValidation(unittest.TestCase):
    def test_constructor(self):
        bad = [
            (dict(inner_cache=RotatingKVCache(4), window_size=8), "at most 4"),
            (dict(inner_cache=ChunkedKVCache(4), window_size=4), "inner_cache"),
            (dict(window_size=0), "window_size"),
            (dict(window_size=4, eviction_strategy="lru"), "eviction_strategy"),
            (dict(window_size=4, fixed_prefix_size=1), "fifo"),
            (
                dict(window_size=4, eviction_strategy="fixed", fixed_prefix_size=4),
                "smaller",
            ),
            (dict(window_size=8, eviction_strategy="attention"), "larger"),
            (
                dict(window_size=8, eviction_attention_window=0),
                "eviction_attention_window",
            ),
        ]
        for kwargs, message in bad:
            kwargs.setdefault("inner_cache", KVCache())
            with self.assertRaisesRegex(ValueError, message, msg=kwargs):
                SlidingWindowKVCache(**kwargs)

    def test_config(self):
        with self.assertRaisesRegex(ValueError, "window_prefix"):
            KVCacheConfig(window_size=8, window_prefix=2)
        with self.assertRaisesRegex(ValueError, "window_attention_span"):
            KVCacheConfig(window_size=32, window_strategy="attention")
        with self.assertRaisesRegex(ValueError, "choose one"):
            KVCacheConfig(window_size=32, max_kv_size=32)
        KVCacheConfig(window_size=64, window_strategy="attention", window_prefix=4)

    def test_cli_errors_before_loading(self):
        bad = [
            (["--window-size", "0"], "--window-size"),
            (["--window-size", "8", "--window-strategy", "lru"], "--window-strategy"),
            (["--window-size", "8", "--window-prefix", "2"], "--window-prefix"),
            (
                [
                    "--window-size",
                    "8",
                    "--window-strategy",
                    "fixed",
                    "--window-prefix",
                    "8",
                ],
                "--window-prefix",
            ),
            (
                ["--window-size", "16", "--window-strategy", "attention"],
                "--window-attention-span",
            ),
            (
                ["--window-size", "8", "--window-attention-span", "0"],
                "--window-attention-span",
            ),
            (["--window-size", "8", "--max-kv-size", "8"], "--max-kv-size"),
        ]
        with mock.patch("mlx_lm.utils.load", side_effect=AssertionError("loaded")):
            for flags, name in bad:
                err = io.StringIO()
                with redirect_stderr(err), self.assertRaises(SystemExit) as ctx:
                    main(flags)
                self.assertEqual(ctx.exception.code, 2, flags)
                message = [l for l in err.getvalue().splitlines() if "error:" in l]
                self.assertEqual(len(message), 1, err.getvalue())
                self.assertTrue(err.getvalue().rstrip().endswith(message[0]))
                self.assertIn(name, message[0], flags)

    def test_unwindowed_prompt_cache_is_refused(self):
        model = window_model()
        with self.assertRaisesRegex(ValueError, "layer 0.*unbounded KVCache"):
            list(
                generate_step(
                    TOKENS[0, :5],
                    model,
                    max_tokens=2,
                    window_size=8,
                    prompt_cache=make_prompt_cache(model),
                )
            )


class TestCommandLine(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        model, config = tiny_model(seed=5, head_dim=HEAD_DIM)
        cls.model_dir = str(
            write_model_dir(os.path.join(cls.tmp.name, "m"), model, config)
        )
        cls.prompt = "import os, sys, json, time, re, math\n" * 3

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def run_main(self, argv, entry=main):
        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(io.StringIO()):
            entry(argv)
        return out.getvalue()

    def test_window_with_kv_bits(self):
        out = self.run_main(
            ["--model", self.model_dir, "--prompt", self.prompt, "--max-tokens", "12"]
            + ["--ignore-chat-template", "--window-size", "8"]
            + ["--window-strategy", "attention", "--window-attention-span", "4"]
            + ["--kv-bits", "8", "--kv-group-size", "32"]
        )
        self.assertRegex(
            out, r"KV cache: [1-9]\d* tokens evicted in [1-9]\d* evictions"
        )

    def test_cache_prompt_then_resume_equals_one_run(self):
        from mlx_lm import load
        from mlx_lm.cache_prompt import main as cache_main

        window = ["--window-size", "8", "--window-strategy", "fixed"]
        window += ["--window-prefix", "2", "--window-attention-span", "3"]
        suffix = "def main():\n"
        path = os.path.join(self.tmp.name, "window.safetensors")
        self.run_main(
            ["--model", self.model_dir, "--prompt", self.prompt]
            + ["--prompt-cache-file", path, "--ignore-chat-template"]
            + ["--prefill-step-size", "5"]
            + window,
            entry=cache_main,
        )
        saved = load_prompt_cache(path)[0]
        self.assertIsInstance(saved, SlidingWindowKVCache)
        self.assertGreater(saved.tokens_evicted, 0)
        resumed = self.run_main(
            ["--prompt-cache-file", path, "--prompt", suffix, "--max-tokens", "10"]
            + ["--ignore-chat-template", "--verbose", "false"]
            + window
        )
        model, tokenizer = load(self.model_dir)
        ids = tokenizer.encode(self.prompt)
        ids += tokenizer.encode(suffix, add_special_tokens=False)
        options = dict(window_size=8, window_strategy="fixed", window_prefix=2)
        expected = generate(
            model, tokenizer, ids, max_tokens=10, window_attention_span=3, **options
        )
        self.assertEqual(resumed, expected + "\n")


class TestTrimAndFiles(unittest.TestCase):
    def test_trim_stops_at_the_last_eviction(self):
        cache = SlidingWindowKVCache(KVCache(), 4, eviction_attention_window=2)
        cache.update_and_fetch(marked(0, 3), marked(0, 3))
        self.assertEqual(cache.trim(2), 2)
        self.assertEqual((cache.offset, cache.size()), (1, 1))
        for t in range(1, 7):
            cache.update_and_fetch(marked(t, 1), marked(t, 1))
        self.assertEqual(cache.evictions, 1)  # at token 7, down to 4, then 5 held
        self.assertEqual(cache.trim(2), 0)
        self.assertEqual(cache.trim(1), 1)
        self.assertEqual(trim_prompt_cache([cache], 1), 0)
        self.assertEqual((cache.offset, cache.size()), (6, 4))

    def test_save_load_continue_exactly(self):
        model = window_model()
        setups = [
            ("fifo", 0, False),
            ("fixed", 2, False),
            ("attention", 1, False),
            ("fifo", 0, True),
            ("attention", 1, True),
        ]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "window.safetensors")
            for strategy, prefix, quantized in setups:
                whole = windows(model, 9, strategy, prefix, quantized=quantized)
                part = windows(model, 9, strategy, prefix, quantized=quantized)
                chunks = [12, 1, 1, 1, 1, 6, 1, 1]
                expected = feed(model, whole, TOKENS, chunks + [1] * 24)
                head = feed(model, part, TOKENS[:, :24], chunks)
                save_prompt_cache(path, part, {"k": "v"})
                loaded, meta = load_prompt_cache(path, return_metadata=True)
                self.assertEqual(meta, {"k": "v"})
                for a, b in zip(part, loaded):
                    self.assertEqual(a.meta_state, b.meta_state)
                    self.assertEqual(type(a.inner), type(b.inner))
                tail = feed(model, loaded, TOKENS[:, 24:], [1] * 24)
                got = mx.concatenate([head, tail], axis=1)
                self.assertTrue(mx.array_equal(got, expected), (strategy, quantized))
                self.assertEqual(
                    [c.eviction_stats() for c in loaded],
                    [c.eviction_stats() for c in whole],
                )

    def test_empty_round_trip_stays_usable(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "empty.safetensors")
            caches = [
                SlidingWindowKVCache(KVCache(), 4),
                SlidingWindowKVCache(QuantizedKVCache(32, 4), 40, "attention", 2, 4),
            ]
            save_prompt_cache(path, caches)
            loaded = load_prompt_cache(path)
        for c in loaded:
            self.assertTrue(c.empty())
            c.update_and_fetch(marked(0, 3), marked(0, 3))
            self.assertEqual((c.offset, c.size()), (3, 3))
        self.assertEqual((loaded[1].bits, loaded[1].group_size), (4, 32))
        self.assertEqual(loaded[1].observed_queries, 4)

    def test_bad_inner_name_is_refused(self):
        meta = ("RotatingKVCache", "4", "fifo", "0", "32", "0", "0", "0", "0")
        with self.assertRaisesRegex(ValueError, "RotatingKVCache"):
            SlidingWindowKVCache.from_state([], meta)


if __name__ == "__main__":
    unittest.main()
