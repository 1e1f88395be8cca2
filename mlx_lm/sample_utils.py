"""Token samplers and logits processors.

Samplers map log-probabilities of shape ``[B, V]`` to token ids of shape
``[B]``. Filters (top-k, top-p, min-p) replace the log-probabilities of
excluded tokens with ``-inf`` and leave the rest unchanged; they accept
unnormalized scores too. Everything stays lazy: nothing here forces an
evaluation.
"""

import math
from functools import partial, reduce
from typing import Callable, Dict, List, Optional

import mlx.core as mx

NEG_INF = -float("inf")


def _kth_largest(x: mx.array, k: int) -> mx.array:
    """The k-th largest value along the last axis, keeping that axis."""
    vocab = x.shape[-1]
    pos = vocab - k
    return mx.partition(x, kth=pos, axis=-1)[..., pos : pos + 1]


def _check_top_k(top_k):
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}.")


def _check_unit_interval(name, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")


def _check_min_tokens(min_tokens_to_keep):
    if (
        not isinstance(min_tokens_to_keep, int)
        or isinstance(min_tokens_to_keep, bool)
        or min_tokens_to_keep < 1
    ):
        raise ValueError(
            "min_tokens_to_keep must be a positive integer, "
            f"got {min_tokens_to_keep!r}."
        )


def apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    """Keep the ``top_k`` most likely tokens of each row.

    Tokens tied with the k-th largest value are kept as well. ``top_k`` at
    least the vocabulary size keeps everything.
    """
    _check_top_k(top_k)
    if top_k == 0:
        raise ValueError("top_k must be positive to filter, got 0.")
    if top_k >= logprobs.shape[-1]:
        return logprobs
    cutoff = _kth_largest(logprobs, top_k)
    return mx.where(logprobs >= cutoff, logprobs, NEG_INF)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Nucleus filtering: keep the most likely tokens whose probabilities
    first reach a total of ``top_p``.

    A token is kept when the probability mass of the tokens ranked above it
    is below ``top_p``, so the most likely token always survives.
    """
    _check_unit_interval("top_p", top_p)
    probs = mx.softmax(logprobs, axis=-1)
    descending = mx.sort(probs, axis=-1)[..., ::-1]
    mass_above = mx.cumsum(descending, axis=-1) - descending
    n_keep = mx.sum(mass_above < top_p, axis=-1, keepdims=True)
    n_keep = mx.maximum(n_keep, 1)
    cutoff = mx.take_along_axis(descending, n_keep - 1, axis=-1)
    return mx.where(probs >= cutoff, logprobs, NEG_INF)


def apply_min_p(
    logprobs: mx.array, min_p: float, min_tokens_to_keep: int = 1
) -> mx.array:
    """Drop tokens less likely than ``min_p`` times the top token's
    probability, always keeping the ``min_tokens_to_keep`` most likely."""
    _check_unit_interval("min_p", min_p)
    _check_min_tokens(min_tokens_to_keep)
    if min_p == 0.0:
        return logprobs
    cutoff = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    if min_tokens_to_keep > 1:
        n = min(min_tokens_to_keep, logprobs.shape[-1])
        cutoff = mx.minimum(cutoff, _kth_largest(logprobs, n))
    return mx.where(logprobs >= cutoff, logprobs, NEG_INF)


def categorical_sampling(logits: mx.array, temp: float) -> mx.array:
    """Draw one token per row from ``softmax(logits / temp)``."""
    return mx.random.categorical(logits * (1.0 / temp), axis=-1)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
) -> Callable[[mx.array], mx.array]:
    """Build a sampler from log-probabilities ``[B, V]`` to tokens ``[B]``.

    Args:
        temp: Sampling temperature; ``0`` picks the most likely token.
        top_p: Nucleus threshold in ``[0, 1]``; ``0`` or ``1`` disables it.
        min_p: Relative probability floor in ``[0, 1]``; ``0`` disables it.
        min_tokens_to_keep: Tokens that survive the min-p filter regardless.
        top_k: Keep only the ``top_k`` most likely tokens; ``0`` disables it.

    The filters run in the order top-k, top-p, min-p, then a token is drawn
    with the temperature applied. Seed with ``mx.random.seed`` for
    reproducible draws.
    """
    if temp < 0:
        raise ValueError(f"temp must be non-negative, got {temp!r}.")
    _check_unit_interval("top_p", top_p)
    _check_unit_interval("min_p", min_p)
    _check_min_tokens(min_tokens_to_keep)
    _check_top_k(top_k)

    if temp == 0:
        return partial(mx.argmax, axis=-1)

    filters = []
    if top_k > 0:
        filters.append(partial(apply_top_k, top_k=top_k))
    if 0.0 < top_p < 1.0:
        filters.append(partial(apply_top_p, top_p=top_p))
    if min_p > 0.0:
        filters.append(
            partial(apply_min_p, min_p=min_p, min_tokens_to_keep=min_tokens_to_keep)
        )

    def sample(logprobs: mx.array) -> mx.array:
        masked = reduce(lambda scores, keep: keep(scores), filters, logprobs)
        return categorical_sampling(masked, temp)

    return sample


def make_repetition_penalty(
    penalty: float, context_size: int = 20
) -> Callable[[mx.array, mx.array], mx.array]:
    """Penalize tokens seen among the last ``context_size`` tokens.

    Positive logits of those tokens are divided by ``penalty`` and negative
    ones multiplied by it (CTRL, arXiv:1909.05858). ``tokens`` may be 1-D (a
    history shared by every row of ``logits``) or ``[B, T]``.
    """
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
        raise ValueError(f"repetition_penalty must be a number, got {penalty!r}.")
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {penalty!r}.")
    if not isinstance(context_size, int) or context_size < 1:
        raise ValueError(
            f"repetition_context_size must be a positive integer, got {context_size!r}."
        )

    def repetition_penalty(tokens, logits):
        tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
        if tokens.size == 0:
            return logits
        recent = tokens[..., -context_size:]
        if recent.ndim == 1:
            recent = mx.broadcast_to(recent, (logits.shape[0], recent.shape[0]))
        seen = mx.take_along_axis(logits, recent, axis=-1)
        seen = mx.where(seen < 0, seen * penalty, seen / penalty)
        return mx.put_along_axis(logits, recent, seen, axis=-1)

    return repetition_penalty


def make_logit_bias(
    logit_bias: Dict[int, float],
) -> Callable[[mx.array, mx.array], mx.array]:
    """Add ``logit_bias[token]`` to the logit of each listed token."""
    for token in logit_bias:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids, got {token!r}.")
    ids = mx.array(list(logit_bias.keys()))
    bias = mx.array(list(logit_bias.values()), dtype=mx.float32)

    def add_bias(tokens, logits):
        return logits.at[:, ids].add(bias.astype(logits.dtype))

    return add_bias


def make_logits_processors(
    logit_bias: Optional[Dict[int, float]] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
) -> List[Callable[[mx.array, mx.array], mx.array]]:
    """Build the processors ``(tokens, logits) -> logits`` to run before
    sampling: an additive ``logit_bias`` and a ``repetition_penalty``."""
    processors = []
    if logit_bias:
        processors.append(make_logit_bias(logit_bias))
    # None and 0 both mean "off", as upstream callers pass either; 1 is a no-op.
    if repetition_penalty not in (None, 0, 1):
        processors.append(
            make_repetition_penalty(repetition_penalty, repetition_context_size)
        )
    return processors
