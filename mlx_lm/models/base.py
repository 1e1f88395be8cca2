"""Pieces shared by every model definition: argument parsing, masks, attention."""

import copy
import inspect
from dataclasses import dataclass
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict):
        """Build the arguments from a config dict, skipping keys the class lacks."""
        accepted = inspect.signature(cls).parameters
        return cls(**{key: val for key, val in params.items() if key in accepted})


def _row_slice(module: nn.Module, start: int, stop: int) -> nn.Module:
    """A copy of an embedding-like ``module`` (float or quantized) holding
    only the rows ``start:stop`` of each of its arrays."""
    part = copy.copy(module)
    part.update({k: v[start:stop] for k, v in tree_flatten(module.parameters())})
    return part


class VocabShardedEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split across ``group``.

    A lookup reads the rows this rank holds, zeros elsewhere, and sums the
    ranks' results (one all-reduce of the hidden states); ``as_linear`` (a tied
    output head) scores this rank's part of the vocabulary and gathers the
    parts in rank order. Both equal the unsplit module's results exactly.
    """

    def __init__(self, embedding: nn.Module, group):
        super().__init__()
        rows = embedding.weight.shape[0] // group.size()
        self.start = group.rank() * rows
        self.rows = rows
        self.group = group
        self.part = _row_slice(embedding, self.start, self.start + rows)

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        h = self.part(mx.where(mine, local, 0))
        h = mx.where(mine[..., None], h, mx.zeros((), h.dtype))
        return mx.distributed.all_sum(h, group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        return _gather_last(self.part.as_linear(x), self.group)


class VocabShardedHead(nn.Module):
    """An output projection whose rows are split across ``group``: each rank
    scores its part of the vocabulary, the parts are gathered in rank order."""

    def __init__(self, head: nn.Module, group):
        super().__init__()
        from mlx.nn.layers.distributed import shard_linear

        self.group = group
        # all-to-sharded keeps this rank's rows and takes the whole input.
        self.part = shard_linear(head, "all-to-sharded", group=group)

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_last(self.part(x), self.group)


def _gather_last(x: mx.array, group) -> mx.array:
    """Concatenate every rank's ``x`` along the last axis, in rank order."""
    gathered = mx.distributed.all_gather(mx.moveaxis(x, -1, 0), group=group)
    return mx.moveaxis(gathered, 0, -1)


def shard_layers(model, group) -> None:
    """Tensor parallelism in place: split every layer's attention heads and MLP
    columns across ``group`` (an ``mx.distributed`` group).

    The query, key and value projections and the MLP's gate and up projections
    keep their rank's share of output rows (all-to-sharded); the output and
    down projections take that share of input columns and sum the ranks'
    partial results (sharded-to-all, one all-reduce each per layer). Fused
    projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are split part by
    part. Quantized layers stay quantized. Each rank then holds
    ``n_kv_heads / group.size()`` KV heads, so its caches hold only those, and
    the model's ``tensor_group`` is set for the caches that must agree across
    ranks (see ``CompressedKVCache.group``).
    """
    from mlx.nn.layers.distributed import shard_linear

    def split(module, name, how, segments=1):
        layer = shard_linear(getattr(module, name), how, segments=segments, group=group)
        setattr(module, name, layer)

    n = group.size()
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.n_heads % n or attn.n_kv_heads % n:
            raise ValueError(
                f"layer {i} has {attn.n_heads} query and {attn.n_kv_heads} KV heads, "
                f"which {n} ranks cannot share evenly"
            )
        if hasattr(attn, "qkv_proj"):
            q_dim = attn.n_heads * attn.head_dim
            kv_dim = attn.n_kv_heads * attn.head_dim
            split(attn, "qkv_proj", "all-to-sharded", [q_dim, q_dim + kv_dim])
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                split(attn, name, "all-to-sharded")
        split(attn, "o_proj", "sharded-to-all")
        attn.n_heads //= n
        attn.n_kv_heads //= n
        if hasattr(mlp, "gate_up_proj"):
            split(mlp, "gate_up_proj", "all-to-sharded", 2)
        else:
            split(mlp, "gate_proj", "all-to-sharded")
            split(mlp, "up_proj", "all-to-sharded")
        split(mlp, "down_proj", "sharded-to-all")
    # The vocabulary too, when the ranks can share it evenly: with a large
    # vocabulary (49K to 262K rows) it is a fifth or more of a small model.
    inner = model.model
    if inner.embed_tokens.weight.shape[0] % n == 0:
        inner.embed_tokens = VocabShardedEmbedding(inner.embed_tokens, group)
        if hasattr(model, "lm_head"):
            model.lm_head = VocabShardedHead(model.lm_head, group)
    model.tensor_group = group


