"""TurboQuant (arXiv 2504.19874) with residual passes: ``turboquant_rvq``.

A vector is split into its norm and its direction. A random rotation (a
Walsh-Hadamard matrix with random signs, or a random orthogonal matrix) makes
every coordinate of the direction nearly Gaussian with variance ``1 / D``,
whatever the data, so one fixed Lloyd-Max codebook for the normal law
quantizes all of them without calibration. Each further pass quantizes what
the previous ones missed with the same codebook, rescaled by the residual's
own norm.

Held per token: ``num_residuals`` planes of ``bits``-bit codes and one float16
scale per pass (the first is the vector's norm).
"""

import math

import mlx.core as mx

from .codec import (
    Codec,
    gaussian_codebook,
    nearest_level,
    norms,
    pack,
    packed_words,
    rotation,
    unpack,
)


class TurboQuantCodec(Codec):
    name = "turboquant_rvq"

    def __init__(
        self,
        head_dim: int,
        bits: int = 1,
        num_residuals: int = 2,
        use_hadamard: bool = True,
        seed: int = 0,
        codebook=None,
        artifacts=None,
    ):
        super().__init__(head_dim)
        self.bits, self.num_residuals = bits, num_residuals
        self.use_hadamard, self.seed = use_hadamard, seed
        artifacts = artifacts or {}
        if "rotation" in artifacts:
            self.rotation = artifacts["rotation"]
        else:
            self.rotation = rotation(head_dim, seed, use_hadamard)
        if "codebook" in artifacts:
            levels = artifacts["codebook"]
        elif codebook is not None:
            levels = mx.array(codebook, dtype=mx.float32)
        else:
            levels = mx.array(gaussian_codebook(bits))
        if levels.shape != (1 << bits,):
            raise ValueError(
                f"codebook must hold 2**bits = {1 << bits} levels, got {levels.shape}"
            )
        # Levels for a coordinate of a unit vector: the normal's, over sqrt(D).
        self.levels = mx.sort(levels) / math.sqrt(head_dim)

    @property
    def settings(self):
        return {
            "bits": self.bits,
            "num_residuals": self.num_residuals,
            "use_hadamard": self.use_hadamard,
            "seed": self.seed,
        }

    @property
    def artifacts(self):
        levels = self.levels * math.sqrt(self.head_dim)
        return {"rotation": self.rotation, "codebook": levels}

    def encode(self, x):
        x = x.astype(mx.float32)
        length = norms(x)
        residual = (x / mx.maximum(length, 1e-12)) @ self.rotation
        # Scales: the vector's length, then each later pass's residual norm
        # (relative to the unit direction).
        scales, planes = [length], []
        for step in range(self.num_residuals):
            scale = 1.0
            if step:
                scale = norms(residual)
                scales.append(scale)
            codes = nearest_level(residual / mx.maximum(scale, 1e-12), self.levels)
            residual = residual - scale * self.levels[codes]
            planes.append(pack(codes, self.bits))
        return (mx.concatenate(scales, -1).astype(mx.float16), *planes)

    @property
    def map(self):
        return self.rotation

    def decode_mapped(self, codes):
        """The rotated vector ``x @ rotation`` (inner products are unchanged
        when queries are rotated alike)."""
        scales = codes[0].astype(mx.float32)
        direction = 0.0
        for step, words in enumerate(codes[1:]):
            levels = self.levels[unpack(words, self.head_dim, self.bits)]
            direction = direction + (
                levels * scales[..., step : step + 1] if step else levels
            )
        return direction * scales[..., :1]

    def decode(self, codes):
        return self.decode_mapped(codes) @ self.rotation.T
