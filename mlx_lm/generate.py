"""Text generation: the token loop, streaming, speculative and batched decoding, and the
``mlx_lm.generate`` command line."""

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from dataclasses import fields as kv_fields
from pathlib import Path
from typing import Any, Callable, Generator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .models import cache as kv
from .models.cache_hook import (
    cache_hook,
    maybe_compact_kv_cache,
    maybe_quantize_kv_cache,
)
from .sample_utils import make_logits_processors, make_sampler, xtc_special_tokens
from .tokenizer_utils import TokenizerWrapper

DEFAULT_PROMPT = "def fibonacci(n):"
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.0
DEFAULT_TOP_K = 0
DEFAULT_SEED = None

# Work queued here runs apart from the caller's default stream; thread-local so that
# a server can generate on a worker thread.
generation_stream = mx.new_thread_local_stream(mx.default_device())


@dataclass
class GenerationResponse:
    """One step of :func:`stream_generate`.

    ``text`` is the newly decodable piece of text (may be empty), ``token`` the sampled id,
    ``logprobs`` the log-probabilities it was drawn from and ``from_draft`` whether a draft
    model proposed it. Throughput figures are tokens per second; ``peak_memory`` is in GB.
    ``finish_reason`` is ``"stop"``, ``"length"`` or ``None`` while generation goes on.
    """

    # In upstream's order, for code that builds one positionally.
    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None


def _kv_config(kv_config, **options) -> kv.KVCacheConfig:
    return kv.KVCacheConfig.from_options(kv_config, **options)


def default_prefill_step_size() -> int:
    """Prompt chunk length when none is given: 256 tokens on the CPU, 2048 elsewhere.

    MLX's CPU attention writes out every score of a chunk, the masked-out half
    included, and its ``exp`` dominates long prompts; short chunks skip most of that
    half (README, "This fork against upstream mlx-lm").
    """
    return 256 if mx.default_device() == mx.cpu else 2048


def _prefill_step(size: Optional[int]) -> int:
    if size is None:
        return default_prefill_step_size()
    if size < 1:
        raise ValueError(f"prefill_step_size must be positive, got {size}")
    return size


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _make_cache(model, prompt_cache, config):
    if prompt_cache is None:
        return kv.make_prompt_cache(model, config=config)
    if len(prompt_cache) != len(model.layers):
        raise ValueError(
            f"prompt_cache has {len(prompt_cache)} layers but the model has "
            f"{len(model.layers)}"
        )
    return prompt_cache


