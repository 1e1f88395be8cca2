"""What every KV codec shares: bit packing, rotations, scalar codebooks, k-means.

A codec turns keys or values ``[B, H, T, D]`` into a tuple of code arrays that
all keep the token axis at position 2 (so a cache can grow, slice, gather and
save them like any other buffer) and back. ``bits_per_value`` is the
accounting of that layout, which :class:`~mlx_lm.models.cache.CodecKVCache`
checks against the bytes it really holds.
"""

import math
from functools import lru_cache
from typing import Dict, Sequence, Tuple

import mlx.core as mx
import numpy as np

# Widths a bit plane can have: each divides 32, so a plane packs into whole
# uint32 words with nothing wasted. Other widths are sums of these planes.
_PLANES = (8, 4, 2, 1)


def _planes(bits: int) -> Tuple[int, ...]:
    out, left = [], bits
    for p in _PLANES:
        if left >= p:
            out.append(p)
            left -= p
    return tuple(out)


def packed_words(n: int, bits: int) -> int:
    """uint32 words that hold ``n`` codes of ``bits`` bits."""
    return sum(-(-n * p // 32) for p in _planes(bits))


def pack(codes: mx.array, bits: int) -> mx.array:
    """Codes ``[..., n]`` (integers below ``2**bits``) as uint32 words
    ``[..., packed_words(n, bits)]``: one plane per power of two in ``bits``."""
    codes = codes.astype(mx.uint32)
    n = codes.shape[-1]
    words, shift = [], 0
    for p in _planes(bits):
        plane = (codes >> shift) & ((1 << p) - 1)
        shift += p
        per_word = 32 // p
        pad = -n % per_word
        if pad:
            plane = mx.pad(plane, [(0, 0)] * (plane.ndim - 1) + [(0, pad)])
        plane = plane.reshape(*plane.shape[:-1], -1, per_word)
        offsets = mx.arange(0, 32, p, dtype=mx.uint32)
        # The shifted fields never overlap, so their sum is their bitwise or.
        words.append(mx.sum(plane << offsets, axis=-1).astype(mx.uint32))
    return mx.concatenate(words, axis=-1) if len(words) > 1 else words[0]


def unpack(words: mx.array, n: int, bits: int) -> mx.array:
    """The inverse of :func:`pack`: uint32 codes ``[..., n]``."""
    codes, start, shift = None, 0, 0
    for p in _planes(bits):
        count = -(-n * p // 32)
        block = words[..., start : start + count]
        start += count
        offsets = mx.arange(0, 32, p, dtype=mx.uint32)
        fields = (block[..., None] >> offsets) & ((1 << p) - 1)
        plane = fields.reshape(*block.shape[:-1], -1)[..., :n] << shift
        shift += p
        codes = plane if codes is None else codes | plane
    return codes


def rotation(dim: int, seed: int, hadamard: bool = True) -> mx.array:
    """An orthogonal ``[dim, dim]`` matrix: a Walsh-Hadamard matrix with random
    signs on its rows when ``hadamard`` and ``dim`` is a power of two, else the
    Q of a QR decomposition of a Gaussian matrix. Seeded, so reproducible."""
    rng = np.random.default_rng(seed)
    if hadamard and dim & (dim - 1) == 0:
        h = np.ones((1, 1))
        while h.shape[0] < dim:
            h = np.block([[h, h], [h, -h]])
        signs = rng.choice([-1.0, 1.0], size=dim)
        return mx.array((signs[:, None] * h / math.sqrt(dim)).astype(np.float32))
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return mx.array((q * np.sign(np.diag(r))).astype(np.float32))


@lru_cache(maxsize=None)
def _gaussian_lloyd_max(bits: int) -> Tuple[float, ...]:
    # Lloyd's iteration on a fine grid weighted by the normal density,
    # started from the quantiles of the levels' equal-mass cells.
    grid = np.linspace(-8.0, 8.0, 40001)
    weight = np.exp(-0.5 * grid**2)
    cdf = np.cumsum(weight) / np.sum(weight)
    levels = 1 << bits
    centroids = grid[np.searchsorted(cdf, (np.arange(levels) + 0.5) / levels)]
    for _ in range(300):
        edges = (centroids[1:] + centroids[:-1]) / 2
        cell = np.searchsorted(edges, grid)
        mass = np.bincount(cell, weight, levels)
        centroids = np.bincount(cell, weight * grid, levels) / np.maximum(mass, 1e-30)
    return tuple(float(c) for c in centroids)


def gaussian_codebook(bits: int) -> np.ndarray:
    """Lloyd-Max levels (ascending) for a standard normal variable: the
    ``2**bits`` values that minimise the expected squared error."""
    return np.array(_gaussian_lloyd_max(bits), dtype=np.float32)


def lloyd_max(samples: np.ndarray, bits: int, iterations: int = 50) -> np.ndarray:
    """Lloyd-Max levels (ascending) fitted to the 1-D ``samples``."""
    samples = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    levels = 1 << bits
    centroids = np.quantile(samples, (np.arange(levels) + 0.5) / levels)
    for _ in range(iterations):
        edges = (centroids[1:] + centroids[:-1]) / 2
        cell = np.searchsorted(edges, samples)
        count = np.bincount(cell, minlength=levels)
        total = np.bincount(cell, samples, minlength=levels)
        centroids = np.where(count > 0, total / np.maximum(count, 1), centroids)
    return np.sort(centroids).astype(np.float32)


def nearest_level(x: mx.array, levels: mx.array) -> mx.array:
    """Index of the level (ascending 1-D ``levels``) nearest to each of ``x``."""
    edges = (levels[1:] + levels[:-1]) / 2
    return mx.sum(x[..., None] > edges, axis=-1).astype(mx.uint32)


def kmeans(points: np.ndarray, k: int, seed: int, iterations: int = 12) -> np.ndarray:
    """``k`` centroids of ``points`` [N, d] (at most N), by Lloyd's algorithm
    started from distinct random points."""
    points = np.asarray(points, dtype=np.float32)
    k = min(k, len(points))
    rng = np.random.default_rng(seed)
    centroids = points[rng.choice(len(points), size=k, replace=False)]
    for _ in range(iterations):
        distance = np.sum(centroids**2, 1)[None] - 2 * points @ centroids.T
        cell = np.argmin(distance, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, cell, points)
        count = np.bincount(cell, minlength=k)[:, None]
        centroids = np.where(count > 0, sums / np.maximum(count, 1), centroids)
    return centroids


def norms(x: mx.array) -> mx.array:
    """L2 norms over the last axis, kept as a trailing axis of 1."""
    return mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))


class Codec:
    """One way of storing vectors of ``head_dim`` values.

    Subclasses set :attr:`name`, implement :meth:`encode` and :meth:`decode`,
    and list their constructor settings in :attr:`settings` and their arrays
    (rotations, codebooks) in :attr:`artifacts`, so that
    ``type(codec)(head_dim, **settings, artifacts=artifacts)`` rebuilds it.
    """

    name = ""
    # Attention over codes: when set, ``decode(codes)`` equals
    # ``decode_mapped(codes) @ map^T`` for this ``map`` ([D, D'], or [H, D, D']
    # per KV head) and ``decode_mapped`` is cheaper. Attention then maps the
    # queries (``q @ map``) instead of every held key, and the output once
    # instead of every held value.
    map = None

    def __init__(self, head_dim: int):
        self.head_dim = head_dim

    def decode_mapped(self, codes: Sequence[mx.array]) -> mx.array:
        return self.decode(codes)

    def encode(self, x: mx.array) -> tuple:
        raise NotImplementedError

    def decode(self, codes: Sequence[mx.array]) -> mx.array:
        raise NotImplementedError

    @property
    def settings(self) -> Dict:
        return {}

    @property
    def artifacts(self) -> Dict[str, mx.array]:
        return {}

    # KV heads of per-head artifacts (codebooks, rotations), 1 when shared.
    heads = 1

    @property
    def bits_per_value(self) -> float:
        """Bits held per value by the codes of one token (its scales and
        norms included; artifacts held once per layer are not)."""
        probe = self.encode(mx.ones((1, self.heads, 1, self.head_dim)))
        return sum(c.nbytes for c in probe) * 8 / (self.heads * self.head_dim)


class Float16Codec(Codec):
    """Values kept as float16 (``value_bits=16``)."""

    name = "float16"

    def __init__(self, head_dim: int, artifacts=None):
        super().__init__(head_dim)

    def encode(self, x):
        return (x.astype(mx.float16),)

    def decode(self, codes):
        return codes[0]


class AffineCodec(Codec):
    """``mx.quantize`` groups: a scale and a bias per ``group_size`` values
    (the storage of :class:`~mlx_lm.models.cache.QuantizedKVCache`)."""

    name = "affine"

    def __init__(
        self, head_dim: int, bits: int = 4, group_size: int = 64, artifacts=None
    ):
        super().__init__(head_dim)
        self.bits, self.group_size = bits, group_size

    @property
    def settings(self):
        return {"bits": self.bits, "group_size": self.group_size}

    def encode(self, x):
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def decode(self, codes):
        return mx.dequantize(*codes, group_size=self.group_size, bits=self.bits)
