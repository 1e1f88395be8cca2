"""Pieces shared by every model definition: argument parsing, masks, attention."""

import inspect
from dataclasses import dataclass
from typing import Optional, Union

import mlx.core as mx


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict):
        """Build the arguments from a config dict, skipping keys the class lacks."""
        accepted = inspect.signature(cls).parameters
        return cls(**{key: val for key, val in params.items() if key in accepted})


def create_causal_mask(
    N: int,
    offset: int = 0,
    window_size: Optional[int] = None,
    right_padding: Optional[mx.array] = None,
    left_padding: Optional[mx.array] = None,
) -> mx.array:
    """Boolean mask of shape [N, offset + N] (True = may attend).

    Query ``i`` sits at absolute position ``offset + i``. With ``window_size``
    a query only sees the last ``window_size`` positions (itself included).
    Per-sequence paddings (arrays of length B) widen the result to
    [B, 1, N, offset + N].
    """
    total = offset + N
    key_pos = mx.arange(total)[None]
    query_pos = mx.arange(offset, total)[:, None]
    mask = key_pos <= query_pos
    if window_size is not None:
        mask = mask & (query_pos - key_pos < window_size)
    if right_padding is not None:
        valid_len = total - right_padding
        mask = mask & (key_pos < valid_len[:, None, None, None])
    if left_padding is not None:
        mask = mask & (key_pos >= left_padding[:, None, None, None])
    return mask


def create_attention_mask(
    h: mx.array,
    cache=None,
    window_size: Optional[int] = None,
    return_array: bool = False,
) -> Union[None, str, mx.array]:
    """Mask for the hidden states ``h`` [B, L, ...] given one layer's cache.

    Returns ``None`` (single query, nothing to hide), the string ``"causal"``
    (let the attention kernel build it) or an explicit boolean array.
    """
    n_queries = h.shape[1]
    if cache is not None and hasattr(cache, "make_mask"):
        return cache.make_mask(
            n_queries, return_array=return_array, window_size=window_size
        )
    if n_queries == 1:
        return None
    windowed = window_size is not None and n_queries > window_size
    if return_array or windowed:
        return create_causal_mask(n_queries, window_size=window_size)
    return "causal"


def _quantized_attention(
    queries: mx.array,
    keys: tuple,
    values: tuple,
    scale: float,
    mask,
    group_size: int,
    bits: int,
) -> mx.array:
    """Attention against keys/values stored as (packed, scales, biases) triples."""
    B, n_heads, L, D = queries.shape
    n_kv_heads = keys[0].shape[-3]
    n_rep = n_heads // n_kv_heads
    queries = queries * scale
    if n_rep > 1:
        # Group the query heads that share one kv head: [B, n_kv, n_rep, L, D].
        queries = queries.reshape(B, n_kv_heads, n_rep, L, D)
        keys = tuple(mx.expand_dims(part, -3) for part in keys)
        values = tuple(mx.expand_dims(part, -3) for part in values)

    scores = mx.quantized_matmul(
        queries, *keys, transpose=True, group_size=group_size, bits=bits
    )
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"Unsupported attention mask {mask!r}")
        n_q, n_k = scores.shape[-2:]
        mask = mx.arange(n_k - n_q, n_k)[:, None] >= mx.arange(n_k)[None]
    if mask is not None:
        if n_rep > 1 and mask.ndim > 3:
            # [B, H, L, S] style masks need a singleton for the n_rep axis.
            mask = mx.expand_dims(mask, -3)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(
        weights, *values, transpose=False, group_size=group_size, bits=bits
    )
    if n_rep > 1:
        out = out.reshape(B, n_heads, L, -1)
    return out


def scaled_dot_product_attention(
    queries: mx.array,
    keys,
    values,
    cache,
    scale: float,
    mask,
) -> mx.array:
    """Multi-head attention; dispatches on whether the cache is quantized.

    ``queries`` is [B, n_heads, L, D]; keys/values are [B, n_kv_heads, S, D]
    arrays, or (packed, scales, biases) tuples when ``cache`` quantizes (it
    then has ``bits`` and ``group_size`` attributes).
    """
    if hasattr(cache, "bits"):
        return _quantized_attention(
            queries,
            keys,
            values,
            scale=scale,
            mask=mask,
            group_size=cache.group_size,
            bits=cache.bits,
        )
    return mx.fast.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=mask
    )
