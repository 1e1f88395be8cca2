"""Key/value caches for attention layers and prompt-cache files.

Growing caches keep a pre-allocated buffer along the sequence axis (axis 2 of
``[batch, kv_heads, seq, head_dim]``). When an update does not fit, the buffer
is replaced once by one of ``max(needed, 2 * capacity)`` slots (rounded up to a
multiple of ``step``) so that appending ``n`` tokens one at a time costs
``O(log n)`` allocations.
"""

import os
import uuid
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .base import create_causal_mask


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _grown_capacity(capacity: int, needed: int, step: int) -> int:
    return _round_up(max(needed, 2 * capacity), step)


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


def _plain_mask(N: int, offset: int, return_array: bool, window_size):
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
        return _plain_mask(N, self.size(), return_array, window_size)

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
        window = window_size or self.max_size
        used, _ = self._layout_after(N)
        # Oldest non-kept slot is (used - keep - 1) tokens behind the newest.
        unrestricted = used - self.keep <= window
        if N == 1 and unrestricted:
            return None
        if N > 1 and unrestricted and not return_array:
            return "causal"
        positions = self._positions_after(N)[None]
        queries = mx.arange(self.offset, self.offset + N)[:, None]
        visible = (queries - positions < window) | (positions < self.keep)
        return visible & (positions <= queries)

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

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedKVCache:
        raise NotImplementedError(
            "RotatingKVCache cannot be converted to a QuantizedKVCache yet"
        )


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


_CACHE_CLASSES = {
    c.__name__: c
    for c in (
        KVCache,
        RotatingKVCache,
        QuantizedKVCache,
        ChunkedKVCache,
        BatchKVCache,
        CacheList,
    )
}


def _cache_class(name: str):
    if name not in _CACHE_CLASSES:
        raise ValueError(
            f"Unknown cache class {name!r}; known: {sorted(_CACHE_CLASSES)}"
        )
    return _CACHE_CLASSES[name]


def make_prompt_cache(model: nn.Module, max_kv_size: Optional[int] = None) -> List[Any]:
    """One cache per layer: ``model.make_cache()`` when the model defines it,
    otherwise ``KVCache`` (or ``RotatingKVCache(max_kv_size, keep=4)``)."""
    if hasattr(model, "make_cache"):
        return model.make_cache()
    if max_kv_size is not None:
        return [RotatingKVCache(max_kv_size, keep=4) for _ in model.layers]
    return [KVCache() for _ in model.layers]


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
