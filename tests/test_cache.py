import os
import tempfile
import unittest
from unittest import mock

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lm.models import cache as cache_module
from mlx_lm.models.cache import (
    BatchKVCache,
    CacheList,
    ChunkedKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    create_attention_mask,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

HEAD_DIM = 4


def tokens(start, count, dim=HEAD_DIM, batch=1):
    """Keys/values [batch, 1, count, dim] whose entries equal their position."""
    pos = mx.arange(start, start + count, dtype=mx.float32)
    return mx.broadcast_to(pos[None, None, :, None], (batch, 1, count, dim))


def positions(keys):
    """Token positions carried by keys built with ``tokens``."""
    return keys[0, 0, :, 0].astype(mx.int32).tolist()


class TestCacheSideMask(unittest.TestCase):
    """``create_attention_mask(N, offset, ...)``, the name clients import from
    this module for their own caches' ``make_mask``."""

    def test_kinds(self):
        self.assertIsNone(create_attention_mask(1, 5))
        self.assertEqual(create_attention_mask(3, 5), "causal")
        mask = create_attention_mask(3, 5, return_array=True)
        self.assertEqual(mask.shape, (3, 8))
        self.assertEqual(mask[0].tolist(), [True] * 6 + [False] * 2)
        # A window that hides old positions always gives an array.
        windowed = create_attention_mask(1, 5, window_size=4)
        self.assertEqual(windowed.tolist(), [[False, False] + [True] * 4])
        self.assertEqual(create_attention_mask(2, 1, window_size=4), "causal")


class TestKeysAndValues(unittest.TestCase):
    def test_held_tokens_only(self):
        for cache in (KVCache(), QuantizedKVCache(group_size=32, bits=8)):
            with self.subTest(type(cache).__name__):
                self.assertEqual(cache.keys_and_values(), (None, None))
                k = mx.ones((1, 2, 5, 32))
                cache.update_and_fetch(k, 2 * k)
                keys, values = cache.keys_and_values()
                if isinstance(cache, QuantizedKVCache):
                    keys = mx.dequantize(*keys, group_size=32, bits=8)
                    values = mx.dequantize(*values, group_size=32, bits=8)
                self.assertEqual(keys.shape, (1, 2, 5, 32))
                self.assertTrue(mx.allclose(values, 2 * k, atol=1e-2).item())


class GrowthChecks:
    """Boundary checks shared by every geometrically growing cache."""

    dim = HEAD_DIM

    def make(self):
        raise NotImplementedError

    def capacity(self, cache):
        return cache.keys.shape[2]

    def dense(self, fetched):
        return fetched

    def add(self, cache, start, count):
        k = tokens(start, count, self.dim)
        keys, values = cache.update_and_fetch(k, k * 2)
        return self.dense(keys), self.dense(values)

    def assert_holds(self, fetched, expected):
        keys, values = fetched
        self.assertEqual(positions(keys), expected)
        self.assertEqual(positions(values), [2 * p for p in expected])

    def test_first_update_allocates_one_step(self):
        cache = self.make()
        self.assertEqual(cache.allocations, 0)
        self.assert_holds(self.add(cache, 0, 1), [0])
        self.assertEqual((cache.allocations, self.capacity(cache)), (1, 256))

    def test_exact_fill_does_not_grow(self):
        cache = self.make()
        self.add(cache, 0, 100)
        self.assert_holds(self.add(cache, 100, 156), list(range(256)))
        self.assertEqual((cache.allocations, self.capacity(cache)), (1, 256))

    def test_single_token_crossing_capacity(self):
        cache = self.make()
        for i in range(256):
            self.add(cache, i, 1)
        self.assertEqual((cache.allocations, self.capacity(cache)), (1, 256))
        self.assert_holds(self.add(cache, 256, 1), list(range(257)))
        self.assertEqual((cache.allocations, self.capacity(cache)), (2, 512))

    def test_chunk_larger_than_twice_capacity(self):
        cache = self.make()
        self.add(cache, 0, 10)
        self.assert_holds(self.add(cache, 10, 600), list(range(610)))
        self.assertEqual((cache.allocations, self.capacity(cache)), (2, 768))

    def test_chunk_doubles_capacity(self):
        cache = self.make()
        self.add(cache, 0, 250)
        self.assert_holds(self.add(cache, 250, 20), list(range(270)))
        self.assertEqual((cache.allocations, self.capacity(cache)), (2, 512))

    def test_trim_then_write_overwrites_stale_slots(self):
        cache = self.make()
        self.add(cache, 0, 100)
        self.assertEqual(cache.trim(40), 40)
        fetched = self.add(cache, 1000, 5)
        self.assert_holds(fetched, list(range(60)) + list(range(1000, 1005)))
        self.assertEqual(cache.allocations, 1)

    def test_trim_then_grow(self):
        cache = self.make()
        self.add(cache, 0, 300)
        self.assertEqual(cache.trim(100), 100)
        fetched = self.add(cache, 1000, 400)
        self.assert_holds(fetched, list(range(200)) + list(range(1000, 1400)))
        self.assertEqual((cache.allocations, self.capacity(cache)), (2, 768))
        stored = tree_flatten(cache.state)[0][1]
        self.assertEqual(stored.shape[2], 600)

    def test_32k_tokens_one_at_a_time(self):
        cache = self.make()
        worst = 0.0
        for i in range(32768):
            fetched = self.add(cache, i, 1)
            if i % 1024 == 1023:
                mx.eval(fetched)
            if i >= 1023:
                worst = max(worst, self.capacity(cache) / (i + 1))
        # O(log n) allocations, and the buffer within 1.15x of what it holds.
        self.assertLessEqual(cache.allocations, 40)
        self.assertLessEqual(worst, 1.15)
        self.assertGreater(worst, 1.0)
        keys, values = fetched
        self.assertEqual(keys.shape[2], 32768)
        self.assertTrue(mx.array_equal(keys[0, 0, :, 0], mx.arange(32768)).item())
        self.assertTrue(mx.array_equal(values[0, 0, :, 0], 2 * mx.arange(32768)).item())

    def test_growth_after_load_is_geometric(self):
        cache = self.make()
        self.add(cache, 0, 300)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "c.safetensors")
            save_prompt_cache(path, [cache])
            (loaded,) = load_prompt_cache(path)
        self.assertEqual(loaded.allocations, 0)
        for i in range(300, 700):
            fetched = self.add(loaded, i, 1)
        self.assert_holds(fetched, list(range(700)))
        # 300 -> 512 -> 768 slots.
        self.assertEqual((loaded.allocations, self.capacity(loaded)), (2, 768))


