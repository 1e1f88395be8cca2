"""Key/value caches for attention layers and prompt-cache files.

Growing caches keep a pre-allocated buffer along the sequence axis (axis 2 of
``[batch, kv_heads, seq, head_dim]``). When an update does not fit, the buffer
is replaced once by one of ``max(needed, 2 * capacity)`` slots (rounded up to a
multiple of ``step``) so that appending ``n`` tokens one at a time costs
``O(log n)`` allocations.
"""

import os
import uuid
from dataclasses import asdict, dataclass, fields
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


def make_prompt_cache(
    model: nn.Module,
    max_kv_size: Optional[int] = None,
    config: Optional["KVCacheConfig"] = None,
    **options,
) -> List[Any]:
    """One cache per layer of ``model``, bounded as ``config`` (or the keyword
    options, see :class:`KVCacheConfig`) asks.

    The model's own ``make_cache()`` is the starting point when it has one. Layers
    with a window of their own (a ``RotatingKVCache`` from the model, such as
    gemma3's local layers) keep it; every other layer gets the requested bound, so
    ``max_kv_size`` is honoured for every model.
    """
    config = KVCacheConfig.from_options(config, max_kv_size=max_kv_size, **options)
    if hasattr(model, "make_cache"):
        layers = model.make_cache()
    else:
        layers = [KVCache() for _ in model.layers]
    if not config.evicts:
        return layers
    return [
        layer if isinstance(layer, RotatingKVCache) else _bounded_cache(config)
        for layer in layers
    ]


def _bounded_cache(config: "KVCacheConfig"):
    """The cache for one layer without a window of its own, under ``config``."""
    if config.max_kv_size is not None:
        return RotatingKVCache(config.max_kv_size, keep=4)
    raise ValueError(f"no cache implements {config}")


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


# ---------------------------------------------------------------------------
# Eviction: scoring functions, selection, and the options that configure it.
# ---------------------------------------------------------------------------


def score_l2_low(keys: mx.array) -> mx.array:
    """KnormPress (arXiv 2406.11430): low-norm keys draw attention, keep them."""
    return -mx.linalg.norm(keys.astype(mx.float32), axis=-1)


def score_l2_high(keys: mx.array) -> mx.array:
    """The reverse of ``l2-low``: keep the keys with the largest norm."""
    return mx.linalg.norm(keys.astype(mx.float32), axis=-1)


def score_keydiff(keys: mx.array) -> mx.array:
    """KeyDiff (arXiv 2504.15364): keep keys least aligned with the mean key direction."""
    k = keys.astype(mx.float32)
    unit = k / (mx.linalg.norm(k, axis=-1, keepdims=True) + 1e-6)
    anchor = mx.mean(unit, axis=-2, keepdims=True)
    return -mx.sum(unit * anchor, axis=-1)


# A policy is nothing but a function from keys [..., T, D] to scores [..., T]:
# the higher the score, the more a token deserves to stay.
KEY_SCORERS = {
    "l2-low": score_l2_low,
    "l2-high": score_l2_high,
    "keydiff": score_keydiff,
}


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
    scores = mx.where(protected, mx.array(mx.inf, scores.dtype), scores)
    top = mx.argpartition(-scores, kth=n_keep - 1, axis=-1)[..., :n_keep]
    return mx.sort(top, axis=-1)


COMPACT_SCOPES = ("model", "layer", "head")
WINDOW_STRATEGIES = ("fifo", "fixed", "attention")
KV_BITS = (2, 3, 4, 5, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)


def _check_int(name, value, low, optional=False):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass
class KVCacheConfig:
    """Every KV-cache memory option in one value.

    Built once from command-line flags, keyword arguments or a server request and
    handed to :func:`make_prompt_cache` and the generation loop. At most one way of
    bounding the cache may be chosen: ``max_kv_size`` (keep the first 4 and the most
    recent tokens), ``compact_kv_budget`` (evict by key score) or ``window_size``
    (sliding window). ``kv_bits`` composes with each of them.
    """

    max_kv_size: Optional[int] = None
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    compact_kv_budget: Optional[int] = None
    compact_keep_recent: int = 32
    compact_policy: str = "l2-low"
    compact_scope: str = "layer"
    compact_sink_tokens: int = 0
    compact_margin: Optional[int] = None
    window_size: Optional[int] = None
    window_strategy: str = "fifo"
    window_prefix: int = 0
    window_attention_span: int = 32

    def __post_init__(self):
        _check_int("max_kv_size", self.max_kv_size, 1, optional=True)
        if self.kv_bits is not None:
            _check_choice("kv_bits", self.kv_bits, KV_BITS)
        _check_choice("kv_group_size", self.kv_group_size, KV_GROUP_SIZES)
        _check_int("quantized_kv_start", self.quantized_kv_start, 0)

        _check_int("compact_kv_budget", self.compact_kv_budget, 1, optional=True)
        _check_int("compact_keep_recent", self.compact_keep_recent, 0)
        _check_int("compact_sink_tokens", self.compact_sink_tokens, 0)
        _check_int("compact_margin", self.compact_margin, 1, optional=True)
        _check_choice("compact_policy", self.compact_policy, KEY_SCORERS)
        _check_choice("compact_scope", self.compact_scope, COMPACT_SCOPES)
        if self.compact_kv_budget is not None:
            protected = self.compact_keep_recent + self.compact_sink_tokens
            if self.compact_kv_budget <= protected:
                raise ValueError(
                    f"compact_kv_budget ({self.compact_kv_budget}) must be larger than "
                    f"compact_keep_recent + compact_sink_tokens ({protected})"
                )

        _check_int("window_size", self.window_size, 1, optional=True)
        _check_choice("window_strategy", self.window_strategy, WINDOW_STRATEGIES)
        _check_int("window_prefix", self.window_prefix, 0)
        _check_int("window_attention_span", self.window_attention_span, 1)
        if self.window_size is not None and self.window_prefix >= self.window_size:
            raise ValueError(
                f"window_prefix ({self.window_prefix}) must be smaller than "
                f"window_size ({self.window_size})"
            )

        bounds = [
            f"{name}={getattr(self, name)}"
            for name in ("max_kv_size", "compact_kv_budget", "window_size")
            if getattr(self, name) is not None
        ]
        if len(bounds) > 1:
            raise ValueError(
                f"choose one way to bound the KV cache, got {' and '.join(bounds)}"
            )

    @property
    def evicts(self) -> bool:
        """Whether the cache drops tokens once it is full."""
        return any(
            v is not None
            for v in (self.max_kv_size, self.compact_kv_budget, self.window_size)
        )

    @classmethod
    def from_options(cls, base: Optional["KVCacheConfig"] = None, **options):
        """``base`` (or the defaults) with ``options`` applied; ``None`` values are
        ignored and an unknown option is a ``ValueError`` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown KV-cache option(s): {', '.join(unknown)}")
        values = asdict(base) if base is not None else {}
        values.update({k: v for k, v in options.items() if v is not None})
        return cls(**values)
