"""QJL (arXiv 2406.03482): a 1-bit Johnson-Lindenstrauss sketch of keys.

A key ``k`` is held as the signs of ``S k`` for a Gaussian matrix ``S`` of
``m`` rows, plus its norm. For any query ``q``,
``sqrt(pi / 2) / m * |k| * <S q, sign(S k)>`` is an unbiased estimate of
``<q, k>``. Decoding returns ``sqrt(pi / 2) / m * |k| * S^T sign(S k)``, the
one vector whose inner product with every query is that estimate. Attention
does not even decode: it sketches the query once and scores it against the
held signs, which is QJL's estimator itself.

``m`` is ``bits * sketch_dim``: ``bits`` sketches of ``sketch_dim`` rows.
"""

import math

import mlx.core as mx
import numpy as np

from .codec import Codec, norms, pack, unpack


class QJLCodec(Codec):
    name = "qjl"

    def __init__(
        self,
        head_dim: int,
        bits: int = 1,
        sketch_dim: int = 64,
        seed: int = 0,
        artifacts=None,
    ):
        super().__init__(head_dim)
        self.bits, self.sketch_dim, self.seed = bits, sketch_dim, seed
        self.rows = bits * sketch_dim
        artifacts = artifacts or {}
        if "sketch" in artifacts:
            self.sketch = artifacts["sketch"]
        else:
            rng = np.random.default_rng(seed)
            gaussian = rng.standard_normal((self.rows, head_dim))
            self.sketch = mx.array(gaussian.astype(np.float32))

    @property
    def settings(self):
        return {"bits": self.bits, "sketch_dim": self.sketch_dim, "seed": self.seed}

    @property
    def artifacts(self):
        return {"sketch": self.sketch}

    def encode(self, x):
        x = x.astype(mx.float32)
        signs = (x @ self.sketch.T) > 0
        return norms(x).astype(mx.float16), pack(signs, 1)

    def signs(self, codes) -> mx.array:
        """The sketch signs of the held keys as +-1, ``[..., T, m]``."""
        return unpack(codes[1], self.rows, 1).astype(mx.float32) * 2 - 1

    @property
    def map(self):
        # Queries are sketched (q @ S^T) and scored against the signs.
        return self.sketch.T

    def decode_mapped(self, codes):
        weight = math.sqrt(math.pi / 2) / self.rows
        return self.signs(codes) * (codes[0].astype(mx.float32) * weight)

    def decode(self, codes):
        return self.decode_mapped(codes) @ self.sketch
