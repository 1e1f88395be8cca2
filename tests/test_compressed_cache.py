import importlib
import io
import os
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import mlx.core as mx
from helpers import tiny_model, tiny_tokenizer, write_model_dir

from mlx_lm.generate import (
    batch_generate,
    cache_hook,
    generate,
    generate_step,
    main,
    maybe_compact_kv_cache,
    speculative_generate_step,
)
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import (
    KEY_SCORERS,
    CompressedKVCache,
    KVCache,
    KVCacheConfig,
    QuantizedCompressedKVCache,
    RotatingKVCache,
    compact_prompt_cache,
    default_compact_margin,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load

# The package exports a function named like the module: fetch the module itself.
cache_hook_module = importlib.import_module("mlx_lm.models.cache_hook")
H, D = 2, 8


def token_values(T, B=1, heads=H, start=0):
    """Values whose first feature is the token's position: gathered slots name themselves."""
    ids = mx.arange(start, start + T).astype(mx.float32)
    v = mx.zeros((B, heads, T, D))
    return v + (mx.arange(D) == 0) * ids[None, None, :, None]


def keys_with_norms(norms):
    """Keys [B, H, T, D] along one axis with the given norms ([B, H, T] nested lists)."""
    n = mx.array(norms, dtype=mx.float32)
    return n[..., None] * (mx.arange(D) == 1).astype(mx.float32)


def kept_ids(cache, row=0, head=0):
    """Original positions of the slots a cache holds (read from token_values)."""
    values = cache.state[1]
    return values[row, head, :, 0].astype(mx.int32).tolist()


def filled(cache, keys):
    values = token_values(keys.shape[2], keys.shape[0], keys.shape[1])
    cache.update_and_fetch(keys, values)
    return cache


class TestSelection(unittest.TestCase):
    def test_l2_low_keeps_lowest_norms_and_protected_tokens(self):
        norms = [[[9, 1, 8, 2, 7, 3, 6, 5, 9, 9]] * H]
        cache = CompressedKVCache(5, keep_recent=2, policy="l2-low")
        filled(cache, keys_with_norms(norms))
        cache.compact()
        # The two newest (8, 9) always stay; the lowest norms 1, 2, 3 fill the rest.
        self.assertEqual(kept_ids(cache), [1, 3, 5, 8, 9])
        self.assertEqual((cache.size(), cache.offset), (5, 10))

    def test_l2_high_is_the_reverse(self):
        norms = [[[9, 1, 8, 2, 7, 3, 6, 5, 1, 1]] * H]
        cache = CompressedKVCache(5, keep_recent=2, policy="l2-high")
        filled(cache, keys_with_norms(norms))
        cache.compact()
        self.assertEqual(kept_ids(cache), [0, 2, 4, 8, 9])

    def test_sink_tokens_are_kept(self):
        norms = [[[9, 9, 1, 8, 2, 7, 3, 6, 5, 5]] * H]
        cache = CompressedKVCache(5, keep_recent=1, policy="l2-low", sink_tokens=2)
        filled(cache, keys_with_norms(norms))
        cache.compact()
        self.assertEqual(kept_ids(cache), [0, 1, 2, 4, 9])

    def test_keydiff_keeps_keys_unlike_the_mean(self):
        # Most keys point one way; tokens 2 and 5 point elsewhere.
        T = 8
        direction = [[1.0, 0.1 * t] for t in range(T)]
        direction[2], direction[5] = [-0.2, 1.0], [0.0, -1.0]
        k = mx.array(direction)
        keys = mx.concatenate([k, mx.zeros((T, D - 2))], axis=1)
        keys = mx.broadcast_to(keys, (1, H, T, D))
        cache = CompressedKVCache(3, keep_recent=1, policy="keydiff")
        filled(cache, keys)
        cache.compact()
        self.assertEqual(kept_ids(cache), [2, 5, 7])

    def test_layer_scope_ranks_by_mean_over_heads(self):
        # Head 0 prefers token 0, head 1 prefers token 1; token 2 is second for both.
        norms = [[[1, 9, 3, 9, 9], [9, 1, 3, 9, 9]]]
        cache = CompressedKVCache(2, keep_recent=1, policy="l2-low", scope="layer")
        filled(cache, keys_with_norms(norms))
        cache.compact()
        self.assertEqual(kept_ids(cache, head=0), [2, 4])
        self.assertEqual(kept_ids(cache, head=1), [2, 4])

    def test_head_scope_with_gqa_keeps_tokens_per_head(self):
        norms = [[[1, 9, 3, 9, 9], [9, 1, 3, 9, 9]]]
        cache = CompressedKVCache(2, keep_recent=1, policy="l2-low", scope="head")
        filled(cache, keys_with_norms(norms))
        cache.compact()
        self.assertEqual(kept_ids(cache, head=0), [0, 4])
        self.assertEqual(kept_ids(cache, head=1), [1, 4])
        # Through a GQA model (4 query heads, 2 KV heads) as well: every KV head
        # keeps its own slots, gathered from its own keys.
        model, _ = tiny_model(seed=3)
        cache = make_prompt_cache(
            model,
            compact_kv_budget=8,
            compact_keep_recent=2,
            compact_scope="head",
            compact_policy="keydiff",
        )
        model(mx.arange(3, 40)[None], cache=cache)
        before = cache[0].state[0]
        kept = cache[0].select(8)
        self.assertEqual(kept.shape, (1, 2, 8))
        self.assertFalse(mx.array_equal(kept[0, 0], kept[0, 1]).item())
        compact_prompt_cache(cache, slack=0)
        after = cache[0].state[0]
        self.assertEqual(after.shape, (1, 2, 8, 16))
        for h in range(2):
            self.assertTrue(
                mx.array_equal(after[0, h], before[0, h][kept[0, h]]).item()
            )

    def test_model_scope_shares_indices_across_layers(self):
        # Layer 0 alone would keep token 0, layer 1 token 1; their mean picks 2.
        layers = []
        for norms in ([[[1, 9, 3, 9, 9]] * H], [[[9, 1, 3, 9, 9]] * H]):
            layer = CompressedKVCache(
                2, keep_recent=1, policy="l2-low", scope="model", margin=1
            )
            layers.append(filled(layer, keys_with_norms(norms)))
        self.assertEqual(compact_prompt_cache(layers), 2)
        self.assertEqual([kept_ids(c) for c in layers], [[2, 4], [2, 4]])

    def test_model_scope_mismatch_names_the_layer(self):
        layers = [
            filled(
                CompressedKVCache(4, keep_recent=1, scope="model"),
                mx.ones((1, H, n, D)),
            )
            for n in (10, 10, 9)
        ]
        with self.assertRaisesRegex(ValueError, "layer 2 .*size is 9, not 10"):
            compact_prompt_cache(layers, slack=0)
        layers[2] = filled(
            CompressedKVCache(4, keep_recent=2, scope="model"), mx.ones((1, H, 10, D))
        )
        with self.assertRaisesRegex(ValueError, "layer 2 .*keep_recent is 2, not 1"):
            compact_prompt_cache(layers, slack=0)

    def test_kept_indices_from_caller(self):
        cache = filled(CompressedKVCache(6, keep_recent=1), mx.ones((2, H, 10, D)))
        bad = [
            mx.array([[0, 1]]),  # batch of 1 for 2 rows
            mx.zeros((2, 3, 2), mx.int32),  # 3 heads for 2
            mx.zeros((2, 0), mx.int32),  # nothing kept
            mx.zeros((2, 11), mx.int32),  # more than held
            mx.zeros((2,), mx.int32),
        ]
        for kept in bad:
            with self.assertRaisesRegex(ValueError, "kept_indices"):
                cache.compact(kept)
        # Fewer than the budget: the gather follows the index array's length.
        cache.compact(mx.array([[1, 4, 9], [0, 2, 3]]))
        self.assertEqual(cache.size(), 3)
        self.assertEqual(kept_ids(cache, row=0), [1, 4, 9])
        self.assertEqual(kept_ids(cache, row=1), [0, 2, 3])
        with self.assertRaisesRegex(ValueError, "empty"):
            CompressedKVCache(4, keep_recent=1).compact(mx.array([[0]]))

    def test_constructor_validation_order(self):
        cases = [
            (dict(budget=0, keep_recent=-1), "budget must be at least 1, got 0"),
            (dict(budget=-3), "budget must be at least 1, got -3"),
            (dict(budget=8, keep_recent=-1), "keep_recent must be at least 0"),
            (dict(budget=8, keep_recent=8), r"budget \(8\) must be larger"),
            (dict(budget=8, keep_recent=4, sink_tokens=4), r"\(4 \+ 4\)"),
            (dict(budget=8, keep_recent=2, margin=0), "margin"),
            (dict(budget=8, keep_recent=2, policy="l2"), "policy"),
            (dict(budget=8, keep_recent=2, scope="row"), "scope"),
        ]
        for kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                CompressedKVCache(**kwargs)

    def test_config_validation(self):
        cases = [
            (dict(compact_kv_budget=0), "compact_kv_budget"),
            (dict(compact_kv_budget=32, compact_keep_recent=32), "compact_kv_budget"),
            (dict(compact_kv_budget=32, compact_keep_recent=-1), "compact_keep_recent"),
            (dict(compact_kv_budget=64, compact_policy="l3"), "compact_policy"),
            (dict(compact_kv_budget=64, compact_scope="row"), "compact_scope"),
            (dict(compact_kv_budget=64, compact_margin=0), "compact_margin"),
            (dict(compact_kv_budget=64, max_kv_size=64), "max_kv_size=64 and"),
        ]
        for kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                KVCacheConfig(**kwargs)
        model, _ = tiny_model(seed=3)
        with self.assertRaisesRegex(ValueError, "max_kv_size"):
            make_prompt_cache(model, max_kv_size=16, compact_kv_budget=64)
        with self.assertRaisesRegex(ValueError, "max_kv_size"):
            list(
                generate_step(
                    mx.array([1, 2]), model, max_kv_size=16, compact_kv_budget=64
                )
            )


class TestMasksAndPositions(unittest.TestCase):
    def test_causal_kernel_mask_is_aligned_to_the_last_key(self):
        # N queries against kept + N keys: the string "causal" must mean "query i
        # sees keys up to kept + i", or the cache could not return it.
        q = mx.random.normal((1, 2, 3, 8), key=mx.random.key(0))
        k = mx.random.normal((1, 2, 7, 8), key=mx.random.key(1))
        v = mx.random.normal((1, 2, 7, 8), key=mx.random.key(2))
        explicit = create_causal_mask(3, 4)
        self.assertEqual(explicit.shape, (3, 7))
        a = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask="causal")
        b = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=explicit)
        self.assertTrue(mx.allclose(a, b, atol=1e-5).item())

    def test_make_mask_after_eviction(self):
        cache = filled(CompressedKVCache(4, keep_recent=1), mx.ones((1, H, 10, D)))
        cache.compact()
        self.assertIsNone(cache.make_mask(1))
        self.assertEqual(cache.make_mask(3), "causal")
        mask = cache.make_mask(3, return_array=True)
        self.assertTrue(mx.array_equal(mask, create_causal_mask(3, 4)).item())
        with self.assertRaisesRegex(ValueError, "sliding-window"):
            cache.make_mask(3, window_size=4)

    def reference_logprobs(self, model, prompt, kept, chunk, n_decode):
        """The full cache, with the evicted tokens hidden by the mask instead."""
        P = prompt.shape[0]
        per_head = kept.ndim == 3
        heads = kept.shape[1] if per_head else 1
        visible = mx.zeros((heads, P), mx.bool_)
        rows = mx.arange(heads)[:, None]
        visible[rows, kept[0] if per_head else kept] = True
        n_rep = model.args.num_attention_heads // heads if per_head else 1
        visible = mx.repeat(visible, n_rep, axis=0)

        class Hiding(KVCache):
            def make_mask(self, N, return_array=False, window_size=None):
                mask = create_causal_mask(N, self.offset)
                if self.offset < P:  # the prompt itself is fed whole
                    return mask
                later = mx.ones((visible.shape[0], self.offset + N - P), mx.bool_)
                seen = mx.concatenate([visible, later], axis=1)
                return mask & seen[None, :, None, :]

        cache = [Hiding() for _ in model.layers]
        model(prompt[None], cache=cache)
        return self.continue_greedy(model, cache, chunk, n_decode)

    def continue_greedy(self, model, cache, chunk, n_decode):
        out = [model(chunk[None], cache=cache)[0]]
        token = mx.argmax(out[-1][-1])
        for _ in range(n_decode):
            logits = model(token.reshape(1, 1), cache=cache)[0]
            out.append(logits)
            token = mx.argmax(logits[-1])
        logits = mx.concatenate(out)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def test_generation_after_compaction_matches_kept_tokens_at_their_positions(self):
        model, _ = tiny_model(seed=7)
        prompt = mx.array(tiny_tokenizer().encode("import os\n" * 6)[:30])
        chunk = mx.array([5, 6, 7, 8, 9])
        layer_kept = mx.array([[0, 3, 4, 10, 17, 18, 25, 27, 28, 29]])
        head_kept = mx.array(
            [
                [
                    [1, 2, 3, 9, 15, 20, 21, 27, 28, 29],
                    [0, 5, 6, 7, 8, 11, 12, 14, 28, 29],
                ]
            ]
        )
        for kept in (layer_kept, head_kept):
            cache = make_prompt_cache(
                model, compact_kv_budget=16, compact_keep_recent=2
            )
            model(prompt[None], cache=cache)
            for c in cache:
                c.compact(kept)
            self.assertEqual([c.offset for c in cache], [30, 30])
            got = self.continue_greedy(model, cache, chunk, 6)
            want = self.reference_logprobs(model, prompt, kept, chunk, 6)
            self.assertTrue(mx.allclose(got, want, atol=1e-4).item(), kept.shape)
            # Were the positions forgotten (offset lowered), RoPE would differ.
            cache = make_prompt_cache(
                model, compact_kv_budget=16, compact_keep_recent=2
            )
            model(prompt[None], cache=cache)
            for c in cache:
                c.compact(kept)
                c.offset = c.size()
            wrong = self.continue_greedy(model, cache, chunk, 6)
            self.assertFalse(mx.allclose(wrong, want, atol=1e-4).item())


