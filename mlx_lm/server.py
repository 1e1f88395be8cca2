"""``mlx_lm.server``: an OpenAI-compatible HTTP API over one loaded model.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``
and ``GET /health``. Every KV-cache memory option of ``mlx_lm.generate`` is a server
flag (the default for every request) and a field of the request body (an override for
that request); responses carry a ``kv_cache`` object saying which options were used,
how many tokens the cache evicted and how many bytes it holds.

One worker thread owns the models and runs every generation: MLX and the models are
not thread-safe, so HTTP threads only parse, validate and relay, and requests wait in
a first-come first-served queue. The worker keeps the cache of the last request so
that the next turn of the same conversation only prefills its new tokens.

The server binds the loopback interface unless ``--host`` says otherwise, answers
only for the models it was started with and reports every bad request as a 4xx JSON
error in OpenAI's format.
"""

import argparse
import functools
import json
import math
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass, field, fields, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np

from .generate import (
    DEFAULT_MIN_P,
    DEFAULT_TEMP,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    add_kv_cache_arguments,
    add_prefill_argument,
    generation_stream,
    kv_config_from_args,
    stream_generate,
)
from .models.cache import (
    METHOD_FIELDS,
    KeyNormObserver,
    KVCacheConfig,
    cache_eviction_stats,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from .sample_utils import make_logits_processors, make_sampler, xtc_special_tokens

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MODEL_ALIAS = "default_model"
# Host header names answered by default: a DNS-rebinding page reaches a loopback
# server under its own name, which is not one of these.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
# The most tokens one request may ask to generate (``--max-tokens-limit``).
DEFAULT_MAX_TOKENS_LIMIT = 32768

# Memory options a request may name: the config's own fields, and a
# quantization method under the command line's names (kv_method, kv_bits as
# its key bits, kv_value_bits).
KV_OPTIONS = tuple(
    f.name for f in fields(KVCacheConfig) if f.name not in METHOD_FIELDS
) + ("kv_method", "kv_value_bits", "kv_outlier_channels")
# Fields of a config that hold arrays or objects, left out of reports.
KV_ARTIFACTS = ("codebook", "smooth_factors", "rotations", "outlier_observer")
# The ways of bounding a cache exclude each other: a request naming one replaces
# whichever the server was started with.
KV_BOUNDS = ("max_kv_size", "compact_kv_budget", "window_size")

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# Fields every request may carry; those specific to one endpoint are added below.
COMMON_FIELDS = {
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "repetition_context_size",
    "logit_bias",
    "seed",
    "stop",
    "cache",
    "n",
    "user",
    "presence_penalty",
    "presence_context_size",
    "frequency_penalty",
    "frequency_context_size",
    "xtc_probability",
    "xtc_threshold",
    *KV_OPTIONS,
}
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
}
TEXT_FIELDS = COMMON_FIELDS | {"prompt", "logprobs"}


class APIError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.kind = "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def _invalid(param, message):
    return APIError(400, message, param=param, code="invalid_value")


# ---------------------------------------------------------------------------
# Request parsing (HTTP threads; no MLX work here)
# ---------------------------------------------------------------------------


