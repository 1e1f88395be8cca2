"""Model architectures: cache consistency, HF reference logits, attention helpers."""

import importlib
import itertools
import json
import unittest
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_lm.models import base, cache, rope_utils

FIXTURES = Path(__file__).parent / "fixtures" / "hf_reference"

# Fixture folder -> architecture module (Mistral checkpoints use the Llama code).
REFERENCE_MODULES = {
    "llama": "llama",
    "mistral": "llama",
    "mistral_sliding": "llama",
    "qwen2": "qwen2",
    "qwen2_sliding": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3_text",
    "phi3": "phi3",
}

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=100,
)

# Tiny configurations exercising each architecture's options.
TINY_CONFIGS = {
    "llama": dict(
        SMALL,
        model_type="llama",
        head_dim=32,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": dict(SMALL, model_type="mistral", tie_word_embeddings=False),
    # Mistral 7B v0.1's shape: a sliding_window and no layer_types.
    "mistral_sliding": dict(
        SMALL, model_type="mistral", sliding_window=5, tie_word_embeddings=False
    ),
    "llama_linear": dict(
        SMALL,
        model_type="llama",
        rope_scaling={"type": "linear", "factor": 2.0},
    ),
    "llama_sliding": dict(
        SMALL,
        model_type="llama",
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=5,
    ),
    "qwen2": dict(SMALL, model_type="qwen2"),
    "qwen3": dict(SMALL, model_type="qwen3", head_dim=32, tie_word_embeddings=False),
    "gemma3_text": dict(
        SMALL,
        model_type="gemma3_text",
        num_hidden_layers=4,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=6,
        sliding_window_pattern=2,
    ),
    "phi3": dict(SMALL, model_type="phi3", partial_rotary_factor=0.5),
    "phi3_longrope": dict(
        SMALL,
        model_type="phi3",
        max_position_embeddings=512,
        original_max_position_embeddings=64,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0] * 8,
            "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
        },
    ),
}


def module_for(model_type):
    name = "llama" if model_type == "mistral" else model_type
    return importlib.import_module(f"mlx_lm.models.{name}")


def build_model(config, seed=0):
    mx.random.seed(seed)
    arch = module_for(config["model_type"])
    model = arch.Model(arch.ModelArgs.from_dict(config))
    # Perturb every parameter so norms and biases are not trivially 1 / 0.
    params = tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), model.parameters())
    model.update(params)
    mx.eval(model.parameters())
    return model


def to_float32(model):
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    return model