def _prefill(model, prompt, cache, step, after_chunk, progress):
    """Run all but the last ``keep`` tokens of ``prompt`` through the model in chunks.

    Returns the tokens still to be fed (at least one), so that the first decode step
    produces logits for the next token.
    """
    total = prompt.shape[0]
    done = 0
    progress(done, total)
    while total - done > 1:
        n = min(step, total - done - 1)
        model(prompt[None, done : done + n], cache=cache)
        after_chunk(cache, prompt=True)
        mx.eval([c.state for c in cache])
        done += n
        progress(done, total)
        mx.clear_cache()
    return prompt[done:]


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    max_kv_size: Optional[int] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: Optional[int] = None,
    quantized_kv_start: Optional[int] = None,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    kv_config: Optional[kv.KVCacheConfig] = None,
    **cache_options,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Yield ``(token, logprobs)`` pairs continuing ``prompt``.

    The prompt is fed in chunks of ``prefill_step_size`` tokens (default:
    :func:`default_prefill_step_size`). While the caller handles one token, the next is
    already being computed (``mx.async_eval``), so the Python overhead overlaps with the
    model. ``prompt_cache`` is updated in place when given; ``max_tokens=-1`` never
    stops. ``kv_bits`` switches each layer to a quantized cache once it holds
    ``quantized_kv_start`` tokens (defaults: from the start, in groups of 64, or 32
    where 64 does not divide the head dimension, or those of an already quantized
    ``prompt_cache``; see :meth:`~mlx_lm.models.cache.KVCacheConfig.for_model`).
    ``kv_config`` (:class:`~mlx_lm.models.cache.KVCacheConfig`) carries every cache
    option at once; keyword options such as ``compact_kv_budget`` or
    ``window_size`` override its fields.
    """
    if prompt.size == 0:
        raise ValueError("prompt must contain at least one token")
    prefill_step_size = _prefill_step(prefill_step_size)
    config = _kv_config(
        kv_config,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        **cache_options,
    ).for_model(model, prompt_cache)
    cache = _make_cache(model, prompt_cache, config)
    sampler = sampler or _greedy
    progress = prompt_progress_callback or (lambda done, total: None)
    history = None
    after_update = cache_hook(config, cache)

    def step(tokens):
        nonlocal history
        logits = model(tokens[None], cache=cache)[:, -1, :]
        if logits_processors:
            history = mx.concatenate([history, tokens.astype(history.dtype)])
            for processor in logits_processors:
                logits = processor(history, logits)
        after_update(cache)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    with mx.stream(generation_stream):
        rest = _prefill(model, prompt, cache, prefill_step_size, after_update, progress)
        history = prompt[: prompt.shape[0] - rest.shape[0]]
        y, logprobs = step(rest)
    mx.async_eval(y, logprobs)

    produced = 0
    if max_tokens == 0:
        mx.eval(y)
        progress(prompt.shape[0], prompt.shape[0])
    while produced != max_tokens:
        # Queue the following step before handing out this token, so the model
        # computes while the caller works.
        if produced + 1 != max_tokens:
            with mx.stream(generation_stream):
                upcoming = step(y)
            mx.async_eval(*upcoming)
        token = y.item()
        if produced == 0:
            progress(prompt.shape[0], prompt.shape[0])
        yield token, logprobs
        produced += 1
        if produced % 256 == 0:
            mx.clear_cache()
        if produced != max_tokens:
            y, logprobs = upcoming


def _trim_rejected(cache: List[Any], n: int):
    """Drop the ``n`` rejected proposals from every layer; a layer that cannot (a
    ring that has wrapped, a window that evicted during the round) is an error,
    never a cache still holding them."""
    if n == 0:
        return
    if kv.can_trim_prompt_cache(cache):
        refused = [i for i, c in enumerate(cache) if c.trim(n) != n]
    else:
        refused = [i for i, c in enumerate(cache) if not c.is_trimmable()]
    if refused:
        i = refused[0]
        raise ValueError(
            f"speculative decoding cannot drop {n} rejected tokens: layer {i} "
            f"({type(cache[i]).__name__}) of the prompt cache refused the trim"
        )


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    draft_model: nn.Module,
    *,
    num_draft_tokens: int = 2,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: Optional[int] = None,
    quantized_kv_start: Optional[int] = None,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    kv_config: Optional[kv.KVCacheConfig] = None,
    **cache_options,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Yield ``(token, logprobs, from_draft)`` using ``draft_model`` to propose tokens.

    Each round the draft proposes ``num_draft_tokens`` tokens one by one; the main model
    scores them all in one call and the longest prefix it agrees with is accepted,
    followed by the main model's own next token. Both caches are then trimmed back to
    the accepted text, so both must be trimmable. ``prompt_cache``, when given, holds the
    main model's layers followed by the draft model's. Cache options (``kv_config``
    and keywords, as for :func:`generate_step`) apply to both models; the cache hooks
    run once per round, after the rejected proposals are trimmed away.
    """
    if prompt.size == 0:
        raise ValueError("prompt must contain at least one token")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be positive, got {num_draft_tokens}")
    prefill_step_size = _prefill_step(prefill_step_size)
    config = _kv_config(
        kv_config,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        **cache_options,
    )
    n_main = len(model.layers)
    if prompt_cache is None:
        main_cache = kv.make_prompt_cache(model, config=config)
        draft_cache = kv.make_prompt_cache(draft_model, config=config)
    else:
        if len(prompt_cache) != n_main + len(draft_model.layers):
            raise ValueError(
                "prompt_cache must hold the main model's layers followed by the draft "
                f"model's ({n_main} + {len(draft_model.layers)}), got {len(prompt_cache)}"
            )
        main_cache, draft_cache = prompt_cache[:n_main], prompt_cache[n_main:]
    # The two models may have heads of different widths: a group for each.
    main_config = config.for_model(model, main_cache)
    draft_config = config.for_model(draft_model, draft_cache)
    for c in main_cache + draft_cache:
        if not c.is_trimmable():
            raise ValueError(
                f"speculative decoding needs trimmable caches; {type(c).__name__} is not"
            )
    sampler = sampler or _greedy
    progress = prompt_progress_callback or (lambda done, total: None)
    history = prompt

    hook_main = cache_hook(main_config, main_cache)
    hook_draft = cache_hook(draft_config, draft_cache)

    # The hooks replace converted layers in main_cache / draft_cache; a
    # caller's prompt_cache must hold those, not the layers they replaced.
    def after_main(cache, prompt=False):
        hook_main(cache, prompt)
        if prompt_cache is not None:
            prompt_cache[:n_main] = cache

    def after_draft(cache, prompt=False):
        hook_draft(cache, prompt)
        if prompt_cache is not None:
            prompt_cache[n_main:] = cache

    def sample(logits, tokens_so_far):
        if logits_processors:
            for processor in logits_processors:
                logits = processor(tokens_so_far, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs

    with mx.stream(generation_stream):
        rest = _prefill(
            model, prompt, main_cache, prefill_step_size, after_main, progress
        )
        _prefill(
            draft_model, prompt, draft_cache, prefill_step_size, after_draft, progress
        )
    # Tokens the draft cache has not seen yet (the draft ends one token behind when
    # every proposal was accepted).
    draft_input = rest
    y = rest
    produced = rounds = 0
    while max_tokens < 0 or produced < max_tokens:
        left = num_draft_tokens if max_tokens < 0 else max_tokens - produced - 1
        k = min(num_draft_tokens, left)
        proposals = []
        with mx.stream(generation_stream):
            d_in = draft_input
            for _ in range(k):
                logits = draft_model(d_in[None], cache=draft_cache)[:, -1, :]
                tok, _ = sample(logits, mx.concatenate([history] + proposals))
                proposals.append(tok.astype(history.dtype))
                d_in = tok
            verify_in = mx.concatenate([y] + proposals) if proposals else y
            logits = model(verify_in[None], cache=main_cache)[0, -(k + 1) :, :]
            chosen, chosen_lp = [], []
            for i in range(k + 1):
                tok, lp = sample(
                    logits[i : i + 1], mx.concatenate([history] + proposals[:i])
                )
                chosen.append(tok)
                chosen_lp.append(lp[0])
        mx.eval(chosen, proposals)
        main_toks = [t.item() for t in chosen]
        draft_toks = [t.item() for t in proposals]
        accepted = 0
        while accepted < k and main_toks[accepted] == draft_toks[accepted]:
            accepted += 1
        for i in range(accepted):
            yield draft_toks[i], chosen_lp[i], True
        yield main_toks[accepted], chosen_lp[accepted], False
        produced += accepted + 1
        # The main cache saw y + k proposals; keep y + accepted ones.
        _trim_rejected(main_cache, k - accepted)
        new_y = mx.array([main_toks[accepted]], history.dtype)
        if accepted == k and k > 0:
            # The draft never fed its last proposal: feed it with the next token.
            draft_input = mx.concatenate([proposals[-1], new_y])
        else:
            _trim_rejected(draft_cache, max(k - 1 - accepted, 0))
            draft_input = new_y
        history = mx.concatenate([history] + proposals[:accepted] + [new_y])
        # Only now, after the trims above, may the hooks evict: a round's trim
        # never reaches tokens that were there at a compaction.
        after_main(main_cache)
        after_draft(draft_cache)
        y = new_y
        rounds += 1
        if rounds % 64 == 0:
            mx.clear_cache()


def _encode_prompt(tokenizer, prompt):
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return mx.array(prompt)


def _kv_cache_alias(kwargs: dict):
    """``kv_cache=`` (the name VeloxQuant-MLX's examples use) is ``prompt_cache=``."""
    if "kv_cache" not in kwargs:
        return
    cache = kwargs.pop("kv_cache")
    if kwargs.get("prompt_cache") is not None and cache is not kwargs["prompt_cache"]:
        raise ValueError("pass the cache as prompt_cache or as kv_cache, not both")
    kwargs["prompt_cache"] = cache


def stream_generate(
    model: nn.Module,
    tokenizer: Union[TokenizerWrapper, Any],
    prompt: Union[str, mx.array, List[int]],
    max_tokens: int = 256,
    draft_model: Optional[nn.Module] = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Yield :class:`GenerationResponse` objects as text is generated.

    ``prompt`` may be a string (encoded here), a list of ids or an ``mx.array``. With a
    ``draft_model`` (same tokenizer) decoding is speculative. Remaining keyword arguments
    go to :func:`generate_step` or :func:`speculative_generate_step`.
    """
    _kv_cache_alias(kwargs)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = _encode_prompt(tokenizer, prompt)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()

    if draft_model is None:
        kwargs.pop("num_draft_tokens", None)
        steps = (
            (tok, lp, False)
            for tok, lp in generate_step(prompt, model, max_tokens=max_tokens, **kwargs)
        )
    else:
        steps = speculative_generate_step(
            prompt, model, draft_model, max_tokens=max_tokens, **kwargs
        )

    start = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    token = None
    for n, (token, logprobs, from_draft) in enumerate(steps, start=1):
        if n == 1:
            prompt_time = time.perf_counter() - start
            prompt_tps = prompt.size / max(prompt_time, 1e-9)
            start = time.perf_counter()
        finished = token in tokenizer.eos_token_ids
        if not finished:
            detokenizer.add_token(token)
        if finished or n == max_tokens:
            detokenizer.finalize()
        elapsed = max(time.perf_counter() - start, 1e-9)
        yield GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=prompt.size,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / elapsed,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=(
                "stop" if finished else ("length" if n == max_tokens else None)
            ),
        )
        if finished:
            return


def generate(
    model: nn.Module,
    tokenizer: Union[TokenizerWrapper, Any],
    prompt: Union[str, List[int], mx.array],
    verbose: bool = False,
    **kwargs,
) -> str:
    """Return the whole generated text; with ``verbose`` stream it and print statistics
    (with eviction counts when the KV cache is bounded)."""
    _kv_cache_alias(kwargs)
    bounded = False
    if verbose:
        print("=" * 10)
        if kwargs.get("prompt_cache") is None:
            # Built here so that its evictions can be reported afterwards.
            kwargs["prompt_cache"], bounded = _fresh_cache(model, kwargs)
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print("=" * 10)
        if response is None:
            print("No text generated for this prompt")
        else:
            print(
                f"Prompt: {response.prompt_tokens} tokens, "
                f"{response.prompt_tps:.3f} tokens-per-sec"
            )
            print(
                f"Generation: {response.generation_tokens} tokens, "
                f"{response.generation_tps:.3f} tokens-per-sec"
            )
            print(f"Peak memory: {response.peak_memory:.3f} GB")
        stats = kv.cache_eviction_stats(kwargs["prompt_cache"])
        group = getattr(model, "pipeline_group", None)
        if group is not None:  # each rank holds some of the layers
            names = ("tokens_evicted", "total_evictions", "current_size")
            # Behind the model's own collectives, in the same order on every rank.
            totals = mx.distributed.all_sum(
                mx.array([stats[k] for k in names], dtype=mx.int64),
                group=group,
                stream=generation_stream,
            )
            stats = dict(zip(names, totals.tolist()))
        if bounded or stats["tokens_evicted"]:
            print(
                f"KV cache: {stats['tokens_evicted']} tokens evicted in "
                f"{stats['total_evictions']} evictions, {stats['current_size']} "
                "held (all layers)"
            )
    return text


def _fresh_cache(model, kwargs) -> Tuple[List[Any], bool]:
    """The prompt cache generation would build from the options in ``kwargs`` (the
    draft model's layers follow the model's), and whether it is bounded."""
    names = {f.name for f in kv_fields(kv.KVCacheConfig)}
    options = {k: v for k, v in kwargs.items() if k in names}
    config = _kv_config(kwargs.get("kv_config"), **options)
    cache = kv.make_prompt_cache(model, config=config)
    if kwargs.get("draft_model") is not None:
        cache += kv.make_prompt_cache(kwargs["draft_model"], config=config)
    return cache, config.evicts


@dataclass
class BatchStats:
    """Totals of one :func:`batch_generate` call (throughput in tokens per second)."""

    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    generation_time: float = 0.0
    peak_memory: float = 0.0


@dataclass
class BatchResponse:
    """Texts of :func:`batch_generate` in prompt order, with statistics."""

    texts: List[str]
    stats: BatchStats
    token_ids: Optional[List[List[int]]] = None
    caches: Optional[List[Any]] = None
    finish_reasons: List[str] = field(default_factory=list)


def _batch_cache(model, config: kv.KVCacheConfig, padding: List[int]) -> List[Any]:
    """One batch cache per layer: compressed where ``config`` asks for it, except in
    layers with a window of their own."""
    if config.compact_kv_budget is None:
        return [kv.BatchKVCache(padding) for _ in model.layers]
    own = model.make_cache() if hasattr(model, "make_cache") else model.layers
    if all(isinstance(layer, kv.RotatingKVCache) for layer in own):
        raise ValueError(
            f"compact_kv_budget={config.compact_kv_budget}: every layer of this model "
            "has a sliding window of its own, which batch caches keep in full, so "
            "batch_generate has no layer to compress"
        )
    layers = []
    for layer in own:
        if isinstance(layer, kv.RotatingKVCache):
            layers.append(kv.BatchKVCache(padding))
            continue
        if config.method is not None:
            codecs = kv.method_codecs(config, kv.model_head_dim(model), len(layers))
            layers.append(
                kv.CodecCompressedKVCache.from_config(config, padding, codecs)
            )
            continue
        layer = kv.CompressedKVCache.from_config(config, left_padding=padding)
        if config.kv_bits is not None:
            layer = layer.to_quantized(config.kv_group_size, config.kv_bits)
        layers.append(layer)
    return layers


def batch_generate(
    model: nn.Module,
    tokenizer: Union[TokenizerWrapper, Any],
    prompts: List[List[int]],
    max_tokens: Union[int, List[int]] = 128,
    verbose: bool = False,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    prefill_step_size: Optional[int] = None,
    return_token_ids: bool = False,
    return_prompt_caches: bool = False,
    kv_config: Optional[kv.KVCacheConfig] = None,
    **cache_options,
) -> BatchResponse:
    """Generate for several tokenized prompts at once over a left-padded batch cache.

    Every layer gets a ``BatchKVCache`` (models with sliding-window layers still mask
    their window, they just keep the full history). With ``compact_kv_budget`` the
    other layers get a batched :class:`~mlx_lm.models.cache.CompressedKVCache`
    instead: every sequence keeps its own tokens and padding is evicted first;
    ``kv_bits`` then quantizes it from the first token. Sequences that hit an EOS
    token or their own ``max_tokens`` stop contributing text while the others go on.
    """
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must contain at least one token")
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    if len(limits) != len(prompts):
        raise ValueError(
            f"max_tokens has {len(limits)} entries for {len(prompts)} prompts"
        )
    prefill_step_size = _prefill_step(prefill_step_size)
    config = _kv_config(kv_config, **cache_options).for_model(model)
    unsupported = [
        f"{name}={getattr(config, name)}"
        for name in ("max_kv_size", "window_size")
        if getattr(config, name) is not None
    ]
    if config.kv_bits is not None and config.compact_kv_budget is None:
        unsupported.append(f"kv_bits={config.kv_bits} without compact_kv_budget")
    if config.method is not None and config.compact_kv_budget is None:
        unsupported.append(f"method={config.method!r} without compact_kv_budget")
    quantizes = config.kv_bits is not None or config.method is not None
    if quantizes and config.quantized_kv_start > 0:
        unsupported.append(f"quantized_kv_start={config.quantized_kv_start}")
    if unsupported:
        raise ValueError(f"batch_generate does not support {', '.join(unsupported)}")
    sampler = sampler or _greedy
    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    batch = mx.array([[0] * pad + list(p) for pad, p in zip(padding, prompts)])
    cache = _batch_cache(model, config, padding)
    # Quantization was decided when the layers were made; compaction runs.
    after_update = cache_hook(kv.KVCacheConfig(compact_mode=config.compact_mode), cache)
    # Per-sequence token history (without padding) for the logits processors.
    history = [mx.array(p) for p in prompts]

    def step(tokens):
        logits = model(tokens, cache=cache)[:, -1, :]
        if logits_processors:
            rows = []
            for i in range(len(prompts)):
                if tokens.shape[1] == 1:
                    history[i] = mx.concatenate(
                        [history[i], tokens[i].astype(mx.int32)]
                    )
                row = logits[i : i + 1]
                for processor in logits_processors:
                    row = processor(history[i], row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        after_update(cache)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs)

    start = time.perf_counter()
    with mx.stream(generation_stream):
        done = 0
        while longest - done > 1:
            n = min(prefill_step_size, longest - done - 1)
            model(batch[:, done : done + n], cache=cache)
            after_update(cache, prompt=True)
            mx.eval([c.state for c in cache])
            done += n
        y = step(batch[:, done:])
    mx.eval(y)
    prompt_time = time.perf_counter() - start

    outputs = [[] for _ in prompts]
    reasons = [None] * len(prompts)
    start = time.perf_counter()
    while True:
        tokens = y.tolist()
        for i, t in enumerate(tokens):
            if reasons[i] is not None:
                continue
            if t in tokenizer.eos_token_ids:
                reasons[i] = "stop"
                continue
            outputs[i].append(t)
            if len(outputs[i]) >= limits[i]:
                reasons[i] = "length"
        if all(r is not None for r in reasons):
            break
        with mx.stream(generation_stream):
            y = step(y[:, None])
        mx.eval(y)
    gen_time = time.perf_counter() - start

    texts = [tokenizer.decode(o) for o in outputs]
    n_gen = sum(len(o) for o in outputs)
    stats = BatchStats(
        prompt_tokens=sum(len(p) for p in prompts),
        prompt_time=prompt_time,
        prompt_tps=sum(len(p) for p in prompts) / max(prompt_time, 1e-9),
        generation_tokens=n_gen,
        generation_time=gen_time,
        generation_tps=n_gen / max(gen_time, 1e-9),
        peak_memory=mx.get_peak_memory() / 1e9,
    )
    if verbose:
        for i, t in enumerate(texts):
            print(f"[{i}] {t}")
        print(
            f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} "
            f"tokens-per-sec\nGeneration: {stats.generation_tokens} tokens, "
            f"{stats.generation_tps:.3f} tokens-per-sec\n"
            f"Peak memory: {stats.peak_memory:.3f} GB"
        )
    return BatchResponse(
        texts=texts,
        stats=stats,
        token_ids=outputs if return_token_ids else None,
        caches=cache if return_prompt_caches else None,
        finish_reasons=reasons,
    )


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {value}")
    return value


def _probability(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {value}")
    return value


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {value}")
    return value


def _xtc_threshold(text):
    value = float(text)
    if not 0.0 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"must be within [0, 0.5], got {value}")
    return value


def _non_negative_float(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {value}")
    return value


def _json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({e}): {text!r}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _existing_file(text):
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def str2bool(text):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_prefill_argument(p: argparse.ArgumentParser):
    """``--prefill-step-size``, shared by generate, cache_prompt and the server."""
    p.add_argument(
        "--prefill-step-size",
        type=_positive_int,
        default=None,
        help="prompt tokens per model call (default: 256 on the CPU, 2048 elsewhere)",
    )


def add_kv_cache_arguments(p: argparse.ArgumentParser):
    """The KV-cache memory flags shared by generate, cache_prompt and the server.

    They are parsed as plain numbers and strings; :func:`kv_config_from_args` checks
    them all through :class:`~mlx_lm.models.cache.KVCacheConfig`.
    """
    defaults = kv.KVCacheConfig()
    g = p.add_argument_group("KV cache memory")
    g.add_argument(
        "--max-kv-size",
        type=int,
        help="Keep the first 4 and the most recent tokens, at most this many per layer",
    )
    g.add_argument(
        "--kv-bits",
        type=int,
        help=f"Quantize the KV cache with affine groups {kv.KV_BITS}, or the keys "
        "of --kv-method with this many bits",
    )
    g.add_argument(
        "--kv-method",
        help=f"KV quantization method: {', '.join(kv.kv_quant.KV_METHODS)} "
        '(README, "KV quantization methods")',
    )
    g.add_argument(
        "--kv-value-bits",
        type=int,
        help="Bits of the values under --kv-method (16: float16; default 2); "
        "with --kv-bits alone, affine values of this width (e.g. K8/V4)",
    )
    g.add_argument(
        "--kv-outlier-channels",
        type=int,
        help="Hold each head's N largest key channels apart with 8 bits "
        "(KeyNormObserver) under --kv-method",
    )
    g.add_argument(
        "--kv-calibration",
        help="Folder written by python -m mlx_lm.calibrate_kv, for the "
        "calibrated methods",
    )
    g.add_argument(
        "--kv-group-size",
        type=int,
        default=defaults.kv_group_size,
        help="Quantization group size (default: 64, or 32 where 64 does not divide "
        "the head dimension, such as 32 or 96)",
    )
    g.add_argument(
        "--quantized-kv-start",
        type=int,
        default=defaults.quantized_kv_start,
        help="Quantize the KV cache once it holds this many tokens",
    )
    g.add_argument(
        "--compact-kv-budget",
        type=int,
        help="Evict low-scoring tokens so each layer keeps about this many",
    )
    g.add_argument(
        "--compact-keep-recent",
        type=int,
        default=defaults.compact_keep_recent,
        help="Newest tokens never evicted by compaction",
    )
    g.add_argument(
        "--compact-policy",
        default=defaults.compact_policy,
        help=f"Token scoring function: {', '.join(kv.COMPACT_POLICIES)} (snapkv: "
        "the attention paid by the newest tokens, the question after a prompt; "
        "default: snapkv with --compact-mode once, keydiff with stream)",
    )
    g.add_argument(
        "--compact-scope",
        default=defaults.compact_scope,
        help=f"Who shares one choice of kept tokens: {', '.join(kv.COMPACT_SCOPES)}",
    )
    g.add_argument(
        "--compact-sink-tokens",
        type=int,
        default=defaults.compact_sink_tokens,
        help="First tokens never evicted by compaction",
    )
    g.add_argument(
        "--compact-margin",
        type=int,
        help="Tokens allowed above the budget before compacting (hysteresis)",
    )
    g.add_argument(
        "--compact-mode",
        default=defaults.compact_mode,
        help="When to compact: once (the default: the prompt is held whole while "
        "it is read, then compacted to the budget; generated tokens then stream) or "
        "stream (whenever a layer outgrows budget + margin, during the prompt too, "
        "so memory never exceeds that)",
    )
    g.add_argument("--window-size", type=int, help="Sliding window of this many tokens")
    g.add_argument(
        "--window-strategy",
        default=defaults.window_strategy,
        help=f"Which tokens leave the window: {', '.join(kv.WINDOW_STRATEGIES)}",
    )
    g.add_argument(
        "--window-prefix",
        type=int,
        default=defaults.window_prefix,
        help="First tokens the 'fixed' and 'attention' strategies always keep",
    )
    g.add_argument(
        "--window-attention-span",
        type=int,
        default=defaults.window_attention_span,
        help="Tokens a window holds beyond --window-size before it evicts them in "
        "one block; the 'attention' strategy ranks tokens by the attention they "
        "received over that many decode steps",
    )


# Config fields whose flag is not the field's own name.
_FLAGS = {
    "method": "--kv-method",
    "bits": "--kv-bits",
    "value_bits": "--kv-value-bits",
    "calibration": "--kv-calibration",
    "num_channels": "--kv-outlier-channels",
}


def kv_config_from_args(args: argparse.Namespace) -> kv.KVCacheConfig:
    """Build the cache options from parsed flags; a ``ValueError`` names the flag.

    With ``--kv-method`` the ``--kv-bits`` are the method's key bits; without
    it ``--kv-bits`` quantizes with affine groups, asymmetrically (method
    ``affine``) when ``--kv-value-bits`` is given too.
    """
    names = [f.name for f in kv_fields(kv.KVCacheConfig)]
    options = {n: getattr(args, n) for n in names if n not in kv.METHOD_FIELDS}
    method = getattr(args, "kv_method", None)
    value_bits = getattr(args, "kv_value_bits", None)
    if method is None and value_bits is not None:
        if args.kv_bits is None:
            raise ValueError("--kv-value-bits needs --kv-bits or --kv-method")
        method = "affine"
    if method is not None:
        options.update(method=method, kv_bits=None)
        if args.kv_bits is not None:
            options["bits"] = args.kv_bits
        if value_bits is not None:
            options["value_bits"] = value_bits
    if getattr(args, "kv_calibration", None) is not None:
        options["calibration"] = args.kv_calibration
    outliers = getattr(args, "kv_outlier_channels", None)
    try:
        if outliers is not None:
            options["outlier_observer"] = kv.KeyNormObserver(outliers)
        return kv.KVCacheConfig(**options)
    except ValueError as e:
        message = str(e)
        flags = {n: "--" + n.replace("_", "-") for n in names}
        flags.update(_FLAGS)
        pattern = r"\b(" + "|".join(sorted(flags, key=len, reverse=True)) + r")\b"
        message = re.sub(pattern, lambda m: flags[m.group(1)], message)
        raise ValueError(message) from None


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Generate text with an MLX language model.")
    p.add_argument(
        "--model",
        default=None,
        help="Local folder or Hugging Face repo (default: the bundled demo model)",
    )
    p.add_argument(
        "--prompt", "-p", default=DEFAULT_PROMPT, help="Prompt, or - for stdin"
    )
    p.add_argument(
        "--system-prompt", default=None, help="System message for chat models"
    )
    p.add_argument(
        "--max-tokens", "-m", type=_non_negative_int, default=DEFAULT_MAX_TOKENS
    )
    p.add_argument("--temp", type=_non_negative_float, default=DEFAULT_TEMP)
    p.add_argument("--top-p", type=_probability, default=DEFAULT_TOP_P)
    p.add_argument("--min-p", type=_probability, default=DEFAULT_MIN_P)
    p.add_argument("--top-k", type=_non_negative_int, default=DEFAULT_TOP_K)
    p.add_argument("--min-tokens-to-keep", type=_positive_int, default=1)
    p.add_argument("--repetition-penalty", type=_non_negative_float, default=None)
    p.add_argument("--repetition-context-size", type=_positive_int, default=20)
    p.add_argument(
        "--presence-penalty",
        type=_finite_float,
        default=None,
        help="Subtracted from the logit of every token among the last "
        "--presence-context-size tokens",
    )
    p.add_argument("--presence-context-size", type=_positive_int, default=20)
    p.add_argument(
        "--frequency-penalty",
        type=_finite_float,
        default=None,
        help="Subtracted once per occurrence among the last "
        "--frequency-context-size tokens",
    )
    p.add_argument("--frequency-context-size", type=_positive_int, default=20)
    p.add_argument(
        "--xtc-probability",
        type=_probability,
        default=0.0,
        help="Chance per token of XTC: dropping all but the least likely of the "
        "tokens above --xtc-threshold",
    )
    p.add_argument("--xtc-threshold", type=_xtc_threshold, default=0.1)
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="Under mlx.launch, give each rank a run of layers (pipeline "
        "parallelism) instead of a share of every layer's heads (tensor parallelism)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Feed the prompt as-is instead of through the chat template",
    )
    p.add_argument(
        "--chat-template-config",
        type=_json_object,
        default=None,
        help="JSON object of extra arguments for the chat template",
    )
    p.add_argument(
        "--extra-eos-token",
        nargs="+",
        default=(),
        help="Further tokens that end generation",
    )
    add_kv_cache_arguments(p)
    add_prefill_argument(p)
    p.add_argument(
        "--prompt-cache-file",
        type=_existing_file,
        default=None,
        help="Resume from a prompt cache written by mlx_lm.cache_prompt",
    )
    p.add_argument("--draft-model", default=None, help="Model for speculative decoding")
    p.add_argument("--num-draft-tokens", type=_positive_int, default=3)
    p.add_argument(
        "--verbose",
        type=str2bool,
        default=True,
        help="Stream text and print statistics (true/false)",
    )
    return p


def build_prompt(
    tokenizer,
    prompt,
    system_prompt=None,
    ignore_chat_template=False,
    template_kwargs=None,
    suffix_only=False,
):
    """Token ids for ``prompt``, through the chat template when the tokenizer has one.

    With ``suffix_only`` (resuming a prompt cache) only the part of the templated text
    that follows the user's message start is returned, so the cached prefix is not fed
    twice.
    """
    if ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(prompt, add_special_tokens=not suffix_only)
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    kwargs = dict(template_kwargs or {})
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    if suffix_only:
        marker = "\x00mlx-lm-query\x00"
        messages[-1]["content"] = marker
        probe = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
        text = text[probe.index(marker) :]
    return tokenizer.encode(text, add_special_tokens=False)


def make_progress_printer(step_size):
    """Progress callback printing to stderr, for prompts longer than one prefill chunk."""

    def report(done, total):
        if total <= step_size:
            return
        end = "\n" if done == total else ""
        percent = 100 * done // total
        print(
            f"\rPrefill: {done}/{total} tokens ({percent}%)",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    return report


def main(argv=None):
    from .utils import load, resolve_model_argument

    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    try:
        kv_config = kv_config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.draft_model is not None and args.prompt_cache_file is not None:
        parser.error("--prompt-cache-file cannot be combined with --draft-model")
    # Under mlx.launch every rank runs this; the model is split across them.
    group = mx.distributed.init()
    if group.size() > 1:
        for flag, value in (
            ("--draft-model", args.draft_model),
            ("--prompt-cache-file", args.prompt_cache_file),
        ):
            if value is not None:
                parser.error(f"{flag} is not supported with {group.size()} ranks")

    prompt_cache, metadata = None, {}
    if args.prompt_cache_file is not None:
        prompt_cache, metadata = kv.load_prompt_cache(
            args.prompt_cache_file, return_metadata=True
        )
        cached_model = metadata.get("model")
        if args.model is not None and cached_model and args.model != cached_model:
            parser.error(
                f"--model {args.model!r} differs from the model the prompt cache was "
                f"made with ({cached_model!r})"
            )
        args.model = args.model or cached_model
        first = prompt_cache[0] if prompt_cache else None
        if hasattr(first, "bits"):  # quantized, possibly inside a window
            if args.kv_bits is not None and args.kv_bits != first.bits:
                parser.error(
                    f"--kv-bits {args.kv_bits} differs from the cache file's {first.bits}"
                )
            if args.kv_group_size not in (None, first.group_size):
                parser.error(
                    f"--kv-group-size {args.kv_group_size} differs from the cache "
                    f"file's {first.group_size}"
                )
        if kv_config.compact_kv_budget is not None:
            try:
                _check_compressed(prompt_cache, kv_config)
            except ValueError as e:
                parser.error(f"--prompt-cache-file: {e}")

    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")

    tokenizer_config = json.loads(metadata.get("tokenizer_config", "{}"))
    # Across ranks the weights load lazily: each rank reads what it keeps (all
    # of its own layers' tensors; with --pipeline nothing of the others').
    model, tokenizer = load(
        resolve_model_argument(args.model),
        tokenizer_config=tokenizer_config,
        lazy=group.size() > 1,
    )
    if group.size() > 1:
        if not hasattr(model, "shard"):
            raise SystemExit(f"error: {type(model).__module__} cannot be sharded")
        try:
            model.pipeline(group) if args.pipeline else model.shard(group)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        mx.eval(model.parameters())
        if group.rank() != 0:  # one copy of the output
            sys.stdout = open(os.devnull, "w")
    for token in args.extra_eos_token:
        tokenizer.add_eos_token(token)
    ids = build_prompt(
        tokenizer,
        prompt,
        system_prompt=args.system_prompt,
        ignore_chat_template=args.ignore_chat_template,
        template_kwargs=args.chat_template_config,
        suffix_only=prompt_cache is not None,
    )
    draft_model = None
    if args.draft_model is not None:
        draft_model, draft_tokenizer = load(args.draft_model)
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise SystemExit(
                "error: the draft model's tokenizer differs from the model's"
            )
        if prompt_cache is not None:
            prompt_cache = prompt_cache + kv.make_prompt_cache(draft_model)
    sampler = make_sampler(
        args.temp,
        args.top_p,
        args.min_p,
        args.min_tokens_to_keep,
        top_k=args.top_k,
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=xtc_special_tokens(tokenizer),
    )
    processors = make_logits_processors(
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
        presence_penalty=args.presence_penalty,
        presence_context_size=args.presence_context_size,
        frequency_penalty=args.frequency_penalty,
        frequency_context_size=args.frequency_context_size,
    )
    options = dict(
        max_tokens=args.max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=prompt_cache,
        prefill_step_size=args.prefill_step_size,
        kv_config=kv_config,
        prompt_progress_callback=(
            make_progress_printer(_prefill_step(args.prefill_step_size))
            if args.verbose
            else None
        ),
    )
    if draft_model is not None:
        options.update(draft_model=draft_model, num_draft_tokens=args.num_draft_tokens)
    text = generate(model, tokenizer, ids, verbose=args.verbose, **options)
    if not args.verbose:
        print(text)


if __name__ == "__main__":
    main()