def shard_pipeline(model, group) -> None:
    """Pipeline parallelism in place: each rank of ``group`` keeps a run of
    consecutive layers (the first rank the first run) and drops the others,
    so its caches hold only its layers.

    The first rank embeds the tokens; every other rank receives the hidden
    states from the rank before it, runs its layers and passes them on; the
    last rank's output is then gathered by all, which finish with the norm and
    the output head (kept whole on every rank). ``model.pipeline_group`` is set.
    """
    layers = model.model.layers
    n, rank = group.size(), group.rank()
    if len(layers) < n:
        raise ValueError(f"{len(layers)} layers cannot be shared by {n} ranks")
    counts = [len(layers) // n + (i < len(layers) % n) for i in range(n)]
    start = sum(counts[:rank])
    model.model.layers = layers[start : start + counts[rank]]
    model.model.pipeline_group = model.pipeline_group = group


class Parallel:
    """``shard`` and ``pipeline`` for a model with ``model.layers`` of
    attention + MLP blocks (every architecture here mixes it in)."""

    def shard(self, group: Optional[mx.distributed.Group] = None):
        """Split every layer across ``group`` (default: the global group) for
        tensor parallelism; see :func:`shard_layers`."""
        shard_layers(self, group or mx.distributed.init())

    def pipeline(self, group: Optional[mx.distributed.Group] = None):
        """Keep this rank's run of layers of a pipeline over ``group``; see
        :func:`shard_pipeline`."""
        shard_pipeline(self, group or mx.distributed.init())


def receive_hidden(inputs: mx.array, width: int, dtype, group) -> mx.array:
    """The hidden states of ``inputs`` ([B, L] ids) from the previous rank."""
    return mx.distributed.recv(
        (*inputs.shape, width), dtype, group.rank() - 1, group=group
    )


def pass_hidden(h: mx.array, group) -> mx.array:
    """After a rank's layers: hand ``h`` to the next rank; every rank returns
    the last rank's output (an identity without a pipeline)."""
    if group is None:
        return h
    if group.rank() < group.size() - 1:
        h = mx.distributed.send(h, group.rank() + 1, group=group)
    out = mx.distributed.all_gather(h, group=group)[-h.shape[0] :]
    # Evaluated here: a prefill evaluates only the caches, which on every
    # rank but the last do not depend on the send, and the next rank would
    # wait for it forever.
    mx.eval(out)
    return out


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


def _attention_weights(queries, keys, scale: float, mask, quantized) -> mx.array:
    """softmax(Q K^T * scale) written out, the query heads grouped under the KV
    head they share: shape [B, n_kv_heads, n_rep, L, S].

    ``keys`` is an array, or a (packed, scales, biases) triple when
    ``quantized`` is ``(group_size, bits)``.
    """
    B, n_heads, L, D = queries.shape
    n_kv_heads = (keys[0] if quantized else keys).shape[1]
    queries = (queries * scale).reshape(B, n_kv_heads, n_heads // n_kv_heads, L, D)
    if quantized:
        group_size, bits = quantized
        scores = mx.quantized_matmul(
            queries,
            *(mx.expand_dims(part, 2) for part in keys),
            transpose=True,
            group_size=group_size,
            bits=bits,
        )
    else:
        scores = queries @ mx.expand_dims(keys, 2).swapaxes(-1, -2)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"Unsupported attention mask {mask!r}")
        # The queries are the last L positions of the S keys.
        S = scores.shape[-1]
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    if mask is not None:
        if mask.ndim > 3:
            # [B, H, L, S] masks gain the n_rep axis.
            mask = mx.expand_dims(mask, -3)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    return mx.softmax(scores, axis=-1, precise=True)


def _weighted_values(weights: mx.array, values, quantized) -> mx.array:
    """Weights from :func:`_attention_weights` applied to ``values``: [B, H, L, D]."""
    if quantized:
        group_size, bits = quantized
        out = mx.quantized_matmul(
            weights,
            *(mx.expand_dims(part, 2) for part in values),
            transpose=False,
            group_size=group_size,
            bits=bits,
        )
    else:
        out = weights @ mx.expand_dims(values, 2)
    B, n_kv_heads, n_rep, L, D = out.shape
    return out.reshape(B, n_kv_heads * n_rep, L, D)


def _fused_attention(queries, keys, values, scale: float, mask) -> mx.array:
    """``mx.fast.scaled_dot_product_attention``, with one-token GQA steps folded on the CPU.

    A single unmasked query per head is reshaped so that the query heads sharing a KV
    head become the rows of one query block ([B, n_kv_heads, n_rep, D]). The result is
    the same; on MLX's CPU backend this form is faster (README, "This fork against
    upstream mlx-lm").
    """
    B, n_heads, L, D = queries.shape
    n_kv_heads = keys.shape[1]
    if (
        L == 1
        and mask is None
        and n_heads > n_kv_heads
        and mx.default_device() == mx.cpu
    ):
        folded = queries.reshape(B, n_kv_heads, n_heads // n_kv_heads, D)
        out = mx.fast.scaled_dot_product_attention(folded, keys, values, scale=scale)
        return out.reshape(B, n_heads, 1, values.shape[-1])
    return mx.fast.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=mask
    )


# Query rows from which float32 attention on the CPU reads dequantized keys.
DEQUANTIZED_ATTENTION_ROWS = 4


def _attend_dequantized(queries: mx.array) -> bool:
    """Whether attention to a quantized cache runs on a float32 copy of it.

    MLX's CPU ``quantized_matmul`` is written for one float32 query row: with a
    prompt chunk, or in half precision at any length, dequantizing the layer's
    keys and values and attending in float32 is several times faster (README,
    "Quantized weights and KV cache on the CPU"). Elsewhere the quantized
    product runs.
    """
    if mx.default_device() != mx.cpu:
        return False
    return queries.dtype != mx.float32 or queries.shape[2] >= DEQUANTIZED_ATTENTION_ROWS


def _dequantized(triple, group_size: int, bits: int) -> mx.array:
    packed, scales, biases = triple
    return mx.dequantize(
        packed,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=group_size,
        bits=bits,
    )


def _mapped(x: mx.array, matrix: mx.array) -> mx.array:
    """``x`` [B, n_heads, L, D] times ``matrix`` ([D, D'], or [n_kv_heads, D,
    D'] for the query heads of each KV head), in float32."""
    x32 = x.astype(mx.float32)
    if matrix.ndim == 2:
        return (x32 @ matrix).astype(x.dtype)
    B, n_heads, L, D = x.shape
    H = matrix.shape[0]
    grouped = x32.reshape(B, H, n_heads // H, L, D) @ matrix[None, :, None]
    return grouped.reshape(B, n_heads, L, -1).astype(x.dtype)


def scaled_dot_product_attention(
    queries: mx.array,
    keys,
    values,
    cache,
    scale: float,
    mask,
) -> mx.array:
    """Multi-head attention (GQA handled) against one layer's keys and values.

    ``queries`` is [B, n_heads, L, D]; keys/values are [B, n_kv_heads, S, D]
    arrays, or (packed, scales, biases) triples when ``cache`` quantizes (it
    then has ``bits`` and ``group_size`` attributes).

    A cache whose ``observed_queries`` is positive (an attention-scored window)
    also gets the attention weights of that many of the newest queries, summed
    over those queries and over the query heads of each KV head ([B,
    n_kv_heads, S]), through ``cache.observe_attention``. The output is the
    same either way; it depends on the updated totals, so evaluating it
    computes them too. A cache with a positive ``query_window`` (a
    query-aware eviction policy) is handed the queries themselves through
    ``cache.observe_queries``. A cache whose ``use_fused_sdpa`` is false gets
    the written-out softmax instead of the fused kernel. A cache with a
    ``key_map`` (``value_map``) returns keys (values) in a mapped space: the
    queries (the output) are mapped alike (README, "KV quantization
    methods").
    """
    if getattr(cache, "query_window", 0):
        cache.observe_queries(queries, scale)
    key_map = getattr(cache, "key_map", None)
    if key_map is not None:
        queries = _mapped(queries, key_map)
    quantized = (cache.group_size, cache.bits) if hasattr(cache, "bits") else None
    dtype = queries.dtype
    if quantized and _attend_dequantized(queries):
        keys, values = (_dequantized(part, *quantized) for part in (keys, values))
        queries, quantized = queries.astype(mx.float32), None
    observed = getattr(cache, "observed_queries", 0)
    fused = getattr(cache, "use_fused_sdpa", True)
    weights = None
    if quantized or observed >= queries.shape[2] or not fused:
        weights = _attention_weights(queries, keys, scale, mask, quantized)
        out = _weighted_values(weights, values, quantized)
    else:
        out = _fused_attention(queries, keys, values, scale, mask)
    value_map = getattr(cache, "value_map", None)
    if value_map is not None:
        out = _mapped(out, mx.swapaxes(value_map, -1, -2))
    out = out.astype(dtype)
    if not observed:
        return out
    if weights is None:
        # A long chunk: only its last queries are written out a second time.
        if isinstance(mask, mx.array):
            mask = mask[..., -observed:, :]
        tail = queries[:, :, -observed:, :]
        weights = _attention_weights(tail, keys, scale, mask, quantized)
    if weights.shape[3] > observed:
        weights = weights[..., -observed:, :]
    received = weights.sum(axis=(2, 3))
    return mx.depends(out, cache.observe_attention(received))