@dataclass
class ServerDefaults:
    """What a request gets for every field it leaves out."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    # Longest prompt in tokens; None: the model's context length.
    max_prompt_tokens: Optional[int] = None
    temperature: float = DEFAULT_TEMP
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    kv_config: KVCacheConfig = field(default_factory=KVCacheConfig)
    # Whether special-token text typed in chat messages becomes control tokens.
    control_tokens_in_messages: bool = False


@dataclass
class GenerationRequest:
    """A validated completion request, ready for the worker."""

    kind: str  # "chat" or "text"
    model_id: str
    messages: Optional[List[Dict[str, str]]]
    prompt: Any  # str or list of token ids (text completions)
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: Optional[float]
    repetition_context_size: int
    presence_penalty: float
    presence_context_size: int
    frequency_penalty: float
    frequency_context_size: int
    xtc_probability: float
    xtc_threshold: float
    logit_bias: Optional[Dict[int, float]]
    seed: Optional[int]
    stop: List[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    kv_config: KVCacheConfig
    max_prompt_tokens: Optional[int] = None
    # "fresh": start from an empty cache instead of the previous request's.
    fresh_cache: bool = False
    control_tokens_in_messages: bool = False


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    # Finite only: JSON's 1e999 parses to infinity.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_strings(body):
    """Refuse any string in ``body`` that UTF-8 cannot encode (lone surrogates
    from ``\\ud800`` escapes), naming the field it is in."""
    pending = [(body, None)]
    while pending:
        value, where = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                pending.append((key, where))
                pending.append((item, key if where is None else f"{where}.{key}"))
        elif isinstance(value, list):
            pending.extend((item, where) for item in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _invalid(where, f"{where or 'a key'} holds a lone surrogate")


class _Fields:
    """Typed, range-checked reads of a JSON request body; ``null`` means absent."""

    def __init__(self, body: dict):
        self.body = body

    def _read(self, name, check, expected, default):
        value = self.body.get(name)
        if value is None:
            return default
        if not check(value):
            raise _invalid(name, f"{name} must be {expected}, got {value!r}")
        return value

    def integer(self, name, default=None, low=None, high=None):
        value = self._read(name, _is_int, "an integer", default)
        if value is not None and (
            (low is not None and value < low) or (high is not None and value > high)
        ):
            span = f"[{low}, {high}]" if high is not None else f"at least {low}"
            raise _invalid(name, f"{name} must be {span}, got {value}")
        return value

    def number(self, name, default=None, low=None, high=None, positive=False):
        value = self._read(name, _is_number, "a finite number", default)
        if value is None:
            return value
        if positive and value <= 0:
            raise _invalid(name, f"{name} must be positive, got {value}")
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"[{low}, {high}]" if high is not None else f"at least {low}"
            raise _invalid(name, f"{name} must be {span}, got {value}")
        return float(value)

    def boolean(self, name, default=False):
        return self._read(name, lambda v: isinstance(v, bool), "true or false", default)

    def text(self, name, default=None):
        return self._read(name, lambda v: isinstance(v, str), "a string", default)

    def mapping(self, name):
        return self._read(name, lambda v: isinstance(v, dict), "an object", None)


def _parse_messages(value):
    if not isinstance(value, list) or not value:
        raise _invalid("messages", "messages must be a non-empty array of objects")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _invalid(where, f"{where} must be an object, got {m!r}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _invalid(
                f"{where}.role", f"{where}.role must be one of {list(CHAT_ROLES)}"
            )
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            pieces = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise _invalid(
                        f"{where}.content", "only text content parts are supported"
                    )
                if not isinstance(part.get("text"), str):
                    raise _invalid(f"{where}.content", "a text part needs a string")
                pieces.append(part["text"])
            content = "".join(pieces)
        elif not isinstance(content, str):
            raise _invalid(
                f"{where}.content", f"{where}.content must be a string or an array"
            )
        messages.append(
            {"role": "system" if role == "developer" else role, "content": content}
        )
    return messages


def _parse_prompt(value):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        if min(value) < 0:
            raise _invalid("prompt", "token ids must be non-negative")
        return list(value)
    raise _invalid(
        "prompt", "prompt must be a string, an array of one string or of token ids"
    )


def _parse_stop(value):
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOP_SEQUENCES
    ):
        raise _invalid(
            "stop",
            f"stop must be a non-empty string or an array of at most "
            f"{MAX_STOP_SEQUENCES} non-empty strings",
        )
    return stops


def _parse_logit_bias(value):
    if value is None:
        return None
    bias = {}
    for key, amount in value.items():
        # ASCII digits only: "²".isdigit() is true, but it is no token id.
        if not re.fullmatch(r"[0-9]+", key) or not _is_number(amount):
            raise _invalid(
                "logit_bias", "logit_bias maps token ids to numbers in [-100, 100]"
            )
        if not -100 <= amount <= 100:
            raise _invalid("logit_bias", "logit_bias values must be in [-100, 100]")
        bias[int(key)] = float(amount)
    return bias


def _parse_cache(value) -> bool:
    if value not in (None, "reuse", "fresh"):
        raise _invalid("cache", f'cache must be "reuse" or "fresh", got {value!r}')
    return value == "fresh"


def request_kv_config(base: KVCacheConfig, body: dict) -> KVCacheConfig:
    """``base`` with the memory options named in ``body`` applied.

    Naming one way of bounding the cache (``max_kv_size``, ``compact_kv_budget`` or
    ``window_size``) drops the server's own bound. Values are checked exactly as on
    the command line; a bad one is an :class:`APIError` (400) naming it.
    """
    overrides = {k: body[k] for k in KV_OPTIONS if body.get(k) is not None}
    if any(k in overrides for k in KV_BOUNDS):
        base = replace(base, **{k: None for k in KV_BOUNDS})
    method = overrides.pop("kv_method", None)
    value_bits = overrides.pop("kv_value_bits", None)
    outliers = overrides.pop("kv_outlier_channels", None)
    if outliers is not None:
        try:
            overrides["outlier_observer"] = KeyNormObserver(outliers)
        except ValueError as e:
            raise APIError(
                400,
                f"kv_outlier_channels: {e}",
                param="kv_outlier_channels",
                code="invalid_kv_cache_option",
            )
    if method is None and value_bits is not None and base.method is None:
        if overrides.get("kv_bits") is None:
            raise APIError(
                400,
                "kv_value_bits needs kv_bits or kv_method",
                param="kv_value_bits",
                code="invalid_kv_cache_option",
            )
        method = "affine"
    if method is not None or (base.method is not None and value_bits is not None):
        overrides["method"] = method or base.method
    if "method" in overrides or base.method is not None:
        # Under a method, kv_bits are its key bits.
        if overrides.get("kv_bits") is not None:
            overrides["bits"] = overrides.pop("kv_bits")
        if value_bits is not None:
            overrides["value_bits"] = value_bits
        base = replace(base, kv_bits=None)
    try:
        return KVCacheConfig.from_options(base, **overrides)
    except ValueError as e:
        message = str(e)
        names = {
            "method": "kv_method",
            "value_bits": "kv_value_bits",
            "bits": "kv_bits",
        }
        # The option the message starts with is the one it is about.
        found = [
            (m.start(), k)
            for k in overrides
            for m in [re.search(rf"\b{k}\b", message)]
            if m
        ]
        named = [min(found)[1]] if found else [None]
        param = names.get(named[0], named[0])
        raise APIError(400, message, param=param, code="invalid_kv_cache_option")


def parse_request(body, kind, defaults: ServerDefaults, models) -> GenerationRequest:
    """Validate a completion request body; raise :class:`APIError` when it is bad."""
    if not isinstance(body, dict):
        raise APIError(
            400, "the request body must be a JSON object", code="invalid_json"
        )
    allowed = CHAT_FIELDS if kind == "chat" else TEXT_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(
            400,
            f"unsupported field(s): {', '.join(unknown)}",
            param=unknown[0],
            code="unsupported_field",
        )
    _check_strings(body)
    f = _Fields(body)
    model_id = models.resolve(f.text("model"))
    if f.integer("n", 1) != 1:
        raise _invalid("n", "only n=1 is supported")
    f.text("user")

    stream_options = f.mapping("stream_options") or {}
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _invalid("stream_options", "stream_options.include_usage must be boolean")

    limit = defaults.max_tokens_limit
    max_tokens = f.integer("max_tokens", defaults.max_tokens, low=1, high=limit)
    if kind == "chat":
        max_tokens = f.integer("max_completion_tokens", max_tokens, low=1, high=limit)
        messages, prompt = _parse_messages(body.get("messages")), None
        logprobs = f.boolean("logprobs")
        top_logprobs = f.integer("top_logprobs", 0, low=0, high=MAX_TOP_LOGPROBS)
        if top_logprobs and not logprobs:
            raise _invalid("top_logprobs", "top_logprobs needs logprobs=true")
    else:
        if body.get("prompt") is None:
            raise _invalid("prompt", "prompt is required")
        messages, prompt = None, _parse_prompt(body["prompt"])
        # The legacy endpoint's ``logprobs`` is the number of alternatives to list.
        top_logprobs = f.integer("logprobs", None, low=0, high=MAX_TOP_LOGPROBS)
        logprobs = top_logprobs is not None
        top_logprobs = top_logprobs or 0

    return GenerationRequest(
        kind=kind,
        model_id=model_id,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=f.number("temperature", defaults.temperature, low=0),
        top_p=f.number("top_p", defaults.top_p, low=0, high=1),
        top_k=f.integer("top_k", defaults.top_k, low=0),
        min_p=f.number("min_p", defaults.min_p, low=0, high=1),
        repetition_penalty=f.number("repetition_penalty", None, positive=True),
        repetition_context_size=f.integer("repetition_context_size", 20, low=1),
        # OpenAI's range for both.
        presence_penalty=f.number("presence_penalty", 0.0, low=-2, high=2),
        presence_context_size=f.integer("presence_context_size", 20, low=1),
        frequency_penalty=f.number("frequency_penalty", 0.0, low=-2, high=2),
        frequency_context_size=f.integer("frequency_context_size", 20, low=1),
        xtc_probability=f.number("xtc_probability", 0.0, low=0, high=1),
        xtc_threshold=f.number("xtc_threshold", 0.1, low=0, high=0.5),
        logit_bias=_parse_logit_bias(f.mapping("logit_bias")),
        seed=f.integer("seed", None, low=0, high=2**64 - 1),
        stop=_parse_stop(body.get("stop")),
        stream=f.boolean("stream"),
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        kv_config=request_kv_config(defaults.kv_config, body),
        max_prompt_tokens=defaults.max_prompt_tokens,
        control_tokens_in_messages=defaults.control_tokens_in_messages,
        fresh_cache=_parse_cache(body.get("cache")),
    )


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def public_model_id(model: str) -> str:
    """The id a model is served under: a local folder or file by its own name
    (the path above it stays private), a hub repo id as it is."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


