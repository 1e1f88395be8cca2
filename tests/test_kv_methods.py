"""KV quantization methods: codecs, the cache holding their codes, the
VeloxQuant-MLX-style API around them, and their compositions."""

import io
import math
import os
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout

import mlx.core as mx
import numpy as np
from helpers import tiny_model, tiny_tokenizer

from mlx_lm.calibrate_kv import calibrate
from mlx_lm.calibrate_kv import main as calibrate_main
from mlx_lm.generate import batch_generate, generate, generate_step, main
from mlx_lm.models import kv_quant
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import (
    CodecCompressedKVCache,
    CodecKVCache,
    CompressedKVCache,
    KeyNormObserver,
    KVCache,
    KVCacheBuilder,
    KVCacheConfig,
    KVCacheFactory,
    NpyArtifactStore,
    RotatingKVCache,
    SlidingWindowKVCache,
    cache_eviction_stats,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlx_lm.models.kv_quant.codec import pack, unpack

D = 64
ZERO = kv_quant.ZERO_CALIBRATION_METHODS


def keys_like(seed, T=256, H=2, outlier=True):
    """Gaussian keys [1, H, T, D] with an offset and one large channel, as
    real keys have."""
    k = mx.random.normal((1, H, T, D), key=mx.random.key(seed))
    k = k + mx.random.normal((1, H, 1, D), key=mx.random.key(seed + 1))
    if outlier:
        k = k + (mx.arange(D) == 5) * 8.0
    return k


def relative_error(x, y):
    return (mx.sum((x - y) ** 2) / mx.sum(x**2)).item()


def calibrated_artifacts(method, bits, keys):
    codec = {
        "vecinfer": kv_quant.VecInferCodec,
        "spectral": kv_quant.SpectralCodec,
        "commvq": kv_quant.CommVQCodec,
    }[method]
    return codec.calibrate(np.array(keys[0]), bits=bits)


def make_codec(method, bits, train=None):
    config = KVCacheConfig(method=method, bits=bits, num_residuals=1)
    if method == "ratequant":
        config = KVCacheConfig(method=method, bits=bits, bit_allocation=[bits])
    if method in ("vecinfer", "spectral", "commvq"):
        artifacts = calibrated_artifacts(method, bits, train)
        return kv_quant.rebuild_codec(method, D, {"bits": bits}, artifacts)
    return kv_quant.key_codec(config, D)


class TestPacking(unittest.TestCase):
    def test_round_trip_every_width(self):
        for bits in range(1, 9):
            for n in (1, 7, 64, 65):
                codes = mx.random.randint(0, 1 << bits, (2, 3, 4, n)).astype(mx.uint32)
                words = pack(codes, bits)
                self.assertEqual(words.dtype, mx.uint32)
                # Exactly the bits asked for, up to the last word of each plane.
                self.assertLessEqual(words.shape[-1] * 32, n * bits + 32 * 4)
                self.assertTrue(
                    mx.array_equal(unpack(words, n, bits), codes), (bits, n)
                )


class TestCodecs(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.train = keys_like(0, T=1024)
        cls.test = keys_like(10)

    def test_error_falls_with_bits(self):
        for method in kv_quant.KV_METHODS:
            if method == "affine":
                continue
            errors = []
            for bits in (1, 2, 3, 4):
                if bits not in kv_quant.METHOD_BITS[method]:
                    continue
                codec = make_codec(method, bits, self.train)
                decoded = codec.decode(codec.encode(self.test))
                self.assertEqual(decoded.shape, self.test.shape)
                errors.append(relative_error(self.test, decoded))
            self.assertEqual(errors, sorted(errors, reverse=True), method)
            # Far better than nothing (error 1) at 4 bits, except QJL's
            # sketch, an unbiased but noisy estimator.
            limit = {"qjl": 0.7, "vecinfer": 0.1}.get(method, 0.05)
            self.assertLess(errors[-1], limit, method)

    def test_turboquant_meets_lloyd_max_distortion(self):
        # A rotated unit vector has nearly Gaussian coordinates: the error is
        # the normal law's Lloyd-Max distortion (0.3634, 0.1175, 0.03454).
        x = mx.random.normal((1, 1, 2000, D), key=mx.random.key(3))
        for bits, distortion in ((1, 0.3634), (2, 0.1175), (3, 0.03454)):
            codec = kv_quant.TurboQuantCodec(D, bits, num_residuals=1)
            error = relative_error(x, codec.decode(codec.encode(x)))
            self.assertAlmostEqual(error, distortion, delta=0.1 * distortion)
        # A residual pass quantizes what the first missed.
        one = kv_quant.TurboQuantCodec(D, 1, num_residuals=1)
        two = kv_quant.TurboQuantCodec(D, 1, num_residuals=2)
        e1 = relative_error(x, one.decode(one.encode(x)))
        e2 = relative_error(x, two.decode(two.encode(x)))
        self.assertLess(e2, 0.4 * e1)

    def test_qjl_and_rabitq_inner_products_are_unbiased(self):
        keys = keys_like(4, T=512, outlier=False)
        queries = mx.random.normal((1, 2, 64, D), key=mx.random.key(5))
        exact = queries @ mx.swapaxes(keys, -1, -2)
        spread = mx.sqrt(mx.mean(exact**2)).item()
        for make in (kv_quant.QJLCodec, kv_quant.RaBitQCodec):
            # Unbiased over the random sketch or rotation: average over seeds.
            bias = 0.0
            for seed in range(8):
                codec = make(D, 1, seed=seed)
                decoded = codec.decode(codec.encode(keys))
                bias += mx.mean(queries @ mx.swapaxes(decoded, -1, -2) - exact).item()
            self.assertLess(abs(bias / 8), 0.03 * spread, make.name)

    def test_mapped_decode_is_decode(self):
        codecs = [make_codec(m, 2, self.train) for m in kv_quant.KV_METHODS]
        codecs.append(
            kv_quant.OutlierCodec(D, kv_quant.TurboQuantCodec(D, 3, num_residuals=1))
        )
        for codec in codecs:
            codes = codec.encode(self.test)
            if codec.map is None:
                continue
            m = codec.map
            mapped = codec.decode_mapped(codes)
            if m.ndim == 2:
                back = mapped @ m.T
            else:
                back = mapped @ mx.swapaxes(m, -1, -2)[None]
            self.assertTrue(
                mx.allclose(back, codec.decode(codes), atol=1e-3), codec.name
            )

    def test_outlier_channels_are_held_apart(self):
        inner = kv_quant.TurboQuantCodec(D, 2, num_residuals=1)
        codec = kv_quant.OutlierCodec(D, inner, num_channels=1, outlier_bits=8)
        decoded = codec.decode(codec.encode(self.test))
        self.assertEqual(codec.channels.tolist(), [[5], [5]])
        plain = inner.decode(inner.encode(self.test))
        self.assertLess(
            relative_error(self.test, decoded), relative_error(self.test, plain)
        )

    def test_accounting_matches_held_bytes(self):
        for method in kv_quant.KV_METHODS:
            for bits in (1, 2, 3, 4):
                if bits not in kv_quant.METHOD_BITS[method]:
                    continue
                codec = make_codec(method, bits, self.train)
                codes = codec.encode(self.test)
                held = sum(c.nbytes for c in codes) * 8 / self.test.size
                self.assertAlmostEqual(held, codec.bits_per_value, 6, (method, bits))


class TestCodecCache(unittest.TestCase):
    def config(self, **options):
        return KVCacheConfig(
            method="turboquant_rvq", bits=3, num_residuals=1, value_bits=4, **options
        )

    def test_holds_codes_and_counts_them(self):
        cache = KVCacheFactory.create(self.config(), 2, D, max_seq_len=512)
        self.assertIsInstance(cache, CodecKVCache)
        # Reserved for max_seq_len tokens, nothing counted yet.
        self.assertEqual(cache.keys[0].shape[2], 512)
        self.assertEqual(cache.nbytes, 0)
        keys, values = keys_like(0, T=300), keys_like(1, T=300)
        cache.update_and_fetch(keys, values)
        self.assertEqual(cache.allocations, 1)
        expected = 300 * 2 * D * 2 * cache.bits_per_value / 8
        self.assertEqual(cache.nbytes, expected)
        fp16 = 300 * 2 * D * 2 * 2
        self.assertLess(cache.nbytes, fp16 / 4)

    def test_attention_over_codes_is_attention_over_decoded(self):
        for method in ZERO + ("affine",):
            config = KVCacheConfig(method=method, bits=4, value_bits=4)
            cache = KVCacheFactory.create(config, 2, D)
            keys, values = keys_like(2, T=40), keys_like(3, T=40)
            mapped_k, mapped_v = cache.update_and_fetch(keys, values)
            queries = mx.random.normal((1, 4, 3, D), key=mx.random.key(6))
            out = scaled_dot_product_attention(
                queries, mapped_k, mapped_v, cache, scale=D**-0.5, mask="causal"
            )
            dense_k = cache.key_codec.decode(cache.keys)[..., :40, :]
            dense_v = cache.value_codec.decode(cache.values)[..., :40, :]
            reference = scaled_dot_product_attention(
                queries, dense_k, dense_v, None, scale=D**-0.5, mask="causal"
            )
            self.assertTrue(mx.allclose(out, reference, atol=1e-4), method)

    def test_trim_and_save_load_continue_exactly(self):
        model, _ = tiny_model(seed=3, hidden_size=128)
        prompt = mx.array([1 + (7 * i) % 90 for i in range(80)])
        configs = [
            self.config(),
            KVCacheConfig(method="rabitq", bits=2, value_bits=16),
            KVCacheConfig(
                method="qjl", bits=2, compact_kv_budget=40, compact_keep_recent=8
            ),
            self.config(window_size=48, window_strategy="fixed", window_prefix=4),
            self.config(outlier_observer=KeyNormObserver(2)),
            self.config(quantized_kv_start=30),
            KVCacheConfig(method="affine", bits=8, value_bits=4, max_kv_size=50),
        ]
        for config in configs:
            cache = make_prompt_cache(model, config=config)
            first = [
                t
                for t, _ in zip(
                    (
                        t
                        for t, _ in generate_step(
                            prompt, model, prompt_cache=cache, kv_config=config
                        )
                    ),
                    range(5),
                )
            ]
            with tempfile.TemporaryDirectory() as tmp:
                name = os.path.join(tmp, "cache.safetensors")
                save_prompt_cache(name, cache)
                loaded = load_prompt_cache(name)
            self.assertEqual([type(c) for c in loaded], [type(c) for c in cache])
            self.assertEqual([c.nbytes for c in loaded], [c.nbytes for c in cache])
            nxt = mx.array(first[-1:])
            go = lambda c: [
                t
                for t, _ in zip(
                    (
                        t
                        for t, _ in generate_step(
                            nxt, model, prompt_cache=c, kv_config=config
                        )
                    ),
                    range(5),
                )
            ]
            self.assertEqual(go(cache), go(loaded), config)

    def test_compaction_keeps_codes_within_budget(self):
        model, _ = tiny_model(seed=4)
        config = KVCacheConfig(
            method="polarquant",
            bits=2,
            compact_kv_budget=32,
            compact_keep_recent=4,
            compact_mode="stream",
        )
        cache = make_prompt_cache(model, config=config)
        self.assertIsInstance(cache[0], CodecCompressedKVCache)
        prompt = mx.array([1 + (5 * i) % 90 for i in range(120)])
        for _ in zip(
            generate_step(prompt, model, prompt_cache=cache, kv_config=config), range(4)
        ):
            pass
        stats = cache_eviction_stats(cache)
        self.assertGreater(stats.tokens_evicted, 0)
        self.assertLessEqual(max(c.size() for c in cache), 32 + cache[0].margin)
        # Codes, not floats: a quarter of what a float32 cache of the size holds.
        plain = sum(c.size() * 2 * D * 2 * 4 for c in cache)
        self.assertLess(sum(c.nbytes for c in cache), plain / 4)


class TestWindowWrapsAnyCache(unittest.TestCase):
    def test_wraps_compressed_coded_and_rotating(self):
        codec = kv_quant.key_codec(KVCacheConfig(method="turboquant_rvq", bits=4), D)
        values = kv_quant.value_codec(
            KVCacheConfig(method="turboquant_rvq", value_bits=4), D
        )
        rotating = RotatingKVCache(64, keep=4)
        rotating.update_and_fetch(keys_like(0, T=10), keys_like(1, T=10))
        inners = [
            CompressedKVCache(40, keep_recent=4),
            CodecKVCache(codec, values),
            CodecCompressedKVCache(40, codec, values, keep_recent=4),
            rotating,
        ]
        for inner in inners:
            window = SlidingWindowKVCache(
                inner_cache=inner, window_size=24, eviction_attention_window=8
            )
            start = window.offset
            for _ in range(40):
                window.update_and_fetch(keys_like(2, T=1), keys_like(3, T=1))
            self.assertEqual(window.offset, start + 40)
            self.assertLessEqual(window.size(), 32)
            stats = window.eviction_stats()
            self.assertEqual(stats.current_size, window.size())
            self.assertEqual(stats["tokens_evicted"], stats.tokens_evicted)
            self.assertEqual(stats.tokens_evicted, window.offset - window.size())

    def test_rotating_narrower_than_window_is_refused(self):
        with self.assertRaisesRegex(ValueError, "at most 16"):
            SlidingWindowKVCache(inner_cache=RotatingKVCache(16), window_size=32)


class TestConfigAndBuilder(unittest.TestCase):
    def test_seed_defaults(self):
        config = KVCacheConfig(method="turboquant_rvq")
        self.assertEqual(
            (config.bits, config.value_bits, config.num_residuals, config.use_hadamard),
            (1, 2, 2, True),
        )
        self.assertEqual(
            (config.outlier_bits, config.sketch_dim, config.num_clusters, config.seed),
            (8, 64, 64, 0),
        )
        self.assertEqual((config.signal_bits, config.noise_bits), (4, 1))

    def test_bad_values_name_themselves(self):
        bad = [
            (dict(method="lloyd"), "method"),
            (dict(method="polarquant", bits=8), "bits"),
            (dict(method="qjl", value_bits=7), "value_bits"),
            (dict(method="rabitq", num_clusters=300), "num_clusters"),
            (dict(method="qjl", kv_bits=4), "kv_bits"),
            (dict(method="qjl", use_hadamard="yes"), "use_hadamard"),
            (dict(method="ratequant", bit_allocation=[2, 9]), "bit_allocation"),
        ]
        for options, name in bad:
            with self.assertRaisesRegex(ValueError, name, msg=options):
                KVCacheConfig(**options)

    def test_calibrated_methods_ask_for_calibration(self):
        for method in kv_quant.CALIBRATED_METHODS:
            with self.assertRaisesRegex(ValueError, "calibrat"):
                KVCacheFactory.create(KVCacheConfig(method=method, bits=2), 2, D)

    def test_builder_gives_each_layer_its_heads(self):
        model, _ = tiny_model(seed=1)
        caches = KVCacheBuilder.build(model, KVCacheConfig(method="qjl", bits=2), 128)
        self.assertEqual(len(caches), len(model.layers))
        self.assertTrue(all(isinstance(c, CodecKVCache) for c in caches))
        self.assertEqual(caches[0].keys[0].shape[:3], (1, 2, 128))

    def test_builder_keeps_windows_of_the_model(self):
        model, _ = tiny_model(
            seed=1,
            model_type="gemma3_text",
            head_dim=16,
            sliding_window=8,
            sliding_window_pattern=2,
            query_pre_attn_scalar=16,
        )
        caches = KVCacheBuilder.build(
            model, KVCacheConfig(method="turboquant_rvq", bits=2)
        )
        kinds = {type(c) for c in caches}
        self.assertEqual(kinds, {SlidingWindowKVCache, CodecKVCache})
        # The model's windows keep their size, over codes.
        windows = [c for c in caches if isinstance(c, SlidingWindowKVCache)]
        self.assertTrue(all(w.window_size == 8 for w in windows))
        self.assertTrue(all(isinstance(w.inner, CodecKVCache) for w in windows))


class TestGeneration(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, _ = tiny_model(seed=2)
        cls.tokenizer = tiny_tokenizer()
        cls.prompt = "the quick brown fox jumps over the lazy dog " * 8

    def test_kv_cache_is_prompt_cache(self):
        config = KVCacheConfig(method="turboquant_rvq", bits=4, value_bits=4)
        cache = KVCacheBuilder.build(self.model, config)
        text = generate(
            self.model, self.tokenizer, self.prompt, max_tokens=6, kv_cache=cache
        )
        again = generate(
            self.model,
            self.tokenizer,
            self.prompt,
            max_tokens=6,
            prompt_cache=make_prompt_cache(self.model, config=config),
        )
        self.assertEqual(text, again)
        self.assertGreater(cache[0].offset, 0)
        with self.assertRaisesRegex(ValueError, "not both"):
            generate(
                self.model,
                self.tokenizer,
                self.prompt,
                max_tokens=2,
                kv_cache=cache,
                prompt_cache=make_prompt_cache(self.model),
            )

    def test_speculative_and_batched(self):
        options = dict(method="turboquant_rvq", bits=4, value_bits=4)
        plain = generate(
            self.model, self.tokenizer, self.prompt, max_tokens=8, **options
        )
        draft, _ = tiny_model(seed=5)
        speculative = generate(
            self.model,
            self.tokenizer,
            self.prompt,
            max_tokens=8,
            draft_model=draft,
            num_draft_tokens=3,
            **options,
        )
        self.assertEqual(plain, speculative)
        prompts = [
            self.tokenizer.encode(self.prompt),
            self.tokenizer.encode("a b c d " * 20),
        ]
        response = batch_generate(
            self.model,
            self.tokenizer,
            prompts,
            max_tokens=4,
            compact_kv_budget=48,
            compact_keep_recent=4,
            return_prompt_caches=True,
            **options,
        )
        self.assertEqual(len(response.texts), 2)
        self.assertIsInstance(response.caches[0], CodecCompressedKVCache)
        with self.assertRaisesRegex(ValueError, "without compact_kv_budget"):
            batch_generate(self.model, self.tokenizer, prompts, max_tokens=2, **options)

    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(list(argv))
            except SystemExit as e:
                return e.code, out.getvalue(), err.getvalue()
        return 0, out.getvalue(), err.getvalue()

    def test_command_line(self):
        code, out, _ = self.run_main(
            "--kv-method",
            "polarquant",
            "--kv-bits",
            "3",
            "--kv-value-bits",
            "4",
            "--max-tokens",
            "4",
            "--prompt",
            "hello",
        )
        self.assertEqual(code, 0)
        for argv, flag in (
            (("--kv-method", "fourier"), "--kv-method"),
            (("--kv-value-bits", "4"), "--kv-value-bits"),
            (("--kv-method", "qjl", "--kv-bits", "9"), "--kv-bits"),
        ):
            code, _, err = self.run_main(*argv, "--model", "/nonexistent")
            self.assertEqual(code, 2, argv)
            self.assertIn(flag, err)
            self.assertNotIn("Traceback", err)


class TestCalibration(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, _ = tiny_model(seed=6)
        cls.tokenizer = tiny_tokenizer()

    def test_every_calibrated_method_round_trips_through_a_folder(self):
        text = "calibration text about many small things. " * 40
        prompt = mx.array([1 + (3 * i) % 90 for i in range(60)])
        for method in kv_quant.CALIBRATED_METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                store = calibrate(
                    self.model,
                    self.tokenizer,
                    method,
                    tmp,
                    bits=2,
                    text=text,
                    num_tokens=200,
                )
                self.assertIsInstance(store, NpyArtifactStore)
                self.assertEqual(store.manifest["method"], method)
                config = KVCacheConfig(method=method, bits=2, calibration=tmp)
                cache = make_prompt_cache(self.model, config=config)
                tokens = [
                    t
                    for t, _ in zip(
                        (
                            t
                            for t, _ in generate_step(
                                prompt, self.model, prompt_cache=cache, kv_config=config
                            )
                        ),
                        range(3),
                    )
                ]
                self.assertEqual(len(tokens), 3)
                self.assertIsInstance(cache[0], CodecKVCache)
                with self.assertRaisesRegex(ValueError, "made for"):
                    other = "spectral" if method != "spectral" else "commvq"
                    make_prompt_cache(self.model, method=other, bits=2, calibration=tmp)

    def test_command_line_errors(self):
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit):
            calibrate_main(["--method", "qjl", "--output", "/tmp/x"])
        self.assertIn("--method", err.getvalue())


if __name__ == "__main__":
    unittest.main()
