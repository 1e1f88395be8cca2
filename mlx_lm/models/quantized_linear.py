"""Quantized layers with fast paths for MLX's CPU backend.

MLX's CPU ``quantized_matmul`` is written for one float32 row: on a
576 x 1536 4-bit layer it takes 0.85 ms for one row but 194 ms for 256, while
dequantizing the weight and calling the BLAS matrix product takes 3.9 ms; in
float16 (bfloat16) it takes 26 ms (6.5 ms) for one row and 6.7 s (1.6 s) for
256 (``python benchmarks/bench_quantized_weights.py``).  So on the CPU these
subclasses compute in float32: inputs of ``DEQUANTIZED_MIN_ROWS`` rows or more
(prompt chunks) against the weight dequantized in slices of at most
``SLICE_ROWS`` output rows, fewer rows (decode steps) with the quantized
kernel; half-precision inputs, scales and offsets are cast for the call and the
result cast back.  The weights stay quantized in memory.  On other devices
the layers are MLX's own.
"""

import mlx.core as mx
import mlx.nn as nn

DEQUANTIZED_MIN_ROWS = 4
SLICE_ROWS = 8192


def _as(a, dtype):
    # astype to the dtype an array already has is still a copy in the graph:
    # skipped, since decode calls this for every layer at every step.
    return a if a is None or a.dtype == dtype else a.astype(dtype)


def _float32(a):
    return _as(a, mx.float32)


def _dequantized_product(layer, x: mx.array) -> mx.array:
    """x @ W.T in float32, W dequantized a slice of output rows at a time."""
    outputs = []
    n_out = layer["weight"].shape[0]
    biases = layer.get("biases")
    for start in range(0, n_out, SLICE_ROWS):
        stop = min(n_out, start + SLICE_ROWS)
        weight = mx.dequantize(
            layer["weight"][start:stop],
            _float32(layer["scales"][start:stop]),
            None if biases is None else _float32(biases[start:stop]),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
        outputs.append(x @ weight.T)
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=-1)


def _float32_product(layer, x: mx.array) -> mx.array:
    """x @ W.T on the CPU, computed in float32 whatever the input's precision."""
    x32 = _float32(x)
    if x.size // x.shape[-1] >= DEQUANTIZED_MIN_ROWS:
        return _dequantized_product(layer, x32)
    return mx.quantized_matmul(
        x32,
        layer["weight"],
        _float32(layer["scales"]),
        _float32(layer.get("biases")),
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


def _on_cpu(x: mx.array) -> bool:
    return mx.default_device() == mx.cpu and mx.issubdtype(x.dtype, mx.floating)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if not _on_cpu(x):
            return super().__call__(x)
        out = _float32_product(self, x)
        if "bias" in self:
            out = out + self["bias"]
        return _as(out, x.dtype)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        if not _on_cpu(x):
            return super().as_linear(x)
        return _as(_float32_product(self, x), x.dtype)


def add_prefill_path(model: nn.Module) -> nn.Module:
    """Give the model's affine quantized layers the CPU paths above, in place."""
    for _, module in model.named_modules():
        if getattr(module, "mode", "affine") != "affine":
            continue
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = QuantizedEmbedding
    return model
