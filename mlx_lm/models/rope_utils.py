"""Rotary position embedding variants selected from a model's rope config.

Every variant equals transformers' rotary embedding of the same config; the
layout follows ``traditional`` (``False`` is transformers' ``rotate_half``).
"""

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


def _periods(dims: int, base: Union[float, mx.array]) -> mx.array:
    """``base ** (2i / dims)`` per rotated pair: 1 / its unscaled frequency."""
    return base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)


class _ScaledRoPE(nn.Module):
    """RoPE over the first ``dims`` features with fixed per-pair periods.

    ``_freqs`` holds the period (1 / inverse frequency) of each rotated pair,
    which is what ``mx.fast.rope`` takes as ``freqs``. ``mscale`` multiplies
    the rotated features (the attention factor of YaRN and LongRoPE), as
    transformers multiplies its cos and sin.
    """

    def __init__(
        self, dims: int, traditional: bool, freqs: mx.array, mscale: float = 1.0
    ):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.mscale = mscale
        self._freqs = freqs

    def extra_repr(self):
        return f"{self.dims}, traditional={self.traditional}, mscale={self.mscale}"

    def _scale(self, x: mx.array) -> mx.array:
        if self.mscale == 1.0:
            return x
        if self.dims == x.shape[-1]:
            return x * self.mscale
        rotated = x[..., : self.dims] * self.mscale
        return mx.concatenate([rotated, x[..., self.dims :]], axis=-1)

    def _rope(self, x, offset, freqs):
        return mx.fast.rope(
            self._scale(x),
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=freqs,
        )

    def __call__(self, x: mx.array, offset: Union[int, mx.array] = 0) -> mx.array:
        return self._rope(x, offset, self._freqs)