class TestHysteresisAndMemory(unittest.TestCase):
    def test_compaction_counts_and_headroom(self):
        budget, margin, T = 32, 8, 200
        cache = CompressedKVCache(budget, keep_recent=4, margin=margin)
        sizes = []
        for t in range(T):
            k = mx.random.normal((1, H, 1, D), key=mx.random.key(t))
            cache.update_and_fetch(k, k)
            maybe_compact_kv_cache([cache])
            sizes.append(cache.size())
        # First at budget + margin + 1 tokens, then every margin + 1 tokens.
        expected = 1 + (T - (budget + margin + 1)) // (margin + 1)
        self.assertEqual(cache.compactions, expected)
        self.assertEqual(max(sizes), budget + margin)
        self.assertEqual(cache.offset, T)
        # Besides the buffer each compaction gathers into (with room for a full
        # margin), one allocation for the whole run: no token reallocates.
        self.assertEqual(cache.allocations, 1 + cache.compactions)
        self.assertEqual(cache._capacity(), 256)
        self.assertEqual(default_compact_margin(32), 16)
        self.assertEqual(default_compact_margin(2048), 256)

    def test_kept_scores_match_a_full_rescoring(self):
        # l2 scores depend on a token's own key: after a compaction only the
        # tokens added since are scored, the kept ones reuse their scores.
        for policy, scope in (
            ("l2-low", "layer"),
            ("l2-high", "head"),
            ("l2-high", "model"),
        ):
            layers = [
                CompressedKVCache(
                    16, keep_recent=2, policy=policy, scope=scope, margin=4
                )
                for _ in range(2)
            ]
            checked = 0
            for t in range(60):
                for i, layer in enumerate(layers):
                    k = mx.random.normal((1, H, 1, D), key=mx.random.key(100 * i + t))
                    layer.update_and_fetch(k, k)
                if layers[0].size() > 20:
                    for layer in layers:
                        want = KEY_SCORERS[policy](layer.state[0])
                        if layer.compactions:
                            self.assertEqual(layer._kept_scores.shape[-1], 16)
                            got = layer.head_scores()
                            self.assertTrue(mx.allclose(got, want).item(), scope)
                            checked += 1
                compact_prompt_cache(layers)
            self.assertGreater(checked, 10)

    def test_growth_is_geometric_then_capped(self):
        cache = CompressedKVCache(1000, keep_recent=4, margin=100)
        cache.step = 4
        for _ in range(1100):
            cache.update_and_fetch(mx.zeros((1, 1, 1, 4)), mx.zeros((1, 1, 1, 4)))
        self.assertLessEqual(cache.allocations, 10)
        self.assertEqual(cache._capacity(), 1104)
        self.assertEqual(cache.nbytes, 2 * 1100 * 4 * 4)

    def test_big_prefill_chunk_buffer_shrinks_after_compaction(self):
        cache = CompressedKVCache(64, keep_recent=4)
        cache.update_and_fetch(mx.ones((1, H, 2000, D)), mx.ones((1, H, 2000, D)))
        compact_prompt_cache([cache])
        self.assertEqual(cache.size(), 64)
        self.assertEqual(cache._capacity(), 256)
        self.assertEqual(cache.nbytes, 2 * 64 * H * D * 4)

    def test_no_hook_without_compression_and_no_sync_in_it(self):
        model, _ = tiny_model(seed=3)
        prompt = mx.arange(3, 60)
        calls = []

        def counting(cache, config=None):
            calls.append(1)

        with mock.patch.object(cache_hook_module, "maybe_compact_kv_cache", counting):
            list(generate_step(prompt, model, max_tokens=4))
            self.assertEqual(calls, [])
            list(
                generate_step(
                    prompt,
                    model,
                    max_tokens=4,
                    compact_kv_budget=16,
                    compact_keep_recent=2,
                    compact_mode="stream",
                )
            )
            self.assertGreater(len(calls), 4)
        cache = make_prompt_cache(model, compact_kv_budget=16, compact_keep_recent=2)
        model(prompt[None], cache=cache)

        def forbidden(*args, **kwargs):
            raise AssertionError("compaction must not synchronise")

        with mock.patch.object(mx, "eval", forbidden), mock.patch.object(
            mx, "synchronize", forbidden
        ), mock.patch.object(mx, "clear_cache", forbidden):
            maybe_compact_kv_cache(cache)
        self.assertEqual([c.size() for c in cache], [16, 16])

    def test_external_cache_must_match_the_request(self):
        model, _ = tiny_model(seed=3)
        prompt = mx.arange(3, 10)
        with self.assertRaisesRegex(ValueError, "no compressed layers"):
            list(
                generate_step(
                    prompt,
                    model,
                    prompt_cache=make_prompt_cache(model),
                    compact_kv_budget=64,
                )
            )
        other = make_prompt_cache(model, compact_kv_budget=32, compact_keep_recent=4)
        with self.assertRaisesRegex(ValueError, "layer 0 .*budget 32"):
            list(generate_step(prompt, model, prompt_cache=other, compact_kv_budget=64))
        with self.assertRaisesRegex(ValueError, "no compressed layers"):
            cache_hook(KVCacheConfig(compact_kv_budget=64), [KVCache()])


