"""Token samplers and logits processors.

Samplers map log-probabilities of shape ``[B, V]`` to token ids of shape
``[B]``. Filters (top-k, top-p, min-p, XTC) replace the log-probabilities of
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


def apply_xtc(
    logits: mx.array,
    xtc_probability: float,
    xtc_threshold: float,
    xtc_special_tokens: Optional[List[int]] = None,
) -> mx.array:
    """Exclude Top Choices: with probability ``xtc_probability``, drop every
    token more likely than ``xtc_threshold`` except the least likely of them,
    so that the draw leaves the most predictable continuations. Nothing
    changes when fewer than two tokens pass the threshold; the tokens of
    ``xtc_special_tokens`` (end of text, newline) are never dropped."""
    _check_unit_interval("xtc_probability", xtc_probability)
    if not 0.0 <= xtc_threshold <= 0.5:
        raise ValueError(f"xtc_threshold must be in [0, 0.5], got {xtc_threshold!r}.")
    probs = mx.softmax(logits, axis=-1)
    above = probs > xtc_threshold
    weakest = mx.min(mx.where(above, probs, mx.inf), axis=-1, keepdims=True)
    drop = probs > weakest
    if xtc_special_tokens:
        listed = mx.zeros((logits.shape[-1],), dtype=mx.int32)
        listed = listed.at[mx.array(xtc_special_tokens)].add(1)
        drop = drop & (listed == 0)
    apply = mx.random.uniform(shape=logits.shape[:-1] + (1,)) < xtc_probability
    return mx.where(apply & drop, NEG_INF, logits)


def xtc_special_tokens(tokenizer) -> List[int]:
    """The tokens XTC should never drop for ``tokenizer``'s model: its newline
    and its end-of-sequence tokens, whose removal would run lines and answers
    on."""
    newline = tokenizer.encode("\n", add_special_tokens=False)
    return list(newline) + sorted(tokenizer.eos_token_ids)


def categorical_sampling(logits: mx.array, temp: float) -> mx.array:
    """Draw one token per row from ``softmax(logits / temp)``."""
    return mx.random.categorical(logits * (1.0 / temp), axis=-1)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.1,
    xtc_special_tokens: Optional[List[int]] = None,
) -> Callable[[mx.array], mx.array]:
    """Build a sampler from log-probabilities ``[B, V]`` to tokens ``[B]``.

    Args:
        temp: Sampling temperature; ``0`` picks the most likely token.
        top_p: Nucleus threshold in ``[0, 1]``; ``0`` or ``1`` disables it.
        min_p: Relative probability floor in ``[0, 1]``; ``0`` disables it.
        min_tokens_to_keep: Tokens that survive the min-p filter regardless.
        top_k: Keep only the ``top_k`` most likely tokens; ``0`` disables it.
        xtc_probability, xtc_threshold, xtc_special_tokens: see
            :func:`apply_xtc`; a probability of ``0`` disables it.

    The filters run in the order top-k, top-p, min-p, XTC, then a token is
    drawn with the temperature applied. Seed with ``mx.random.seed`` for
    reproducible draws.
    """
    if temp < 0:
        raise ValueError(f"temp must be non-negative, got {temp!r}.")
    _check_unit_interval("top_p", top_p)
    _check_unit_interval("min_p", min_p)
    _check_min_tokens(min_tokens_to_keep)
    _check_top_k(top_k)
    _check_unit_interval("xtc_probability", xtc_probability)

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
    if xtc_probability > 0.0:
        filters.append(
            partial(
                apply_xtc,
                xtc_probability=xtc_probability,
                xtc_threshold=xtc_threshold,
                xtc_special_tokens=xtc_special_tokens,
            )
        )

    def sample(logprobs: mx.array) -> mx.array:
        masked = reduce(lambda scores, keep: keep(scores), filters, logprobs)
        return categorical_sampling(masked, temp)

    return sample


def _check_context_size(name, context_size):
    if (
        not isinstance(context_size, int)
        or isinstance(context_size, bool)
        or context_size < 1
    ):
        raise ValueError(f"{name} must be a positive integer, got {context_size!r}.")


def _recent(tokens, logits, context_size) -> Optional[mx.array]:
    """The last ``context_size`` tokens as ``[B, T]`` (a 1-D history is shared
    by every row of ``logits``); None when there are none."""
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    if tokens.size == 0:
        return None
    recent = tokens[..., -context_size:]
    if recent.ndim == 1:
        recent = mx.broadcast_to(recent, (logits.shape[0], recent.shape[0]))
    return recent


def _occurrences(recent: mx.array, logits: mx.array) -> mx.array:
    """``[B, V]``: how often each token occurs in each row of ``recent``."""
    counts = mx.zeros(logits.shape, dtype=logits.dtype)
    ones = mx.ones(recent.shape, dtype=logits.dtype)
    rows = mx.broadcast_to(mx.arange(recent.shape[0])[:, None], recent.shape)
    return counts.at[rows, recent].add(ones)


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
    _check_context_size("repetition_context_size", context_size)

    def repetition_penalty(tokens, logits):
        recent = _recent(tokens, logits, context_size)
        if recent is None:
            return logits
        seen = mx.take_along_axis(logits, recent, axis=-1)
        seen = mx.where(seen < 0, seen * penalty, seen / penalty)
        return mx.put_along_axis(logits, recent, seen, axis=-1)

    return repetition_penalty


def _make_additive_penalty(name, penalty, context_size, per_occurrence):
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
        raise ValueError(f"{name} must be a number, got {penalty!r}.")
    if not math.isfinite(penalty):
        raise ValueError(f"{name} must be finite, got {penalty!r}.")
    _check_context_size(name.replace("penalty", "context_size"), context_size)

    def additive_penalty(tokens, logits):
        recent = _recent(tokens, logits, context_size)
        if recent is None:
            return logits
        counts = _occurrences(recent, logits)
        if not per_occurrence:
            counts = (counts > 0).astype(logits.dtype)
        return logits - penalty * counts

    return additive_penalty


def make_presence_penalty(
    penalty: float, context_size: int = 20
) -> Callable[[mx.array, mx.array], mx.array]:
    """Subtract ``penalty`` from the logit of every token that occurs among
    the last ``context_size`` tokens (OpenAI's ``presence_penalty``)."""
    return _make_additive_penalty("presence_penalty", penalty, context_size, False)


def make_frequency_penalty(
    penalty: float, context_size: int = 20
) -> Callable[[mx.array, mx.array], mx.array]:
    """Subtract ``penalty`` from a token's logit once for each time it occurs
    among the last ``context_size`` tokens (OpenAI's ``frequency_penalty``)."""
    return _make_additive_penalty("frequency_penalty", penalty, context_size, True)


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
    presence_penalty: Optional[float] = None,
    presence_context_size: int = 20,
    frequency_penalty: Optional[float] = None,
    frequency_context_size: int = 20,
) -> List[Callable[[mx.array, mx.array], mx.array]]:
    """Build the processors ``(tokens, logits) -> logits`` to run before
    sampling: an additive ``logit_bias``, a multiplicative
    ``repetition_penalty`` and the additive presence and frequency penalties,
    each over its own window of recent tokens."""
    processors = []
    if logit_bias:
        processors.append(make_logit_bias(logit_bias))
    # None and 0 both mean "off", as upstream callers pass either; 1 is a no-op.
    if repetition_penalty not in (None, 0, 1):
        processors.append(
            make_repetition_penalty(repetition_penalty, repetition_context_size)
        )
    if presence_penalty not in (None, 0):
        processors.append(
            make_presence_penalty(presence_penalty, presence_context_size)
        )
    if frequency_penalty not in (None, 0):
        processors.append(
            make_frequency_penalty(frequency_penalty, frequency_context_size)
        )
    return processors