class ServedModels:
    """The models a server answers for: its own, plus ``allowed`` ones loaded on
    first use (at most one of those is kept in memory at a time).

    Each is known by a public id (:func:`public_model_id`, or ``default_name``
    for the default) and a request may name it by that id, by the argument the
    server was started with, or as ``"default_model"``. Nothing else is ever
    loaded, so a request cannot make the server read an arbitrary path.
    """

    def __init__(
        self,
        default: str,
        allowed: List[str],
        loader: Callable,
        default_name: Optional[str] = None,
    ):
        self._sources = {}  # public id -> what the loader is given
        self._aliases = {}  # any accepted name -> public id
        for i, source in enumerate(dict.fromkeys([default, *allowed])):
            name = default_name if i == 0 and default_name else public_model_id(source)
            if name in self._sources:
                raise ValueError(
                    f"two served models would have the id {name!r}; give the "
                    "default one another with --served-model-name, or rename a folder"
                )
            self._sources[name] = source
            self._aliases[name] = self._aliases[source] = name
        self.ids = list(self._sources)
        self.default_id = self.ids[0]
        self._loader = loader
        self._loaded = {}

    def resolve(self, name: Optional[str]) -> str:
        """The public id a request's ``model`` field names."""
        if name is None or name == DEFAULT_MODEL_ALIAS:
            return self.default_id
        if name in self._aliases:
            return self._aliases[name]
        raise APIError(
            404,
            f"The model {name!r} is not served here; available: {self.ids}",
            param="model",
            code="model_not_found",
        )

    def get(self, model_id: str):
        """``(model, tokenizer)`` of a public id, loading it if needed (worker
        thread only)."""
        if model_id not in self._loaded:
            for other in list(self._loaded):
                if other != self.default_id:
                    del self._loaded[other]
            mx.clear_cache()
            self._loaded[model_id] = self._loader(self._sources[model_id])
        return self._loaded[model_id]


# ---------------------------------------------------------------------------
# Generation (the worker thread)
# ---------------------------------------------------------------------------


class StopScanner:
    """Releases generated text except what could still turn into a stop sequence.

    ``push`` returns the text that is safe to send; once a stop sequence shows up,
    ``hit`` is set and the text before it is the last thing returned.
    """

    def __init__(self, stops: List[str]):
        self.stops = stops
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            out, self.pending = self.pending[: min(found)], ""
            return out
        cut = len(self.pending) - self._partial_match()
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _partial_match(self) -> int:
        """Length of the longest tail of ``pending`` that begins a stop sequence."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="server_shutting_down")


class _Cancelled(Exception):
    pass


class Job:
    """One queued request: the worker reports to ``events``; ``cancel()`` stops it.

    ``source`` is the ``(kind, body)`` it was parsed from, which the worker of
    a server across ranks sends to the others.
    """

    def __init__(self, request: GenerationRequest, source=None):
        self.request = request
        self.source = source
        self.events = queue.Queue()
        self._cancelled = threading.Event()

    def cancel(self):
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, kind: str, payload=None):
        self.events.put((kind, payload))


def _all_sum(x: mx.array, group) -> mx.array:
    """``all_sum`` queued on the generation stream, behind the model's own
    collectives: every rank then meets them in the same order."""
    return mx.distributed.all_sum(x, group=group, stream=generation_stream)


def _broadcast_text(text: Optional[str], group) -> str:
    """Rank 0's ``text`` on every rank of ``group`` (the others pass None)."""
    data = text.encode() if group.rank() == 0 else b""
    size = _all_sum(mx.array(len(data)), group).item()
    if size == 0:
        return ""
    codes = np.frombuffer(data, dtype=np.uint8) if data else np.zeros(size, np.uint8)
    total = _all_sum(mx.array(codes.astype(np.int32)), group)
    return np.array(total).astype(np.uint8).tobytes().decode()


def follow(worker: "GenerationWorker", defaults: ServerDefaults):
    """A rank other than 0 of a server across ranks: run every job rank 0 runs
    (its share of the model's work), with nothing to answer, until rank 0 stops."""
    while True:
        text = _broadcast_text(None, worker.group)
        if not text:
            break
        kind, body = json.loads(text)
        worker.serve(Job(parse_request(body, kind, defaults, worker.models)))
    mx.clear_streams()


@dataclass
class _Reusable:
    """The cache left by the last request and the tokens it holds."""

    model_id: str
    config: KVCacheConfig
    tokens: List[int]
    cache: List[Any]


def common_prefix_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def has_evicted(cache) -> bool:
    return any(c.offset != c.size() for c in cache)


def reuse_cache(previous: Optional[_Reusable], model_id, config, prompt):
    """``(cache, n_cached)`` taken from ``previous`` for ``prompt``, or ``(None, 0)``.

    Only an exact match is reused: the same model and cache options, and the cached
    tokens must be a prefix of the prompt. A cache that never evicted is trimmed back
    to the common prefix; one that evicted is only reused when the prompt extends its
    whole history, since what it dropped cannot be told apart any more. At least one
    prompt token is always left to feed.
    """
    if previous is None or previous.model_id != model_id or previous.config != config:
        return None, 0
    history, cache = previous.tokens, previous.cache
    common = min(common_prefix_length(history, prompt), len(prompt) - 1)
    if common == len(history):
        return cache, common
    if common == 0 or has_evicted(cache) or not can_trim_prompt_cache(cache):
        return None, 0
    drop = len(history) - common
    if trim_prompt_cache(cache, drop) != drop:
        return None, 0
    return cache, common