def recording_greedy(log, avoid=()):
    """Greedy sampler that records the log-probabilities it sees and never picks
    a token in ``avoid`` (the EOS ids, so that no sequence stops early)."""
    banned = None

    def sample(logprobs):
        nonlocal banned
        log.append(logprobs)
        if banned is None:
            banned = mx.zeros(logprobs.shape[-1], mx.bool_)
            if avoid:
                banned[mx.array(list(avoid))] = True
        return mx.argmax(mx.where(banned, -mx.inf, logprobs), axis=-1)

    return sample


class TestGeneration(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, _ = tiny_model(seed=1, hidden_size=128)
        cls.tokenizer = tiny_tokenizer()
        # Fixed text (once the head of generate.py): the batched and single runs
        # must keep the same tokens, which a score on a rounding edge of the tie
        # grid could change, so the prompt must not move with unrelated edits.
        text = (
            Path(__file__).parent / "fixtures" / "compaction_prompt.txt"
        ).read_text()
        cls.ids = cls.tokenizer.encode(text, add_special_tokens=False)

    def test_generate_stays_within_budget(self):
        budget, margin = 32, 8
        cache = make_prompt_cache(
            self.model,
            compact_kv_budget=budget,
            compact_keep_recent=4,
            compact_margin=margin,
        )
        sizes = []
        greedy = recording_greedy([], self.tokenizer.eos_token_ids)

        def sampler(logprobs):
            sizes.append(max(c.size() for c in cache))
            return greedy(logprobs)

        text = generate(
            self.model,
            self.tokenizer,
            self.ids[:40],
            max_tokens=4 * budget,
            prompt_cache=cache,
            sampler=sampler,
            compact_kv_budget=budget,
            compact_keep_recent=4,
        )
        self.assertIsInstance(text, str)
        self.assertEqual(len(sizes), 4 * budget)
        self.assertLessEqual(max(sizes), budget + margin)
        self.assertGreater(min(c.compactions for c in cache), 10)
        self.assertEqual([c.offset for c in cache], [40 + 4 * budget - 1] * 2)
        stats = cache[0].eviction_stats()
        self.assertEqual(stats["total_evictions"], cache[0].compactions)
        self.assertEqual(stats["tokens_evicted"], cache[0].offset - cache[0].size())

    def test_batch_rows_match_single_sequences(self):
        # Both rows outgrow the budget during prefill, so every row compacts at
        # the same moments as it does alone; padding goes first.
        prompts = [self.ids[:70], self.ids[100:160]]
        options = dict(compact_kv_budget=24, compact_keep_recent=4, compact_margin=6)
        setups = [("stream", "keydiff", scope) for scope in ("layer", "head", "model")]
        # Once, question-aware: padding must not take part in the attention scores.
        setups.append(("once", "snapkv", "head"))
        for mode, policy, scope in setups:
            options.update(compact_mode=mode, compact_policy=policy)
            batched = []
            result = batch_generate(
                self.model,
                self.tokenizer,
                prompts,
                max_tokens=20,
                sampler=recording_greedy(batched, self.tokenizer.eos_token_ids),
                return_token_ids=True,
                return_prompt_caches=True,
                compact_scope=scope,
                **options,
            )
            self.assertTrue(
                all(isinstance(c, CompressedKVCache) for c in result.caches)
            )
            self.assertLessEqual(result.caches[0].size(), 30)
            self.assertEqual(result.caches[0].left_padding.tolist(), [0, 0])
            for row, prompt in enumerate(prompts):
                single = []
                tokens = [
                    t
                    for t, _ in generate_step(
                        mx.array(prompt),
                        self.model,
                        max_tokens=20,
                        sampler=recording_greedy(single, self.tokenizer.eos_token_ids),
                        compact_scope=scope,
                        **options,
                    )
                ]
                self.assertEqual(result.token_ids[row], tokens, scope)
                got = mx.stack([lp[row] for lp in batched])
                want = mx.concatenate(single)
                self.assertTrue(mx.allclose(got, want, atol=1e-4).item(), scope)

    def test_batch_cache_evicts_padding_first(self):
        # Row 1 has 3 padding slots whose small keys l2-low would otherwise love.
        keys = mx.random.normal((2, H, 12, D), key=mx.random.key(5)) + 1
        keys[1, :, :3] = 0.01
        values = token_values(12, B=2)
        for policy in ("l2-low", "keydiff"):
            batch = CompressedKVCache(
                6, keep_recent=2, policy=policy, left_padding=[0, 3]
            )
            batch.update_and_fetch(keys, values)
            batch.compact()
            self.assertEqual(batch.left_padding.tolist(), [0, 0])
            self.assertEqual(batch.offset.tolist(), [12, 9])
            # Real tokens fed (12 + 9) minus held (6 + 6); padding not counted.
            self.assertEqual(batch.eviction_stats()["tokens_evicted"], 9)
            for row, pad in enumerate((0, 3)):
                alone = CompressedKVCache(6, keep_recent=2, policy=policy)
                alone.update_and_fetch(
                    keys[row : row + 1, :, pad:], values[row : row + 1, :, pad:]
                )
                alone.compact()
                self.assertEqual(kept_ids(batch, row=row), kept_ids(alone), policy)
        # A row with fewer tokens than the budget keeps some padding, still masked.
        short = CompressedKVCache(6, keep_recent=2, left_padding=[0, 8])
        short.update_and_fetch(keys, values)
        short.compact()
        self.assertEqual(short.left_padding.tolist(), [0, 2])
        mask = short.make_mask(1)
        self.assertEqual(mask[1, 0, 0].tolist(), [False] * 2 + [True] * 5)

    def test_quantized_and_compressed(self):
        budget = 24
        options = dict(
            compact_kv_budget=budget, compact_keep_recent=4, compact_margin=6
        )
        cache = make_prompt_cache(self.model, **options)
        quantized, dense = [], []
        list(
            generate_step(
                mx.array(self.ids[:80]),
                self.model,
                max_tokens=30,
                prompt_cache=cache,
                sampler=recording_greedy(quantized),
                kv_bits=8,
                kv_group_size=32,
                **options,
            )
        )
        self.assertTrue(all(isinstance(c, QuantizedCompressedKVCache) for c in cache))
        self.assertTrue(all(c.compactions > 2 for c in cache))
        self.assertLessEqual(max(c.size() for c in cache), budget + 6)
        plain = make_prompt_cache(self.model, **options)
        list(
            generate_step(
                mx.array(self.ids[:80]),
                self.model,
                max_tokens=30,
                prompt_cache=plain,
                sampler=recording_greedy(dense),
                **options,
            )
        )
        # 8-bit storage: about a quarter of float32 plus scales and biases.
        self.assertEqual(cache[0].size(), plain[0].size())
        self.assertLess(cache[0].nbytes, 0.35 * plain[0].nbytes)
        # 8-bit keys and values barely move the first decode steps.
        first = mx.concatenate(quantized[:3]), mx.concatenate(dense[:3])
        self.assertTrue(mx.allclose(*first, atol=0.05).item())
        with self.assertRaisesRegex(ValueError, "already quantized"):
            cache[0].to_quantized(group_size=32, bits=4)
        self.assertIs(cache[0].to_quantized(group_size=32, bits=8), cache[0])

    def test_quantized_compaction_gathers_packed_rows(self):
        keys = mx.random.normal((1, H, 20, 32), key=mx.random.key(9))
        dense = CompressedKVCache(8, keep_recent=2)
        dense.update_and_fetch(keys, keys)
        quantized = dense.to_quantized(group_size=32, bits=8)
        kept = dense.select(8)
        self.assertTrue(mx.array_equal(kept, quantized.select(8)).item())
        dense.compact(kept)
        quantized.compact(kept)
        want = mx.dequantize(
            *mx.quantize(dense.state[0], group_size=32, bits=8), group_size=32, bits=8
        )
        self.assertTrue(mx.array_equal(quantized._dense_keys(), want).item())

    def test_speculative_trims_never_cross_a_compaction(self):
        draft, _ = tiny_model(seed=2, hidden_size=128, num_hidden_layers=1)
        options = dict(compact_kv_budget=24, compact_keep_recent=4, compact_margin=6)
        trims = []
        original = CompressedKVCache.trim

        def checked(cache, n):
            done = original(cache, n)
            trims.append((n, done))
            return done

        # Sampling makes the draft miss now and then: rounds trim rejected tokens.
        for d in (self.model, draft):
            trims.clear()
            mx.random.seed(0)
            with mock.patch.object(CompressedKVCache, "trim", checked):
                out = list(
                    speculative_generate_step(
                        mx.array(self.ids[:60]),
                        self.model,
                        d,
                        num_draft_tokens=3,
                        max_tokens=60,
                        sampler=make_sampler(temp=1.0),
                        **options,
                    )
                )
            self.assertEqual(len(out), 60)
            self.assertTrue(trims)
            self.assertTrue(all(n == done for n, done in trims), trims)
            if d is draft:
                self.assertTrue(any(n > 0 for n, _ in trims))

    def test_speculative_with_self_draft_matches_its_own_greedy_choice(self):
        # Every emitted token is the main model's greedy pick given its cache, so
        # with a budget never reached both paths agree exactly.
        options = dict(compact_kv_budget=500, compact_keep_recent=4)
        prompt = mx.array(self.ids[:40])
        plain = [
            t for t, _ in generate_step(prompt, self.model, max_tokens=20, **options)
        ]
        spec = speculative_generate_step(
            prompt, self.model, self.model, num_draft_tokens=2, max_tokens=20, **options
        )
        self.assertEqual([t for t, _, _ in spec], plain)

    def test_save_load_continue(self):
        options = dict(compact_kv_budget=24, compact_keep_recent=4, compact_margin=6)
        prefix, suffix = mx.array(self.ids[:90]), mx.array(self.ids[90:95])
        for extra in ({}, dict(kv_bits=8, kv_group_size=32)):
            cache = make_prompt_cache(self.model, **options)
            list(
                generate_step(
                    prefix,
                    self.model,
                    max_tokens=0,
                    prompt_cache=cache,
                    **options,
                    **extra,
                )
            )
            self.assertTrue(all(c.compactions > 0 for c in cache))
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "c.safetensors")
                save_prompt_cache(path, cache)
                loaded = load_prompt_cache(path)
            self.assertEqual([type(c) for c in loaded], [type(c) for c in cache])
            self.assertEqual(
                [c.meta_state for c in loaded], [c.meta_state for c in cache]
            )
            before = [c.compactions for c in loaded]
            runs = []
            for c in (cache, loaded):
                log = []
                list(
                    generate_step(
                        suffix,
                        self.model,
                        max_tokens=40,
                        prompt_cache=c,
                        sampler=recording_greedy(log),
                        **extra,
                    )
                )
                runs.append(mx.concatenate(log))
                self.assertLessEqual(max(layer.size() for layer in c), 30)
            self.assertTrue(mx.array_equal(*runs).item(), extra)
            # Headroom is back after one growth: no reallocation per token.
            for c, n in zip(loaded, before):
                self.assertGreater(c.compactions, n)
                self.assertEqual(c.allocations, 1 + c.compactions - n)

    def test_state_round_trips(self):
        empty = CompressedKVCache(16, keep_recent=2, scope="head", sink_tokens=1)
        restored = CompressedKVCache.from_state(empty.state, empty.meta_state)
        self.assertIsNone(restored.keys)
        self.assertEqual(
            (restored.size(), restored.offset, restored.scope), (0, 0, "head")
        )
        restored.update_and_fetch(mx.ones((1, H, 3, D)), mx.ones((1, H, 3, D)))
        self.assertEqual(restored.size(), 3)

        batch = CompressedKVCache(4, keep_recent=1, left_padding=[2, 0])
        again = CompressedKVCache.from_state(batch.state, batch.meta_state)
        self.assertEqual(again.offset.tolist(), [-2, 0])
        batch.update_and_fetch(mx.ones((2, H, 9, D)), token_values(9, B=2))
        batch.compact()
        again = CompressedKVCache.from_state(batch.state, batch.meta_state)
        self.assertEqual(again.offset.tolist(), [7, 9])
        self.assertEqual(again.left_padding.tolist(), [0, 0])
        self.assertEqual(kept_ids(again, row=1), kept_ids(batch, row=1))

        quantized = CompressedKVCache(8, keep_recent=2).to_quantized(
            group_size=32, bits=4
        )
        again = QuantizedCompressedKVCache.from_state(
            quantized.state, quantized.meta_state
        )
        self.assertEqual((again.bits, again.group_size, again.keys), (4, 32, None))

    def test_trim_only_since_the_last_compaction(self):
        cache = filled(CompressedKVCache(6, keep_recent=1), mx.ones((1, H, 10, D)))
        self.assertTrue(cache.is_trimmable())
        self.assertEqual(cache.trim(2), 2)
        self.assertEqual((cache.size(), cache.offset), (8, 8))
        cache.compact()
        self.assertEqual(cache.trim(1), 0)
        self.assertEqual((cache.size(), cache.offset), (6, 8))
        cache.update_and_fetch(mx.ones((1, H, 3, D)), mx.ones((1, H, 3, D)))
        self.assertEqual(cache.trim(4), 0)
        self.assertEqual(cache.trim(2), 2)
        self.assertEqual((cache.size(), cache.offset), (7, 9))
        self.assertEqual(cache.trim(2), 0)
        self.assertEqual(cache.trim(1), 1)
        self.assertEqual((cache.size(), cache.offset), (6, 8))

    def test_model_with_its_own_cache_layout(self):
        model, _ = tiny_model(
            seed=3,
            model_type="gemma3_text",
            num_hidden_layers=4,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=8,
            sliding_window_pattern=2,
        )
        cache = make_prompt_cache(model, compact_kv_budget=20, compact_keep_recent=4)
        kinds = [type(c) for c in cache]
        self.assertEqual(kinds, [RotatingKVCache, CompressedKVCache] * 2)
        log = []
        list(
            generate_step(
                mx.array(self.ids[:50]),
                model,
                max_tokens=30,
                prompt_cache=cache,
                sampler=recording_greedy(log),
                compact_kv_budget=20,
                compact_keep_recent=4,
                prefill_step_size=16,
            )
        )
        for c in cache[1::2]:
            self.assertGreaterEqual(c.compactions, 2)
            self.assertLessEqual(c.size(), 20 + default_compact_margin(20))
        self.assertEqual([c.offset for c in cache], [79] * 4)
        # Eviction changes what the global layers see.
        full = []
        list(
            generate_step(
                mx.array(self.ids[:50]),
                model,
                max_tokens=30,
                sampler=recording_greedy(full),
            )
        )
        self.assertFalse(mx.allclose(mx.concatenate(log), mx.concatenate(full)).item())
        # Batched: local layers keep their own (full) batch cache.
        result = batch_generate(
            model,
            self.tokenizer,
            [self.ids[:50], self.ids[60:90]],
            max_tokens=10,
            return_prompt_caches=True,
            compact_kv_budget=20,
            compact_keep_recent=4,
        )
        self.assertEqual(
            [type(c).__name__ for c in result.caches],
            ["BatchKVCache", "CompressedKVCache"] * 2,
        )

    def test_batch_rejects_other_bounds(self):
        for options in (
            dict(max_kv_size=64),
            dict(kv_bits=8),
            dict(compact_kv_budget=64, kv_bits=8, quantized_kv_start=10),
        ):
            with self.assertRaisesRegex(ValueError, "batch_generate does not support"):
                batch_generate(self.model, self.tokenizer, [[1, 2]], **options)
        result = batch_generate(
            self.model,
            self.tokenizer,
            [self.ids[:60], self.ids[:45]],
            max_tokens=5,
            return_prompt_caches=True,
            compact_kv_budget=24,
            compact_keep_recent=4,
            kv_bits=8,
            kv_group_size=32,
        )
        self.assertTrue(
            all(isinstance(c, QuantizedCompressedKVCache) for c in result.caches)
        )