class TestKVCacheGrowth(GrowthChecks, unittest.TestCase):
    def make(self):
        return KVCache()


class TestBatchKVCacheGrowth(GrowthChecks, unittest.TestCase):
    def make(self):
        return BatchKVCache([0])


class TestChunkedKVCacheGrowth(GrowthChecks, unittest.TestCase):
    def make(self):
        return ChunkedKVCache(chunk_size=1 << 20)


class TestQuantizedKVCacheGrowth(GrowthChecks, unittest.TestCase):
    dim = 32

    def make(self):
        return QuantizedKVCache(group_size=32, bits=8)

    def capacity(self, cache):
        return cache.keys[0].shape[2]

    def dense(self, fetched):
        self.assertEqual(len(fetched), 3)
        return mx.dequantize(*fetched, group_size=32, bits=8)


class TestKVCache(unittest.TestCase):
    def test_masks(self):
        cache = KVCache()
        self.assertEqual(cache.make_mask(5), "causal")
        self.assertIsNone(cache.make_mask(1))
        cache.update_and_fetch(tokens(0, 6), tokens(0, 6))
        mask = cache.make_mask(3, return_array=True)
        self.assertEqual(mask.shape, (3, 9))
        expected = [[j <= 6 + i for j in range(9)] for i in range(3)]
        self.assertEqual(mask.tolist(), expected)
        windowed = cache.make_mask(3, window_size=4)
        expected = [[j <= 6 + i and 6 + i - j < 4 for j in range(9)] for i in range(3)]
        self.assertEqual(windowed.tolist(), expected)
        self.assertEqual(cache.make_mask(3, window_size=16), "causal")

    def test_nbytes_counts_used_part(self):
        cache = KVCache()
        self.assertEqual(cache.nbytes, 0)
        cache.update_and_fetch(tokens(0, 10), tokens(0, 10))
        self.assertEqual(cache.nbytes, 2 * 10 * HEAD_DIM * 4)

    def test_to_quantized(self):
        cache = KVCache()
        k = mx.random.normal((1, 2, 10, 64))
        cache.update_and_fetch(k, k)
        quantized = cache.to_quantized(group_size=64, bits=8)
        self.assertEqual(quantized.offset, 10)
        self.assertEqual((quantized.group_size, quantized.bits), (64, 8))
        keys, _ = quantized.update_and_fetch(k[..., :1, :], k[..., :1, :])
        restored = mx.dequantize(*keys, group_size=64, bits=8)
        self.assertEqual(restored.shape, (1, 2, 11, 64))
        self.assertLess(mx.abs(restored[..., :10, :] - k).max().item(), 0.05)
        self.assertTrue(KVCache().to_quantized().empty())

    def test_make_prompt_cache(self):
        class Plain:
            layers = [None] * 3

        class Custom(Plain):
            def make_cache(self):
                return ["custom"]

        self.assertTrue(all(type(c) is KVCache for c in make_prompt_cache(Plain())))
        rotating = make_prompt_cache(Plain(), max_kv_size=32)
        self.assertEqual(len(rotating), 3)
        self.assertEqual((rotating[0].max_size, rotating[0].keep), (32, 4))
        self.assertEqual(make_prompt_cache(Custom()), ["custom"])