def cache_report(config: KVCacheConfig, cache, model=None, group=None) -> dict:
    """The ``kv_cache`` object of a response: the options in effect, then
    ``tokens_evicted``, ``evictions`` and ``tokens_held`` summed over layers (as
    :func:`~mlx_lm.models.cache.cache_eviction_stats` counts them, over the whole
    life of the cache, so a reused cache includes earlier turns) and ``kv_bytes``,
    the bytes of keys and values held by all layers.

    Across ranks (``group``) the figures are the whole model's: the bytes are
    summed over ranks, and so are the token counts of a pipeline (each rank
    holds some layers; with tensor parallelism every rank holds every layer's
    tokens, for its share of the heads)."""
    stats = cache_eviction_stats(cache)
    report = {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if f.name not in KV_ARTIFACTS
    }
    observer = config.outlier_observer
    report["kv_outlier_channels"] = observer.num_channels if observer else None
    if report["calibration"] is not None:
        report["calibration"] = str(
            getattr(config.calibration, "path", config.calibration)
        )
    report["compact_policy"] = config.policy
    report["tokens_evicted"] = stats["tokens_evicted"]
    report["evictions"] = stats["total_evictions"]
    report["tokens_held"] = stats["current_size"]
    report["kv_bytes"] = sum(c.nbytes for c in cache)
    if group is not None:
        names = ["kv_bytes"]
        if getattr(model, "pipeline_group", None) is not None:
            names += ["tokens_evicted", "evictions", "tokens_held"]
        counts = mx.array([report[k] for k in names], dtype=mx.int64)
        totals = _all_sum(counts, group).tolist()
        report.update(zip(names, totals))
    return report


def _with_history(processor, head):
    """Let a logits processor see the reused prompt tokens too."""

    def run(tokens, logits):
        return processor(mx.concatenate([head, tokens.astype(head.dtype)]), logits)

    return run


@functools.lru_cache(maxsize=8)
def _control_token_pattern(tokenizer) -> Optional["re.Pattern"]:
    """A regex matching the text of ``tokenizer``'s special tokens, longest
    first; None when it has none."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = sorted({t.content for t in decoder.values() if t.special}, key=len)
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in reversed(texts)))


def _encode_text(tokenizer, text, add_special_tokens, as_text=True):
    """Token ids of ``text``; ``as_text`` keeps special-token text as text."""
    if as_text and _control_token_pattern(tokenizer) is not None:
        return tokenizer.encode(
            text, add_special_tokens=add_special_tokens, split_special_tokens=True
        )
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _encode_chat(request: GenerationRequest, tokenizer) -> List[int]:
    """The chat template's tokens, where messages that type a special token
    (``<|im_end|>``, ``<start_of_turn>``...) have it encoded as plain text, so
    that a user cannot forge turns; the template's own control tokens stay."""
    pattern = _control_token_pattern(tokenizer)
    as_text = not request.control_tokens_in_messages and pattern is not None
    contents, messages = {}, []
    nonce = uuid.uuid4().hex
    for i, m in enumerate(request.messages):
        if as_text and pattern.search(m["content"]):
            mark = f"\ue000{nonce}{i}\ue001"
            contents[mark] = m["content"]
            m = {**m, "content": mark}
        messages.append(m)
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    except Exception as e:
        raise ValueError(f"the chat template rejected the messages: {e}")
    if not contents:
        return tokenizer.encode(text, add_special_tokens=False)
    ids = []
    for piece in re.split(f"(\ue000{nonce}\\d+\ue001)", text):
        if piece in contents:
            ids += _encode_text(tokenizer, contents[piece], False)
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def encode_prompt(request: GenerationRequest, tokenizer) -> List[int]:
    """The prompt token ids of ``request``; ``ValueError`` when it cannot be built."""
    if request.kind == "chat" and tokenizer.has_chat_template:
        ids = _encode_chat(request, tokenizer)
    elif request.kind == "chat":
        lines = [f"{m['role']}: {m['content']}" for m in request.messages]
        text = "\n".join(lines) + "\nassistant:"
        ids = _encode_text(
            tokenizer, text, True, as_text=not request.control_tokens_in_messages
        )
    elif isinstance(request.prompt, str):
        # A raw prompt is the client's own template: its special tokens count.
        bos = getattr(tokenizer, "bos_token", None)
        with_bos = bos is None or not request.prompt.startswith(bos)
        ids = tokenizer.encode(request.prompt, add_special_tokens=with_bos)
    else:
        ids = request.prompt
        if max(ids) >= len(tokenizer):
            raise ValueError(f"prompt token id {max(ids)} is outside the vocabulary")
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return list(ids)


def context_length(model) -> Optional[int]:
    """The context length the model was trained for, when its config says."""
    args = getattr(model, "args", None)
    found = getattr(args, "max_position_embeddings", None)
    return found if isinstance(found, int) and found > 0 else None


def _logprob_entry(tokenizer, token, logprobs, top_k):
    entry = {"token": tokenizer.decode([token]), "logprob": logprobs[token].item()}
    top = []
    if top_k:
        k = min(top_k, logprobs.shape[-1])
        ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
        pairs = zip(ids.tolist(), logprobs[ids].tolist())
        top = [
            (tokenizer.decode([i]), v) for i, v in sorted(pairs, key=lambda p: -p[1])
        ]
    entry["top"] = top
    return entry