class TestCLI(unittest.TestCase):
    def test_generate_with_compression(self):
        model, config = tiny_model(seed=5)
        prompt = "def main():\n    return parse(sys.argv)\n" * 3
        flags = ["--compact-kv-budget", "16", "--compact-keep-recent", "4"]
        with tempfile.TemporaryDirectory() as d:
            path = str(write_model_dir(Path(d) / "m", model, config))
            argv = ["--model", path, "--prompt", prompt, "--max-tokens", "40"]
            argv += ["--ignore-chat-template"] + flags
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                main(argv + ["--verbose", "false"])
            quiet = out.getvalue()
            out = io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                main(argv)
            loaded, tokenizer = load(path)
        expected = generate(
            loaded,
            tokenizer,
            prompt,
            max_tokens=40,
            compact_kv_budget=16,
            compact_keep_recent=4,
        )
        self.assertEqual(quiet, expected + "\n")
        self.assertRegex(out.getvalue(), r"KV cache: \d+ tokens evicted in [1-9]\d* ")

    def test_bad_compression_flags_fail_before_loading(self):
        bad = [
            (["--compact-kv-budget", "0"], "--compact-kv-budget"),
            (["--compact-kv-budget", "-4"], "--compact-kv-budget"),
            (
                ["--compact-kv-budget", "16", "--compact-keep-recent", "16"],
                "--compact-kv-budget",
            ),
            (
                ["--compact-kv-budget", "64", "--compact-keep-recent", "-1"],
                "--compact-keep-recent",
            ),
            (
                ["--compact-kv-budget", "64", "--compact-sink-tokens", "-1"],
                "--compact-sink-tokens",
            ),
            (
                ["--compact-kv-budget", "64", "--compact-margin", "0"],
                "--compact-margin",
            ),
            (
                ["--compact-kv-budget", "64", "--compact-policy", "l3"],
                "--compact-policy",
            ),
            (
                ["--compact-kv-budget", "64", "--compact-scope", "row"],
                "--compact-scope",
            ),
            (["--compact-kv-budget", "64", "--max-kv-size", "64"], "--max-kv-size"),
            (["--compact-kv-budget", "abc"], "--compact-kv-budget"),
        ]
        for flags, name in bad:
            err = io.StringIO()
            with redirect_stderr(err), self.assertRaises(SystemExit) as ctx:
                main(["--model", "/nonexistent/model"] + flags)
            self.assertEqual(ctx.exception.code, 2, flags)
            message = err.getvalue().strip().splitlines()[-1]
            self.assertIn(name, message, flags)
            self.assertTrue(message.startswith("usage:") or "error:" in message, flags)
            self.assertNotIn("Traceback", err.getvalue())
            self.assertNotIn("nonexistent", err.getvalue())


if __name__ == "__main__":
    unittest.main()