class Llama3RoPE(_ScaledRoPE):
    """Llama 3.1 / 3.2 scaling (``rope_type: llama3``).

    Pairs whose wavelength exceeds ``original / low_freq_factor`` turn
    ``factor`` times slower, those under ``original / high_freq_factor`` stay,
    and the ones between blend the two by wavelength.
    """

    def __init__(
        self,
        dims: int,
        base: float,
        traditional: bool,
        factor: float,
        original_max_position_embeddings: int,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
    ):
        context = original_max_position_embeddings
        inv_freq = 1.0 / _periods(dims, base)
        wavelength = 2 * math.pi / inv_freq
        long_wave = context / low_freq_factor
        short_wave = context / high_freq_factor

        stretched = mx.where(wavelength > long_wave, inv_freq / factor, inv_freq)
        blend = (context / wavelength - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        blended = (1 - blend) * stretched / factor + blend * stretched
        in_between = (wavelength >= short_wave) & (wavelength <= long_wave)
        inv_freq = mx.where(in_between, blended, stretched)
        super().__init__(dims, traditional, 1.0 / inv_freq)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


class YarnRoPE(_ScaledRoPE):
    """YaRN scaling (``rope_type: yarn``; Qwen, DeepSeek).

    Pairs turning more than ``beta_fast`` times over the original context keep
    their frequency, those turning fewer than ``beta_slow`` times are divided
    by ``factor``, and a linear ramp over pair index joins the two. The
    rotated features are multiplied by ``attention_factor``, by default
    ``0.1 ln(factor) + 1`` (DeepSeek: the ratio of that with ``mscale`` and
    with ``mscale_all_dim``).
    """

    def __init__(
        self,
        dims: int,
        base: float,
        traditional: bool,
        factor: float,
        original_max_position_embeddings: int,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: Optional[float] = None,
        mscale_all_dim: Optional[float] = None,
        attention_factor: Optional[float] = None,
        truncate: bool = True,
    ):
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(
                    factor, mscale_all_dim
                )
            else:
                attention_factor = _yarn_mscale(factor)

        def pair_index(turns):
            # The pair that turns ``turns`` times over the original context.
            wavelength = original_max_position_embeddings / (turns * 2 * math.pi)
            return dims * math.log(wavelength) / (2 * math.log(base))

        low = pair_index(beta_fast)
        high = pair_index(beta_slow)
        if truncate:
            low = math.floor(low)
            high = math.ceil(high)
        low = max(low, 0)
        high = min(high, dims - 1)
        if low == high:
            high += 0.001

        ramp = (mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low)
        ramp = mx.clip(ramp, 0.0, 1.0)
        periods = _periods(dims, base)
        inv_freq = (1 - ramp) / periods + ramp / (factor * periods)
        super().__init__(dims, traditional, 1.0 / inv_freq, mscale=attention_factor)


class SuScaledRoPE(_ScaledRoPE):
    """LongRoPE / "su" scaling (Phi-3, ``rope_type: longrope``).

    Each pair's period is multiplied by its entry of ``long_factor`` when
    ``max_position_embeddings`` exceeds the original context, else of
    ``short_factor``. The rotated features are multiplied by
    ``attention_factor``, by default ``sqrt(1 + ln(factor) / ln(original))``
    with ``factor`` defaulting to ``max_position_embeddings / original``.
    """

    def __init__(
        self,
        dims: int,
        base: float,
        traditional: bool,
        short_factor: list,
        long_factor: list,
        max_position_embeddings: int,
        original_max_position_embeddings: int,
        factor: Optional[float] = None,
        attention_factor: Optional[float] = None,
    ):
        original = original_max_position_embeddings
        if factor is None:
            factor = max_position_embeddings / original
        if attention_factor is None:
            if factor <= 1.0:
                attention_factor = 1.0
            else:
                attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
        use_long = max_position_embeddings > original
        ext = mx.array(long_factor if use_long else short_factor, dtype=mx.float32)
        super().__init__(
            dims, traditional, ext * _periods(dims, base), mscale=attention_factor
        )


class DynamicNTKRoPE(_ScaledRoPE):
    """Dynamic NTK scaling (``rope_type: dynamic``).

    Up to ``max_position_embeddings`` positions this is plain RoPE. Past it,
    the base grows with the sequence length ``n`` (offset plus the tokens of
    this call) to ``base * (factor n / max - factor + 1) ** (dims / (dims - 2))``.
    As in transformers, keys already cached keep the rotation they got.
    """

    def __init__(
        self,
        dims: int,
        base: float,
        traditional: bool,
        factor: float,
        max_position_embeddings: int,
    ):
        super().__init__(dims, traditional, _periods(dims, base))
        self.base = base
        self.factor = factor
        self.max_position_embeddings = max_position_embeddings

    def _grown_base(self, length):
        ratio = self.factor * length / self.max_position_embeddings
        return self.base * (ratio - (self.factor - 1)) ** (self.dims / (self.dims - 2))

    def __call__(self, x: mx.array, offset: Union[int, mx.array] = 0) -> mx.array:
        length = x.shape[-2]
        if isinstance(offset, int):
            length += offset
            if length <= self.max_position_embeddings:
                return self._rope(x, offset, self._freqs)
            return self._rope(x, offset, _periods(self.dims, self._grown_base(length)))
        # Per-sequence offsets: the longest sequence sets the base for all.
        length = mx.max(offset) + length
        length = mx.maximum(length, self.max_position_embeddings).astype(mx.float32)
        return self._rope(x, offset, _periods(self.dims, self._grown_base(length)))


def _original_context(
    scaling_config: dict, max_position_embeddings: Optional[int]
) -> int:
    """The pre-training context; like transformers, max_position_embeddings
    stands in where the config leaves it out."""
    original = scaling_config.get("original_max_position_embeddings")
    if original is None:
        original = max_position_embeddings
    if original is None:
        kind = _rope_type(scaling_config)
        raise ValueError(f"{kind} scaling needs original_max_position_embeddings")
    return original


def initialize_rope(
    dims: int,
    base: float,
    traditional: bool,
    scaling_config: Optional[dict] = None,
    max_position_embeddings: Optional[int] = None,
) -> nn.Module:
    """Pick the rotary embedding for ``scaling_config`` (HF ``rope_scaling``).

    Supported types: default, ``linear``, ``dynamic``, ``llama3``, ``yarn``,
    ``longrope`` (alias ``su``). Anything else raises ``ValueError``.
    ``scaling_config`` is only read.
    """
    kind = _rope_type(scaling_config)
    config = scaling_config
    if kind == "default":
        return nn.RoPE(dims, traditional=traditional, base=base)
    if kind == "linear":
        scale = 1 / config["factor"]
        return nn.RoPE(dims, traditional=traditional, base=base, scale=scale)
    if kind == "dynamic":
        if max_position_embeddings is None:
            raise ValueError("dynamic scaling needs max_position_embeddings")
        return DynamicNTKRoPE(
            dims, base, traditional, config["factor"], max_position_embeddings
        )
    if kind == "llama3":
        return Llama3RoPE(
            dims,
            base,
            traditional,
            factor=config["factor"],
            original_max_position_embeddings=_original_context(
                config, max_position_embeddings
            ),
            low_freq_factor=config.get("low_freq_factor", 1.0),
            high_freq_factor=config.get("high_freq_factor", 4.0),
        )
    if kind == "yarn":
        original = _original_context(config, max_position_embeddings)
        factor = config.get("factor")
        if factor is None:
            factor = (max_position_embeddings or original) / original
        return YarnRoPE(
            dims,
            base,
            traditional,
            factor=factor,
            original_max_position_embeddings=original,
            beta_fast=config.get("beta_fast") or 32.0,
            beta_slow=config.get("beta_slow") or 1.0,
            mscale=config.get("mscale"),
            mscale_all_dim=config.get("mscale_all_dim"),
            attention_factor=config.get("attention_factor"),
            truncate=config.get("truncate", True),
        )
    if kind in ("longrope", "su"):
        original = _original_context(config, max_position_embeddings)
        return SuScaledRoPE(
            dims,
            base,
            traditional,
            short_factor=config["short_factor"],
            long_factor=config["long_factor"],
            max_position_embeddings=max_position_embeddings or original,
            original_max_position_embeddings=original,
            factor=config.get("factor"),
            attention_factor=config.get("attention_factor"),
        )
    raise ValueError(f"Unsupported rope type {kind!r}")