class GenerationWorker:
    """Runs queued :class:`Job` s one at a time on its own thread.

    Events sent to a job: ``("start", {"prompt_tokens", "cached_tokens"})`` once the
    prompt is accepted, then ``("delta", {"text", "logprobs"})`` pieces, then
    ``("done", {...})``; or ``("error", APIError)`` at any point.
    """

    def __init__(
        self,
        models: ServedModels,
        prefill_step_size: Optional[int] = None,
        group: Optional[mx.distributed.Group] = None,
    ):
        self.models = models
        self.prefill_step_size = prefill_step_size
        # Across ranks (a model split over ``group``): rank 0's worker sends
        # every job it runs to the others, whose followers run it too.
        self.group = group
        self.counts = {"completed": 0, "cancelled": 0, "skipped": 0, "failed": 0}
        self._jobs = queue.Queue()
        self._current = None
        self._stopping = threading.Event()
        self._reusable = None
        self._thread = threading.Thread(
            target=self._loop, name="mlx-generation", daemon=True
        )

    def start(self):
        self._thread.start()

    def submit(self, job: Job):
        if self._stopping.is_set():
            raise _shutting_down()
        self._jobs.put(job)

    def pending(self) -> int:
        return self._jobs.qsize()

    def busy(self) -> bool:
        return self._current is not None or not self._jobs.empty()

    def stop(self):
        """Cancel the job in progress, fail the queued ones, and end the thread."""
        self._stopping.set()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self):
        while True:
            job = self._jobs.get()
            if job is None:
                break
            if self._stopping.is_set():
                job.emit("error", _shutting_down())
                continue
            if job.cancelled:
                self.counts["skipped"] += 1
                continue
            if self.group is not None:
                _broadcast_text(json.dumps(job.source), self.group)
            self.serve(job)
        if self.group is not None:
            _broadcast_text("", self.group)  # the followers' end
        # This thread's streams must go with it, or the process aborts at exit.
        mx.clear_streams()

    def serve(self, job: Job):
        """Run ``job`` and count how it ended (on this thread)."""
        self._current = job
        outcome = self._attempt(job)
        self._current = None
        self.counts[outcome] += 1
        if outcome != "completed":
            # Whatever the failed request held is unreachable by now.
            self._reusable = None
            mx.clear_cache()

    def _attempt(self, job: Job) -> str:
        try:
            self._run(job)
            return "completed"
        except _Cancelled:
            # Read only when the server, not the client, stopped the job.
            job.emit("error", _shutting_down())
            return "cancelled"
        except APIError as e:
            job.emit("error", e)
        except ValueError as e:
            job.emit("error", APIError(400, str(e)))
        except Exception:
            # The details (paths, internals) go to the log, not to the client.
            traceback.print_exc(file=sys.stderr)
            job.emit("error", APIError(500, "generation failed"))
        return "failed"

    def _run(self, job: Job):
        request = job.request
        model, tokenizer = self.models.get(request.model_id)
        # The quantization group is decided here, once for this model, so that
        # a reused cache and this request's conversions agree on it.
        try:
            kv_config = request.kv_config.for_model(model)
        except ValueError as e:
            raise APIError(
                400, str(e), param="kv_group_size", code="invalid_kv_cache_option"
            )
        prompt = encode_prompt(request, tokenizer)
        limit = request.max_prompt_tokens or context_length(model)
        if limit is not None and len(prompt) > limit:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; this server accepts at most "
                f"{limit}",
                param="messages" if request.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        if request.logit_bias and max(request.logit_bias) >= len(tokenizer):
            raise APIError(400, "logit_bias names a token outside the vocabulary")
        sampler = make_sampler(
            request.temperature,
            request.top_p,
            request.min_p,
            top_k=request.top_k,
            xtc_probability=request.xtc_probability,
            xtc_threshold=request.xtc_threshold,
            xtc_special_tokens=xtc_special_tokens(tokenizer),
        )
        processors = make_logits_processors(
            request.logit_bias,
            request.repetition_penalty,
            request.repetition_context_size,
            request.presence_penalty,
            request.presence_context_size,
            request.frequency_penalty,
            request.frequency_context_size,
        )

        previous, self._reusable = self._reusable, None
        if request.fresh_cache:
            previous = None
        cache, cached = reuse_cache(previous, request.model_id, kv_config, prompt)
        del previous
        if cache is None:
            mx.clear_cache()
            cache = make_prompt_cache(model, config=kv_config)
        if processors and cached:
            # The cached tokens are history the processors would have seen.
            window = max(
                request.repetition_context_size,
                request.presence_context_size,
                request.frequency_context_size,
            )
            head = mx.array(prompt[max(0, cached - window) : cached])
            processors = [_with_history(p, head) for p in processors]
        if request.seed is not None:
            mx.random.seed(request.seed)
        job.emit("start", {"prompt_tokens": len(prompt), "cached_tokens": cached})

        def check_cancel(*_):
            stop = job.cancelled or self._stopping.is_set()
            if self.group is not None:
                # Every rank stops at the same step as rank 0 (whose client
                # may have left): one small all-reduce per token.
                stop = _all_sum(mx.array(int(stop)), self.group).item() > 0
            if stop:
                raise _Cancelled()

        steps = stream_generate(
            model,
            tokenizer,
            mx.array(prompt[cached:]),
            max_tokens=request.max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=cache,
            kv_config=kv_config,
            prefill_step_size=self.prefill_step_size,
            prompt_progress_callback=check_cancel,
        )
        scanner = StopScanner(request.stop)
        generated = []
        produced_chars = sent_chars = 0
        held = []  # logprob entries whose text has not been sent yet
        finish = "length"
        try:
            for response in steps:
                check_cancel()
                generated.append(response.token)
                eos = response.token in tokenizer.eos_token_ids
                if request.logprobs and not eos:
                    entry = _logprob_entry(
                        tokenizer,
                        response.token,
                        response.logprobs,
                        request.top_logprobs,
                    )
                    entry["offset"] = produced_chars
                    held.append(entry)
                produced_chars += len(response.text)
                piece = scanner.push(response.text)
                sent_chars += len(piece)
                ready = [e for e in held if e["offset"] < sent_chars]
                held = held[len(ready) :]
                if piece or ready:
                    job.emit("delta", {"text": piece, "logprobs": ready})
                if eos or scanner.hit:
                    finish = "stop"
                    break
        finally:
            steps.close()
        if not scanner.hit:
            tail = scanner.flush()
            if tail or held:
                job.emit("delta", {"text": tail, "logprobs": held})

        report = cache_report(kv_config, cache, model, self.group)
        offsets = {c.offset for c in cache}
        if len(offsets) == 1:
            history = (prompt + generated)[: offsets.pop()]
            mx.eval([c.state for c in cache])
            self._reusable = _Reusable(request.model_id, kv_config, history, cache)
        job.emit(
            "done",
            {
                "finish_reason": finish,
                "prompt_tokens": len(prompt),
                "completion_tokens": len(generated),
                "cached_tokens": cached,
                "kv_cache": report,
            },
        )


# ---------------------------------------------------------------------------
# Response bodies
# ---------------------------------------------------------------------------


def _usage(done: dict) -> dict:
    return {
        "prompt_tokens": done["prompt_tokens"],
        "completion_tokens": done["completion_tokens"],
        "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": done["cached_tokens"]},
    }


def _chat_logprobs(entries) -> dict:
    def one(token, value):
        return {"token": token, "logprob": value, "bytes": list(token.encode())}

    return {
        "content": [
            dict(
                one(e["token"], e["logprob"]),
                top_logprobs=[one(t, v) for t, v in e["top"]],
            )
            for e in entries
        ]
    }


def _text_logprobs(entries) -> dict:
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [dict(e["top"]) for e in entries],
        "text_offset": [e["offset"] for e in entries],
    }


