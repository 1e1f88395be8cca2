"""Rotary position embedding variants selected from a model's rope config."""

import math
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn


def _rope_type(scaling_config: Optional[dict]) -> str:
    if not scaling_config:
        return "default"
    return scaling_config.get("rope_type") or scaling_config.get("type") or "default"


def unpack_rope_parameters(
    rope_parameters: Optional[dict],
    rope_theta: float,
    rope_scaling: Optional[dict],
):
    """Read a transformers-5 style ``rope_parameters`` dict.

    Newer configs fold the base (``rope_theta``) and the scaling settings into
    one dict. Returns ``(rope_theta, rope_scaling)`` with the values from
    ``rope_parameters`` taking precedence when it is given.
    """
    if not rope_parameters:
        return rope_theta, rope_scaling
    rope_theta = rope_parameters.get("rope_theta", rope_theta)
    if _rope_type(rope_parameters) != "default":
        rope_scaling = rope_parameters
    return rope_theta, rope_scaling


class _FixedFreqRoPE(nn.Module):
    """RoPE over the first ``dims`` features with precomputed wavelengths.

    ``periods`` holds 1 / inverse-frequency per rotated feature pair, which is
    what ``mx.fast.rope`` expects as ``freqs``. ``input_scale`` multiplies the
    rotated features (the attention factor of LongRoPE).
    """

    def __init__(
        self,
        dims: int,
        periods: mx.array,
        traditional: bool = False,
        input_scale: float = 1.0,
    ):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.input_scale = input_scale
        self._periods = periods

    def extra_repr(self):
        return f"{self.dims}, traditional={self.traditional}"

    def __call__(self, x: mx.array, offset: Union[int, mx.array] = 0) -> mx.array:
        if self.input_scale != 1.0:
            rotated = x[..., : self.dims] * self.input_scale
            x = mx.concatenate([rotated, x[..., self.dims :]], axis=-1)
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )


def _inverse_frequencies(dims: int, base: float) -> mx.array:
    return 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))


def llama3_rope(
    dims: int, base: float, traditional: bool, scaling_config: dict
) -> _FixedFreqRoPE:
    """Llama 3.1 style scaling: slow components stretched, fast ones kept."""
    factor = scaling_config["factor"]
    low_factor = scaling_config.get("low_freq_factor", 1.0)
    high_factor = scaling_config.get("high_freq_factor", 4.0)
    context = scaling_config.get("original_max_position_embeddings", 8192)

    inv_freq = _inverse_frequencies(dims, base)
    wavelength = 2 * math.pi / inv_freq
    long_wave = context / low_factor
    short_wave = context / high_factor

    stretched = mx.where(wavelength > long_wave, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low_factor) / (high_factor - low_factor)
    blended = (1 - blend) * stretched / factor + blend * stretched
    in_between = (wavelength >= short_wave) & (wavelength <= long_wave)
    inv_freq = mx.where(in_between, blended, stretched)
    return _FixedFreqRoPE(dims, 1.0 / inv_freq, traditional=traditional)


def longrope(
    dims: int,
    base: float,
    scaling_config: dict,
    max_position_embeddings: Optional[int],
    original_max_position_embeddings: Optional[int] = None,
) -> _FixedFreqRoPE:
    """LongRoPE / "su" scaling (Phi-3). Always uses the long-context factors."""
    original = scaling_config.get(
        "original_max_position_embeddings", original_max_position_embeddings
    )
    if original is None:
        raise ValueError("longrope scaling needs original_max_position_embeddings")
    long_factor = mx.array(scaling_config["long_factor"], dtype=mx.float32)
    periods = long_factor / _inverse_frequencies(dims, base)

    attention_factor = scaling_config.get("attention_factor")
    if attention_factor is None:
        ratio = scaling_config.get("factor") or (max_position_embeddings / original)
        if ratio <= 1.0:
            attention_factor = 1.0
        else:
            attention_factor = math.sqrt(1 + math.log(ratio) / math.log(original))
    return _FixedFreqRoPE(dims, periods, input_scale=attention_factor)


def initialize_rope(
    dims: int,
    base: float,
    traditional: bool,
    scaling_config: Optional[dict] = None,
    max_position_embeddings: Optional[int] = None,
) -> nn.Module:
    """Pick the rotary embedding for ``scaling_config`` (HF ``rope_scaling``).

    Supported types: default / none, ``linear``, ``llama3``, ``longrope``
    (alias ``su``). Anything else raises ``ValueError``.
    """
    kind = _rope_type(scaling_config)
    if kind == "default":
        return nn.RoPE(dims, traditional=traditional, base=base)
    if kind == "linear":
        factor = scaling_config["factor"]
        return nn.RoPE(dims, traditional=traditional, base=base, scale=1 / factor)
    if kind == "llama3":
        return llama3_rope(dims, base, traditional, scaling_config)
    if kind in ("longrope", "su"):
        return longrope(dims, base, scaling_config, max_position_embeddings)
    raise ValueError(f"Unsupported rope type {kind!r}")