class TestChunkedKVCache(unittest.TestCase):
    def test_trim_front_keeps_last_chunk_and_bounded_memory(self):
        cache = ChunkedKVCache(chunk_size=300)
        for i in range(3000):
            cache.maybe_trim_front()
            keys, _ = cache.update_and_fetch(tokens(i, 1), tokens(i, 1))
            if i % 500 == 499:
                mx.eval(keys)
        self.assertEqual(cache.start_position, 2699)
        self.assertEqual(positions(keys), list(range(2699, 3000)))
        self.assertLessEqual(cache.keys.shape[2], 1024)
        self.assertEqual(cache.make_mask(2), "causal")
        self.assertEqual(cache.make_mask(2, return_array=True).shape, (2, 303))

    def test_round_trip_with_start_position(self):
        cache = ChunkedKVCache(chunk_size=8)
        cache.update_and_fetch(tokens(0, 12), tokens(0, 12))
        cache.maybe_trim_front()
        loaded = ChunkedKVCache.from_state(cache.state, cache.meta_state)
        self.assertEqual((loaded.offset, loaded.start_position), (12, 4))
        keys, _ = loaded.update_and_fetch(tokens(12, 1), tokens(12, 1))
        self.assertEqual(positions(keys), list(range(4, 13)))


class TestRotatingKVCache(unittest.TestCase):
    def check_schedule(self, max_size, keep, schedule, window_size=None):
        """Feed updates of the given sizes; check contents and masks."""
        cache = RotatingKVCache(max_size, keep=keep)
        # A window of the layer's own also hides the kept tokens.
        window = min(window_size or max_size, max_size)
        own = window_size or float("inf")
        offset = 0
        for count in schedule:
            mask = cache.make_mask(count, window_size=window_size)
            array_mask = cache.make_mask(
                count, window_size=window_size, return_array=True
            )
            keys, values = cache.update_and_fetch(
                tokens(offset, count), tokens(offset, count)
            )
            held = positions(keys)
            self.assertEqual(positions(values), held)

            # Which tokens are held: the first `keep` plus the newest ones.
            recent = max_size - keep if count == 1 else max_size - 1 - keep + count
            kept = list(range(min(keep, offset + count)))
            expected = kept + list(
                range(max(keep, offset + count - recent), offset + count)
            )
            self.assertEqual(sorted(held), expected, f"after {count} at {offset}")
            if count > 1:
                self.assertEqual(held, expected)

            # Masks against a reference built from the held positions.
            reference = [
                [p <= q and (q - p < window or p < keep) and q - p < own for p in held]
                for q in range(offset, offset + count)
            ]
            all_causal = all(
                row == [p <= q for p in held]
                for q, row in zip(range(offset, offset + count), reference)
            )
            if mask is None:
                self.assertEqual(count, 1)
                self.assertTrue(all(reference[0]))
            elif isinstance(mask, str):
                self.assertEqual(mask, "causal")
                self.assertTrue(all_causal)
            else:
                self.assertEqual(mask.tolist(), reference)
            if count > 1 or array_mask is not None:
                self.assertEqual(array_mask.tolist(), reference)
            offset += count
        self.assertEqual(cache.offset, offset)
        return cache

    def test_single_tokens_wrap(self):
        for keep in (0, 3):
            self.check_schedule(8, keep, [1] * 30)

    def test_prefill_then_single_tokens(self):
        for keep in (0, 2):
            self.check_schedule(8, keep, [5] + [1] * 12)
            self.check_schedule(8, keep, [20] + [1] * 12)

    def test_mixed_updates(self):
        schedule = [3, 1, 1, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 2, 1, 1, 11, 1]
        for keep in (0, 2):
            self.check_schedule(8, keep, schedule)
            self.check_schedule(8, keep, schedule, window_size=4)
            self.check_schedule(8, keep, schedule, window_size=12)

    def test_growth_is_capped_at_max_size(self):
        cache = self.check_schedule(300, 0, [1] * 310)
        self.assertEqual(cache.keys.shape[2], 300)

    def test_trim_rules(self):
        cache = RotatingKVCache(8)
        cache.update_and_fetch(tokens(0, 5), tokens(0, 5))
        self.assertTrue(cache.is_trimmable())
        self.assertEqual(cache.trim(2), 2)
        keys, _ = cache.update_and_fetch(tokens(100, 1), tokens(100, 1))
        self.assertEqual(positions(keys), [0, 1, 2, 100])
        cache.update_and_fetch(tokens(0, 6), tokens(0, 6))
        self.assertFalse(cache.is_trimmable())
        self.assertFalse(can_trim_prompt_cache([KVCache(), cache]))
        self.assertEqual(trim_prompt_cache([KVCache(), cache], 3), 0)
        self.assertEqual(cache.offset, 10)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "keep"):
            RotatingKVCache(4, keep=4)
        with self.assertRaisesRegex(ValueError, "max_size"):
            RotatingKVCache(0)


