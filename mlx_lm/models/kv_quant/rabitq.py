"""RaBitQ (arXiv 2405.12497) with IVF clusters: ``rabitq``.

Each KV head keeps ``num_clusters`` centroids, fitted by k-means to the first
keys it sees (no calibration run). A key is held as its nearest centroid, the
norm of its residual to it, and the residual's direction after a random
rotation, quantized to ``bits`` bits per coordinate (signs at one bit; a
symmetric uniform grid above). RaBitQ's estimator divides the quantized
direction by its inner product with the true one, which makes inner products
with any query unbiased; decoding applies that correction, so attention over
decoded keys uses the estimator.

Held per token: the cluster id (one byte), ``D * bits`` bits and two float16
factors; per head, the centroids in float16.
"""

import mlx.core as mx
import numpy as np

from .codec import Codec, kmeans, norms, pack, packed_words, rotation, unpack


class RaBitQCodec(Codec):
    name = "rabitq"
    # The centroids come from the first keys encoded.
    fits_on_first_keys = True

    def __init__(
        self,
        head_dim: int,
        bits: int = 1,
        num_clusters: int = 64,
        use_hadamard: bool = True,
        seed: int = 0,
        artifacts=None,
    ):
        if not 1 <= num_clusters <= 256:
            raise ValueError(f"num_clusters must be in [1, 256], got {num_clusters}")
        super().__init__(head_dim)
        self.bits, self.num_clusters = bits, num_clusters
        self.use_hadamard, self.seed = use_hadamard, seed
        artifacts = artifacts or {}
        self.rotation = artifacts.get("rotation")
        if self.rotation is None:
            self.rotation = rotation(head_dim, seed, use_hadamard)
        # [H, C, D], fitted on the first encode.
        self.centroids = artifacts.get("centroids")

    @property
    def settings(self):
        return {
            "bits": self.bits,
            "num_clusters": self.num_clusters,
            "use_hadamard": self.use_hadamard,
            "seed": self.seed,
        }

    @property
    def artifacts(self):
        if self.centroids is None:
            return {"rotation": self.rotation}
        return {"rotation": self.rotation, "centroids": self.centroids}

    @property
    def bits_per_value(self) -> float:
        # Cluster id (a byte), two float16 factors and the packed direction.
        return (8 + 32 + 32 * packed_words(self.head_dim, self.bits)) / self.head_dim

    @property
    def nbytes(self) -> int:
        return 0 if self.centroids is None else self.centroids.nbytes

    def _fit(self, x):
        points = np.array(x.astype(mx.float32))
        heads = [
            kmeans(
                points[:, h].reshape(-1, self.head_dim), self.num_clusters, self.seed
            )
            for h in range(points.shape[1])
        ]
        k = min(len(c) for c in heads)
        self.centroids = mx.array(np.stack([c[:k] for c in heads])).astype(mx.float16)

    def _grid(self, z):
        """Quantized unit direction and its codes for rotated directions z."""
        if self.bits == 1:
            codes = z > 0
            return (codes.astype(mx.float32) * 2 - 1), codes
        top = (1 << self.bits) - 1
        peak = mx.max(mx.abs(z), axis=-1, keepdims=True)
        codes = mx.round((z / mx.maximum(peak, 1e-12) + 1) * top / 2)
        return codes * 2 / top - 1, codes.astype(mx.uint32)

    def encode(self, x):
        if self.centroids is None:
            self._fit(x)
        x = x.astype(mx.float32)
        centroids = self.centroids.astype(mx.float32)[None]
        distance = mx.sum(centroids**2, -1)[:, :, None] - 2 * x @ mx.swapaxes(
            centroids, -1, -2
        )
        cluster = mx.argmin(distance, axis=-1)
        residual = x - self._centroid_of(cluster)
        length = norms(residual)
        z = (residual / mx.maximum(length, 1e-12)) @ self.rotation
        grid, codes = self._grid(z)
        unit = grid / mx.maximum(norms(grid), 1e-12)
        alignment = mx.sum(unit * z, axis=-1, keepdims=True)
        factors = mx.concatenate([length, alignment], axis=-1).astype(mx.float16)
        return cluster.astype(mx.uint8)[..., None], factors, pack(codes, self.bits)

    def _centroid_of(self, cluster):
        B, H, T = cluster.shape
        centroids = mx.broadcast_to(
            self.centroids.astype(mx.float32)[None], (B,) + self.centroids.shape
        )
        index = cluster.astype(mx.uint32)[..., None]
        return mx.take_along_axis(centroids, index, axis=2)

    def decode(self, codes):
        cluster, factors, words = codes
        grid_codes = unpack(words, self.head_dim, self.bits).astype(mx.float32)
        if self.bits == 1:
            grid = grid_codes * 2 - 1
        else:
            top = (1 << self.bits) - 1
            grid = grid_codes * 2 / top - 1
        unit = grid / mx.maximum(norms(grid), 1e-12)
        factors = factors.astype(mx.float32)
        scale = factors[..., :1] / mx.maximum(factors[..., 1:], 1e-3)
        return self._centroid_of(cluster[..., 0]) + (unit @ self.rotation.T) * scale
