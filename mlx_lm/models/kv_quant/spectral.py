"""Spectral quantization of keys: ``spectral``.

Keys of one head live mostly in a few directions. Calibration finds them: the
right singular vectors of the head's calibration keys (unit-normalised, so a
few long keys do not decide) give a rotation that orders the channels by
energy, and the spread of each rotated channel is recorded
(``calibrate_spectral_rotation``). The leading channels, the signal, are
quantized with ``signal_bits`` bits and the rest, the noise, with
``noise_bits``; each rotated channel is divided by its spread and rounded to
the Lloyd-Max levels of the normal law. How many channels count as signal
follows from ``bits``, the average asked for:
``round(D * (bits - noise_bits) / (signal_bits - noise_bits))``.

Held per token: the two planes of codes and the float16 norm.
"""

import mlx.core as mx
import numpy as np

from .codec import Codec, gaussian_codebook, nearest_level, norms, pack, unpack
from .vecinfer import need_artifacts


def calibrate_spectral_rotation(keys: np.ndarray):
    """Per-head rotation ``[H, D, D]`` (columns: principal directions, by
    decreasing energy) and the spread of each rotated channel ``[H, D]``, from
    calibration keys ``[H, N, D]``."""
    unit = keys / np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
    rotations, spreads = [], []
    for head in unit:
        _, _, vt = np.linalg.svd(head, full_matrices=False)
        rotations.append(vt.T)
        # Root mean square, not deviation: keys are not centred.
        spreads.append(np.maximum(np.sqrt(np.mean((head @ vt.T) ** 2, axis=0)), 1e-4))
    return np.stack(rotations).astype(np.float32), np.stack(spreads).astype(np.float32)


class SpectralCodec(Codec):
    name = "spectral"
    calibrated = True

    def __init__(
        self,
        head_dim: int,
        bits: int = 2,
        signal_bits: int = 4,
        noise_bits: int = 1,
        artifacts=None,
    ):
        super().__init__(head_dim)
        if not 1 <= noise_bits <= bits <= signal_bits:
            raise ValueError(
                "spectral needs 1 <= noise_bits <= bits <= signal_bits, got "
                f"noise_bits={noise_bits}, bits={bits}, signal_bits={signal_bits}"
            )
        self.bits, self.signal_bits, self.noise_bits = bits, signal_bits, noise_bits
        spread = max(signal_bits - noise_bits, 1)
        self.signal = int(round(head_dim * (bits - noise_bits) / spread))
        need_artifacts(self.name, artifacts, ("rotations",))
        self.rotations = artifacts["rotations"]
        # Without measured spreads: a unit vector's mean spread, 1 / sqrt(D).
        flat = mx.full(self.rotations.shape[:2], head_dim**-0.5)
        self.spreads = artifacts.get("spreads", flat)
        self.signal_levels = mx.array(gaussian_codebook(signal_bits))
        self.noise_levels = mx.array(gaussian_codebook(noise_bits))

    @property
    def settings(self):
        return {
            "bits": self.bits,
            "signal_bits": self.signal_bits,
            "noise_bits": self.noise_bits,
        }

    @property
    def artifacts(self):
        return {"rotations": self.rotations, "spreads": self.spreads}

    @property
    def heads(self) -> int:
        return self.rotations.shape[0]

    @property
    def nbytes(self) -> int:
        return self.rotations.nbytes + self.spreads.nbytes

    def encode(self, x):
        x = x.astype(mx.float32)
        length = norms(x)
        y = ((x / mx.maximum(length, 1e-12)) @ self.rotations[None]) / self.spreads[
            None, :, None
        ]
        r = self.signal
        codes = [length.astype(mx.float16)]
        if r:
            codes.append(
                pack(nearest_level(y[..., :r], self.signal_levels), self.signal_bits)
            )
        if r < self.head_dim:
            codes.append(
                pack(nearest_level(y[..., r:], self.noise_levels), self.noise_bits)
            )
        return tuple(codes)

    @property
    def map(self):
        return self.rotations

    def decode(self, codes):
        mapped = self.decode_mapped(codes)
        return mapped @ mx.swapaxes(self.rotations, -1, -2)[None]

    def decode_mapped(self, codes):
        r, parts = self.signal, []
        if r:
            parts.append(self.signal_levels[unpack(codes[1], r, self.signal_bits)])
        if r < self.head_dim:
            words = codes[-1]
            parts.append(
                self.noise_levels[unpack(words, self.head_dim - r, self.noise_bits)]
            )
        y = mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        return y * self.spreads[None, :, None] * codes[0].astype(mx.float32)

    @classmethod
    def calibrate(cls, keys: np.ndarray, **_):
        rotations, spreads = calibrate_spectral_rotation(keys)
        return {"rotations": mx.array(rotations), "spreads": mx.array(spreads)}