class TestBatchKVCache(unittest.TestCase):
    def test_merge_extract_round_trip(self):
        short, long = KVCache(), KVCache()
        short.update_and_fetch(tokens(0, 3), tokens(0, 3))
        long.update_and_fetch(tokens(10, 5), tokens(10, 5))
        batch = BatchKVCache.merge([short, long])
        self.assertEqual(batch.left_padding.tolist(), [2, 0])
        self.assertEqual(batch.offset.tolist(), [3, 5])
        self.assertEqual(batch.size(), 5)
        step = mx.concatenate([tokens(3, 1), tokens(15, 1)])
        keys, _ = batch.update_and_fetch(step, step)
        self.assertEqual(keys[1, 0, :, 0].tolist(), list(range(10, 16)))
        self.assertEqual(keys[0, 0, 2:, 0].tolist(), [0, 1, 2, 3])
        self.assertEqual(batch.offset.tolist(), [4, 6])
        first = batch.extract(0)
        self.assertEqual(positions(first.state[0]), [0, 1, 2, 3])
        self.assertEqual(first.offset, 4)
        self.assertIs(type(KVCache.merge([KVCache(), KVCache()])), BatchKVCache)

    def test_mask_left_padding(self):
        batch = BatchKVCache([2, 0])
        mask = batch.make_mask(4)
        self.assertEqual(mask.shape, (2, 1, 4, 4))
        for row, pad in enumerate([2, 0]):
            expected = [[pad <= j <= i for j in range(4)] for i in range(4)]
            self.assertEqual(mask[row, 0].tolist(), expected)
        batch.update_and_fetch(tokens(0, 4, batch=2), tokens(0, 4, batch=2))
        step_mask = batch.make_mask(1)
        self.assertEqual(step_mask.shape, (2, 1, 1, 5))
        self.assertEqual(
            step_mask[:, 0, 0].tolist(), [[False, False, True, True, True], [True] * 5]
        )

    def test_filter_drops_shared_padding(self):
        batch = BatchKVCache([3, 1, 2])
        data = mx.arange(3 * 6, dtype=mx.float32).reshape(3, 1, 6, 1)
        batch.update_and_fetch(data, data)
        batch.filter([2, 0])
        self.assertEqual(batch.left_padding.tolist(), [0, 1])
        self.assertEqual(batch._idx, 4)
        self.assertEqual(batch.offset.tolist(), [4, 3])
        keys, _ = batch.update_and_fetch(mx.zeros((2, 1, 1, 1)), mx.zeros((2, 1, 1, 1)))
        self.assertEqual(
            keys[:, 0, :4, 0].tolist(), [list(range(14, 18)), list(range(2, 6))]
        )

    def test_extend(self):
        a = BatchKVCache([0])
        a.update_and_fetch(tokens(0, 2), tokens(0, 2))
        b = BatchKVCache([1])
        b.update_and_fetch(tokens(10, 4), tokens(10, 4))
        a.extend(b)
        self.assertEqual(a.left_padding.tolist(), [2, 1])
        self.assertEqual(a.offset.tolist(), [2, 3])
        step = mx.concatenate([tokens(2, 1), tokens(14, 1)])
        keys, _ = a.update_and_fetch(step, step)
        self.assertEqual(keys[0, 0, 2:, 0].tolist(), [0, 1, 2])
        self.assertEqual(keys[1, 0, 1:, 0].tolist(), [11, 12, 13, 14])
        empty = BatchKVCache([0])
        empty.extend(BatchKVCache([1, 2]))
        self.assertEqual(empty.left_padding.tolist(), [0, 1, 2])

    def test_right_padding_finalize(self):
        batch = BatchKVCache([0, 0])
        batch.prepare(right_padding=[0, 2], lengths=[4, 2])
        data = mx.concatenate([tokens(0, 4), tokens(10, 4)])
        batch.update_and_fetch(data, data)
        batch.finalize()
        self.assertEqual(batch.left_padding.tolist(), [0, 2])
        self.assertEqual(batch.offset.tolist(), [4, 2])
        step = mx.concatenate([tokens(4, 1), tokens(12, 1)])
        keys, _ = batch.update_and_fetch(step, step)
        self.assertEqual(keys[1, 0, 2:, 0].tolist(), [10, 11, 12])
        with self.assertRaisesRegex(ValueError, "left_padding"):
            batch.prepare(left_padding=[1, 1])


