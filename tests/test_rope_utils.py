"""RoPE variants: each equals transformers' rotary embedding of the same config.

transformers' rotations are kept in ``fixtures/rope_reference.npz``; with torch
installed, ``python tests/test_rope_utils.py --write-reference`` rewrites it
and ``test_fixture_is_current`` checks it.
"""

import copy
import math
import sys
import unittest
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lm.models import rope_utils

try:
    import torch
    import transformers
    from transformers.models.llama import modeling_llama
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.qwen2 import modeling_qwen2
except ImportError as error:
    torch = None
    MISSING = f"torch and transformers are needed for the reference ({error})"
else:
    MISSING = None

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "rope_reference.npz"
HEADS = 4
HEAD_DIM = 16
# Relative to the largest reference entry; float32 angles stay below ~100 here.
TOLERANCE = 1e-5

SHORT_FACTOR = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0]
LONG_FACTOR = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]

# name -> (transformers config class name, config kwargs, [(offset, length)]).
# Positions reach past the original context where a type cares about it.
CASES = {
    "default": ("LlamaConfig", dict(max_position_embeddings=64), [(0, 9), (5, 12)]),
    "linear": (
        "LlamaConfig",
        dict(
            max_position_embeddings=64,
            rope_scaling={"rope_type": "linear", "factor": 3.0},
        ),
        [(7, 11)],
    ),
    "dynamic_below": (
        "LlamaConfig",
        dict(
            max_position_embeddings=32,
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        ),
        [(0, 32), (9, 12)],
    ),
    "dynamic_above": (
        "LlamaConfig",
        dict(
            max_position_embeddings=32,
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        ),
        [(0, 33), (30, 10), (70, 1)],
    ),
    "llama3": (
        "LlamaConfig",
        dict(
            max_position_embeddings=256,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        [(3, 10), (60, 12)],
    ),
    "yarn": (
        "Qwen2Config",
        dict(
            max_position_embeddings=16384,
            rope_theta=1000000.0,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 4096,
            },
        ),
        [(5, 12)],
    ),
    "yarn_deepseek": (
        "LlamaConfig",
        dict(
            max_position_embeddings=163840,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 16,
                "beta_slow": 2,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
            },
        ),
        [(5, 12)],
    ),
    "yarn_untruncated": (
        "Qwen2Config",
        dict(
            max_position_embeddings=8192,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 4096,
                "truncate": False,
            },
        ),
        [(5, 12)],
    ),
    # Pre-training context 32 = max: the short factors, no attention factor.
    "longrope_short": (
        "Phi3Config",
        dict(
            max_position_embeddings=32,
            original_max_position_embeddings=32,
            rope_scaling={
                "type": "longrope",
                "short_factor": SHORT_FACTOR,
                "long_factor": LONG_FACTOR,
            },
        ),
        [(0, 9), (20, 12)],
    ),
    # Context 256 over 32: the long factors, which transformers takes once
    # the sequence passes 32, and the attention factor for factor 8.
    "longrope_long": (
        "Phi3Config",
        dict(
            max_position_embeddings=256,
            original_max_position_embeddings=32,
            rope_scaling={
                "type": "longrope",
                "short_factor": SHORT_FACTOR,
                "long_factor": LONG_FACTOR,
            },
        ),
        [(0, 33), (30, 10)],
    ),
    # Half the head rotated: 4 factors, the rest passes through unscaled.
    "longrope_partial": (
        "Phi3Config",
        dict(
            max_position_embeddings=256,
            original_max_position_embeddings=32,
            partial_rotary_factor=0.5,
            rope_scaling={
                "type": "longrope",
                "short_factor": SHORT_FACTOR[:4],
                "long_factor": LONG_FACTOR[:4],
                "attention_factor": 1.25,
            },
        ),
        [(30, 10)],
    ),
}

MODULES = {
    "LlamaConfig": ("modeling_llama", "LlamaRotaryEmbedding"),
    "Qwen2Config": ("modeling_qwen2", "Qwen2RotaryEmbedding"),
    "Phi3Config": ("modeling_phi3", "Phi3RotaryEmbedding"),
}


