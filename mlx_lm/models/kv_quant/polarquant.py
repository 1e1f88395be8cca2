"""PolarQuant (arXiv 2502.02617): keys in polar coordinates.

After a random rotation (which makes the coordinates i.i.d. and removes the
need for per-block scales), the ``D`` coordinates are paired and each pair
becomes a radius and an angle; the radii are paired again, level after level,
until one radius (the norm) is left. The ``D / 2`` first-level angles are
uniform on the circle; deeper angles lie in ``[0, pi / 2]`` and crowd around
``pi / 4`` the deeper they are, so each level gets its own Lloyd-Max codebook,
fitted once to the known distribution (by sampling Gaussian vectors).

Held per token: first-level angles with ``bits + 1`` bits, deeper angles with
``bits`` bits, and the norm in float16. ``head_dim`` must be a power of two.
"""

import math

import mlx.core as mx
import numpy as np

from .codec import Codec, lloyd_max, nearest_level, pack, rotation, unpack


def _polar_levels(head_dim: int, bits: int, seed: int):
    """Codebooks of the angles at levels 2, 3, ... of a Gaussian vector."""
    rng = np.random.default_rng(seed)
    radii = np.abs(rng.standard_normal((4096, head_dim)))
    radii = np.hypot(radii[:, 0::2], radii[:, 1::2])
    books = []
    while radii.shape[1] > 1:
        books.append(lloyd_max(np.arctan2(radii[:, 1::2], radii[:, 0::2]), bits))
        radii = np.hypot(radii[:, 0::2], radii[:, 1::2])
    return books


class PolarQuantCodec(Codec):
    name = "polarquant"

    def __init__(
        self,
        head_dim: int,
        bits: int = 1,
        use_hadamard: bool = True,
        seed: int = 0,
        artifacts=None,
    ):
        if head_dim & (head_dim - 1) or head_dim < 2:
            raise ValueError(
                f"polarquant needs a head dimension that is a power of two, got {head_dim}"
            )
        super().__init__(head_dim)
        self.bits, self.use_hadamard, self.seed = bits, use_hadamard, seed
        artifacts = artifacts or {}
        if "rotation" in artifacts:
            self.rotation = artifacts["rotation"]
            self.books = [artifacts[f"level{i}"] for i in range(2, len(artifacts) + 1)]
        else:
            self.rotation = rotation(head_dim, seed, use_hadamard)
            self.books = [mx.array(b) for b in _polar_levels(head_dim, bits, seed)]

    @property
    def settings(self):
        return {"bits": self.bits, "use_hadamard": self.use_hadamard, "seed": self.seed}

    @property
    def artifacts(self):
        books = {f"level{i + 2}": b for i, b in enumerate(self.books)}
        return {"rotation": self.rotation, **books}

    def encode(self, x):
        y = x.astype(mx.float32) @ self.rotation
        first = self.bits + 1
        step = 2 * math.pi / (1 << first)
        angle = mx.arctan2(y[..., 1::2], y[..., 0::2])
        codes = [
            pack(
                mx.floor((angle + math.pi) / step).astype(mx.uint32) % (1 << first),
                first,
            )
        ]
        radii = mx.sqrt(y[..., 0::2] ** 2 + y[..., 1::2] ** 2)
        deeper = []
        for book in self.books:
            angle = mx.arctan2(radii[..., 1::2], radii[..., 0::2])
            deeper.append(nearest_level(angle, book))
            radii = mx.sqrt(radii[..., 0::2] ** 2 + radii[..., 1::2] ** 2)
        # Deeper angles share one width, so they share one packed array.
        codes.append(pack(mx.concatenate(deeper, axis=-1), self.bits))
        return (radii.astype(mx.float16), *codes)

    @property
    def map(self):
        return self.rotation

    def decode(self, codes):
        return self.decode_mapped(codes) @ self.rotation.T

    def decode_mapped(self, codes):
        radii = codes[0].astype(mx.float32)
        deeper = unpack(codes[2], self.head_dim // 2 - 1, self.bits)
        end = deeper.shape[-1]
        for book in reversed(self.books):
            n = radii.shape[-1] * 2
            angle = book[deeper[..., end - n // 2 : end]]
            end -= n // 2
            radii = mx.stack([radii * mx.cos(angle), radii * mx.sin(angle)], axis=-1)
            radii = radii.reshape(*radii.shape[:-2], n)
        first = self.bits + 1
        step = 2 * math.pi / (1 << first)
        index = unpack(codes[1], self.head_dim // 2, first).astype(mx.float32)
        angle = (index + 0.5) * step - math.pi
        y = mx.stack([radii * mx.cos(angle), radii * mx.sin(angle)], axis=-1)
        return y.reshape(*y.shape[:-2], self.head_dim)