class TestPromptCacheFiles(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.folder.name, "prompt.safetensors")

    def tearDown(self):
        self.folder.cleanup()

    def round_trip(self, caches, metadata=None):
        save_prompt_cache(self.path, caches, metadata or {})
        loaded, meta = load_prompt_cache(self.path, return_metadata=True)
        self.assertEqual(meta, metadata or {})
        self.assertEqual([type(c) for c in loaded], [type(c) for c in caches])
        for old, new in zip(caches, loaded):
            self.assertEqual(new.meta_state, old.meta_state)
            old_flat = tree_flatten(old.state)
            new_flat = tree_flatten(new.state)
            self.assertEqual([k for k, _ in old_flat], [k for k, _ in new_flat])
            for (_, a), (_, b) in zip(old_flat, new_flat):
                self.assertTrue(mx.array_equal(a, b).item())
        return loaded

    def filled(self, cache, count, dim=HEAD_DIM, chunk=7):
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            cache.update_and_fetch(tokens(start, n, dim), tokens(start, n, dim))
        return cache

    def test_each_class_round_trips(self):
        caches = [
            self.filled(KVCache(), 20),
            self.filled(RotatingKVCache(8, keep=2), 30),
            self.filled(QuantizedKVCache(group_size=32, bits=4), 20, dim=32),
            self.filled(ChunkedKVCache(16), 20),
            self.filled(BatchKVCache([0]), 20),
            CacheList(self.filled(KVCache(), 5), self.filled(RotatingKVCache(4), 9)),
        ]
        loaded = self.round_trip(caches, {"model": "tiny", "n": "3"})
        self.assertEqual([c.size() for c in loaded], [20, 9, 20, 20, 20, 5])

    def test_rotating_ring_continues_after_load(self):
        cache = RotatingKVCache(6, keep=1)
        for i in range(9):
            cache.update_and_fetch(tokens(i, 1), tokens(i, 1))
        (loaded,) = self.round_trip([cache])
        for c in (cache, loaded):
            keys, _ = c.update_and_fetch(tokens(9, 1), tokens(9, 1))
            self.assertEqual(sorted(positions(keys)), [0, 5, 6, 7, 8, 9])

    def test_empty_caches_round_trip_and_stay_usable(self):
        caches = [
            KVCache(),
            RotatingKVCache(8),
            QuantizedKVCache(group_size=32),
            ChunkedKVCache(4),
            BatchKVCache([1, 0]),
            CacheList(KVCache(), KVCache()),
            self.filled(KVCache(), 3),
        ]
        loaded = self.round_trip(caches)
        self.assertTrue(all(c.empty() for c in loaded[:6]))
        self.assertEqual(loaded[4].left_padding.tolist(), [1, 0])
        for cache in loaded[:4] + [loaded[5][0]]:
            dim = 32 if isinstance(cache, QuantizedKVCache) else HEAD_DIM
            cache.update_and_fetch(tokens(0, 2, dim), tokens(0, 2, dim))
            self.assertEqual(cache.size(), 2)
        keys, _ = loaded[4].update_and_fetch(
            tokens(0, 2, batch=2), tokens(0, 2, batch=2)
        )
        self.assertEqual(keys.shape, (2, 1, 2, HEAD_DIM))

    def test_upstream_layout(self):
        caches = [
            self.filled(KVCache(), 3),
            self.filled(RotatingKVCache(4, keep=1), 6, chunk=1),
        ]
        save_prompt_cache(self.path, caches, {"who": "me"})
        arrays, meta = mx.load(self.path, return_metadata=True)
        self.assertEqual(sorted(arrays), ["0.0", "0.1", "1.0", "1.1"])
        self.assertEqual(arrays["1.0"].shape, (1, 1, 4, HEAD_DIM))
        self.assertEqual(
            meta,
            {
                "0.0": "",
                "0.1.0": "1",
                "0.1.1": "4",
                "0.1.2": "6",
                "0.1.3": "3",
                "1.who": "me",
                "2.0": "KVCache",
                "2.1": "RotatingKVCache",
            },
        )

    def test_suffix_added_like_save_safetensors(self):
        bare = os.path.join(self.folder.name, "bare")
        save_prompt_cache(bare, [self.filled(KVCache(), 2)])
        self.assertEqual(os.listdir(self.folder.name), ["bare.safetensors"])
        self.assertEqual(load_prompt_cache(bare + ".safetensors")[0].offset, 2)
        self.assertEqual(load_prompt_cache(bare)[0].offset, 2)

    def test_failed_save_keeps_old_file(self):
        save_prompt_cache(self.path, [self.filled(KVCache(), 4)])

        def broken(path, arrays, metadata=None):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")

        with mock.patch.object(cache_module.mx, "save_safetensors", broken):
            with self.assertRaisesRegex(OSError, "disk full"):
                save_prompt_cache(self.path, [self.filled(KVCache(), 9)])
        self.assertEqual(os.listdir(self.folder.name), ["prompt.safetensors"])
        self.assertEqual(load_prompt_cache(self.path)[0].offset, 4)

    def test_unknown_class_is_rejected(self):
        mx.save_safetensors(self.path, {}, {"0.0": "", "2.0": "MysteryCache"})
        with self.assertRaisesRegex(ValueError, "MysteryCache"):
            load_prompt_cache(self.path)