def hf_config(class_name, kwargs):
    # transformers adopts and fills in the rope_scaling dict it is given.
    kwargs = copy.deepcopy(kwargs)
    config_class = getattr(transformers, class_name)
    return config_class(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        head_dim=HEAD_DIM,
        **kwargs,
    )


def hf_rotary(class_name, kwargs):
    """transformers' rotary embedding and apply function for this config."""
    module_name, rotary_name = MODULES[class_name]
    module = globals()[module_name]
    rotary = getattr(module, rotary_name)(hf_config(class_name, kwargs))
    return rotary, module.apply_rotary_pos_emb


def hf_rotate(rotary, apply, q, positions):
    """``q`` [B, H, L, D] rotated at ``positions`` [B, L] by transformers."""
    q = torch.from_numpy(q)
    positions = torch.from_numpy(positions)
    with torch.no_grad():
        cos, sin = rotary(q, positions)
        rotated, _ = apply(q, q, cos, sin)
    return rotated.numpy()


def our_rope(class_name, kwargs):
    """Our module for the same config, built as the model files build it."""
    scaling = kwargs.get("rope_scaling")
    if class_name == "Phi3Config" and scaling:
        # phi3.py hands over the top-level pre-training context this way.
        original = kwargs["original_max_position_embeddings"]
        scaling = {"original_max_position_embeddings": original, **scaling}
    dims = int(HEAD_DIM * kwargs.get("partial_rotary_factor", 1.0))
    return rope_utils.initialize_rope(
        dims,
        kwargs.get("rope_theta", 10000.0),
        False,
        scaling,
        kwargs["max_position_embeddings"],
    )


def random_q(batch, length, seed):
    rng = np.random.default_rng(seed)
    shape = (batch, HEADS, length, HEAD_DIM)
    return rng.standard_normal(shape).astype(np.float32)


def relative_error(ours, expected):
    diff = np.abs(np.array(ours) - expected).max()
    return diff, diff / np.abs(expected).max()


def reference_checks():
    """(fixture key, case name, q, our offset, positions) of every comparison."""
    for name, (_, _, spans) in CASES.items():
        for offset, length in spans:
            positions = np.repeat(np.arange(offset, offset + length)[None], 2, axis=0)
            q = random_q(2, length, seed=offset + length)
            yield f"{name}/{offset}/{length}", name, q, offset, positions
    # A batch whose rows start at different offsets: transformers scales it by
    # its longest row, as ours does.
    offsets = [3, 40]
    positions = np.stack([np.arange(o, o + 6) for o in offsets])
    for name in ["dynamic_above", "yarn_deepseek", "longrope_partial"]:
        q = random_q(2, 6, seed=1)
        yield f"{name}/per_sequence", name, q, mx.array(offsets), positions


def transformers_rotations():
    """Every reference rotation, computed by transformers."""
    out = {}
    for key, name, q, _, positions in reference_checks():
        # A fresh module each time: transformers' dynamic scaling keeps the
        # longest length it has seen.
        class_name, kwargs, _ = CASES[name]
        rotary, apply = hf_rotary(class_name, kwargs)
        out[key] = hf_rotate(rotary, apply, q, positions)
    return out


class TestAgainstTransformers(unittest.TestCase):
    """Against transformers' rotations, kept in a fixture so torch is not needed."""

    def test_each_type_matches(self):
        reference = np.load(REFERENCE)
        self.assertEqual(sorted(reference), sorted(k for k, *_ in reference_checks()))
        for key, name, q, offset, _ in reference_checks():
            with self.subTest(key):
                ours = our_rope(*CASES[name][:2])(mx.array(q), offset=offset)
                self.assertEqual(ours.dtype, mx.float32)
                diff, relative = relative_error(ours, reference[key])
                self.assertLess(relative, TOLERANCE, f"{key}: max abs diff {diff:.2e}")

    @unittest.skipIf(MISSING, MISSING)
    def test_fixture_is_current(self):
        reference = np.load(REFERENCE)
        for key, expected in transformers_rotations().items():
            with self.subTest(key):
                np.testing.assert_allclose(reference[key], expected, atol=1e-6)

    def test_dynamic_grows_past_max(self):
        # Past max_position_embeddings the rotation differs from plain RoPE.
        _, kwargs, _ = CASES["dynamic_above"]
        rope = our_rope("LlamaConfig", kwargs)
        plain = nn.RoPE(HEAD_DIM, traditional=False, base=10000.0)
        q = mx.array(random_q(1, 8, seed=2))
        self.assertLess(mx.abs(rope(q, offset=24) - plain(q, offset=24)).max(), 1e-6)
        self.assertGreater(mx.abs(rope(q, offset=25) - plain(q, offset=25)).max(), 1e-3)


