"""Per-layer bit allocation: ``ratequant``.

Layers do not suffer equally from quantized keys: what matters is the error
of the attention logits ``q . k``, which grows with the size of a layer's
queries and keys. Calibration measures, for every layer and every width from
1 to ``MAX_BITS`` bits, the mean squared logit error that the TurboQuant
scalar codec (one pass) makes on that layer's own calibration queries and
keys, and hands out bits greedily: starting from one bit everywhere, the next
bit goes to the layer where it removes the most error, until the layers
average ``bits``. Each layer then holds its keys with its own width.
"""

from typing import List

import mlx.core as mx
import numpy as np

from .turboquant import TurboQuantCodec

MAX_BITS = 8


class RateQuantCodec(TurboQuantCodec):
    name = "ratequant"
    calibrated = True

    def __init__(
        self, head_dim: int, bits: int = 2, use_hadamard=True, seed=0, artifacts=None
    ):
        super().__init__(head_dim, bits, 1, use_hadamard, seed, artifacts=artifacts)

    @property
    def settings(self):
        return {"bits": self.bits, "use_hadamard": self.use_hadamard, "seed": self.seed}


def logit_errors(keys: np.ndarray, queries: np.ndarray, seed: int = 0) -> List[float]:
    """Mean squared logit error of one layer at 1 .. MAX_BITS bits, from its
    calibration keys ``[H, N, D]`` and queries ``[H * n_rep, M, D]``."""
    H, N, D = keys.shape
    k = mx.array(keys)[None]
    q = mx.array(queries).reshape(H, -1, queries.shape[1], D)
    errors = []
    for bits in range(1, MAX_BITS + 1):
        codec = TurboQuantCodec(D, bits, 1, seed=seed)
        miss = (codec.decode(codec.encode(k)) - k)[0]
        logits = q @ mx.swapaxes(miss, -1, -2)[:, None]
        errors.append(mx.mean(logits * logits).item())
    return errors


def allocate_bits(errors: List[List[float]], mean_bits: float) -> List[int]:
    """Bits per layer (1 .. MAX_BITS) averaging ``mean_bits`` (rounded down to
    whole bits in total), each next bit where it removes the most error."""
    bits = [1] * len(errors)
    budget = int(mean_bits * len(errors)) - len(errors)
    for _ in range(max(budget, 0)):
        gains = [
            e[b - 1] - e[b] if b < MAX_BITS else -np.inf for e, b in zip(errors, bits)
        ]
        best = int(np.argmax(gains))
        if gains[best] == -np.inf:
            break
        bits[best] += 1
    return bits
