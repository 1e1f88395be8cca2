"""Commutative vector quantization of keys: ``commvq``.

After RoPE, channel ``i`` and channel ``i + D / 2`` of a key form one complex
number, and RoPE multiplies it by a phase that depends on the position only.
CommVQ (arXiv 2506.18879) builds its codebook from elements that commute with
that rotation. Here each pair is held in polar form: its phase on a uniform
grid (rotating by RoPE moves a phase code, it never changes the grid) and its
magnitude, which RoPE leaves alone, by vector quantization: groups of
magnitudes (relative to the key's norm) are replaced by the nearest codeword
of a codebook fitted by k-means to the calibration keys of that head.

Held per token: ``bits`` bits of phase and ``bits`` bits of magnitude per
pair (a group of ``8 // bits`` pairs, two at 3 bits, shares one index) and
the float16 norm; that is ``bits`` bits per value.
"""

import math

import mlx.core as mx
import numpy as np

from .codec import Codec, kmeans, norms, pack, unpack
from .vecinfer import need_artifacts

# Pairs per magnitude codeword at each width: indices of 8 bits (6 at 3 bits).
GROUPS = {1: 8, 2: 4, 3: 2, 4: 2}


class CommVQCodec(Codec):
    name = "commvq"
    calibrated = True

    def __init__(self, head_dim: int, bits: int = 2, seed: int = 0, artifacts=None):
        if head_dim % 16:
            raise ValueError(
                f"commvq needs a head dimension divisible by 16, got {head_dim}"
            )
        super().__init__(head_dim)
        self.bits, self.seed = bits, seed
        self.phase_bits = bits
        self.group = GROUPS[bits]
        self.index_bits = bits * self.group
        need_artifacts(self.name, artifacts, ("magnitude_codebooks",))
        self.books = artifacts["magnitude_codebooks"]  # [H, G, K, pairs]

    @property
    def settings(self):
        return {"bits": self.bits, "seed": self.seed}

    @property
    def artifacts(self):
        return {"magnitude_codebooks": self.books}

    @property
    def heads(self) -> int:
        return self.books.shape[0]

    @property
    def nbytes(self) -> int:
        return self.books.nbytes

    def encode(self, x):
        x = x.astype(mx.float32)
        length = norms(x)
        unit = x / mx.maximum(length, 1e-12)
        half = self.head_dim // 2
        re, im = unit[..., :half], unit[..., half:]
        levels = 1 << self.phase_bits
        step = 2 * math.pi / levels
        phase = (
            mx.round((mx.arctan2(im, re) + math.pi) / step).astype(mx.uint32) % levels
        )
        magnitude = mx.sqrt(re * re + im * im)
        B, H, T, P = magnitude.shape
        groups = magnitude.reshape(B, H, T, P // self.group, self.group)
        books = self.books.astype(mx.float32)
        cross = mx.einsum("bhtgw,hgkw->bhtgk", groups, books)
        distance = mx.sum(books * books, axis=-1)[None, :, None] - 2 * cross
        index = mx.argmin(distance, axis=-1)
        return (
            length.astype(mx.float16),
            pack(index, self.index_bits),
            pack(phase, self.phase_bits),
        )

    def decode(self, codes):
        length, index, words = codes
        index = unpack(index, self.head_dim // 2 // self.group, self.index_bits)
        B, H, T, G = index.shape
        books = mx.broadcast_to(
            self.books.astype(mx.float32)[None], (B,) + self.books.shape
        )
        flat = index.astype(mx.uint32).transpose(0, 1, 3, 2)[..., None]
        magnitude = mx.take_along_axis(books, flat, axis=3)
        magnitude = magnitude.transpose(0, 1, 3, 2, 4).reshape(B, H, T, G * self.group)
        levels = 1 << self.phase_bits
        phase = unpack(words, self.head_dim // 2, self.phase_bits).astype(mx.float32)
        phase = phase * (2 * math.pi / levels) - math.pi
        y = mx.concatenate(
            [magnitude * mx.cos(phase), magnitude * mx.sin(phase)], axis=-1
        )
        return y * length.astype(mx.float32)

    @classmethod
    def calibrate(cls, keys: np.ndarray, bits: int = 2, seed: int = 0, **_):
        H, N, D = keys.shape
        unit = keys / np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
        magnitude = np.hypot(unit[..., : D // 2], unit[..., D // 2 :])
        width = GROUPS[bits]
        G, k = D // 2 // width, 1 << (bits * width)
        books = np.zeros((H, G, k, width), np.float32)
        for h in range(H):
            for g in range(G):
                part = magnitude[h, :, g * width : (g + 1) * width]
                found = kmeans(part, k, seed + g)
                books[h, g, : len(found)] = found
                books[h, g, len(found) :] = found[0]
        return {"magnitude_codebooks": mx.array(books).astype(mx.float16)}