class _Reply:
    """Builds the JSON objects of one response, whole or streamed."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.chat = request.kind == "chat"
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj, choices):
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.request.model_id,
            "choices": choices,
        }

    def _logprobs(self, entries):
        if not self.request.logprobs:
            return None
        return _chat_logprobs(entries) if self.chat else _text_logprobs(entries)

    def whole(self, text, entries, done) -> dict:
        choice = {
            "index": 0,
            "finish_reason": done["finish_reason"],
            "logprobs": self._logprobs(entries),
        }
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = self._envelope(
            "chat.completion" if self.chat else "text_completion", [choice]
        )
        body["usage"] = _usage(done)
        body["kv_cache"] = done["kv_cache"]
        return body

    def chunk(self, text=None, entries=(), finish_reason=None, first=False) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason}
        if entries:
            choice["logprobs"] = self._logprobs(entries)
        if self.chat:
            delta = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [choice])

    def usage_chunk(self, done) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._envelope(obj, [])
        body["usage"] = _usage(done)
        return body


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


class _Answered(Exception):
    """The reply is already sent (a CORS preflight)."""


class _ClientGone(Exception):
    pass


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class APIHandler(BaseHTTPRequestHandler):
    """Routes requests to the worker and relays its events; errors become JSON."""

    protocol_version = "HTTP/1.1"
    server_version = "mlx-lm"
    # Seconds a silent client may hold its connection (reading or being written to).
    timeout = 120
    poll_seconds = 0.2
    probe_seconds = 0.25
    # Errors in the request line are answered with a status line; http.server's
    # default (HTTP/0.9) would send a bare body.
    default_request_version = "HTTP/1.0"

    routes = {
        ("GET", "/v1/models"): "_models",
        ("GET", "/v1/models/{id}"): "_model",
        ("GET", "/health"): "_health",
        ("POST", "/v1/chat/completions"): "_chat",
        ("POST", "/v1/completions"): "_text",
    }

    # -- plumbing ---------------------------------------------------------

    def log_message(self, format, *args):
        if self.server.log_requests:
            super().log_message(format, *args)

    def _send_empty(self, status, headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_json(self, status, payload, close=False, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {**getattr(self, "_cors", {}), **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_api_error(self, error: APIError, close=False):
        self._send_json(error.status, error.body(), close=close, headers=error.headers)

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (bad request line, oversized headers, unknown
        # method) get the same JSON body as ours. An unknown method is a 405 and
        # an HTTP version other than 1.x a 400: a client's mistake, not a 5xx.
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, None
        elif code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code = HTTPStatus.BAD_REQUEST
        try:
            error = APIError(code, message or HTTPStatus(code).phrase)
            self._send_api_error(error, close=True)
        except OSError:
            self.close_connection = True

    def _peer_closed(self) -> bool:
        """Whether the client has gone away.

        Its end of file alone does not say so: a client may half-close after
        sending its request and still wait for the reply. After one, the
        connection is probed with bytes a client ignores (an interim ``100
        Continue`` before the reply, an event-stream comment within one): a
        client that is gone answers the first with a reset, so a later one
        cannot be written. Probes are spaced from 2 ms up to ``probe_seconds``.
        An HTTP/1.0 client cannot be sent a 1xx, so its end of file counts.
        """
        try:
            if not self._probes:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable or self.connection.recv(1, socket.MSG_PEEK) != b"":
                    return False
            if self._started:
                probe = b":\n\n"
            elif self.request_version == "HTTP/1.1":
                probe = b"HTTP/1.1 100 Continue\r\n\r\n"
            else:
                return True
            gap = min(self.probe_seconds, 0.002 * 2**self._probes)
            if not self._probes:
                # A reset from this machine or a near one is back by then.
                self.connection.sendall(probe)
                time.sleep(0.002)
            elif time.monotonic() - self._probed_at < gap:
                return False
            self.connection.sendall(probe)
            self._probes += 1
            self._probed_at = time.monotonic()
            return False
        except (OSError, ValueError):
            return True

    def _content_length(self) -> Optional[int]:
        """The Content-Length header as a number, None when absent; ASCII digits
        only (``int`` would also read other scripts' digits)."""
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        if not re.fullmatch(r"[0-9]+", length.strip()):
            raise APIError(400, f"invalid Content-Length: {length!r}")
        return int(length)

    def handle_expect_100(self):
        # Refuse an announced oversized body before the client sends it; a bad
        # length is answered when the body is read.
        try:
            length = self._content_length()
        except APIError as e:
            self._send_api_error(e, close=True)
            return False
        if length is not None and length > self.server.max_request_bytes:
            self._refuse_body(length)
            return False
        return super().handle_expect_100()

    def _refuse_body(self, length):
        """Answer 413, then read and drop what the client still sends (for a few
        seconds at most) so that closing the socket does not destroy the reply."""
        self._send_api_error(
            APIError(
                413,
                f"the request body has {length} bytes; this server accepts at most "
                f"{self.server.max_request_bytes}",
                code="request_too_large",
            ),
            close=True,
        )
        deadline = time.monotonic() + 5
        try:
            while length > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = self.connection.recv(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass

    def _read_body(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "send the body with a Content-Length header")
        length = self._content_length()
        if length is None:
            raise APIError(411, "a Content-Length header is required")
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            # Also what keeps a web page's form or text/plain POST out.
            raise APIError(
                415,
                f"send the body as application/json, not {kind or 'no Content-Type'}",
                code="unsupported_media_type",
            )
        if length > self.server.max_request_bytes:
            self._refuse_body(length)
            raise _ClientGone()
        data = self.rfile.read(length)
        if len(data) < length:
            raise _ClientGone()
        try:
            return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise APIError(
                400, f"the request body is not valid JSON: {e}", code="invalid_json"
            )
        except RecursionError:
            raise APIError(
                400, "the request body nests too deeply", code="invalid_json"
            )

    def _check_host(self):
        host = self.headers.get("Host")
        allowed = self.server.allowed_hosts
        if host is None or allowed is None:
            return
        name = host.strip().lower()
        name = name[: name.index("]") + 1] if "]" in name else name.split(":")[0]
        if name not in allowed:
            raise APIError(
                403,
                f"this server does not answer for Host {host!r}; "
                "start it with --allowed-hosts to add a name",
                code="host_not_allowed",
            )

    def parse_request(self):
        if not super().parse_request():
            return False
        words = self.requestline.split()
        major = self.request_version.split("/", 1)[1].split(".")[0]
        if len(words) != 3 or int(major) < 1:
            # HTTP/0.9 has no headers to say where a body ends: not served.
            self.request_version = "HTTP/1.0"
            self.send_error(
                HTTPStatus.BAD_REQUEST,
                f"this server speaks HTTP/1.0 and HTTP/1.1, not {self.requestline!r}",
            )
            return False
        return True

    def _check_origin(self, path):
        """The CORS headers for this request's ``Origin``; a page from an origin
        not in ``--allow-origin`` is refused (browsers send Origin, other
        clients do not), so a page cannot even run a generation blind."""
        origin = self.headers.get("Origin")
        allowed = self.server.allowed_origins
        if origin is None:
            return {}
        if origin not in allowed and "*" not in allowed:
            raise APIError(
                403,
                f"requests from the web origin {origin!r} are not allowed; start "
                "the server with --allow-origin to allow them",
                code="origin_not_allowed",
            )
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        methods = [m for m, p in self.routes if p == path]
        wanted = self.headers.get("Access-Control-Request-Method")
        if self.command == "OPTIONS" and wanted is not None and methods:
            # A preflight: answered here, without reaching a route.
            asked = self.headers.get("Access-Control-Request-Headers")
            headers["Access-Control-Allow-Methods"] = ", ".join(methods)
            headers["Access-Control-Allow-Headers"] = asked or "Content-Type"
            headers["Access-Control-Max-Age"] = "600"
            self._send_empty(204, headers)
            raise _Answered()
        return headers

    def _dispatch(self, method):
        self._started = False
        self._probes = 0  # sent since the client's end of file
        self._probed_at = 0.0
        self._cors = {}
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path in ("/models", "/chat/completions", "/completions"):
            path = "/v1" + path
        if path.startswith("/v1/models/"):
            # /v1/models/{id}; ids of hub models have a slash of their own.
            self._model_id = urllib.parse.unquote(path[len("/v1/models/") :])
            path = "/v1/models/{id}"
        name = self.routes.get((method, path))
        self.server.in_flight.add(1)
        try:
            self._check_host()
            self._cors = self._check_origin(path)
            if self.server.draining:
                raise _shutting_down()
            if name is None:
                allowed = [m for m, p in self.routes if p == path]
                if allowed:
                    raise APIError(
                        405,
                        f"{method} is not allowed on {path}; use {allowed[0]}",
                        headers={"Allow": ", ".join(allowed)},
                    )
                raise APIError(404, f"no route for {method} {path}", code="unknown_url")
            getattr(self, name)()
        except APIError as e:
            self._fail(e)
        except _Answered:
            pass
        except (_ClientGone, ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._fail(APIError(500, "internal server error"))
        finally:
            self.server.in_flight.add(-1)

    def _fail(self, error: APIError):
        # The connection is closed after any error: the body may be unread.
        self.close_connection = True
        if not self._started:
            try:
                self._send_api_error(error, close=True)
            except OSError:
                pass

    def _by_method(self):
        self._dispatch(self.command)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _by_method

    # -- endpoints --------------------------------------------------------

    def _model_card(self, model_id):
        created = self.server.created
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "mlx-lm",
        }

    def _models(self):
        data = [self._model_card(m) for m in self.server.models.ids]
        self._send_json(200, {"object": "list", "data": data})

    def _model(self):
        if self._model_id not in self.server.models.ids:
            raise APIError(
                404,
                f"The model {self._model_id!r} is not served here; "
                f"available: {self.server.models.ids}",
                param="model",
                code="model_not_found",
            )
        self._send_json(200, self._model_card(self._model_id))

    def _health(self):
        worker = self.server.worker
        self._send_json(
            200,
            {
                "status": "ok",
                "model": self.server.models.default_id,
                "queued": worker.pending(),
                "requests": dict(worker.counts),
            },
        )

    def _chat(self):
        self._complete("chat")

    def _text(self):
        self._complete("text")

    def _complete(self, kind):
        body = self._read_body()
        request = parse_request(body, kind, self.server.defaults, self.server.models)
        job = Job(request, source=(kind, body))
        self.server.worker.submit(job)
        try:
            if request.stream:
                self._stream(job)
            else:
                self._collect(job)
        except (_ClientGone, ConnectionError, TimeoutError):
            job.cancel()
            raise

    def _next_event(self, job):
        # The peer is checked at every event as well as every poll: a busy
        # generation sends events faster than the poll, and a non-streaming
        # reply writes nothing that would notice a closed socket until the end.
        while True:
            try:
                event = job.events.get(timeout=self.poll_seconds)
            except queue.Empty:
                event = None
            if self._peer_closed():
                raise _ClientGone()
            if event is not None:
                return event

    def _collect(self, job):
        reply = _Reply(job.request)
        pieces, entries = [], []
        while True:
            kind, payload = self._next_event(job)
            if kind == "error":
                raise payload
            if kind == "delta":
                pieces.append(payload["text"])
                entries.extend(payload["logprobs"])
            elif kind == "done":
                self._send_json(200, reply.whole("".join(pieces), entries, payload))
                return

    def _send_event(self, data):
        if self._peer_closed():
            raise _ClientGone()
        text = data if isinstance(data, str) else json.dumps(data)
        self.wfile.write(f"data: {text}\n\n".encode())
        self.wfile.flush()

    def _stream(self, job):
        reply = _Reply(job.request)
        kind, payload = self._next_event(job)
        if kind == "error":
            raise payload
        self.send_response(200)
        for name, value in self._cors.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._started = True
        self._send_event(reply.chunk(text="", first=True))
        while True:
            kind, payload = self._next_event(job)
            if kind == "error":
                self._send_event(payload.body())
                return
            if kind == "delta":
                self._send_event(reply.chunk(payload["text"], payload["logprobs"]))
            elif kind == "done":
                final = reply.chunk(finish_reason=payload["finish_reason"])
                final["kv_cache"] = payload["kv_cache"]
                self._send_event(final)
                if job.request.include_usage:
                    self._send_event(reply.usage_chunk(payload))
                self._send_event("[DONE]")
                return


class _Counter:
    """A count shared by threads."""

    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int):
        with self._lock:
            self.value += n


class APIServer(ThreadingHTTPServer):
    """The HTTP server plus the worker that generates for it.

    Run ``serve_forever()`` (from any thread); ``shutdown()`` stops it and
    ``close()`` then releases the socket and the worker.
    """

    daemon_threads = True

    def __init__(
        self,
        address,
        models: ServedModels,
        defaults: ServerDefaults,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        log_requests: bool = False,
        prefill_step_size: Optional[int] = None,
        allowed_hosts=LOOPBACK_HOSTS,
        allowed_origins=(),
        group=None,
    ):
        super().__init__(address, APIHandler)
        # Web origins whose pages may call the server ("*": any).
        self.allowed_origins = set(allowed_origins)
        self.in_flight = _Counter()  # requests being handled
        self.draining = False
        # Host names answered (lower case, no port); None answers any.
        self.allowed_hosts = (
            None
            if allowed_hosts is None or "*" in allowed_hosts
            else {h.lower() for h in allowed_hosts}
        )
        self.models = models
        self.defaults = defaults
        self.max_request_bytes = max_request_bytes
        self.log_requests = log_requests
        self.created = int(time.time())
        self.worker = GenerationWorker(models, prefill_step_size, group)
        self.worker.start()

    def close(self):
        self.server_close()
        self.worker.stop()

    def drain(self, timeout: float):
        """A graceful stop, once ``serve_forever`` has returned: accept no more
        connections, answer 503 to new requests on open ones, give the requests
        in flight ``timeout`` seconds to finish, then cancel the rest (503) and
        let their replies go out (two seconds at most)."""
        self.draining = True
        self.server_close()
        deadline = time.monotonic() + timeout
        while self.worker.busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.worker.stop()
        deadline = time.monotonic() + 2
        while self.in_flight.value and time.monotonic() < deadline:
            time.sleep(0.02)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _int_at_least(low, high=None):
    def parse(text):
        value = int(text)
        if value < low or (high is not None and value > high):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _float_within(low, high=None):
    def parse(text):
        value = float(text)
        if not (value >= low and (high is None or value <= high)):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def setup_arg_parser():
    p = argparse.ArgumentParser(
        description="OpenAI-compatible HTTP server for an MLX language model."
    )
    p.add_argument(
        "--model",
        default=None,
        help="Local folder or Hugging Face repo (default: the bundled demo model)",
    )
    p.add_argument(
        "--allowed-models",
        nargs="*",
        default=[],
        help="Further models a request may name; each is loaded on first use",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="The id clients see and send for --model (default: the folder's or "
        "file's own name, or the hub repo id)",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="Address to bind (default: loopback only)",
    )
    p.add_argument("--port", type=_int_at_least(0, 65535), default=DEFAULT_PORT)
    p.add_argument(
        "--allowed-hosts",
        nargs="*",
        default=[],
        help="Host header names answered besides the loopback names and --host "
        "('*': any); other names get 403, which keeps DNS-rebinding pages out",
    )
    p.add_argument(
        "--allow-origin",
        nargs="*",
        default=[],
        help="Web origins (scheme://host:port) whose pages may call the server, "
        "with CORS headers ('*': any); requests from other pages get 403",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=_float_within(0.0),
        default=5.0,
        help="On SIGTERM or Ctrl-C, seconds the requests in flight get to "
        "finish before they are cancelled",
    )
    p.add_argument(
        "--max-tokens",
        type=_int_at_least(1),
        default=DEFAULT_MAX_TOKENS,
        help="Tokens to generate when a request does not say",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=_int_at_least(1),
        default=DEFAULT_MAX_TOKENS_LIMIT,
        help="Requests asking for more tokens are refused with 400",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=_int_at_least(1),
        default=None,
        help="Longer prompts are refused with 400 (default: the model's "
        "context length, max_position_embeddings)",
    )
    p.add_argument("--temp", type=_float_within(0.0), default=DEFAULT_TEMP)
    p.add_argument("--top-p", type=_float_within(0.0, 1.0), default=DEFAULT_TOP_P)
    p.add_argument("--top-k", type=_int_at_least(0), default=DEFAULT_TOP_K)
    p.add_argument("--min-p", type=_float_within(0.0, 1.0), default=DEFAULT_MIN_P)
    p.add_argument(
        "--max-request-bytes",
        type=_int_at_least(1),
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="Larger request bodies are refused with 413",
    )
    p.add_argument(
        "--control-tokens-in-messages",
        action="store_true",
        help="Let special-token text typed in chat messages (<|im_end|>...) act as "
        "control tokens, as before; by default it is encoded as plain text",
    )
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="Under mlx.launch, give each rank a run of layers instead of a share "
        "of every layer's heads",
    )
    add_prefill_argument(p)
    p.add_argument(
        "--log-requests", action="store_true", help="Log every request to stderr"
    )
    add_kv_cache_arguments(p)
    return p