class TestInitializeRope(unittest.TestCase):
    def test_types(self):
        kinds = {
            "default": nn.RoPE,
            "linear": nn.RoPE,
            "dynamic_above": rope_utils.DynamicNTKRoPE,
            "llama3": rope_utils.Llama3RoPE,
            "yarn": rope_utils.YarnRoPE,
            "longrope_long": rope_utils.SuScaledRoPE,
        }
        for name, kind in kinds.items():
            with self.subTest(name):
                class_name, kwargs, _ = CASES[name]
                self.assertIsInstance(our_rope(class_name, kwargs), kind)
        su = {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
        rope = rope_utils.initialize_rope(16, 10000.0, False, su, 64)
        self.assertIsInstance(rope, rope_utils.SuScaledRoPE)

    def test_config_not_mutated(self):
        for name, (_, kwargs, _) in CASES.items():
            scaling = kwargs.get("rope_scaling")
            if scaling is None:
                continue
            with self.subTest(name):
                before = copy.deepcopy(scaling)
                rope_utils.initialize_rope(
                    int(HEAD_DIM * kwargs.get("partial_rotary_factor", 1.0)),
                    10000.0,
                    False,
                    scaling,
                    kwargs["max_position_embeddings"],
                )
                self.assertEqual(scaling, before)

    def test_longrope_factor_choice(self):
        scaling = {
            "rope_type": "longrope",
            "short_factor": SHORT_FACTOR,
            "long_factor": LONG_FACTOR,
            "original_max_position_embeddings": 32,
        }
        periods = 10000.0 ** (np.arange(0, 16, 2) / 16)
        for context, factors in [(32, SHORT_FACTOR), (33, LONG_FACTOR)]:
            with self.subTest(context=context):
                rope = rope_utils.initialize_rope(16, 10000.0, False, scaling, context)
                np.testing.assert_allclose(
                    np.array(rope._freqs), np.array(factors) * periods, rtol=1e-6
                )
        rope = rope_utils.initialize_rope(16, 10000.0, False, scaling, 256)
        self.assertAlmostEqual(
            rope.mscale, math.sqrt(1 + math.log(8) / math.log(32)), places=6
        )

    def test_yarn_attention_factor(self):
        scaling = {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 4096,
        }
        rope = rope_utils.initialize_rope(16, 10000.0, False, scaling)
        self.assertAlmostEqual(rope.mscale, 0.1 * math.log(4.0) + 1.0, places=6)
        rope = rope_utils.initialize_rope(
            16, 10000.0, False, dict(scaling, attention_factor=0.75)
        )
        self.assertEqual(rope.mscale, 0.75)

    def test_unknown_type_names_it(self):
        with self.assertRaisesRegex(ValueError, "wobbly"):
            rope_utils.initialize_rope(16, 10000.0, False, {"rope_type": "wobbly"})

    def test_missing_context_lengths(self):
        with self.assertRaisesRegex(ValueError, "dynamic"):
            rope_utils.initialize_rope(
                16, 10000.0, False, {"rope_type": "dynamic", "factor": 2.0}
            )
        with self.assertRaisesRegex(ValueError, "yarn"):
            rope_utils.initialize_rope(
                16, 10000.0, False, {"rope_type": "yarn", "factor": 2.0}
            )


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-reference"]:
        np.savez_compressed(REFERENCE, **transformers_rotations())
        print(f"wrote {REFERENCE}")
    else:
        unittest.main()
