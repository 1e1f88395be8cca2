"""The CPU paths of mlx_lm.models.quantized_linear against a float32 reference."""

import itertools
import unittest

import mlx.core as mx
import mlx.nn as nn

from mlx_lm.models import quantized_linear as ql

# Largest |difference| allowed, relative to the largest |reference| entry.
TOLERANCE = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}


def reference(layer, x):
    """x @ W.T in float32 on the layer's dequantized weight."""
    weight = mx.dequantize(
        layer.weight,
        layer.scales.astype(mx.float32),
        layer.biases.astype(mx.float32),
        group_size=layer.group_size,
        bits=layer.bits,
    )
    return x.astype(mx.float32) @ weight.T


class TestCPUPaths(unittest.TestCase):
    def setUp(self):
        mx.random.seed(0)

    def check(self, ours, expected, dtype):
        self.assertEqual(ours.dtype, dtype)
        diff = mx.abs(ours.astype(mx.float32) - expected).max().item()
        scale = mx.abs(expected).max().item()
        self.assertLess(diff, TOLERANCE[dtype] * scale)

    def test_linear_matches_float32_reference(self):
        dtypes = (mx.float32, mx.float16, mx.bfloat16)
        for dtype, bits, rows, bias in itertools.product(
            dtypes, (4, 8), (1, ql.DEQUANTIZED_MIN_ROWS - 1, 8), (False, True)
        ):
            with self.subTest(dtype=dtype, bits=bits, rows=rows, bias=bias):
                linear = nn.Linear(128, 96, bias=bias)
                linear.set_dtype(dtype)
                layer = ql.add_prefill_path(
                    nn.Sequential(linear.to_quantized(group_size=32, bits=bits))
                ).layers[0]
                self.assertIs(type(layer), ql.QuantizedLinear)
                self.assertEqual(layer.weight.dtype, mx.uint32)
                x = mx.random.normal((2, rows, 128)).astype(dtype)
                expected = reference(layer, x)
                if bias:
                    expected = expected + layer.bias.astype(mx.float32)
                self.check(layer(x), expected, dtype)

    def test_many_output_rows_are_sliced(self):
        linear = nn.Linear(64, 200, bias=False)
        layer = ql.add_prefill_path(
            nn.Sequential(linear.to_quantized(group_size=32, bits=4))
        ).layers[0]
        x = mx.random.normal((1, 6, 64))
        whole = layer(x)
        old, ql.SLICE_ROWS = ql.SLICE_ROWS, 64
        try:
            sliced = layer(x)
        finally:
            ql.SLICE_ROWS = old
        self.assertLess(mx.abs(whole - sliced).max().item(), 1e-5)
        self.check(sliced, reference(layer, x), mx.float32)

    def test_embedding_as_linear(self):
        for dtype, rows in itertools.product((mx.float32, mx.float16), (1, 8)):
            with self.subTest(dtype=dtype, rows=rows):
                embedding = nn.Embedding(300, 64)
                embedding.set_dtype(dtype)
                layer = ql.add_prefill_path(
                    nn.Sequential(embedding.to_quantized(group_size=32, bits=4))
                ).layers[0]
                self.assertIs(type(layer), ql.QuantizedEmbedding)
                x = mx.random.normal((1, rows, 64)).astype(dtype)
                self.check(layer.as_linear(x), reference(layer, x), dtype)


if __name__ == "__main__":
    unittest.main()
