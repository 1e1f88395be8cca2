"""Eviction policies: each a scoring function (the higher, the more a token
deserves to stay), and the one selection routine that keeps the top scores."""

from typing import Optional

import mlx.core as mx


def _as_f32_with_norms(keys: mx.array):
    """Keys in float32 and their L2 norms (a contraction over the last axis,
    which unlike ``linalg.norm`` makes no key-sized temporary)."""
    k = keys.astype(mx.float32)
    return k, mx.sqrt(mx.einsum("...d,...d->...", k, k))


def score_l2_low(keys: mx.array) -> mx.array:
    """KnormPress (arXiv 2406.11430): low-norm keys draw attention, keep them."""
    return -_as_f32_with_norms(keys)[1]


def score_l2_high(keys: mx.array) -> mx.array:
    """The reverse of ``l2-low``: keep the keys with the largest norm."""
    return _as_f32_with_norms(keys)[1]


def score_keydiff(keys: mx.array) -> mx.array:
    """KeyDiff (arXiv 2504.15364): keep the keys least aligned (by cosine
    similarity) with the mean of the unit keys."""
    k, norms = _as_f32_with_norms(keys)
    inverse = 1.0 / (norms + 1e-6)
    mean_unit = (inverse[..., None, :] @ k) / k.shape[-2]
    return -(k @ mx.swapaxes(mean_unit, -1, -2))[..., 0] * inverse


# Queries a query-aware policy reads (SnapKV's observation window; the paper
# uses 32, kvpress 64), and how many tokens after an attended key share its
# score (a power of two).
SNAPKV_WINDOW = 64
SNAPKV_SPREAD = 16


def _spread_forward(x: mx.array, width: int) -> mx.array:
    """Each position's maximum over itself and the ``width - 1`` before it,
    along the last axis (doubling the span per step: log2(width) maxima)."""
    span = 1
    while span < width:
        before = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(span, 0)])[..., : x.shape[-1]]
        x = mx.maximum(x, before)
        span *= 2
    return x


def score_snapkv(
    keys: mx.array,
    queries: mx.array,
    scale: float,
    left_padding: Optional[mx.array] = None,
) -> mx.array:
    """SnapKV (arXiv 2404.14469): keep the keys that the newest queries (the
    question, after a prompt) attend to most. ``keys`` [B, H, T, D] are one
    layer's slots, ``queries`` [B, H * n_rep, w, D] its ``w`` newest queries,
    which are also its ``w`` newest slots; the first ``left_padding`` slots
    of each row (one count per row) are no tokens. A key scores the softmax
    weight it gets, averaged over those queries and the query heads sharing
    its KV head.

    SnapKV then pools each score with its neighbours on both sides; here a
    key's score goes to the ``SNAPKV_SPREAD - 1`` tokens after it instead. A
    question attends to the words that name what it asks for, and the answer
    is what follows them: with SmolLM2 (README, "Question-aware eviction") the
    symmetric pooling kept the needle's key but lost its value.
    """
    B, H, T, D = keys.shape
    w = queries.shape[2]
    q = queries.astype(mx.float32).reshape(B, H, -1, w, D) * scale
    logits = q @ mx.swapaxes(keys.astype(mx.float32), -1, -2)[:, :, None]
    slot, query_slot = mx.arange(T), T - w + mx.arange(w)
    hidden = slot[None] > query_slot[:, None]
    if left_padding is None:
        logits = mx.where(hidden, mx.array(-mx.inf, mx.float32), logits)
        weights = mx.mean(mx.softmax(logits, axis=-1), axis=(2, 3))
    else:
        # Padding slots are hidden from every query, and padding queries
        # (which would see nothing) are left out of the mean.
        pad = left_padding.reshape(B, 1, 1, 1, 1)
        hidden = hidden | (slot < pad)
        real = query_slot[:, None] >= pad
        logits = mx.where(hidden | ~real, mx.array(-mx.inf, mx.float32), logits)
        logits = mx.where(real, logits, 0.0)
        weights = mx.softmax(logits, axis=-1) * real
        n_real = mx.sum(real, axis=(3, 4)) * q.shape[2]
        weights = mx.sum(weights, axis=(2, 3)) / mx.maximum(n_real, 1)
    # In logarithms: select_kept compares scores to 1e-4, and weights are
    # mostly far smaller than that.
    return mx.log(_spread_forward(weights, SNAPKV_SPREAD))


# A policy is nothing but a scoring function: the higher the score, the more
# a token deserves to stay. Key scorers map keys [..., T, D] to [..., T];
# query scorers also read the newest queries (see score_snapkv).
KEY_SCORERS = {
    "l2-low": score_l2_low,
    "l2-high": score_l2_high,
    "keydiff": score_keydiff,
}
QUERY_SCORERS = {"snapkv": score_snapkv}
COMPACT_POLICIES = {**KEY_SCORERS, **QUERY_SCORERS}
# Policies under which a token's score depends on its own key alone, so that
# a score once computed stays valid while the token is kept.
PER_TOKEN_POLICIES = {"l2-low", "l2-high"}


def select_kept(
    scores: mx.array, n_keep: int, protect_first: int = 0, protect_last: int = 0
) -> mx.array:
    """Indices (ascending) of the ``n_keep`` positions to keep along the last axis.

    The first ``protect_first`` and last ``protect_last`` positions are always kept;
    the rest of the room goes to the highest ``scores``. Positions keep their
    relative order, so the survivors stay in time order.
    """
    T = scores.shape[-1]
    if not 0 < n_keep <= T:
        raise ValueError(f"n_keep must be in [1, {T}], got {n_keep}")
    if protect_first + protect_last > n_keep:
        raise ValueError(
            f"cannot protect {protect_first} + {protect_last} positions "
            f"while keeping {n_keep}"
        )
    pos = mx.arange(T)
    protected = (pos < protect_first) | (pos >= T - protect_last)
    # Scores equal to 1e-4 are ties (RoPE keeps norms, so a repeated token's keys
    # score alike up to rounding); a tie goes to the newer position, so that runs
    # whose arithmetic differs in the last bits (batched or not) keep the same tokens.
    grid = mx.round(mx.clip(scores.astype(mx.float32), -1e9, 1e9) * 1e4)
    rank = grid.astype(mx.int64) * (T + 1) + pos.astype(mx.int64)
    rank = mx.where(protected, mx.array(2**62, mx.int64), rank)
    top = mx.argpartition(-rank, kth=n_keep - 1, axis=-1)[..., :n_keep]
    return mx.sort(top, axis=-1)


COMPACT_SCOPES = ("model", "layer", "head")
COMPACT_MODES = ("stream", "once")
# Without a question at the end of what was read (streaming through a long
# prompt) attention says little about what is needed later: keydiff there.
DEFAULT_COMPACT_POLICY = {"once": "snapkv", "stream": "keydiff"}