class TestTrim(unittest.TestCase):
    def test_trim_prompt_cache(self):
        caches = [KVCache(), KVCache()]
        for c in caches:
            c.update_and_fetch(tokens(0, 10), tokens(0, 10))
        self.assertTrue(can_trim_prompt_cache(caches))
        self.assertEqual(trim_prompt_cache(caches, 4), 4)
        self.assertEqual([c.offset for c in caches], [6, 6])
        self.assertEqual(trim_prompt_cache(caches, 100), 6)
        self.assertEqual(trim_prompt_cache([], 3), 0)

    def test_quantized_and_cache_list_trim(self):
        quantized = QuantizedKVCache(group_size=32)
        quantized.update_and_fetch(tokens(0, 5, 32), tokens(0, 5, 32))
        self.assertEqual(quantized.trim(2), 2)
        keys, _ = quantized.update_and_fetch(tokens(7, 1, 32), tokens(7, 1, 32))
        restored = mx.dequantize(*keys, group_size=32, bits=8)
        self.assertEqual(positions(restored), [0, 1, 2, 7])
        pair = CacheList(KVCache(), RotatingKVCache(16))
        for c in pair.caches:
            c.update_and_fetch(tokens(0, 5), tokens(0, 5))
        self.assertTrue(pair.is_trimmable())
        self.assertEqual(pair.trim(2), 2)
        self.assertEqual([c.offset for c in pair.caches], [3, 3])


if __name__ == "__main__":
    unittest.main()
