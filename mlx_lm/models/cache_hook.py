"""What runs on the prompt cache after every model call: compaction of the
compressed layers, then quantization (affine groups or a method's codes).

``cache_hook`` builds that step once per generation from a
:class:`~mlx_lm.models.cache.KVCacheConfig`; the generation loops of
:mod:`mlx_lm.generate` call it after each prompt chunk and decode step.
"""

from typing import Any, Callable, List, Optional

from . import cache as kv


def maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits):
    """Swap full-precision layers for quantized ones once they hold enough tokens.

    ``kv_group_size`` is the model's group, decided once by
    :meth:`~mlx_lm.models.cache.KVCacheConfig.for_model`: a layer converted on
    an earlier step must meet the same group on every later one.
    """
    if kv_bits is None:
        return
    if kv_group_size is None:
        raise ValueError(
            f"kv_bits={kv_bits} needs a kv_group_size; "
            "KVCacheConfig.for_model(model) decides it"
        )
    for i, layer in enumerate(prompt_cache):
        if hasattr(layer, "to_quantized") and layer.offset >= quantized_kv_start:
            prompt_cache[i] = layer.to_quantized(group_size=kv_group_size, bits=kv_bits)


def maybe_encode_kv_cache(prompt_cache, config: kv.KVCacheConfig):
    """Swap layers holding float keys and values for ones holding the codes of
    ``config.method`` once they hold ``quantized_kv_start`` tokens."""
    if config.method is None:
        return
    for i, layer in enumerate(prompt_cache):
        if layer.empty() or layer.offset < config.quantized_kv_start:
            continue
        head_dim = kv._parts(getattr(layer, "inner", layer).keys)[0].shape[-1]
        prompt_cache[i] = kv.to_codec(layer, config, i, head_dim)


def maybe_compact_kv_cache(prompt_cache, config: Optional[kv.KVCacheConfig] = None):
    """Evict by key score in every compressed layer that has outgrown its budget.

    Hysteresis: a layer is compacted back to ``budget`` tokens only once it holds
    more than ``budget + margin``, so the cost of one pass over the layer is spread
    over ``margin`` tokens. The decision compares Python integers, so it adds no
    synchronisation to the pipelined decode step. With ``config`` asking for
    compression, a cache without compressed layers is a ``ValueError``.
    """
    if config is not None and config.compact_kv_budget is not None:
        _check_compressed(prompt_cache, config)
    kv.compact_prompt_cache(prompt_cache)


def _window_tokens(layer) -> Optional[int]:
    """Most tokens a windowed layer holds; None for any other cache."""
    if isinstance(layer, kv.RotatingKVCache):
        return layer.max_size
    if isinstance(layer, kv.SlidingWindowKVCache):
        return layer.window_size
    return None


def _check_compressed(prompt_cache, config: kv.KVCacheConfig):
    layers = [
        (i, c)
        for i, c in enumerate(prompt_cache)
        if isinstance(c, kv.CompressedKVCache)
    ]
    # A model whose every layer slides gets windows no wider than the budget
    # (make_prompt_cache): nothing is left to compress.
    windows = [_window_tokens(c) for c in prompt_cache]
    narrow = [w is not None and w <= config.compact_kv_budget for w in windows]
    if not layers and not (narrow and all(narrow)):
        raise ValueError(
            f"compact_kv_budget={config.compact_kv_budget} was requested but the "
            "prompt cache has no compressed layers; build it with "
            "make_prompt_cache(model, compact_kv_budget=...)"
        )
    for i, layer in layers:
        if layer.budget != config.compact_kv_budget:
            raise ValueError(
                f"layer {i} of the prompt cache has budget {layer.budget} but "
                f"compact_kv_budget={config.compact_kv_budget} was requested"
            )


def _check_windowed(prompt_cache, config: kv.KVCacheConfig):
    """A window was asked for: no layer may be an unbounded cache."""
    for i, layer in enumerate(prompt_cache):
        if type(layer) in (kv.KVCache, kv.QuantizedKVCache, kv.CodecKVCache):
            raise ValueError(
                f"window_size={config.window_size} was requested but layer {i} of "
                f"the prompt cache is an unbounded {type(layer).__name__}; build it "
                "with make_prompt_cache(model, window_size=...)"
            )


def cache_hook(
    config: kv.KVCacheConfig, prompt_cache: Optional[List[Any]] = None
) -> Callable[..., None]:
    """What to run on the cache after each model call: ``hook(cache)`` after a
    decode step, ``hook(cache, prompt=True)`` after a prompt chunk.

    Compaction comes first, then quantization. Compaction is installed when
    ``config`` asks for it or ``prompt_cache`` (checked against ``config`` here)
    has compressed layers. With ``compact_mode="stream"`` it runs after every
    call; with ``"once"`` prompt chunks are held whole and the first decode step
    after them compacts the prompt to the budget (``compact_prompt_cache`` with
    no slack), so a query-aware policy sees the end of the prompt. A
    quantization ``method`` with ``quantized_kv_start`` converts layers to its
    codes once they hold that many tokens (from 0, the caches hold codes
    already). With ``kv_bits``, ``config`` must come from
    :meth:`~mlx_lm.models.cache.KVCacheConfig.for_model` (or name a
    ``kv_group_size``).
    """
    if config.kv_bits is not None and config.kv_group_size is None:
        raise ValueError(
            f"kv_bits={config.kv_bits} needs a kv_group_size; "
            "KVCacheConfig.for_model(model) decides it"
        )
    compressed = any(isinstance(c, kv.CompressedKVCache) for c in prompt_cache or ())
    if config.compact_kv_budget is not None and prompt_cache is not None:
        _check_compressed(prompt_cache, config)
    compacts = config.compact_kv_budget is not None or compressed
    once = config.compact_mode == "once"
    if config.window_size is not None and prompt_cache is not None:
        _check_windowed(prompt_cache, config)
    held = False  # once: prompt chunks arrived since the last compaction

    def run(cache, prompt=False):
        nonlocal held
        if compacts and once and prompt:
            held = True
        elif compacts and held:
            kv.compact_prompt_cache(cache, slack=0)
            held = False
        elif compacts:
            maybe_compact_kv_cache(cache)
        if config.kv_bits is not None:
            maybe_quantize_kv_cache(
                cache, config.quantized_kv_start, config.kv_group_size, config.kv_bits
            )
        if config.method is not None and config.quantized_kv_start:
            maybe_encode_kv_cache(cache, config)

    return run
