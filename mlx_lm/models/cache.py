"""Key/value caches for attention layers and prompt-cache files.

Growing caches keep a pre-allocated buffer along the sequence axis (axis 2 of
``[batch, kv_heads, seq, head_dim]``). When an update does not fit, the buffer
is replaced once by one of ``max(needed, capacity * 9 / 8)`` slots, so that
appending ``n`` tokens one at a time costs ``O(log n)`` allocations and about
eight copies of each token in all, while the buffer stays within 1.15x of what
it holds past ``4 * step`` tokens (``_grown_capacity``).
"""

import copy
import json
import os
import uuid
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import kv_quant
from .base import create_causal_mask
from .eviction import (  # noqa: F401 (the policies, re-exported)
    COMPACT_MODES,
    COMPACT_POLICIES,
    COMPACT_SCOPES,
    DEFAULT_COMPACT_POLICY,
    KEY_SCORERS,
    PER_TOKEN_POLICIES,
    QUERY_SCORERS,
    SNAPKV_SPREAD,
    SNAPKV_WINDOW,
    score_keydiff,
    score_l2_high,
    score_l2_low,
    score_snapkv,
    select_kept,
)
from .kv_config import (  # noqa: F401 (the options, re-exported)
    KV_BITS,
    KV_GROUP_SIZES,
    METHOD_FIELDS,
    WINDOW_STRATEGIES,
    KVCacheConfig,
    _check_choice,
    _check_int,
    _check_window,
    default_kv_group_size,
    model_head_dim,
)
from .kv_quant import (  # noqa: F401 (the catalogue of KV quantization methods)
    KV_METHODS,
    AffineCodec,
    CommVQCodec,
    KeyNormObserver,
    NpyArtifactStore,
    PolarQuantCodec,
    QJLCodec,
    RaBitQCodec,
    RateQuantCodec,
    SpectralCodec,
    TurboQuantCodec,
    VecInferCodec,
    calibrate_spectral_rotation,
)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _grown_capacity(capacity: int, needed: int, step: int) -> int:
    """Slots for at least ``needed``: whole steps while small, then an eighth
    more than ``capacity``, rounded to a grain of at most 1/64 of it (so the
    buffer is at most 1.125 * 65 / 64 of the slots it holds)."""
    grown = max(needed, capacity + capacity // 8)
    if grown <= 4 * step:
        return _round_up(grown, step)
    grain = 1 << max(0, (grown // 64).bit_length() - 1)
    return _round_up(grown, min(step, max(16, grain)))


def _reserve(old, like, start: int, stop: int, capacity: int):
    """A zero buffer shaped like ``like`` with ``capacity`` slots on axis 2,
    holding ``old[..., start:stop, :]`` at its front."""
    shape = list(like.shape)
    shape[2] = capacity
    fresh = mx.zeros(shape, like.dtype)
    if old is not None and stop > start:
        fresh[..., : stop - start, :] = old[..., start:stop, :]
    return fresh


def _own(x):
    # A new handle on the same data: later in-place writes through the cache
    # rebind this handle only, never an array object the caller still holds.
    return x[...]


def create_attention_mask(
    N: int, offset: int, return_array: bool = False, window_size=None
):
    """The mask for ``N`` queries after ``offset`` cached positions: None for a
    lone query, ``"causal"`` for the kernel to build, or a boolean array when
    asked for or a window hides something. Caches build theirs from it (so do
    clients' caches: the name and signature are upstream's for this module;
    :func:`~mlx_lm.models.base.create_attention_mask` is the model-side one)."""
    if window_size is not None and offset + N > window_size:
        return create_causal_mask(N, offset, window_size=window_size)
    if N == 1:
        return None
    if return_array:
        return create_causal_mask(N, offset)
    return "causal"


def _roll_rows(x, shifts):
    """Roll every batch row of ``x`` along axis 2 by its own amount."""
    n = x.shape[2]
    source = (mx.arange(n)[None] - shifts[:, None]) % n
    return mx.take_along_axis(x, source[:, None, :, None], axis=2)


def _is_empty_state(v) -> bool:
    # Missing entries come back from a file as [] or {}.
    return v is None or len(v) == 0


class _BaseCache:
    """Common interface of all caches. Subclasses override what they hold."""

    @property
    def state(self):
        return []

    @state.setter
    def state(self, v):
        if not _is_empty_state(v):
            raise ValueError(f"{type(self).__name__} holds no arrays, got {v!r}")

    @property
    def meta_state(self):
        return ""

    @meta_state.setter
    def meta_state(self, v):
        if v:
            raise ValueError(f"{type(self).__name__} has no meta state, got {v!r}")

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        return 0

    def size(self) -> int:
        return 0

    @property
    def nbytes(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not report nbytes")

    def empty(self) -> bool:
        raise NotImplementedError(f"{type(self).__name__} does not report empty()")

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        return create_attention_mask(N, self.size(), return_array, window_size)

    @classmethod
    def from_state(cls, state, meta_state):
        cache = cls.__new__(cls)
        cache.state = state
        cache.meta_state = meta_state
        return cache


class QuantizedKVCache(_BaseCache):
    """KV cache stored as ``mx.quantize`` triples ``(packed, scales, biases)``."""

    step = 256

    def __init__(self, group_size: int = 64, bits: int = 8):
        self.keys = None
        self.values = None
        self.offset = 0
        self.group_size = group_size
        self.bits = bits
        self.allocations = 0

    def update_and_fetch(self, keys, values):
        new_keys = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        new_values = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        start = self.offset
        stop = start + keys.shape[2]
        capacity = 0 if self.keys is None else self.keys[0].shape[2]
        if stop > capacity:
            capacity = _grown_capacity(capacity, stop, self.step)
            old_keys = self.keys or (None,) * len(new_keys)
            old_values = self.values or (None,) * len(new_values)
            self.keys = tuple(
                _reserve(o, n, 0, start, capacity) for o, n in zip(old_keys, new_keys)
            )
            self.values = tuple(
                _reserve(o, n, 0, start, capacity)
                for o, n in zip(old_values, new_values)
            )
            self.allocations += 1
        for buffer, part in zip(self.keys + self.values, new_keys + new_values):
            buffer[..., start:stop, :] = part
        self.offset = stop
        return (
            tuple(x[..., :stop, :] for x in self.keys),
            tuple(x[..., :stop, :] for x in self.values),
        )

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        capacity = self.keys[0].shape[2]
        return sum(x.nbytes // capacity * self.offset for x in self.keys + self.values)

    @property
    def state(self):
        if self.keys is None:
            return []
        return (
            tuple(x[..., : self.offset, :] for x in self.keys),
            tuple(x[..., : self.offset, :] for x in self.values),
        )

    @state.setter
    def state(self, v):
        self.allocations = 0
        if _is_empty_state(v):
            self.keys = self.values = None
        else:
            self.keys = tuple(_own(x) for x in v[0])
            self.values = tuple(_own(x) for x in v[1])

    def keys_and_values(self):
        """The held ``(keys, values)`` triples, without the spare room."""
        return self.state if self.keys is not None else (None, None)

    @property
    def meta_state(self):
        return tuple(str(x) for x in (self.offset, self.group_size, self.bits))

    @meta_state.setter
    def meta_state(self, v):
        self.offset, self.group_size, self.bits = (int(x) for x in v)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


class KVCache(_BaseCache):
    """Append-only KV cache with geometric buffer growth."""

    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0
        self.allocations = 0

    def update_and_fetch(self, keys, values):
        start = self.offset
        stop = start + keys.shape[2]
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if stop > capacity:
            capacity = _grown_capacity(capacity, stop, self.step)
            self.keys = _reserve(self.keys, keys, 0, start, capacity)
            self.values = _reserve(self.values, values, 0, start, capacity)
            self.allocations += 1
        self.keys[..., start:stop, :] = keys
        self.values[..., start:stop, :] = values
        self.offset = stop
        return self.keys[..., :stop, :], self.values[..., :stop, :]

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        per_slot = (self.keys.nbytes + self.values.nbytes) // self.keys.shape[2]
        return per_slot * self.offset

    def keys_and_values(self):
        """The held ``(keys, values)``, without the spare room."""
        return self.state if self.keys is not None else (None, None)

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, v):
        self.allocations = 0
        if _is_empty_state(v):
            self.keys = self.values = None
            self.offset = 0
        else:
            self.keys, self.values = _own(v[0]), _own(v[1])
            self.offset = self.keys.shape[2]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedKVCache:
        quantized = QuantizedKVCache(group_size=group_size, bits=bits)
        if self.keys is not None:
            keys, values = self.state
            quantized.keys = mx.quantize(keys, group_size=group_size, bits=bits)
            quantized.values = mx.quantize(values, group_size=group_size, bits=bits)
            quantized.offset = self.offset
        return quantized

    @classmethod
    def merge(cls, caches):
        return BatchKVCache.merge(caches)


class RotatingKVCache(_BaseCache):
    """Bounded cache: the first ``keep`` tokens plus the most recent ones.

    Single-token updates write into a ring of ``max_size`` slots (slots
    ``[0, keep)`` are never overwritten). Multi-token updates rebuild the
    buffer in time order so that every new token still sees ``max_size - 1``
    earlier tokens; the buffer can then briefly hold more than ``max_size``.
    ``offset`` counts all tokens ever added; ``_idx`` is the next slot to write.
    """

    step = 256

    def __init__(self, max_size: int, keep: int = 0):
        if max_size < 1:
            raise ValueError(f"max_size must be positive, got {max_size}")
        if not 0 <= keep < max_size:
            raise ValueError(f"keep must be in [0, max_size), got keep={keep}")
        self.max_size = max_size
        self.keep = keep
        self.keys = None
        self.values = None
        self.offset = 0
        self._idx = 0

    def size(self) -> int:
        if self.keys is None:
            return 0
        return min(self.offset, self.keys.shape[2])

    def _in_time_order(self, buffer):
        n = self.size()
        if self._idx >= n:
            return buffer[..., :n, :]
        k = self.keep
        return mx.concatenate(
            [
                buffer[..., :k, :],
                buffer[..., self._idx : n, :],
                buffer[..., k : self._idx, :],
            ],
            axis=2,
        )

    def _drop_oldest(self, buffer, count: int):
        if count <= 0:
            return buffer
        k = self.keep
        return mx.concatenate([buffer[..., :k, :], buffer[..., k + count :, :]], axis=2)

    def _append_many(self, keys, values):
        n = self.size()
        if n == 0:
            self.keys, self.values = _own(keys), _own(values)
        else:
            drop = n - (self.max_size - 1)
            old_keys = self._drop_oldest(self._in_time_order(self.keys), drop)
            old_values = self._drop_oldest(self._in_time_order(self.values), drop)
            self.keys = mx.concatenate([old_keys, keys], axis=2)
            self.values = mx.concatenate([old_values, values], axis=2)
        self.offset += keys.shape[2]
        self._idx = self.keys.shape[2]

    def _append_one(self, keys, values):
        excess = self.size() - self.max_size
        if excess > 0:
            # Left over from a multi-token update: back to max_size slots.
            self.keys = self._drop_oldest(self.keys, excess)
            self.values = self._drop_oldest(self.values, excess)
            self._idx = self.max_size
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if self._idx == capacity and capacity < self.max_size:
            grown = _grown_capacity(capacity, capacity + 1, self.step)
            grown = min(self.max_size, grown)
            self.keys = _reserve(self.keys, keys, 0, self._idx, grown)
            self.values = _reserve(self.values, values, 0, self._idx, grown)
        if self._idx == self.max_size:
            self._idx = self.keep
        self.keys[..., self._idx : self._idx + 1, :] = keys
        self.values[..., self._idx : self._idx + 1, :] = values
        self._idx += 1
        self.offset += 1

    def update_and_fetch(self, keys, values):
        if keys.shape[2] == 1:
            self._append_one(keys, values)
        else:
            self._append_many(keys, values)
        n = self.size()
        return self.keys[..., :n, :], self.values[..., :n, :]

    def _layout_after(self, N: int):
        """(slots in use, next write slot) once ``N`` more tokens are added."""
        n = self.size()
        if N > 1:
            used = min(n, self.max_size - 1) + N
            return used, used
        if n < self.max_size:
            return n + 1, n + 1
        wraps = n > self.max_size or self._idx == self.max_size
        return self.max_size, (self.keep if wraps else self._idx) + 1

    def _positions_after(self, N: int):
        """Absolute token position held by every slot after adding ``N``."""
        used, next_slot = self._layout_after(N)
        end = self.offset + N
        slots = mx.arange(used)
        ring = max(used - self.keep, 1)
        back = (next_slot - slots - 1) % ring + 1
        return mx.where(slots < self.keep, slots, end - back)

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """``window_size`` is the layer's own window (the model's): it hides the
        kept first tokens too once the queries are that far past them."""
        ring = self.max_size if window_size is None else min(window_size, self.max_size)
        used, _ = self._layout_after(N)
        end = self.offset + N
        far_keep = window_size is not None and self.keep > 0 and end > window_size
        # Oldest non-kept slot is (used - keep - 1) tokens behind the newest.
        unrestricted = used - self.keep <= ring and not far_keep
        if N == 1 and unrestricted:
            return None
        if N > 1 and unrestricted and not return_array:
            return "causal"
        positions = self._positions_after(N)[None]
        distance = mx.arange(self.offset, end)[:, None] - positions
        visible = (distance < ring) | (positions < self.keep)
        if window_size is not None:
            visible = visible & (distance < window_size)
        return visible & (distance >= 0)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        per_slot = (self.keys.nbytes + self.values.nbytes) // self.keys.shape[2]
        return per_slot * self.size()

    @property
    def state(self):
        if self.keys is None:
            return []
        n = self.size()
        return self.keys[..., :n, :], self.values[..., :n, :]

    @state.setter
    def state(self, v):
        if _is_empty_state(v):
            self.keys = self.values = None
        else:
            self.keys, self.values = _own(v[0]), _own(v[1])

    @property
    def meta_state(self):
        return tuple(str(x) for x in (self.keep, self.max_size, self.offset, self._idx))

    @meta_state.setter
    def meta_state(self, v):
        self.keep, self.max_size, self.offset, self._idx = (int(x) for x in v)

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def trim(self, n: int) -> int:
        if not self.is_trimmable():
            return 0
        n = min(self.offset, n)
        self.offset -= n
        self._idx -= n
        return n

    def to_quantized(
        self, group_size: int = 64, bits: int = 4
    ) -> "SlidingWindowKVCache":
        """The same bound over quantized storage: a ``SlidingWindowKVCache`` of
        ``max_size`` tokens keeping the first ``keep`` ("fixed" strategy) around
        a ``QuantizedKVCache``. It evicts in blocks, so it holds up to
        ``max_size + 32`` slots, the surplus hidden by its mask."""
        ordered = KVCache()
        if self.keys is not None:
            ordered.state = (
                self._in_time_order(self.keys),
                self._in_time_order(self.values),
            )
        window = SlidingWindowKVCache(
            ordered.to_quantized(group_size=group_size, bits=bits),
            self.max_size,
            "fixed",
            fixed_prefix_size=self.keep,
        )
        dropped = self.offset - ordered.offset
        window.offset = self.offset
        window.evictions = window.tokens_evicted = dropped
        window._floor = ordered.offset if dropped else 0
        return window


def _fit(x, n: int):
    """``x`` cut or zero-padded to ``n`` entries along its last axis."""
    if x.shape[-1] >= n:
        return x[..., :n]
    return mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _time_ordered(rotating: "RotatingKVCache", window_size: int):
    """The tokens of ``rotating`` in a :class:`KVCache`, oldest first, and how
    many it had already dropped."""
    if rotating.max_size < window_size:
        raise ValueError(
            f"the inner RotatingKVCache keeps at most {rotating.max_size} tokens, "
            f"fewer than window_size ({window_size})"
        )
    ordered = KVCache()
    if rotating.keys is not None:
        ordered.state = (
            rotating._in_time_order(rotating.keys),
            rotating._in_time_order(rotating.values),
        )
    return ordered, rotating.offset - ordered.offset


# What validation errors call the window settings: the constructor's
# arguments (the KVCacheConfig fields are kv_config._WINDOW_OPTIONS).
_WINDOW_ARGS = (
    "window_size",
    "eviction_strategy",
    "fixed_prefix_size",
    "eviction_attention_window",
)


class SlidingWindowKVCache(_BaseCache):
    """A bounded window of tokens stored in ``inner_cache``, which holds them in
    time order: a ``KVCache``, ``QuantizedKVCache`` or ``CodecKVCache``, or a
    compressed cache of any of these storages (its own eviction by score then
    runs within the window, and the mask shows every held token once it has
    evicted). A ``RotatingKVCache`` of at least ``window_size`` tokens is
    taken over, oldest first, into a ``KVCache``.

    ``eviction_strategy`` decides which tokens stay:

    * ``"fifo"``: the newest ``window_size``;
    * ``"fixed"``: the first ``fixed_prefix_size`` and the newest rest;
    * ``"attention"``: the first ``fixed_prefix_size`` and the newest
      ``eviction_attention_window`` always; of the others, per KV head, those
      that received the most attention since the last eviction. The attention
      layer hands the weights over through :meth:`observe_attention` when
      :attr:`observed_queries` asks for them.

    Eviction works in blocks (hysteresis) instead of copying the window on
    every token: the cache grows to ``window_size + eviction_attention_window``
    slots, and the update after that first drops back to ``window_size`` in
    one pass. For ``"attention"`` a block is exactly the decode steps that
    score its candidates. For ``"fifo"`` and ``"fixed"`` the mask hides the
    surplus, so every query sees exactly its window.

    A chunk of several tokens is appended whole, and evicted from at the next
    update. Within a chunk, under ``"fifo"`` and ``"fixed"`` each query sees
    exactly what it would see if the chunk came one token at a time; under
    ``"attention"`` it sees every token kept before the chunk and the chunk up
    to itself, so at least the window.

    ``offset`` counts every token ever added (RoPE positions stay absolute);
    ``size()`` is the number of slots in use, which writes and masks follow.
    """

    def __init__(
        self,
        inner_cache,
        window_size: int,
        eviction_strategy: str = "fifo",
        fixed_prefix_size: int = 0,
        eviction_attention_window: int = 32,
    ):
        dropped = 0
        if isinstance(inner_cache, RotatingKVCache):
            inner_cache, dropped = _time_ordered(inner_cache, window_size)
        if type(inner_cache).__name__ not in _WINDOW_INNER:
            raise ValueError(
                f"inner_cache must be one of {sorted(_WINDOW_INNER)} or a "
                f"RotatingKVCache, got {type(inner_cache).__name__}"
            )
        _check_window(
            window_size,
            eviction_strategy,
            fixed_prefix_size,
            eviction_attention_window,
            _WINDOW_ARGS,
        )
        self.inner = inner_cache
        self.window_size = window_size
        self.eviction_strategy = eviction_strategy
        self.fixed_prefix_size = fixed_prefix_size
        self.eviction_attention_window = eviction_attention_window
        # Tokens already seen are positions 0 .. offset - 1.
        self.offset = inner_cache.offset + dropped
        self.evictions = self.tokens_evicted = dropped
        # Slots present right after the last eviction: trim never goes below.
        self._floor = inner_cache.size() if dropped else 0
        # "attention": weight received per slot since the last eviction, [B, H, n].
        self._scores = None

    # Which tokens stay.

    def _evicts_before(self, n_new: int) -> bool:
        size = self.inner.size()
        ceiling = self.window_size + self.eviction_attention_window
        return size > self.window_size and size + n_new > ceiling

    def _kept_slots(self, n: int) -> mx.array:
        """Ascending slots (of ``n``) that survive, shaped to index axis 2."""
        prefix = self.fixed_prefix_size
        if self.eviction_strategy == "attention":
            B, H = _parts(self.inner.keys)[0].shape[:2]
            scores = mx.zeros((B, H, n)) if self._scores is None else self._scores
            kept = select_kept(
                _fit(scores, n),
                self.window_size,
                protect_first=prefix,
                protect_last=self.eviction_attention_window,
            )
            return kept[..., None]
        # Slots are in time order, so the slot number itself ranks by recency.
        recency = mx.arange(n, dtype=mx.float32)
        kept = select_kept(recency, self.window_size, protect_first=prefix)
        return kept[None, None, :, None]

    def _evict(self):
        n, kept = self.inner.size(), self.window_size
        index = self._kept_slots(n)
        if isinstance(self.inner, CompressedKVCache):
            # A compressed inner cache keeps its own buffers (and its offset,
            # the next position): it gathers the survivors itself.
            B, H = _parts(self.inner.keys)[0].shape[:2]
            self.inner.compact(mx.broadcast_to(index[..., 0], (B, H, kept)))
            self._floor = kept
            self.evictions += 1
            self.tokens_evicted += n - kept
            self._scores = None
            return
        # The buffers get room for exactly one block of new tokens.
        room = kept + self.eviction_attention_window
        resize = _parts(self.inner.keys)[0].shape[2] != room
        self.inner.allocations += resize
        for name in ("keys", "values"):
            stored = getattr(self.inner, name)
            parts = []
            for part in _parts(stored):
                survivors = mx.take_along_axis(part[..., :n, :], index, axis=2)
                if resize:
                    part = _reserve(None, survivors, 0, 0, room)
                part[..., :kept, :] = survivors
                parts.append(part)
            if isinstance(stored, mx.array):
                setattr(self.inner, name, parts[0])
            else:
                setattr(self.inner, name, tuple(parts))
        self.inner.offset = self._floor = kept
        self.evictions += 1
        self.tokens_evicted += n - kept
        self._scores = None

    def update_and_fetch(self, keys, values):
        if self._evicts_before(keys.shape[2]):
            self._evict()
        self.offset += keys.shape[2]
        return self.inner.update_and_fetch(keys, values)

    @property
    def observed_queries(self) -> int:
        """How many of the newest queries of each call should report their
        attention weights to :meth:`observe_attention` (0: none)."""
        if self.eviction_strategy == "attention":
            return self.eviction_attention_window
        return 0

    def observe_attention(self, received: mx.array) -> mx.array:
        """Add ``received`` ([B, n_kv_heads, size()]: attention weights summed over
        the observed queries and the query heads of each KV head) to the
        per-slot totals. Returns the new totals, which the caller ties to its
        output so that they are computed along with it."""
        if received.dtype != mx.float32:
            received = received.astype(mx.float32)
        if self._scores is not None:
            received = received + _fit(self._scores, received.shape[-1])
        self._scores = received
        return received

    def eviction_stats(self) -> "EvictionStats":
        return EvictionStats(self.evictions, self.tokens_evicted, self.size())

    # The common cache interface.

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        held = self.window_size if self._evicts_before(N) else self.inner.size()
        total, end = held + N, self.offset + N
        prefix = self.fixed_prefix_size
        if self.eviction_strategy == "attention" or self._unordered():
            # Slots no longer map to positions; a model's own window can only
            # be honoured while it cannot hide anything.
            if window_size is not None and window_size < end:
                raise ValueError(
                    f"the 'attention' strategy cannot apply a window of {window_size} "
                    "tokens of the model's own; give such layers their own cache"
                )
            return create_attention_mask(N, held, return_array, None)
        # Slot j holds position j in the prefix and end - total + j after it.
        first = 0 if prefix else end - total
        hides_nothing = window_size is None or end - first <= window_size
        if total <= self.window_size and hides_nothing:
            return create_attention_mask(N, held, return_array, None)
        slots = mx.arange(total)
        positions = mx.where(slots < prefix, slots, slots + end - total)
        distance = mx.arange(end - N, end)[:, None] - positions[None]
        recent = distance < self.window_size - prefix
        visible = (distance >= 0) & ((positions < prefix) | recent)
        if window_size is not None:
            visible = visible & (distance < window_size)
        return visible

    def _unordered(self) -> bool:
        """Whether slots stopped matching positions: an inner compressed cache
        that evicted by score. The mask then shows every held token."""
        return getattr(self.inner, "compactions", 0) > 0

    @property
    def query_window(self) -> int:
        return getattr(self.inner, "query_window", 0)

    @property
    def use_fused_sdpa(self) -> bool:
        return getattr(self.inner, "use_fused_sdpa", True)

    @property
    def key_map(self):
        return getattr(self.inner, "key_map", None)

    @property
    def value_map(self):
        return getattr(self.inner, "value_map", None)

    def observe_queries(self, queries, scale):
        self.inner.observe_queries(queries, scale)

    def size(self) -> int:
        return self.inner.size()

    def empty(self) -> bool:
        return self.inner.empty()

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    @property
    def bits(self) -> int:
        # An AttributeError here (plain inner cache) tells attention that the
        # layer is not quantized.
        return self.inner.bits

    @property
    def group_size(self) -> int:
        return self.inner.group_size

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest ``n`` tokens; refused (returns 0) when that would
        reach tokens that were there at the last eviction."""
        n = min(self.inner.size(), n)
        if n > self.inner.size() - self._floor:
            return 0
        n = self.inner.trim(n)
        self.offset -= n
        return n

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        """The same window over a ``QuantizedKVCache`` (``self`` when it already
        is quantized with these settings)."""
        if hasattr(self.inner, "bits"):
            if (group_size, bits) != (self.inner.group_size, self.inner.bits):
                raise ValueError(
                    f"cache is already quantized with group_size="
                    f"{self.inner.group_size}, bits={self.inner.bits}; got "
                    f"group_size={group_size}, bits={bits}"
                )
            return self
        quantized = copy.copy(self)
        quantized.inner = self.inner.to_quantized(group_size=group_size, bits=bits)
        return quantized

    @property
    def state(self):
        inner = self.inner.state
        if self._scores is None or _is_empty_state(inner):
            return [inner]
        return [inner, _fit(self._scores, self.inner.size())]

    @state.setter
    def state(self, v):
        v = [] if _is_empty_state(v) else list(v)
        self.inner.state = v[0] if v else []
        self._scores = v[1] if len(v) > 1 else None

    @property
    def meta_state(self):
        own = (
            type(self.inner).__name__,
            self.window_size,
            self.eviction_strategy,
            self.fixed_prefix_size,
            self.eviction_attention_window,
            self.offset,
            self._floor,
            self.evictions,
            self.tokens_evicted,
        )
        inner = self.inner.meta_state
        return tuple(str(x) for x in own) + (tuple(inner) if inner else ())

    @meta_state.setter
    def meta_state(self, v):
        name, size, strategy, prefix, span = v[:5]
        if name != type(self.inner).__name__:
            raise ValueError(
                f"meta state is for a {name} inner cache, this one holds a "
                f"{type(self.inner).__name__}"
            )
        size, prefix, span = int(size), int(prefix), int(span)
        _check_window(size, strategy, prefix, span, _WINDOW_ARGS)
        self.window_size, self.eviction_strategy = size, strategy
        self.fixed_prefix_size, self.eviction_attention_window = prefix, span
        counters = (int(x) for x in v[5:9])
        self.offset, self._floor, self.evictions, self.tokens_evicted = counters
        self.inner.meta_state = tuple(v[9:]) or ""
        self._floor = min(self._floor, self.inner.size())

    @classmethod
    def from_state(cls, state, meta_state):
        name = meta_state[0] if meta_state else None
        if name not in _WINDOW_INNER:
            raise ValueError(
                f"a SlidingWindowKVCache wraps one of {sorted(_WINDOW_INNER)}, "
                f"got {name!r}"
            )
        cache = cls.__new__(cls)
        cache.inner = _WINDOW_INNER[name].__new__(_WINDOW_INNER[name])
        cache.state = state
        cache.meta_state = meta_state
        return cache


class ChunkedKVCache(_BaseCache):
    """KV cache that can drop tokens from the front (see ``maybe_trim_front``).

    Valid tokens live at ``[_head, _head + size())`` of the buffer; dropping
    from the front only moves ``_head``. Growth compacts them to the front.
    """

    step = 256

    def __init__(self, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.keys = None
        self.values = None
        self.offset = 0
        self.start_position = 0
        self._head = 0
        self.allocations = 0

    def size(self) -> int:
        return self.offset - self.start_position

    def maybe_trim_front(self):
        excess = self.size() - self.chunk_size
        if self.keys is not None and excess > 0:
            self.start_position += excess
            self._head += excess

    def update_and_fetch(self, keys, values):
        used = self.size()
        start = self._head + used
        stop = start + keys.shape[2]
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if stop > capacity:
            grown = _grown_capacity(
                capacity - self._head, used + keys.shape[2], self.step
            )
            self.keys = _reserve(self.keys, keys, self._head, start, grown)
            self.values = _reserve(self.values, values, self._head, start, grown)
            self.allocations += 1
            self._head, start, stop = 0, used, used + keys.shape[2]
        self.keys[..., start:stop, :] = keys
        self.values[..., start:stop, :] = values
        self.offset += keys.shape[2]
        return (
            self.keys[..., self._head : stop, :],
            self.values[..., self._head : stop, :],
        )

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        per_slot = (self.keys.nbytes + self.values.nbytes) // self.keys.shape[2]
        return per_slot * self.size()

    @property
    def state(self):
        if self.keys is None:
            return []
        stop = self._head + self.size()
        return (
            self.keys[..., self._head : stop, :],
            self.values[..., self._head : stop, :],
        )

    @state.setter
    def state(self, v):
        self.allocations = 0
        self._head = 0
        self.start_position = 0
        if _is_empty_state(v):
            self.keys = self.values = None
            self.offset = 0
        else:
            self.keys, self.values = _own(v[0]), _own(v[1])
            self.offset = self.keys.shape[2]

    @property
    def meta_state(self):
        return str(self.chunk_size), str(self.start_position)

    @meta_state.setter
    def meta_state(self, v):
        chunk_size, start_position = (int(x) for x in v)
        # The stored arrays begin at start_position: shift offset to match.
        self.offset += start_position - self.start_position
        self.chunk_size, self.start_position = chunk_size, start_position

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.size(), n)
        self.offset -= n
        return n


class BatchKVCache(_BaseCache):
    """KV cache for a batch of left-padded sequences.

    ``left_padding[b]`` leading slots of row ``b`` are padding; ``offset[b]``
    is that row's number of real tokens (an ``mx.array``); ``_idx`` is the
    number of slots used, shared by all rows.
    """

    step = 256

    def __init__(self, left_padding: List[int]):
        self.keys = None
        self.values = None
        self.left_padding = mx.array(left_padding)
        self.offset = -self.left_padding
        self._idx = 0
        self._right_padding = None
        self.allocations = 0

    def update_and_fetch(self, keys, values):
        start = self._idx
        stop = start + keys.shape[2]
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if stop > capacity:
            capacity = _grown_capacity(capacity, stop, self.step)
            self.keys = _reserve(self.keys, keys, 0, start, capacity)
            self.values = _reserve(self.values, values, 0, start, capacity)
            self.allocations += 1
        self.keys[..., start:stop, :] = keys
        self.values[..., start:stop, :] = values
        self._idx = stop
        self.offset = self.offset + keys.shape[2]
        return self.keys[..., :stop, :], self.values[..., :stop, :]

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        """Add padding before a (right-padded) prefill.

        ``left_padding`` is only allowed while the cache is empty.
        ``right_padding`` is moved to the left by ``finalize()``.
        """
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError(
                    f"left_padding={left_padding} can only be added to an empty cache"
                )
            extra = mx.array(left_padding)
            self.left_padding = self.left_padding + extra
            self.offset = self.offset - extra
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self):
        """Rotate right padding from a prefill to the front of each row."""
        if self._right_padding is None:
            return
        # Rolling the whole buffer moves each row's right padding past _idx
        # (or around to the front), where the new left padding masks it.
        shift = self._right_padding
        self.keys = _roll_rows(self.keys, shift)
        self.values = _roll_rows(self.values, shift)
        self.offset = self.offset - shift
        self.left_padding = self.left_padding + shift
        self._right_padding = None

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        return create_causal_mask(
            N, self._idx, window_size=window_size, left_padding=self.left_padding
        )

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        per_slot = (self.keys.nbytes + self.values.nbytes) // self.keys.shape[2]
        return per_slot * self._idx

    @property
    def state(self):
        if self.keys is None:
            return self.offset, self.left_padding
        k = self.keys[..., : self._idx, :]
        v = self.values[..., : self._idx, :]
        return k, v, self.offset, self.left_padding

    @state.setter
    def state(self, v):
        self._right_padding = None
        self.allocations = 0
        if len(v) == 2:
            self.keys = self.values = None
            self.offset, self.left_padding = v
            self._idx = 0
        else:
            keys, values, self.offset, self.left_padding = v
            self.keys, self.values = _own(keys), _own(values)
            self._idx = self.keys.shape[2]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def filter(self, batch_indices):
        """Keep only the rows ``batch_indices`` (in that order), in place."""
        rows = mx.array(batch_indices)
        self.offset, self.left_padding = self.offset[rows], self.left_padding[rows]
        # Columns that are padding in every surviving row are dead weight.
        drop = self.left_padding.min().item()
        self.left_padding = self.left_padding - drop
        self._idx -= drop
        if self.keys is not None:
            self.keys = self.keys[rows, :, drop:, :]
            self.values = self.values[rows, :, drop:, :]

    def extend(self, other: "BatchKVCache"):
        """Append the rows of ``other`` after this cache's rows, in place.

        Both are right-aligned on the longer one's ``_idx``; the shorter gets
        extra left padding.
        """
        if self.keys is None and other.keys is None:
            self.offset = mx.concatenate([self.offset, other.offset])
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            return
        filled = self if self.keys is not None else other
        _, heads, _, k_dim = filled.keys.shape
        v_dim, dtype = filled.values.shape[3], filled.keys.dtype
        end = max(self._idx, other._idx)
        headroom = max(
            c.keys.shape[2] - c._idx for c in (self, other) if c.keys is not None
        )

        def aligned(cache, buffer, dim):
            rows = cache.offset.shape[0]
            if buffer is None:
                buffer = mx.zeros((rows, heads, 0, dim), dtype)
            pad = [(0, 0), (0, 0), (end - cache._idx, headroom), (0, 0)]
            return mx.pad(buffer[..., : cache._idx, :], pad)

        self.keys = mx.concatenate(
            [aligned(self, self.keys, k_dim), aligned(other, other.keys, k_dim)]
        )
        self.values = mx.concatenate(
            [aligned(self, self.values, v_dim), aligned(other, other.values, v_dim)]
        )
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate(
            [
                self.left_padding + (end - self._idx),
                other.left_padding + (end - other._idx),
            ]
        )
        self._idx = end

    def extract(self, idx: int) -> KVCache:
        """Row ``idx`` without its padding, as a standalone ``KVCache``."""
        cache = KVCache()
        if self.keys is None:
            return cache
        pad = self.left_padding[idx].item()
        cache.keys = mx.contiguous(self.keys[idx : idx + 1, :, pad : self._idx])
        cache.values = mx.contiguous(self.values[idx : idx + 1, :, pad : self._idx])
        cache.offset = cache.keys.shape[2]
        return cache

    @classmethod
    def merge(cls, caches) -> "BatchKVCache":
        """Batch single-sequence ``KVCache`` objects, left-padding the shorter."""
        lengths = [c.size() for c in caches]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        batch = cls(padding)
        if longest == 0:
            return batch
        filled = [c for c, n in zip(caches, lengths) if n > 0]
        _, heads, _, k_dim = filled[0].keys.shape
        v_dim, dtype = filled[0].values.shape[3], filled[0].keys.dtype
        capacity = _round_up(longest, cls.step)
        keys = mx.zeros((len(caches), heads, capacity, k_dim), dtype)
        values = mx.zeros((len(caches), heads, capacity, v_dim), dtype)
        for row, (cache, n, pad) in enumerate(zip(caches, lengths, padding)):
            if n > 0:
                keys[row : row + 1, :, pad:longest] = cache.keys[..., :n, :]
                values[row : row + 1, :, pad:longest] = cache.values[..., :n, :]
        batch.keys, batch.values = keys, values
        batch._idx = longest
        batch.offset = mx.array(lengths)
        batch.allocations = 1
        return batch


class CacheList(_BaseCache):
    """Several caches used by one layer, handled as a unit."""

    def __init__(self, *caches):
        self.caches = caches

    def __getitem__(self, idx):
        return self.caches[idx]

    def is_trimmable(self) -> bool:
        return all(c.is_trimmable() for c in self.caches)

    def trim(self, n: int) -> int:
        return min(c.trim(n) for c in self.caches)

    def size(self) -> int:
        return max(c.size() for c in self.caches)

    def empty(self) -> bool:
        return self.caches[0].empty()

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    @property
    def state(self):
        return [c.state for c in self.caches]

    @state.setter
    def state(self, v):
        for cache, s in zip(self.caches, v):
            cache.state = s

    @property
    def meta_state(self):
        return [type(c).__name__ for c in self.caches], [
            c.meta_state for c in self.caches
        ]

    @meta_state.setter
    def meta_state(self, v):
        for cache, m in zip(self.caches, v[1]):
            cache.meta_state = m

    @classmethod
    def from_state(cls, state, meta_state):
        names, metas = meta_state
        states = list(state) + [[]] * (len(names) - len(state))
        caches = [
            _cache_class(n).from_state(s, m) for n, s, m in zip(names, states, metas)
        ]
        return cls(*caches)

    def filter(self, batch_indices):
        for cache in self.caches:
            cache.filter(batch_indices)

    def extend(self, other: "CacheList"):
        for cache, more in zip(self.caches, other.caches):
            cache.extend(more)

    def extract(self, idx: int) -> "CacheList":
        return CacheList(*(c.extract(idx) for c in self.caches))

    @classmethod
    def merge(cls, caches) -> "CacheList":
        columns = zip(*(c.caches for c in caches))
        return cls(*(type(col[0]).merge(list(col)) for col in columns))

    def prepare(self, **kwargs):
        for cache in self.caches:
            cache.prepare(**kwargs)

    def finalize(self):
        for cache in self.caches:
            cache.finalize()


def _parts(x) -> tuple:
    """The arrays of a stored tensor: one array, or a quantized triple (which
    comes back from a file as a list)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _head(x, n: int):
    """The first ``n`` slots (axis 2) of a stored tensor."""
    if isinstance(x, (tuple, list)):
        return tuple(p[..., :n, :] for p in x)
    return x[..., :n, :]


def default_compact_margin(budget: int) -> int:
    """Tokens a compressed layer may hold above ``budget`` before it is compacted.

    An eighth of the budget keeps the extra memory at 12.5% while the cost of a
    compaction (one pass over the layer) is spread over ``budget / 8`` tokens.
    """
    return max(16, budget // 8)


def _check_compaction(budget, keep_recent, sink_tokens, margin):
    # Order matters: a bad budget is reported before the values compared to it.
    _check_int("budget", budget, 1)
    _check_int("keep_recent", keep_recent, 0)
    _check_int("sink_tokens", sink_tokens, 0)
    _check_int("margin", margin, 1, optional=True)
    if budget <= keep_recent + sink_tokens:
        raise ValueError(
            f"budget ({budget}) must be larger than keep_recent + sink_tokens "
            f"({keep_recent} + {sink_tokens}), or it could never evict"
        )


class CompressedKVCache(_BaseCache):
    """KV cache held near ``budget`` tokens by evicting the lowest-scoring keys.

    Tokens are appended as in :class:`KVCache`. :meth:`compact` (which the
    generation loop runs once a layer holds more than ``budget + margin``
    tokens) keeps ``budget`` of them: the ``sink_tokens`` oldest, the
    ``keep_recent`` newest and, among the others, those whose keys score
    highest under ``policy`` (a name in ``COMPACT_POLICIES``). ``scope`` says what
    shares one choice of tokens: ``"head"`` lets each KV head keep its own,
    ``"layer"`` ranks by the mean score over heads, ``"model"`` lets
    :func:`compact_prompt_cache` also average over all such layers.

    A query-aware policy (``"snapkv"``) scores keys by the attention that the
    newest ``SNAPKV_WINDOW`` queries pay them; the attention function hands
    those queries over through :meth:`observe_queries`.

    ``offset`` is the absolute position of the next token (RoPE uses it and
    eviction never lowers it); ``size()`` is the number of slots in use (what
    writes and masks use). Survivors keep their order, so slot order stays
    time order and every kept token precedes every new one.

    With ``left_padding`` (one count per row) the cache holds a left-padded
    batch like :class:`BatchKVCache`: ``offset`` is then an array per row and
    padding slots are evicted before any token.

    Buffers grow geometrically up to the first multiple of ``step`` above
    ``budget + margin``. A compaction gathers the survivors into a new buffer
    with that much room, so the tokens up to the next one never reallocate.
    """

    step = 256
    # The tensor-parallel group this layer's heads are split over (set by
    # make_prompt_cache for a sharded model): scores shared by the heads are
    # then averaged over the heads of every rank, so all ranks keep the same
    # tokens as one process would.
    group = None
    # The pipeline this layer's model is split over: model-scope ranking then
    # averages the scores of every rank's layers.
    pipeline_group = None

    def __init__(
        self,
        budget: int,
        keep_recent: int = 32,
        policy: str = "keydiff",
        scope: str = "head",
        sink_tokens: int = 0,
        margin: Optional[int] = None,
        left_padding: Optional[List[int]] = None,
    ):
        _check_compaction(budget, keep_recent, sink_tokens, margin)
        _check_choice("policy", policy, COMPACT_POLICIES)
        _check_choice("scope", scope, COMPACT_SCOPES)
        self.budget = budget
        self.keep_recent = keep_recent
        self.policy = policy
        self.scope = scope
        self.sink_tokens = sink_tokens
        self.margin = default_compact_margin(budget) if margin is None else margin
        self.keys = None
        self.values = None
        self._size = 0
        # Slots present right after the last compaction: trim never goes below.
        self._floor = 0
        # Per-head scores of those slots (per-token policies), and the scores
        # head_scores() computed for the compaction about to happen.
        self._kept_scores = None
        self._pending_scores = None
        # Query-aware policies: the newest queries seen and their scale.
        self._queries, self._scale = None, 1.0
        self.compactions = 0
        self.allocations = 0
        if left_padding is None:
            self.left_padding, self.offset = None, 0
        else:
            self.left_padding = mx.array(left_padding)
            self.offset = -self.left_padding

    @classmethod
    def from_config(cls, config: "KVCacheConfig", left_padding=None):
        return cls(
            config.compact_kv_budget,
            keep_recent=config.compact_keep_recent,
            policy=config.policy,
            scope=config.compact_scope,
            sink_tokens=config.compact_sink_tokens,
            margin=config.compact_margin,
            left_padding=left_padding,
        )

    # Storage: the quantized subclass keeps (packed, scales, biases) triples.

    def _encode(self, x):
        return x

    def _encoded(self, keys, values) -> tuple:
        return _parts(self._encode(keys)) + _parts(self._encode(values))

    def _pack(self, parts):
        return parts[0]

    def _dense_keys(self, start: int = 0):
        return self.keys[..., start : self._size, :]

    def _buffers(self) -> tuple:
        return _parts(self.keys) + _parts(self.values)

    def _set_buffers(self, buffers):
        half = len(buffers) // 2
        self.keys = self._pack(buffers[:half])
        self.values = self._pack(buffers[half:])

    def _capacity(self) -> int:
        return 0 if self.keys is None else _parts(self.keys)[0].shape[2]

    def _room_after(self, n: int) -> int:
        """Capacity that holds ``n`` slots plus a full margin of new tokens."""
        return _round_up(n + self.margin + 1, self.step)

    def update_and_fetch(self, keys, values):
        parts = self._encoded(keys, values)
        start, stop = self._size, self._size + keys.shape[2]
        capacity = self._capacity()
        if stop > capacity:
            ceiling = self._room_after(self.budget)
            capacity = _round_up(max(stop, min(2 * capacity, ceiling)), self.step)
            old = self._buffers() if self.keys is not None else [None] * len(parts)
            self._set_buffers(
                [_reserve(o, p, 0, start, capacity) for o, p in zip(old, parts)]
            )
            self.allocations += 1
        for buffer, part in zip(self._buffers(), parts):
            buffer[..., start:stop, :] = part
        self._size = stop
        self.offset = self.offset + keys.shape[2]
        self._pending_scores = None
        return _head(self.keys, stop), _head(self.values, stop)

    @property
    def query_window(self) -> int:
        """How many of the newest queries the policy reads (0: none)."""
        return SNAPKV_WINDOW if self.policy in QUERY_SCORERS else 0

    def observe_queries(self, queries: mx.array, scale: float):
        """Keep the newest :attr:`query_window` of ``queries`` ([B, n_heads, L,
        D], after RoPE, as attention uses them) and their softmax ``scale``."""
        window = self.query_window
        if self._queries is not None and queries.shape[2] < window:
            queries = mx.concatenate([self._queries, queries], axis=2)
        self._queries = queries[:, :, -window:, :]
        self._scale = scale

    def _recent_run(self) -> int:
        """Newest slots that are surely the newest tokens, without a gap:
        those kept as recent at the last compaction and all added since."""
        if not self.compactions:
            return self._size
        return min(self._size, self.keep_recent + self._size - self._floor)

    # Choosing and dropping tokens.

    def head_scores(self) -> mx.array:
        """Score of every slot in use for each KV head, shape [B, H, size()].

        Under a per-token policy the slots kept by the last compaction keep
        their scores, so only the tokens added since are read and scored.
        """
        if self.policy in QUERY_SCORERS:
            if self._queries is None:
                raise ValueError(
                    f"policy {self.policy!r} scores keys by the attention of the "
                    "newest queries, and none reached this layer since it was "
                    "built or loaded"
                )
            window = min(self._queries.shape[2], self._recent_run())
            queries = self._queries[:, :, self._queries.shape[2] - window :, :]
            scorer = QUERY_SCORERS[self.policy]
            return scorer(self._dense_keys(), queries, self._scale, self.left_padding)
        scorer = KEY_SCORERS[self.policy]
        if self.policy not in PER_TOKEN_POLICIES:
            keys = self._dense_keys()
            if self.left_padding is not None:
                # Zero keys carry no direction, so padding cannot sway a scorer
                # that looks at all keys at once (keydiff's mean key).
                pad = self.left_padding[:, None, None, None]
                keys = keys * (mx.arange(self._size)[:, None] >= pad)
            return scorer(keys)
        if self._kept_scores is None:
            scores = scorer(self._dense_keys())
        else:
            fresh = scorer(self._dense_keys(self._floor))
            scores = mx.concatenate([self._kept_scores, fresh], axis=-1)
        self._pending_scores = scores
        return scores

    def _protect(self, scores):
        """Padding slots to -inf and sink tokens to +inf, per row."""
        if self.left_padding is None and self.sink_tokens == 0:
            return scores
        pos = mx.arange(scores.shape[-1])
        pad = 0
        if self.left_padding is not None:
            pad = self.left_padding.reshape((-1,) + (1,) * (scores.ndim - 1))
            scores = mx.where(pos < pad, mx.array(-mx.inf, scores.dtype), scores)
        if self.sink_tokens:
            sink = (pos >= pad) & (pos < pad + self.sink_tokens)
            scores = mx.where(sink, mx.array(mx.inf, scores.dtype), scores)
        return scores

    def select(self, n_keep: int, scores: Optional[mx.array] = None) -> mx.array:
        """Ascending indices of the ``n_keep`` slots to keep.

        ``scores`` ([B, T] shared by the heads, or [B, H, T] per head) default
        to this layer's own, aggregated as ``scope`` says. The result has the
        same leading shape: [B, n_keep] or [B, H, n_keep].
        """
        if scores is None:
            scores = self.head_scores()
            if self.scope != "head":
                scores = self.head_mean(scores)
        return select_kept(self._protect(scores), n_keep, protect_last=self.keep_recent)

    def head_mean(self, scores: mx.array) -> mx.array:
        """[B, H, T] scores averaged over the heads (of all ranks) to [B, T]."""
        mean = mx.mean(scores, axis=1)
        if self.group is None or self.group.size() == 1:
            return mean
        return mx.distributed.all_sum(mean, group=self.group) / self.group.size()

    def _check_kept(self, kept):
        if self.keys is None:
            raise ValueError("cannot compact an empty CompressedKVCache")
        B, H = _parts(self.keys)[0].shape[:2]
        wanted = f"[{B}, n] or [{B}, {H}, n] with 1 <= n <= {self._size}"
        if kept.ndim not in (2, 3) or kept.shape[0] != B:
            raise ValueError(f"kept_indices must be {wanted}, got {kept.shape}")
        if kept.ndim == 3 and kept.shape[1] != H:
            raise ValueError(f"kept_indices must be {wanted}, got {kept.shape}")
        if not 0 < kept.shape[-1] <= self._size:
            raise ValueError(f"kept_indices must be {wanted}, got {kept.shape}")

    def compact(self, kept_indices: Optional[mx.array] = None):
        """Keep only the slots ``kept_indices`` (ascending; [B, n] shared by
        the heads or [B, H, n] per head), or, without it, the ``budget`` slots
        :meth:`select` picks when more are held. ``offset`` is unchanged."""
        if kept_indices is None:
            if self._size <= self.budget:
                return
            kept_indices = self.select(self.budget)
        else:
            self._check_kept(kept_indices)
        n = kept_indices.shape[-1]
        if kept_indices.ndim == 2:
            index = kept_indices[:, None, :, None]
        else:
            index = kept_indices[..., None]
        scores, self._pending_scores = self._pending_scores, None
        self._kept_scores = None
        if scores is not None and scores.shape[-1] == self._size:
            self._kept_scores = mx.take_along_axis(scores, index[..., 0], axis=-1)
        # One gather per buffer straight into a fresh buffer with room for a
        # full margin: the slots past n repeat slot 0 and are never read. (An
        # in-place write would copy the whole old buffer instead.)
        room = self._room_after(n)
        filler = mx.zeros(index.shape[:2] + (room - n, 1), index.dtype)
        index = mx.concatenate([index, filler], axis=2)
        self._set_buffers(
            [mx.take_along_axis(b, index, axis=2) for b in self._buffers()]
        )
        self.allocations += 1
        if self.left_padding is not None:
            rows = kept_indices if kept_indices.ndim == 2 else kept_indices[:, 0]
            still_padding = rows < self.left_padding[:, None]
            self.left_padding = mx.sum(still_padding, axis=-1).astype(mx.int32)
        self._size = self._floor = n
        self.compactions += 1

    # The common cache interface.

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        if window_size is not None and self.compactions:
            raise ValueError(
                "a sliding-window layer cannot use a CompressedKVCache that has "
                "evicted tokens: its slots no longer match positions"
            )
        if self.left_padding is not None:
            return create_causal_mask(
                N, self._size, window_size=window_size, left_padding=self.left_padding
            )
        # Kept tokens all precede the N new ones, so the kernel's "causal"
        # (aligned to the last key) is the right mask for N < size + N keys.
        return create_attention_mask(N, self._size, return_array, window_size)

    def size(self) -> int:
        return self._size

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        capacity = self._capacity()
        return sum(b.nbytes // capacity * self._size for b in self._buffers())

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest ``n`` tokens; refused (returns 0) when that would
        reach tokens that were there at the last compaction."""
        n = min(self._size, n)
        if n > self._size - self._floor:
            return 0
        self._pending_scores = None
        self._size -= n
        self.offset = self.offset - n
        if self._queries is not None:
            # The trimmed tokens' queries go too; none left means none observed.
            kept = self._queries.shape[2] - n
            self._queries = self._queries[:, :, :kept, :] if kept > 0 else None
        return n

    @property
    def state(self):
        arrays = []
        if self.keys is not None:
            arrays = [_head(self.keys, self._size), _head(self.values, self._size)]
        if self.left_padding is not None:
            arrays += [self.offset, self.left_padding]
        return arrays

    @state.setter
    def state(self, v):
        v = [] if _is_empty_state(v) else list(v)
        self.allocations = 0
        self._kept_scores = self._pending_scores = None
        self._queries, self._scale = None, 1.0
        self.left_padding = None
        # A batch ends with its per-row offset and left padding (1-D arrays).
        if v and getattr(v[-1], "ndim", None) == 1:
            self.offset, self.left_padding = v[-2], v[-1]
            v = v[:-2]
        if v:
            keys, values = v
            self._set_buffers([_own(b) for b in _parts(keys) + _parts(values)])
            self._size = self._capacity()
        else:
            self.keys = self.values = None
            self._size = 0

    @property
    def meta_state(self):
        fields_ = (
            self.budget,
            self.keep_recent,
            self.policy,
            self.scope,
            self.sink_tokens,
            self.margin,
            self._floor,
            self.compactions,
            "batch" if self.left_padding is not None else self.offset,
        )
        return tuple(str(x) for x in fields_)

    @meta_state.setter
    def meta_state(self, v):
        budget, keep_recent, policy, scope, sink, margin, floor, compactions, offset = (
            v[:9]
        )

        self.budget, self.keep_recent = int(budget), int(keep_recent)
        self.policy, self.scope = policy, scope
        self.sink_tokens, self.margin = int(sink), int(margin)
        _check_compaction(self.budget, self.keep_recent, self.sink_tokens, self.margin)
        _check_choice("policy", policy, COMPACT_POLICIES)
        _check_choice("scope", scope, COMPACT_SCOPES)
        self._floor = min(int(floor), self._size)
        self.compactions = int(compactions)
        if offset != "batch":
            self.offset = int(offset)

    def eviction_stats(self) -> "EvictionStats":
        """Compactions so far, tokens they evicted and slots now held."""
        if self.left_padding is None:
            evicted = self.offset - self._size
        else:
            # Real tokens fed minus real tokens held, summed over rows.
            held = self._size - self.left_padding
            evicted = mx.sum(self.offset - held).item()
        return EvictionStats(self.compactions, evicted, self._size)

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        quantized = QuantizedCompressedKVCache(
            self.budget,
            keep_recent=self.keep_recent,
            policy=self.policy,
            scope=self.scope,
            sink_tokens=self.sink_tokens,
            margin=self.margin,
            group_size=group_size,
            bits=bits,
        )
        quantized.offset, quantized.left_padding = self.offset, self.left_padding
        quantized._queries, quantized._scale = self._queries, self._scale
        quantized._floor, quantized.compactions = self._floor, self.compactions
        if self.keys is not None:
            keys, values = self.state[:2]
            quantized.keys = quantized._encode(keys)
            quantized.values = quantized._encode(values)
            quantized._size = self._size
        return quantized


class QuantizedCompressedKVCache(CompressedKVCache):
    """:class:`CompressedKVCache` storing ``mx.quantize`` triples, so that memory
    shrinks by eviction and by quantization. Compaction gathers the packed
    rows, scales and biases alike; keys are scored after dequantization."""

    def __init__(
        self,
        budget: int,
        keep_recent: int = 32,
        policy: str = "keydiff",
        scope: str = "head",
        sink_tokens: int = 0,
        margin: Optional[int] = None,
        left_padding: Optional[List[int]] = None,
        group_size: int = 64,
        bits: int = 8,
    ):
        super().__init__(
            budget, keep_recent, policy, scope, sink_tokens, margin, left_padding
        )
        self.group_size = group_size
        self.bits = bits

    def _encode(self, x):
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _pack(self, parts):
        return tuple(parts)

    def _dense_keys(self, start: int = 0):
        parts = (p[..., start : self._size, :] for p in self.keys)
        return mx.dequantize(*parts, group_size=self.group_size, bits=self.bits)

    @property
    def meta_state(self):
        return super().meta_state + (str(self.group_size), str(self.bits))

    @meta_state.setter
    def meta_state(self, v):
        CompressedKVCache.meta_state.fset(self, v)
        self.group_size, self.bits = int(v[9]), int(v[10])

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        if (group_size, bits) != (self.group_size, self.bits):
            raise ValueError(
                f"cache is already quantized with group_size={self.group_size}, "
                f"bits={self.bits}; got group_size={group_size}, bits={bits}"
            )
        return self


def _codec_meta(codec) -> str:
    return json.dumps([codec.name, codec.head_dim, codec.settings])


def _rebuilt_codec(meta: str, artifacts):
    name, head_dim, settings = json.loads(meta)
    return kv_quant.rebuild_codec(name, head_dim, settings, artifacts)


def _mapped_decode(cache, keys, values, n: int, dtype):
    """The first ``n`` held keys and values as attention reads them: in the
    codecs' mapped spaces (``Codec.map``) where they have one."""
    keys = cache.key_codec.decode_mapped(_head(keys, n))
    values = cache.value_codec.decode_mapped(_head(values, n))
    return keys.astype(dtype), values.astype(dtype)


def _codec_bytes(codec) -> int:
    # What a codec holds for the layer alone (centroids, calibrated codebooks).
    return getattr(codec, "nbytes", 0)


class CodecKVCache(_BaseCache):
    """KV cache holding the codes of a quantization method (``kv_quant``):
    keys through ``key_codec``, values through ``value_codec``.

    Codes grow along the token axis like :class:`KVCache` buffers (or start
    with room for ``max_seq_len`` tokens; see :meth:`reserve`). Each update
    encodes the new tokens and returns every held key and value decoded; only
    the codes stay in memory. A codec with a ``map`` (a rotation, QJL's
    sketch) returns its keys and values unmapped by it, and attention maps the
    queries and its output instead (:attr:`key_map`, :attr:`value_map`), so
    no per-token matrix product is spent on decoding. ``nbytes`` counts the codes of the
    tokens held and what the codecs keep for this layer alone.
    """

    step = 256

    def __init__(
        self, key_codec=None, value_codec=None, max_seq_len=None, use_fused_sdpa=True
    ):
        self.key_codec, self.value_codec = key_codec, value_codec
        self.max_seq_len = max_seq_len
        # False: attention writes out its softmax instead of the fused kernel.
        self.use_fused_sdpa = use_fused_sdpa
        self.keys = None
        self.values = None
        self.offset = 0
        self.allocations = 0

    def update_and_fetch(self, keys, values):
        new_keys = self.key_codec.encode(keys)
        new = new_keys + self.value_codec.encode(values)
        start, stop = self.offset, self.offset + keys.shape[2]
        capacity = 0 if self.keys is None else self.keys[0].shape[2]
        if stop > capacity:
            if capacity == 0 and self.max_seq_len:
                capacity = _round_up(max(stop, self.max_seq_len), self.step)
            else:
                capacity = _grown_capacity(capacity, stop, self.step)
            old = self.keys + self.values if self.keys else (None,) * len(new)
            grown = [_reserve(o, n, 0, start, capacity) for o, n in zip(old, new)]
            self.keys = tuple(grown[: len(new_keys)])
            self.values = tuple(grown[len(new_keys) :])
            self.allocations += 1
        for buffer, part in zip(self.keys + self.values, new):
            buffer[..., start:stop, :] = part
        self.offset = stop
        return self._decoded(stop, keys.dtype)

    def reserve(self, batch: int, num_heads: int):
        """Allocate room for ``max_seq_len`` tokens now (when the codecs need
        no data to set themselves up; otherwise at the first update)."""
        if self.keys is not None or not self.max_seq_len:
            return
        if getattr(self.key_codec, "fits_on_first_keys", False):
            return
        probe = mx.zeros((batch, num_heads, 1, self.key_codec.head_dim))
        new_keys = self.key_codec.encode(probe)
        new = new_keys + self.value_codec.encode(probe)
        grown = [_reserve(None, n, 0, 0, self.max_seq_len) for n in new]
        self.keys = tuple(grown[: len(new_keys)])
        self.values = tuple(grown[len(new_keys) :])
        self.allocations += 1

    def _decoded(self, n: int, dtype):
        return _mapped_decode(self, self.keys, self.values, n, dtype)

    @property
    def key_map(self):
        """What attention maps queries by (keys come back mapped), or None."""
        return self.key_codec.map

    @property
    def value_map(self):
        """What attention maps its output by (values come back mapped), or None."""
        return self.value_codec.map

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        own = _codec_bytes(self.key_codec) + _codec_bytes(self.value_codec)
        if self.keys is None:
            return own
        capacity = self.keys[0].shape[2]
        held = sum(b.nbytes // capacity * self.offset for b in self.keys + self.values)
        return held + own

    @property
    def bits_per_value(self) -> float:
        """Bits per key and value as the codes are laid out."""
        return (self.key_codec.bits_per_value + self.value_codec.bits_per_value) / 2

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self):
        artifacts = {
            "key": self.key_codec.artifacts,
            "value": self.value_codec.artifacts,
        }
        if self.keys is None:
            return [[], [], artifacts]
        return [
            _head(self.keys, self.offset),
            _head(self.values, self.offset),
            artifacts,
        ]

    @state.setter
    def state(self, v):
        keys, values, artifacts = _as_list(v, 3)
        artifacts = artifacts if isinstance(artifacts, dict) else {}
        self._artifacts = artifacts
        self.allocations = 0
        if _is_empty_state(keys):
            self.keys = self.values = None
        else:
            self.keys = tuple(_own(x) for x in keys)
            self.values = tuple(_own(x) for x in values)

    @property
    def meta_state(self):
        return (
            str(self.offset),
            _codec_meta(self.key_codec),
            _codec_meta(self.value_codec),
            str(self.max_seq_len or 0),
            str(int(self.use_fused_sdpa)),
        )

    @meta_state.setter
    def meta_state(self, v):
        offset, key_meta, value_meta, max_seq_len, fused = v
        self.use_fused_sdpa = fused == "1"
        artifacts = getattr(self, "_artifacts", {})
        self.key_codec = _rebuilt_codec(key_meta, artifacts.get("key"))
        self.value_codec = _rebuilt_codec(value_meta, artifacts.get("value"))
        self.offset, self.max_seq_len = int(offset), int(max_seq_len) or None


class CodecCompressedKVCache(CompressedKVCache):
    """:class:`CompressedKVCache` holding the codes of ``key_codec`` and
    ``value_codec`` (as :class:`CodecKVCache`), so that memory shrinks by
    eviction and by quantization. Compaction gathers the codes; keys are
    scored after decoding."""

    def __init__(
        self,
        budget: int,
        key_codec=None,
        value_codec=None,
        use_fused_sdpa=True,
        **options,
    ):
        super().__init__(budget, **options)
        self.key_codec, self.value_codec = key_codec, value_codec
        self.use_fused_sdpa = use_fused_sdpa

    @classmethod
    def from_config(cls, config, left_padding=None, codecs=(None, None)):
        cache = super().from_config(config, left_padding=left_padding)
        cache.key_codec, cache.value_codec = codecs
        cache.use_fused_sdpa = config.use_fused_sdpa
        return cache

    def _encoded(self, keys, values):
        encoded = self.key_codec.encode(keys)
        self._key_parts = len(encoded)
        return encoded + self.value_codec.encode(values)

    def _buffers(self) -> tuple:
        return self.keys + self.values

    def _set_buffers(self, buffers):
        n = self._key_parts
        self.keys, self.values = tuple(buffers[:n]), tuple(buffers[n:])

    def _dense_keys(self, start: int = 0):
        return self.key_codec.decode(
            tuple(p[..., start : self._size, :] for p in self.keys)
        )

    def update_and_fetch(self, keys, values):
        super().update_and_fetch(keys, values)
        return _mapped_decode(self, self.keys, self.values, self._size, keys.dtype)

    key_map = CodecKVCache.key_map
    value_map = CodecKVCache.value_map

    @property
    def nbytes(self) -> int:
        own = _codec_bytes(self.key_codec) + _codec_bytes(self.value_codec)
        return CompressedKVCache.nbytes.fget(self) + own

    @property
    def state(self):
        arrays = CompressedKVCache.state.fget(self)
        artifacts = {
            "key": self.key_codec.artifacts,
            "value": self.value_codec.artifacts,
        }
        return [arrays, artifacts]

    @state.setter
    def state(self, v):
        arrays, artifacts = _as_list(v, 2)
        self._artifacts = artifacts if isinstance(artifacts, dict) else {}
        self._pending_state = arrays

    @property
    def meta_state(self):
        codecs = (_codec_meta(self.key_codec), _codec_meta(self.value_codec))
        fused = str(int(self.use_fused_sdpa))
        return CompressedKVCache.meta_state.fget(self) + codecs + (fused,)

    @meta_state.setter
    def meta_state(self, v):
        artifacts = getattr(self, "_artifacts", {})
        self.key_codec = _rebuilt_codec(v[9], artifacts.get("key"))
        self.value_codec = _rebuilt_codec(v[10], artifacts.get("value"))
        self.use_fused_sdpa = v[11] == "1"
        arrays = getattr(self, "_pending_state", [])
        self._key_parts = len(arrays[0]) if arrays else 0
        CompressedKVCache.state.fset(self, arrays)
        CompressedKVCache.meta_state.fset(self, v[:9])

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        raise ValueError(
            "this compressed cache already holds the codes of "
            f"{self.key_codec.name!r}; kv_bits cannot quantize it again"
        )


def _check_shared(layers):
    """Layers sharing one choice of kept tokens must agree on its shape."""
    i0, first = layers[0]
    for i, layer in layers[1:]:
        for name in ("size", "budget", "keep_recent", "sink_tokens", "margin"):
            mine, theirs = getattr(layer, name), getattr(first, name)
            if name == "size":
                mine, theirs = mine(), theirs()
            if mine != theirs:
                raise ValueError(
                    f"layer {i} cannot share kept tokens with layer {i0} "
                    f"(compact_scope='model'): its {name} is {mine}, not {theirs}"
                )


def compact_prompt_cache(prompt_cache: List[Any], slack: Optional[int] = None) -> int:
    """Compact every :class:`CompressedKVCache` layer of ``prompt_cache`` that
    holds more than its budget plus ``slack`` tokens (default: its own margin,
    the hysteresis used while generating; ``0``: anything above the budget).

    Layers with scope ``"model"`` keep one common set of tokens ranked by their
    scores averaged over heads and layers; they must agree on size, budget and
    protected tokens. Deciding compares Python integers only, so it never
    waits for the device. Returns the number of layers compacted.
    """
    shared, done = [], 0
    for i, layer in enumerate(prompt_cache):
        if isinstance(layer, SlidingWindowKVCache):
            layer = layer.inner
        if not isinstance(layer, CompressedKVCache):
            continue
        if layer.scope == "model":
            shared.append((i, layer))
        elif layer.size() > layer.budget + (layer.margin if slack is None else slack):
            layer.compact()
            done += 1
    if shared:
        _check_shared(shared)
        first = shared[0][1]
        if first.size() > first.budget + (first.margin if slack is None else slack):
            scores = mx.stack([c.head_mean(c.head_scores()) for _, c in shared])
            group = first.pipeline_group
            if group is None:
                mean = mx.mean(scores, axis=0)
            else:  # the other ranks' layers too
                total = mx.distributed.all_sum(mx.sum(scores, axis=0), group=group)
                count = mx.distributed.all_sum(mx.array(len(shared)), group=group)
                # Now: left lazy, a later rank could meet its next receive
                # first while the rank before waits here.
                mx.eval(total, count)
                mean = total / count.astype(total.dtype)
            kept = first.select(first.budget, mean)
            for _, layer in shared:
                layer.compact(kept)
            done += len(shared)
    return done


# What a window may hold its tokens in (all keep slots in time order).
_WINDOW_INNER = {
    c.__name__: c
    for c in (
        KVCache,
        QuantizedKVCache,
        CodecKVCache,
        CompressedKVCache,
        QuantizedCompressedKVCache,
        CodecCompressedKVCache,
    )
}

_CACHE_CLASSES = {
    c.__name__: c
    for c in (
        KVCache,
        RotatingKVCache,
        QuantizedKVCache,
        ChunkedKVCache,
        BatchKVCache,
        CacheList,
        SlidingWindowKVCache,
        CompressedKVCache,
        QuantizedCompressedKVCache,
        CodecKVCache,
        CodecCompressedKVCache,
    )
}


def _cache_class(name: str):
    if name not in _CACHE_CLASSES:
        raise ValueError(
            f"Unknown cache class {name!r}; known: {sorted(_CACHE_CLASSES)}"
        )
    return _CACHE_CLASSES[name]


def make_prompt_cache(
    model: nn.Module,
    max_kv_size: Optional[int] = None,
    config: Optional["KVCacheConfig"] = None,
    **options,
) -> List[Any]:
    """One cache per layer of ``model``, bounded as ``config`` (or the keyword
    options, see :class:`KVCacheConfig`) asks.

    The model's own ``make_cache()`` is the starting point when it has one. A layer
    with a window of its own (a ``RotatingKVCache`` from the model: gemma3's local
    layers, Mistral's or Phi-3's ``sliding_window``) never holds more than that
    window. A bound of at most as many tokens replaces it by a ``RotatingKVCache``
    of the bound keeping the tokens the bound always keeps (the first 4 under
    ``max_kv_size``, ``window_prefix``, ``compact_sink_tokens``) and the newest
    ones; the model's mask still hides what lies outside its window. Every other
    layer gets the requested bound, so ``max_kv_size`` is honoured for every model.

    With a quantization ``method`` and ``quantized_kv_start=0`` the other
    layers hold the method's codes from the first token (otherwise the
    generation loop converts them once they hold that many tokens).
    """
    config = KVCacheConfig.from_options(config, max_kv_size=max_kv_size, **options)
    if hasattr(model, "make_cache"):
        layers = model.make_cache()
    else:
        layers = [KVCache() for _ in model.layers]
    coded = config.method is not None and config.quantized_kv_start == 0
    if not config.evicts and not coded:
        return layers
    head_dim = model_head_dim(model)
    layers = [_bounded_layer(c, config, i, head_dim) for i, c in enumerate(layers)]
    return _for_ranks(model, layers, config)


def _for_ranks(model, layers: List[Any], config: "KVCacheConfig") -> List[Any]:
    """Tell the compressed layers of a split ``model`` its tensor-parallel or
    pipeline group. Under a pipeline with model-scope compaction every rank
    must hold such a layer (each takes part in every ranking)."""
    group = getattr(model, "tensor_group", None)
    pipeline = getattr(model, "pipeline_group", None)
    ranked = 0
    for layer in layers:
        storage = getattr(layer, "inner", layer)
        if isinstance(storage, CompressedKVCache):
            storage.group, storage.pipeline_group = group, pipeline
            ranked += storage.scope == "model"
    model_scope = (
        config.compact_kv_budget is not None and config.compact_scope == "model"
    )
    if pipeline is not None and model_scope and not ranked:
        raise ValueError(
            f"pipeline rank {pipeline.rank()} holds no layer that compact_scope="
            "'model' ranks: use 'layer' or 'head', or split the layers otherwise"
        )
    return layers


class KVCacheFactory:
    """Caches for one layer from a :class:`KVCacheConfig`."""

    @staticmethod
    def create(
        config: "KVCacheConfig",
        num_heads: int,
        head_dim: int,
        max_seq_len: int = 8192,
        layer: int = 0,
    ):
        """The cache of layer ``layer`` (``num_heads`` KV heads of ``head_dim``)
        with the storage and bound of ``config``; storage of method codes is
        reserved for ``max_seq_len`` tokens of a batch of one."""
        _check_int("num_heads", num_heads, 1)
        _check_int("head_dim", head_dim, 1)
        _check_int("max_seq_len", max_seq_len, 1)
        config = config.for_head_dim(head_dim)
        cache = _bounded_cache(config, head_dim, layer, max_seq_len)
        if config.method is None and config.kv_bits is not None:
            cache = cache.to_quantized(config.kv_group_size, config.kv_bits)
        storage = getattr(cache, "inner", cache)
        if isinstance(storage, CodecKVCache):
            storage.reserve(1, num_heads)
        return cache


class KVCacheBuilder:
    """One cache per layer of a model from a :class:`KVCacheConfig`."""

    @staticmethod
    def build(model, config: "KVCacheConfig", max_seq_len: int = 8192) -> List[Any]:
        """Caches for every layer of ``model`` as :meth:`KVCacheFactory.create`
        makes them, with the model's KV heads and head dimension; a layer with
        a window of its own keeps it (see :func:`make_prompt_cache`)."""
        args = getattr(model, "args", None)
        heads = getattr(args, "num_key_value_heads", None) or getattr(
            args, "num_attention_heads", None
        )
        # A tensor-parallel rank holds its share of the heads.
        layers = getattr(model, "layers", None)
        attn = getattr(layers[0], "self_attn", None) if layers else None
        heads = getattr(attn, "n_kv_heads", heads)
        head_dim = model_head_dim(model)
        if heads is None or head_dim is None:
            raise ValueError(
                f"cannot read the KV heads and head dimension of {type(model).__name__}"
            )
        own = model.make_cache() if hasattr(model, "make_cache") else model.layers
        layers = [
            (
                _bounded_layer(layer, config, i, head_dim)
                if isinstance(layer, RotatingKVCache)
                else KVCacheFactory.create(
                    config, heads, head_dim, max_seq_len, layer=i
                )
            )
            for i, layer in enumerate(own)
        ]
        return _for_ranks(model, layers, config)


# Tokens a max_kv_size cache keeps at the front, whatever it evicts.
MAX_KV_KEEP = 4


def _bound_tokens(config: "KVCacheConfig"):
    """``(tokens, kept first)`` of the bound ``config`` sets."""
    if config.max_kv_size is not None:
        return config.max_kv_size, MAX_KV_KEEP
    if config.compact_kv_budget is not None:
        return config.compact_kv_budget, config.compact_sink_tokens
    return config.window_size, config.window_prefix


def _bounded_layer(layer, config: "KVCacheConfig", index: int = 0, head_dim=None):
    """``layer`` (from the model) bounded as ``config`` asks."""
    if not isinstance(layer, RotatingKVCache):
        return _bounded_cache(config, head_dim, index)
    if config.evicts:
        # A window of the model's own: score-based eviction cannot keep its
        # mask (slots stop matching positions), so a narrower bound keeps the
        # newest.
        tokens, keep = _bound_tokens(config)
        if layer.max_size > tokens:
            layer = RotatingKVCache(tokens, keep=keep)
    if config.method is not None and config.quantized_kv_start == 0:
        return to_codec(layer, config, index, head_dim)
    return layer


def method_codecs(config: "KVCacheConfig", head_dim: Optional[int], index: int):
    if head_dim is None:
        raise ValueError(
            f"method={config.method!r} needs the model's head dimension, which "
            "its arguments do not give"
        )
    config = config.for_head_dim(head_dim)
    return (
        kv_quant.key_codec(config, head_dim, index),
        kv_quant.value_codec(config, head_dim, index),
    )


def _bounded_cache(
    config: "KVCacheConfig", head_dim=None, index: int = 0, max_seq_len=None
):
    """The cache of layer ``index`` when it has no window of its own."""
    if config.method is not None and config.quantized_kv_start == 0:
        codecs = method_codecs(config, head_dim, index)
        if config.compact_kv_budget is not None:
            return CodecCompressedKVCache.from_config(config, codecs=codecs)
        storage = CodecKVCache(*codecs, max_seq_len, config.use_fused_sdpa)
    else:
        storage = KVCache()
        if config.compact_kv_budget is not None:
            return CompressedKVCache.from_config(config)
    if config.max_kv_size is not None:
        if config.method is None:
            return RotatingKVCache(config.max_kv_size, keep=MAX_KV_KEEP)
        # Codes need slots in time order: the same bound as a fixed window.
        return SlidingWindowKVCache(
            storage, config.max_kv_size, "fixed", fixed_prefix_size=MAX_KV_KEEP
        )
    if config.window_size is not None:
        return SlidingWindowKVCache(
            storage,
            config.window_size,
            config.window_strategy,
            fixed_prefix_size=config.window_prefix,
            eviction_attention_window=config.window_attention_span,
        )
    return storage


def to_codec(layer, config: "KVCacheConfig", index: int, head_dim: int):
    """``layer`` holding the codes of ``config.method`` instead of float keys
    and values (the same tokens, bound and counters; a ``RotatingKVCache``
    becomes a window of its size over codes); other caches (codes already,
    affine groups) come back as they are."""
    if isinstance(layer, (CodecKVCache, CodecCompressedKVCache)):
        return layer
    if isinstance(layer, RotatingKVCache):
        # The same window over codes (its tokens taken over oldest first).
        strategy = "fixed" if layer.keep else "fifo"
        window = SlidingWindowKVCache(
            layer, layer.max_size, strategy, fixed_prefix_size=layer.keep
        )
        return to_codec(window, config, index, head_dim)
    if isinstance(layer, SlidingWindowKVCache):
        coded = copy.copy(layer)
        coded.inner = to_codec(layer.inner, config, index, head_dim)
        return coded
    if type(layer) is KVCache:
        codecs = method_codecs(config, head_dim, index)
        coded = CodecKVCache(*codecs, use_fused_sdpa=config.use_fused_sdpa)
        if layer.keys is not None:
            coded.update_and_fetch(*layer.state)
        return coded
    if type(layer) is CompressedKVCache:
        coded = CodecCompressedKVCache.from_config(
            config, codecs=method_codecs(config, head_dim, index)
        )
        coded.budget, coded.keep_recent = layer.budget, layer.keep_recent
        coded.policy, coded.scope = layer.policy, layer.scope
        coded.sink_tokens, coded.margin = layer.sink_tokens, layer.margin
        if layer.keys is not None:
            coded.update_and_fetch(*layer.state[:2])
        coded.offset, coded.left_padding = layer.offset, layer.left_padding
        coded._queries, coded._scale = layer._queries, layer._scale
        coded._floor, coded.compactions = layer._floor, layer.compactions
        return coded
    return layer


def save_prompt_cache(
    file_name: str, cache: List[Any], metadata: Optional[Dict[str, str]] = None
):
    """Write ``cache`` (one entry per layer) and string ``metadata`` to a
    ``.safetensors`` file (the suffix is appended when missing).

    The file is written under a temporary name in the same directory and then
    renamed, so an existing file is never left half-written.
    """
    file_name = os.fspath(file_name)
    if not file_name.endswith(".safetensors"):
        file_name += ".safetensors"
    arrays = dict(tree_flatten([c.state for c in cache]))
    layout = [
        [c.meta_state for c in cache],
        dict(metadata or {}),
        [type(c).__name__ for c in cache],
    ]
    folder, base = os.path.split(os.path.abspath(file_name))
    partial = os.path.join(folder, f".{base}.{uuid.uuid4().hex}.tmp.safetensors")
    try:
        mx.save_safetensors(partial, arrays, dict(tree_flatten(layout)))
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, file_name)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _as_list(items, length: int = 0) -> list:
    # Parts without any key in the file come back as {} or not at all.
    items = list(items) if isinstance(items, list) else []
    return items + [[]] * (length - len(items))


def load_prompt_cache(file_name: str, return_metadata: bool = False):
    """Read a file written by ``save_prompt_cache``.

    As when saving, ``.safetensors`` is appended to a name that lacks it
    unless a file with exactly that name exists. Returns the list of caches,
    or ``(caches, metadata)`` when ``return_metadata`` is true.
    """
    file_name = os.fspath(file_name)
    if not file_name.endswith(".safetensors") and not os.path.exists(file_name):
        file_name += ".safetensors"
    arrays, flat_layout = mx.load(file_name, format="safetensors", return_metadata=True)
    layout = tree_unflatten(list(flat_layout.items())) if flat_layout else []
    metas, metadata, names = _as_list(layout, 3)
    names = _as_list(names)
    states = tree_unflatten(list(arrays.items())) if arrays else []
    states, metas = _as_list(states, len(names)), _as_list(metas, len(names))
    cache = [_cache_class(n).from_state(s, m) for n, s, m in zip(names, states, metas)]
    if return_metadata:
        return cache, metadata if isinstance(metadata, dict) else {}
    return cache


def can_trim_prompt_cache(cache: List[Any]) -> bool:
    """True when every layer's cache supports ``trim``."""
    return all(c.is_trimmable() for c in cache)


def trim_prompt_cache(cache: List[Any], num_tokens: int) -> int:
    """Drop the last ``num_tokens`` tokens from every layer, in place.

    Returns how many were dropped (0 when some layer cannot be trimmed).
    """
    if not cache or not can_trim_prompt_cache(cache):
        return 0
    return [c.trim(num_tokens) for c in cache][0]


class EvictionStats(dict):
    """Eviction counts, read as attributes (``stats.total_evictions``) or as a
    dict: ``total_evictions`` (eviction passes), ``tokens_evicted`` and
    ``current_size`` (slots now held)."""

    def __init__(self, total_evictions=0, tokens_evicted=0, current_size=0):
        super().__init__(
            total_evictions=total_evictions,
            tokens_evicted=tokens_evicted,
            current_size=current_size,
        )

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def cache_eviction_stats(prompt_cache: List[Any]) -> EvictionStats:
    """Eviction totals over the layers of ``prompt_cache``.

    A layer with ``eviction_stats()`` reports its own counts. Any other layer
    with an integer ``offset`` and ``size()`` has evicted ``offset - size()``
    tokens, counted as one eviction each (as a rotating cache drops them).
    Layers with neither are skipped.
    """
    totals = EvictionStats()
    for layer in prompt_cache:
        if hasattr(layer, "eviction_stats"):
            stats = layer.eviction_stats()
        elif isinstance(getattr(layer, "offset", None), int):
            dropped = layer.offset - layer.size()
            stats = {
                "total_evictions": dropped,
                "tokens_evicted": dropped,
                "current_size": layer.size(),
            }
        else:
            continue
        for key in totals:
            totals[key] += stats[key]
    return totals
