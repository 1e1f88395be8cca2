"""VecInfer-style vector quantization of keys: ``vecinfer``.

Keys have a few outlier channels that ruin any shared codebook. Following
VecInfer (arXiv 2510.06175), each channel is first divided by a smoothing
factor (the square root of its largest magnitude in calibration, normalised
to a geometric mean of one) and the smoothed keys are rotated by a
Walsh-Hadamard matrix, which spreads what is left of the outliers. The result
is product-quantized: ``num_subspaces`` slices of the head, each replaced by
the index of its nearest centroid in a codebook fitted by k-means to the
calibration keys of that head and slice.

A slice of ``d`` values at ``bits`` bits per value has ``2 ** (bits * d)``
centroids; the default slice is as wide as keeps that at 256 (64 at 3 bits).
Held per token: one packed index per slice and the float16 norm.
"""

import mlx.core as mx
import numpy as np

from .codec import Codec, kmeans, norms, pack, rotation, unpack


def default_subspaces(head_dim: int, bits: int) -> int:
    width = {1: 8, 2: 4, 3: 2, 4: 2}.get(bits, 1)
    return head_dim // width


class VecInferCodec(Codec):
    name = "vecinfer"
    calibrated = True

    def __init__(
        self,
        head_dim: int,
        bits: int = 2,
        num_subspaces=None,
        use_hadamard: bool = True,
        seed: int = 0,
        artifacts=None,
    ):
        super().__init__(head_dim)
        self.bits, self.use_hadamard, self.seed = bits, use_hadamard, seed
        self.num_subspaces = num_subspaces or default_subspaces(head_dim, bits)
        if head_dim % self.num_subspaces:
            raise ValueError(
                f"num_subspaces ({self.num_subspaces}) must divide the head "
                f"dimension {head_dim}"
            )
        self.width = head_dim // self.num_subspaces
        if bits * self.width > 8:
            raise ValueError(
                f"vecinfer fits at most 256 centroids per slice: bits * head_dim / "
                f"num_subspaces must be at most 8, got {bits} * {self.width}"
            )
        need_artifacts(self.name, artifacts, ("smooth_factors", "codebooks"))
        self.smooth = artifacts["smooth_factors"]  # [H, D]
        self.codebooks = artifacts["codebooks"]  # [H, S, K, width]
        self.rotation = artifacts.get("rotation")
        if self.rotation is None:
            self.rotation = rotation(head_dim, seed, use_hadamard)

    @property
    def settings(self):
        return {
            "bits": self.bits,
            "num_subspaces": self.num_subspaces,
            "use_hadamard": self.use_hadamard,
            "seed": self.seed,
        }

    @property
    def artifacts(self):
        return {
            "smooth_factors": self.smooth,
            "codebooks": self.codebooks,
            "rotation": self.rotation,
        }

    @property
    def heads(self) -> int:
        return self.codebooks.shape[0]

    @property
    def nbytes(self) -> int:
        return self.smooth.nbytes + self.codebooks.nbytes

    def _transform(self, x):
        y = (x.astype(mx.float32) / self.smooth[:, None, :]) @ self.rotation
        return y / mx.maximum(norms(y), 1e-12), norms(y)

    def encode(self, x):
        unit, length = self._transform(x)
        B, H, T, D = unit.shape
        slices = unit.reshape(B, H, T, self.num_subspaces, self.width)
        books = self.codebooks.astype(mx.float32)  # H, S, K, w
        # |s - c|^2 up to |s|^2, which does not change the nearest centroid.
        cross = mx.einsum("bhtsw,hskw->bhtsk", slices, books)
        distance = mx.sum(books * books, axis=-1)[None, :, None] - 2 * cross
        index = mx.argmin(distance, axis=-1)
        return length.astype(mx.float16), pack(index, self.bits * self.width)

    @property
    def map(self):
        # x = (y @ R^T) * s, so q . x = ((q * s) @ R) . y.
        return self.smooth[:, :, None] * self.rotation[None]

    def decode(self, codes):
        y = self.decode_mapped(codes)
        return (y @ self.rotation.T) * self.smooth[:, None, :]

    def decode_mapped(self, codes):
        length, words = codes
        index = unpack(words, self.num_subspaces, self.bits * self.width)
        B, H, T, S = index.shape
        books = mx.broadcast_to(
            self.codebooks.astype(mx.float32)[None], (B,) + self.codebooks.shape
        )
        flat = index.astype(mx.uint32).transpose(0, 1, 3, 2)[..., None]  # B,H,S,T,1
        picked = mx.take_along_axis(books, flat, axis=3)  # B,H,S,T,w
        unit = picked.transpose(0, 1, 3, 2, 4).reshape(B, H, T, self.head_dim)
        return unit * length.astype(mx.float32)

    @classmethod
    def calibrate(
        cls,
        keys: np.ndarray,
        bits: int = 2,
        num_subspaces=None,
        use_hadamard=True,
        seed=0,
        **_,
    ):
        """Artifacts for one layer from its calibration keys ``[H, N, D]``."""
        H, N, D = keys.shape
        peak = np.sqrt(np.maximum(np.abs(keys).max(axis=1), 1e-6))
        smooth = peak / np.exp(np.mean(np.log(peak), axis=-1, keepdims=True))
        R = np.array(rotation(D, seed, use_hadamard))
        y = (keys / smooth[:, None, :]) @ R
        unit = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
        S = num_subspaces or default_subspaces(D, bits)
        width = D // S
        k = 1 << (bits * width)
        books = np.zeros((H, S, k, width), np.float32)
        for h in range(H):
            for s in range(S):
                found = kmeans(unit[h, :, s * width : (s + 1) * width], k, seed + s)
                books[h, s, : len(found)] = found
                books[h, s, len(found) :] = found[0]
        return {
            "smooth_factors": mx.array(smooth.astype(np.float32)),
            "codebooks": mx.array(books).astype(mx.float16),
            "rotation": mx.array(R),
        }


def need_artifacts(method: str, artifacts, names):
    missing = [n for n in names if n not in (artifacts or {})]
    if missing:
        raise ValueError(
            f"method {method!r} is calibrated and needs {', '.join(missing)}; run "
            f'python -m mlx_lm.calibrate_kv --method {method} (README, "KV '
            'quantization methods") and pass calibration=<its folder>'
        )