def load_fixture_model(name):
    folder = FIXTURES / name
    config = json.loads((folder / "config.json").read_text())
    arch = importlib.import_module(f"mlx_lm.models.{REFERENCE_MODULES[name]}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = model.sanitize(mx.load(str(folder / "model.safetensors")))
    model.load_weights(list(weights.items()), strict=True)
    return to_float32(model)


def max_diff(a, b):
    return np.abs(np.array(a) - np.array(b)).max()


class TestCacheConsistency(unittest.TestCase):
    """Incremental decoding through the KV cache reproduces the full pass."""

    n_tokens = 20

    def tokens(self, vocab_size):
        rng = np.random.default_rng(1)
        return mx.array(rng.integers(0, vocab_size, size=(1, self.n_tokens)))

    def check_chunks(self, name, chunk_sizes, make_cache=cache.make_prompt_cache):
        config = TINY_CONFIGS[name]
        model = build_model(config)
        tokens = self.tokens(config["vocab_size"])
        full = model(tokens)

        prompt_cache = make_cache(model)
        pieces, start = [], 0
        for size in chunk_sizes:
            pieces.append(model(tokens[:, start : start + size], cache=prompt_cache))
            start += size
        self.assertEqual(start, self.n_tokens)
        stepped = mx.concatenate(pieces, axis=1)
        self.assertEqual(stepped.shape, (1, self.n_tokens, config["vocab_size"]))
        self.assertLess(max_diff(full, stepped), 1e-4, f"{name} {chunk_sizes}")
        return prompt_cache

    def test_token_by_token(self):
        for name in TINY_CONFIGS:
            with self.subTest(name):
                self.check_chunks(name, [1] * self.n_tokens)

    def test_chunked_prefill(self):
        for name in TINY_CONFIGS:
            with self.subTest(name):
                self.check_chunks(name, [9, 11])
                self.check_chunks(name, [13, 1, 1, 5])

    def test_gemma_cache_kinds(self):
        model = build_model(TINY_CONFIGS["gemma3_text"])
        kinds = [type(c) for c in model.make_cache()]
        self.assertEqual(
            kinds,
            [cache.RotatingKVCache, cache.KVCache] * 2,
        )
        self.assertEqual(model.make_cache()[0].max_size, 6)

    def test_llama_cache_layout(self):
        plain = build_model(TINY_CONFIGS["llama"])
        self.assertFalse(hasattr(plain, "make_cache"))
        kinds = [type(c) for c in cache.make_prompt_cache(plain, max_kv_size=8)]
        self.assertEqual(kinds, [cache.RotatingKVCache] * 2)
        sliding = build_model(TINY_CONFIGS["llama_sliding"])
        kinds = [type(c) for c in cache.make_prompt_cache(sliding)]
        self.assertEqual(kinds, [cache.RotatingKVCache, cache.KVCache])

    def test_gemma_window_matters(self):
        # With a window wider than the sequence, the logits must change.
        config = TINY_CONFIGS["gemma3_text"]
        tokens = self.tokens(config["vocab_size"])
        narrow = build_model(config)(tokens)
        wide = build_model(dict(config, sliding_window=64))(tokens)
        self.assertLess(max_diff(narrow[:, :6], wide[:, :6]), 1e-5)
        self.assertGreater(max_diff(narrow[:, 6:], wide[:, 6:]), 1e-3)

    def test_quantized_cache_close_to_full_precision(self):
        config = dict(TINY_CONFIGS["qwen3"], head_dim=64)
        model = build_model(config)
        tokens = self.tokens(config["vocab_size"])
        full = model(tokens)

        def quantized_cache(m):
            return [cache.QuantizedKVCache(group_size=32, bits=8) for _ in m.layers]

        q_cache = quantized_cache(model)
        stepped = mx.concatenate(
            [model(tokens[:, :12], cache=q_cache)]
            + [model(tokens[:, i : i + 1], cache=q_cache) for i in range(12, 20)],
            axis=1,
        )
        scale = np.abs(np.array(full)).max()
        self.assertLess(max_diff(full, stepped), 0.02 * scale)
        self.assertGreater(max_diff(full, stepped), 0.0)

    def test_batched_left_padding(self):
        # Rows of a BatchKVCache have per-row (array) offsets for RoPE.
        prompts = [[5, 9, 2, 7, 1, 8, 3], [4, 6, 11, 12]]
        pad = [0, 3]
        for name in ["llama", "qwen2", "qwen3", "phi3"]:
            with self.subTest(name):
                model = build_model(TINY_CONFIGS[name])
                batch_cache = [cache.BatchKVCache(pad) for _ in model.layers]
                padded = mx.array([[0] * p + t for p, t in zip(pad, prompts)])
                first = model(padded, cache=batch_cache)[:, -1]
                second = model(mx.array([[13], [14]]), cache=batch_cache)[:, -1]
                for row, (prompt, nxt) in enumerate(zip(prompts, [13, 14])):
                    alone = model(mx.array([prompt + [nxt]]))
                    self.assertLess(max_diff(first[row], alone[0, -2]), 1e-4)
                    self.assertLess(max_diff(second[row], alone[0, -1]), 1e-4)

    def test_input_embeddings(self):
        for name in ["llama", "gemma3_text", "phi3"]:
            with self.subTest(name):
                model = build_model(TINY_CONFIGS[name])
                tokens = self.tokens(TINY_CONFIGS[name]["vocab_size"])
                embeds = model.model.embed_tokens(tokens)
                via_embeds = model(tokens, input_embeddings=embeds)
                self.assertLess(max_diff(model(tokens), via_embeds), 1e-6)


class TestHFReference(unittest.TestCase):
    """Logits equal those transformers computed for the committed checkpoints."""

    def check(self, name, model):
        tokens = mx.array(np.load(FIXTURES / name / "tokens.npy"))[None]
        expected = np.load(FIXTURES / name / "logits.npy")
        logits = model(tokens)[0]
        self.assertEqual(logits.dtype, mx.float32)
        self.assertLess(max_diff(logits, expected), 1e-4, name)

    def test_reference_logits(self):
        for name in REFERENCE_MODULES:
            with self.subTest(name):
                self.check(name, load_fixture_model(name))

    def test_reference_logits_through_cache(self):
        for name in REFERENCE_MODULES:
            with self.subTest(name):
                model = load_fixture_model(name)
                tokens = mx.array(np.load(FIXTURES / name / "tokens.npy"))[None]
                expected = np.load(FIXTURES / name / "logits.npy")
                prompt_cache = cache.make_prompt_cache(model)
                head = model(tokens[:, :30], cache=prompt_cache)
                tail = [
                    model(tokens[:, i : i + 1], cache=prompt_cache)
                    for i in range(30, 40)
                ]
                logits = mx.concatenate([head] + tail, axis=1)[0]
                self.assertLess(max_diff(logits, expected), 1e-4, name)

    def test_reference_logits_through_loader(self):
        from mlx_lm.utils import load_model

        for name in REFERENCE_MODULES:
            with self.subTest(name):
                model, config = load_model(FIXTURES / name)
                self.assertEqual(model.model_type, config["model_type"])
                self.check(name, to_float32(model))

    def test_sanitize_drops_rotary_and_tied_head(self):
        model = build_model(TINY_CONFIGS["qwen2"])
        weights = dict(tree_flatten(model.parameters()))
        extra = {
            "model.layers.0.self_attn.rotary_emb.inv_freq": mx.zeros((8,)),
            "lm_head.weight": mx.zeros((100, 64)),
        }
        self.assertEqual(set(model.sanitize({**weights, **extra})), set(weights))


class TestModelArgs(unittest.TestCase):
    def test_unknown_keys_ignored(self):
        for name, config in TINY_CONFIGS.items():
            with self.subTest(name):
                noisy = dict(config, not_a_real_key=3, architectures=["X"])
                arch = module_for(config["model_type"])
                args = arch.ModelArgs.from_dict(noisy)
                self.assertFalse(hasattr(args, "not_a_real_key"))
                model = arch.Model(args)
                self.assertEqual(model.model_type, config["model_type"])
                self.assertIs(model.args, args)
                logits = model(mx.array([[1, 2, 3]]))
                self.assertEqual(logits.shape, (1, 3, config["vocab_size"]))

    def test_upstream_parameter_names(self):
        model = build_model(TINY_CONFIGS["phi3"])
        names = set(k for k, _ in tree_flatten(model.parameters()))
        self.assertIn("model.layers.1.self_attn.qkv_proj.weight", names)
        self.assertIn("model.layers.1.mlp.gate_up_proj.weight", names)
        self.assertIn("lm_head.weight", names)
        model = build_model(TINY_CONFIGS["qwen2"])
        names = set(k for k, _ in tree_flatten(model.parameters()))
        self.assertIn("model.layers.0.self_attn.q_proj.bias", names)
        self.assertNotIn("model.layers.0.self_attn.o_proj.bias", names)
        self.assertNotIn("lm_head.weight", names)

    def test_rope_parameters_style_config(self):
        arch = module_for("llama")
        args = arch.ModelArgs.from_dict(
            dict(
                SMALL,
                model_type="llama",
                rope_parameters={
                    "rope_type": "linear",
                    "factor": 4.0,
                    "rope_theta": 77.0,
                },
            )
        )
        self.assertEqual(args.rope_theta, 77.0)
        self.assertEqual(args.rope_scaling["factor"], 4.0)
        args = arch.ModelArgs.from_dict(
            dict(SMALL, model_type="llama", rope_parameters={"rope_theta": 5.0})
        )
        self.assertEqual((args.rope_theta, args.rope_scaling), (5.0, None))

    def test_gemma_layer_types(self):
        arch = module_for("gemma3_text")
        args = arch.ModelArgs.from_dict(
            dict(
                model_type="gemma3_text", num_hidden_layers=7, sliding_window_pattern=3
            )
        )
        self.assertEqual(
            [t == "full_attention" for t in args.layer_types],
            [False, False, True, False, False, True, False],
        )

    def test_unsupported_rope_type(self):
        with self.assertRaisesRegex(ValueError, "wobbly"):
            rope_utils.initialize_rope(16, 10000.0, False, {"rope_type": "wobbly"})


def windowed_logits(model, tokens, window):
    """Logits of a Llama-family ``model`` with every layer masked to the last
    ``window`` positions, whatever its config says."""
    inner = model.model
    h = inner.embed_tokens(tokens)
    mask = base.create_causal_mask(tokens.shape[1], window_size=window)
    for layer in inner.layers:
        h = layer(h, mask)
    h = inner.norm(h)
    if model.args.tie_word_embeddings:
        return inner.embed_tokens.as_linear(h)
    return model.lm_head(h)


class TestConfiguredWindows(unittest.TestCase):
    """Where a config's sliding_window applies, as transformers decides it."""

    def args(self, **config):
        arch = module_for(config["model_type"])
        return arch.ModelArgs.from_dict(dict(SMALL, **config))

    def test_mistral_window_applies_to_every_layer(self):
        from mlx_lm.generate import generate_step

        config = dict(SMALL, model_type="mistral", sliding_window=8)
        model = to_float32(build_model(config))
        tokens = mx.array(np.random.default_rng(2).integers(0, 100, (1, 20)))
        expected = windowed_logits(model, tokens, 8)
        self.assertGreater(max_diff(expected, windowed_logits(model, tokens, 20)), 1e-3)
        self.assertLess(max_diff(model(tokens), expected), 1e-4)

        prompt_cache = cache.make_prompt_cache(model)
        for layer in prompt_cache:
            self.assertEqual((type(layer), layer.max_size), (cache.RotatingKVCache, 8))
        steps = generate_step(
            tokens[0], model, max_tokens=30, prompt_cache=prompt_cache
        )
        generated = [t for t, _ in steps]
        for layer in prompt_cache:
            self.assertEqual((layer.offset, layer.size()), (20 + 29, 8))
        # The same tokens as the windowed model recomputed from scratch.
        sequence = tokens[0].tolist()
        for t in generated[:8]:
            logits = windowed_logits(model, mx.array([sequence]), 8)
            self.assertEqual(mx.argmax(logits[0, -1]).item(), t)
            sequence.append(t)

    def test_mistral_null_window_is_full_attention(self):
        for window in ({}, {"sliding_window": None}):
            args = self.args(model_type="mistral", **window)
            self.assertEqual(args.layer_types, ["full_attention"] * 2)
            model = module_for("mistral").Model(args)
            self.assertFalse(hasattr(model, "make_cache"))
        # layer_types naming sliding layers, but no window to slide.
        args = self.args(
            model_type="mistral", layer_types=["sliding_attention", "full_attention"]
        )
        self.assertEqual(args.layer_types, ["full_attention"] * 2)

    def test_phi3_window_applies_to_every_layer(self):
        args = self.args(model_type="phi3", sliding_window=6)
        self.assertEqual(args.layer_types, ["sliding_attention"] * 2)

    def test_qwen_window_needs_use_sliding_window(self):
        for model_type in ("qwen2", "qwen3"):
            with self.subTest(model_type):
                # Qwen2.5's shape: a window given, but switched off.
                args = self.args(
                    model_type=model_type, sliding_window=4096, max_window_layers=1
                )
                self.assertIsNone(args.sliding_window)
                self.assertEqual(args.layer_types, ["full_attention"] * 2)
                # Switched on: the layers from max_window_layers on slide.
                args = self.args(
                    model_type=model_type,
                    use_sliding_window=True,
                    sliding_window=8,
                    max_window_layers=1,
                )
                self.assertEqual(args.sliding_window, 8)
                self.assertEqual(
                    args.layer_types, ["full_attention", "sliding_attention"]
                )
                # transformers' default max_window_layers (28) keeps both full.
                args = self.args(
                    model_type=model_type, use_sliding_window=True, sliding_window=8
                )
                self.assertEqual(args.layer_types, ["full_attention"] * 2)


class FakeQuantizedCache:
    group_size = 32
    bits = 8


class TestAttentionHelpers(unittest.TestCase):
    def test_causal_mask(self):
        mask = base.create_causal_mask(3, offset=2)
        expected = np.tril(np.ones((3, 5), dtype=bool), k=2)
        np.testing.assert_array_equal(np.array(mask), expected)

    def test_windowed_mask(self):
        mask = np.array(base.create_causal_mask(5, offset=1, window_size=3))
        for q in range(5):
            row = [q + 1 - 3 < k <= q + 1 for k in range(6)]
            np.testing.assert_array_equal(mask[q], row)

    def test_padded_mask(self):
        mask = base.create_causal_mask(
            4, left_padding=mx.array([0, 2]), right_padding=mx.array([1, 0])
        )
        self.assertEqual(mask.shape, (2, 1, 4, 4))
        mask = np.array(mask)
        self.assertFalse(mask[0, 0, 3, 3])  # right padded key
        self.assertTrue(mask[0, 0, 2, 2])
        self.assertFalse(mask[1, 0, 3, 1])  # left padded key
        self.assertTrue(mask[1, 0, 3, 2])

    def test_attention_mask_kinds(self):
        self.assertIsNone(base.create_attention_mask(mx.zeros((1, 1, 8))))
        self.assertEqual(base.create_attention_mask(mx.zeros((1, 4, 8))), "causal")
        mask = base.create_attention_mask(mx.zeros((1, 4, 8)), return_array=True)
        self.assertEqual(mask.shape, (4, 4))
        mask = base.create_attention_mask(mx.zeros((1, 4, 8)), window_size=2)
        self.assertEqual(np.array(mask).sum(), 4 + 3)

    def test_attention_mask_delegates_to_cache(self):
        class Recorder:
            def make_mask(self, n, return_array=False, window_size=None):
                return ("made", n, return_array, window_size)

        mask = base.create_attention_mask(mx.zeros((1, 5, 8)), Recorder(), 3, True)
        self.assertEqual(mask, ("made", 5, True, 3))

    def test_quantized_attention_matches_dequantized(self):
        # float32 with fewer than DEQUANTIZED_ATTENTION_ROWS queries runs the
        # quantized product; chunks, and half precision, a float32 copy.
        mx.random.seed(3)
        B, n_heads, n_kv, S, D = 2, 6, 2, 12, 64
        cases = [(mx.float32, 1e-4), (mx.float16, 2e-2)]
        for (dtype, tolerance), L in itertools.product(cases, (1, 3, 8)):
            queries = mx.random.normal((B, n_heads, L, D)).astype(dtype)
            keys = mx.random.normal((B, n_kv, S, D)).astype(dtype)
            values = mx.random.normal((B, n_kv, S, D)).astype(dtype)
            q_keys = mx.quantize(keys, group_size=32, bits=8)
            q_values = mx.quantize(values, group_size=32, bits=8)
            keys = mx.dequantize(*q_keys, group_size=32, bits=8)
            values = mx.dequantize(*q_values, group_size=32, bits=8)

            bool_mask = mx.random.uniform(shape=(B, 1, L, S)) > 0.3
            bool_mask[..., -1] = True
            masks = [None, "causal", bool_mask, base.create_causal_mask(L, S - L)]
            for mask in masks:
                with self.subTest(dtype=dtype, L=L, mask=type(mask).__name__):
                    got = base.scaled_dot_product_attention(
                        queries, q_keys, q_values, FakeQuantizedCache(), 0.2, mask
                    )
                    want = mx.fast.scaled_dot_product_attention(
                        queries.astype(mx.float32),
                        keys.astype(mx.float32),
                        values.astype(mx.float32),
                        scale=0.2,
                        mask=mask,
                    )
                    self.assertEqual(got.shape, (B, n_heads, L, D))
                    self.assertEqual(got.dtype, dtype)
                    self.assertLess(max_diff(got, want), tolerance)

    def test_single_query_grouped_heads(self):
        # One-token steps take the folded path on the CPU; compare with the heads
        # expanded by hand.
        mx.random.seed(4)
        for n_heads, n_kv in [(6, 2), (4, 4), (9, 3)]:
            with self.subTest(n_heads=n_heads, n_kv=n_kv):
                B, S, D = 2, 11, 32
                queries = mx.random.normal((B, n_heads, 1, D))
                keys = mx.random.normal((B, n_kv, S, D))
                values = mx.random.normal((B, n_kv, S, D))
                got = base.scaled_dot_product_attention(
                    queries, keys, values, None, 0.3, None
                )
                rep = n_heads // n_kv
                k = mx.repeat(keys, rep, axis=1)
                v = mx.repeat(values, rep, axis=1)
                weights = mx.softmax((queries * 0.3) @ k.swapaxes(-1, -2), axis=-1)
                self.assertEqual(got.shape, (B, n_heads, 1, D))
                self.assertLess(max_diff(got, weights @ v), 1e-5)

    def test_rope_accepts_array_offset(self):
        # Batched caches carry one offset per sequence.
        rope = build_model(TINY_CONFIGS["llama"]).layers[0].self_attn.rope
        x = mx.random.normal((2, 4, 3, 32))
        together = rope(x, offset=mx.array([0, 4]))
        self.assertLess(max_diff(together[:1], rope(x[:1], offset=0)), 1e-6)
        self.assertLess(max_diff(together[1:], rope(x[1:], offset=4)), 1e-6)


if __name__ == "__main__":
    unittest.main()