def allowed_hosts(args: argparse.Namespace) -> List[str]:
    """The loopback names, the bound address and ``--allowed-hosts``."""
    names = list(LOOPBACK_HOSTS) + list(args.allowed_hosts)
    if args.host not in ("0.0.0.0", "::", ""):
        names.append(f"[{args.host}]" if ":" in args.host else args.host)
    return list(dict.fromkeys(names))


def _models_and_defaults(args: argparse.Namespace, group=None):
    """The served models (the default one loaded, split over ``group`` when
    given) and the request defaults ``args`` name."""
    from .utils import load, resolve_model_argument

    kv_config = kv_config_from_args(args)

    def loader(source):
        model, tokenizer = load(source, lazy=group is not None)
        if group is not None:
            model.pipeline(group) if args.pipeline else model.shard(group)
            mx.eval(model.parameters())
        return model, tokenizer

    models = ServedModels(
        resolve_model_argument(args.model),
        args.allowed_models,
        loader,
        default_name=args.served_model_name,
    )
    models.get(models.default_id)
    defaults = ServerDefaults(
        max_tokens=args.max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        kv_config=kv_config,
        control_tokens_in_messages=args.control_tokens_in_messages,
    )
    return models, defaults


def build_server(args: argparse.Namespace, group=None) -> APIServer:
    """Load the model named by ``args`` and bind the server (not yet serving);
    with ``group``, rank 0's server over a model split across its ranks.

    ``ValueError`` when a memory option is invalid.
    """
    models, defaults = _models_and_defaults(args, group)
    return APIServer(
        (args.host, args.port),
        models,
        defaults,
        args.max_request_bytes,
        log_requests=args.log_requests,
        prefill_step_size=args.prefill_step_size,
        allowed_hosts=allowed_hosts(args),
        allowed_origins=args.allow_origin,
        group=group,
    )


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    group = mx.distributed.init()
    group = group if group.size() > 1 else None
    try:
        kv_config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.max_tokens > args.max_tokens_limit:
        parser.error(
            f"--max-tokens ({args.max_tokens}) is above --max-tokens-limit "
            f"({args.max_tokens_limit})"
        )
    if args.host not in ("127.0.0.1", "localhost"):
        print(
            f"Warning: binding {args.host} exposes the server beyond this machine; "
            "it has no authentication.",
            file=sys.stderr,
        )
    if group is not None and group.rank() > 0:
        # Under mlx.launch: rank 0 serves, the others run its jobs with it
        # and stop when it does (Ctrl-C reaches every rank: only rank 0 acts).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            models, defaults = _models_and_defaults(args, group)
        except ValueError as e:
            parser.error(str(e))
        follow(GenerationWorker(models, args.prefill_step_size, group), defaults)
        return
    try:
        server = build_server(args, group)
    except ValueError as e:
        parser.error(str(e))
    host, port = server.server_address[:2]
    print(
        f"Serving {server.models.default_id} on http://{host}:{port}/v1 "
        "(one generation at a time; Ctrl-C or SIGTERM to stop)",
        file=sys.stderr,
        flush=True,
    )

    def on_sigterm(*_):
        # shutdown() waits for serve_forever(), which runs on this thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print("Stopping: finishing the requests in flight", file=sys.stderr, flush=True)
    server.drain(args.shutdown_timeout)


if __name__ == "__main__":
    main()
