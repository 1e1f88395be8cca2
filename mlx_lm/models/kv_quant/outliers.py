"""Outlier channels of keys, held apart: ``outlier_observer``.

Keys of real models carry a few channels far larger than the rest (SmolLM2:
one channel per head averages ten times the median magnitude). A shared
scale or a rotation spreads their error over every channel, and it is the
small channels that hold most of what tells one token from another. As QJL
(arXiv 2406.03482) and KIVI do, :class:`KeyNormObserver` picks each head's
largest channels from the first keys it sees; :class:`OutlierCodec` holds
those channels with ``outlier_bits`` (symmetric, one float16 scale per token)
and hands the others to the method's codec.

For attention over codes the outliers join the method's mapped space: the
mapped key is ``[inner mapped key, outlier channels]`` and the map
``[inner map, the one-hot columns of the channels]``.
"""

import mlx.core as mx

from .codec import Codec, pack, packed_words, unpack


class KeyNormObserver:
    """Each KV head's ``num_channels`` channels of largest mean magnitude."""

    def __init__(self, num_channels: int = 2):
        if isinstance(num_channels, bool) or not isinstance(num_channels, int):
            raise ValueError(f"num_channels must be an integer, got {num_channels!r}")
        if num_channels < 1:
            raise ValueError(f"num_channels must be at least 1, got {num_channels}")
        self.num_channels = num_channels

    def select(self, keys: mx.array) -> mx.array:
        """Channel indices ``[H, num_channels]`` (ascending) from keys [B, H, T, D]."""
        magnitude = mx.mean(mx.abs(keys.astype(mx.float32)), axis=(0, 2))
        top = mx.argpartition(-magnitude, self.num_channels - 1, axis=-1)
        return mx.sort(top[:, : self.num_channels], axis=-1).astype(mx.uint32)

    def __repr__(self):
        return f"KeyNormObserver(num_channels={self.num_channels})"

    def __eq__(self, other):
        return (
            isinstance(other, KeyNormObserver)
            and other.num_channels == self.num_channels
        )


class OutlierCodec(Codec):
    fits_on_first_keys = True

    def __init__(
        self,
        head_dim: int,
        inner=None,
        num_channels: int = 2,
        outlier_bits: int = 8,
        artifacts=None,
    ):
        from . import rebuild_codec

        super().__init__(head_dim)
        artifacts = dict(artifacts or {})
        if isinstance(inner, (list, tuple)):
            name, settings = inner
            inner_artifacts = {
                k[len("inner.") :]: v
                for k, v in artifacts.items()
                if k.startswith("inner.")
            }
            inner = rebuild_codec(name, head_dim, settings, inner_artifacts)
        self.inner = inner
        self.name = inner.name
        self.observer = KeyNormObserver(num_channels)
        self.outlier_bits = outlier_bits
        self.channels = artifacts.get("channels")  # [H, n]

    @property
    def settings(self):
        return {
            "inner": [self.inner.name, self.inner.settings],
            "num_channels": self.observer.num_channels,
            "outlier_bits": self.outlier_bits,
        }

    @property
    def artifacts(self):
        out = {f"inner.{k}": v for k, v in self.inner.artifacts.items()}
        if self.channels is not None:
            out["channels"] = self.channels
        return out

    @property
    def nbytes(self) -> int:
        return getattr(self.inner, "nbytes", 0)

    @property
    def heads(self) -> int:
        return 1 if self.channels is None else self.channels.shape[0]

    @property
    def bits_per_value(self) -> float:
        n = self.observer.num_channels
        own = (
            n * self.outlier_bits // 32 * 32
            if n * self.outlier_bits % 32 == 0
            else -(-n * self.outlier_bits // 32) * 32
        ) + 16
        return self.inner.bits_per_value + own / self.head_dim

    def _index(self, x):
        B, H, T, _ = x.shape
        return mx.broadcast_to(
            self.channels[None, :, None, :], (B, H, T, self.channels.shape[1])
        )

    def encode(self, x):
        if self.channels is None:
            self.channels = self.observer.select(x)
        x = x.astype(mx.float32)
        index = self._index(x)
        outliers = mx.take_along_axis(x, index, axis=-1)
        rest = mx.put_along_axis(x, index, mx.zeros_like(outliers), axis=-1)
        top = (1 << (self.outlier_bits - 1)) - 1
        scale = mx.max(mx.abs(outliers), axis=-1, keepdims=True) / top
        codes = mx.round(outliers / mx.maximum(scale, 1e-12)) + top
        packed = pack(codes.astype(mx.uint32), self.outlier_bits)
        return (scale.astype(mx.float16), packed) + self.inner.encode(rest)

    def _outliers(self, codes):
        top = (1 << (self.outlier_bits - 1)) - 1
        n = self.channels.shape[1]
        values = unpack(codes[1], n, self.outlier_bits).astype(mx.float32) - top
        return values * codes[0].astype(mx.float32)

    def decode(self, codes):
        # The outliers add to what the inner codec left in their channels
        # (nearly zero), exactly as in the mapped form.
        rest = self.inner.decode(codes[2:]).astype(mx.float32)
        index = self._index(rest)
        added = mx.take_along_axis(rest, index, axis=-1) + self._outliers(codes)
        return mx.put_along_axis(rest, index, added, axis=-1)

    @property
    def map(self):
        H, n = self.channels.shape
        D = self.head_dim
        inner = self.inner.map
        if inner is None:
            inner = mx.eye(D)
        if inner.ndim == 2:
            inner = mx.broadcast_to(inner[None], (H,) + inner.shape)
        onehot = (mx.arange(D)[None, :, None] == self.channels[:, None, :]).astype(
            mx.float32
        )
        return mx.concatenate([inner, onehot], axis=-1)

    def decode_mapped(self, codes):
        rest = self.inner.decode_mapped(codes[2:]).astype(mx.float32)
        return mx.concatenate([rest, self._outliers(codes)], axis=-1)
