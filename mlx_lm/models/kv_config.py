"""Every KV-cache memory option in one value (:class:`KVCacheConfig`) and the
checks that give a bad option a clear error."""

from dataclasses import dataclass, fields, replace
from typing import Any, List, Optional

from . import kv_quant
from .eviction import (
    COMPACT_MODES,
    COMPACT_POLICIES,
    COMPACT_SCOPES,
    DEFAULT_COMPACT_POLICY,
)

_WINDOW_OPTIONS = (
    "window_size",
    "window_strategy",
    "window_prefix",
    "window_attention_span",
)


WINDOW_STRATEGIES = ("fifo", "fixed", "attention")
KV_BITS = (2, 3, 4, 5, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)


def default_kv_group_size(head_dim: Optional[int]) -> int:
    """The quantization group used when none is asked for: 64, or 32 where 64
    does not divide the head dimension (32 wide heads as in the bundled demo
    model, 96 wide as in Phi-3)."""
    if head_dim is not None and head_dim % 64 and head_dim % 32 == 0:
        return 32
    return 64


def model_head_dim(model) -> Optional[int]:
    """Width of one attention head of ``model``, from its arguments (None when
    they do not say)."""
    args = getattr(model, "args", None)
    head_dim = getattr(args, "head_dim", None)
    heads = getattr(args, "num_attention_heads", None)
    if head_dim is None and heads:
        head_dim = args.hidden_size // heads
    return head_dim


def _check_int(name, value, low, optional=False):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def _check_choice(name, value, choices):
    # Of the same type as well as equal: 4.0 is not the integer 4, and an
    # unhashable value (a list, an object) is no choice either.
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_window(size, strategy, prefix, span, names):
    """Validate sliding-window settings; ``names`` are what errors call the four
    (a ``size`` of None checks the others alone)."""
    size_name, strategy_name, prefix_name, span_name = names
    _check_int(size_name, size, 1, optional=True)
    _check_choice(strategy_name, strategy, WINDOW_STRATEGIES)
    _check_int(prefix_name, prefix, 0)
    _check_int(span_name, span, 1)
    if size is None:
        return
    if prefix >= size:
        raise ValueError(
            f"{prefix_name} ({prefix}) must be smaller than {size_name} ({size})"
        )
    if strategy == "fifo" and prefix > 0:
        raise ValueError(
            f"{prefix_name} ({prefix}) needs {strategy_name} 'fixed' or 'attention'; "
            "'fifo' keeps no prefix"
        )
    if strategy == "attention" and size <= prefix + span:
        raise ValueError(
            f"{size_name} ({size}) must be larger than {prefix_name} + {span_name} "
            f"({prefix} + {span}) with {strategy_name} 'attention', or no token "
            "would be kept for the attention it received"
        )


def _check_method(config: "KVCacheConfig"):
    """The quantization-method settings of ``config`` (``method`` is set)."""
    _check_choice("method", config.method, kv_quant.KV_METHODS)
    if config.kv_bits is not None:
        raise ValueError(
            f"kv_bits={config.kv_bits} quantizes with affine groups and "
            f"method={config.method!r} with its own codes: choose one (bits sets "
            "the method's key bits)"
        )
    _check_choice(
        f"bits for method {config.method!r}",
        config.bits,
        kv_quant.METHOD_BITS[config.method],
    )
    value_bits = kv_quant.VALUE_BITS
    if config.method == "affine":
        value_bits = tuple(kv_quant.METHOD_BITS["affine"]) + (16,)
    _check_choice("value_bits", config.value_bits, value_bits)
    _check_int("num_residuals", config.num_residuals, 1)
    _check_int("sketch_dim", config.sketch_dim, 1)
    _check_int("num_clusters", config.num_clusters, 1)
    if config.num_clusters > 256:
        raise ValueError(f"num_clusters must be at most 256, got {config.num_clusters}")
    _check_int("num_subspaces", config.num_subspaces, 1, optional=True)
    _check_choice("outlier_bits", config.outlier_bits, tuple(range(2, 9)))
    _check_int("signal_bits", config.signal_bits, 1)
    _check_int("noise_bits", config.noise_bits, 1)
    _check_int("seed", config.seed, 0)
    for name in ("use_hadamard", "use_fused_sdpa"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(
                f"{name} must be true or false, got {getattr(config, name)!r}"
            )
    if config.bit_allocation is not None:
        for b in config.bit_allocation:
            _check_choice(
                "bit_allocation entries", b, kv_quant.METHOD_BITS["ratequant"]
            )


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
    # None: decided per model by for_model (default_kv_group_size of its heads).
    kv_group_size: Optional[int] = None
    quantized_kv_start: int = 0
    compact_kv_budget: Optional[int] = None
    compact_keep_recent: int = 32
    # Defaults chosen with benchmarks/eval_ruler.py on SmolLM2 and Gemma-3
    # (README, "Measured quality, and the defaults it chose"). None: the policy
    # that scored best in compact_mode (DEFAULT_COMPACT_POLICY).
    compact_policy: Optional[str] = None
    compact_scope: str = "head"
    compact_sink_tokens: int = 0
    compact_margin: Optional[int] = None
    compact_mode: str = "once"
    window_size: Optional[int] = None
    window_strategy: str = "fifo"
    window_prefix: int = 0
    window_attention_span: int = 32
    # A KV quantization method (README, "KV quantization methods"): keys in
    # bits, values in value_bits (16: float16). Without it kv_bits quantizes
    # both with affine groups, as upstream does.
    method: Optional[str] = None
    bits: int = 1
    value_bits: int = 2
    num_residuals: int = 2
    use_hadamard: bool = True
    codebook: Optional[Any] = None
    smooth_factors: Optional[Any] = None
    rotations: Optional[Any] = None
    bit_allocation: Optional[List[int]] = None
    outlier_observer: Optional[Any] = None
    outlier_bits: int = 8
    sketch_dim: int = 64
    num_clusters: int = 64
    num_subspaces: Optional[int] = None
    use_fused_sdpa: bool = True
    signal_bits: int = 4
    noise_bits: int = 1
    seed: int = 0
    # Folder written by python -m mlx_lm.calibrate_kv (or an NpyArtifactStore).
    calibration: Optional[Any] = None

    def __post_init__(self):
        _check_int("max_kv_size", self.max_kv_size, 1, optional=True)
        if self.kv_bits is not None:
            _check_choice("kv_bits", self.kv_bits, KV_BITS)
        if self.kv_group_size is not None:
            _check_choice("kv_group_size", self.kv_group_size, KV_GROUP_SIZES)
        _check_int("quantized_kv_start", self.quantized_kv_start, 0)

        _check_int("compact_kv_budget", self.compact_kv_budget, 1, optional=True)
        _check_int("compact_keep_recent", self.compact_keep_recent, 0)
        _check_int("compact_sink_tokens", self.compact_sink_tokens, 0)
        _check_int("compact_margin", self.compact_margin, 1, optional=True)
        if self.compact_policy is not None:
            _check_choice("compact_policy", self.compact_policy, COMPACT_POLICIES)
        _check_choice("compact_scope", self.compact_scope, COMPACT_SCOPES)
        _check_choice("compact_mode", self.compact_mode, COMPACT_MODES)
        if self.compact_kv_budget is not None:
            protected = self.compact_keep_recent + self.compact_sink_tokens
            if self.compact_kv_budget <= protected:
                raise ValueError(
                    f"compact_kv_budget ({self.compact_kv_budget}) must be larger than "
                    f"compact_keep_recent + compact_sink_tokens ({protected})"
                )

        _check_window(
            self.window_size,
            self.window_strategy,
            self.window_prefix,
            self.window_attention_span,
            _WINDOW_OPTIONS,
        )

        if self.method is not None:
            _check_method(self)
        elif self.outlier_observer is not None:
            raise ValueError(
                "outlier_observer holds key channels apart from a method's codes: "
                "it needs method"
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
    def policy(self) -> str:
        """``compact_policy``, or the default for ``compact_mode`` when None."""
        return self.compact_policy or DEFAULT_COMPACT_POLICY[self.compact_mode]

    @property
    def evicts(self) -> bool:
        """Whether the cache drops tokens once it is full."""
        return any(
            v is not None
            for v in (self.max_kv_size, self.compact_kv_budget, self.window_size)
        )

    def for_head_dim(self, head_dim: int) -> "KVCacheConfig":
        """This config with an affine group decided for heads of ``head_dim``
        (as :meth:`for_model` does) when it quantizes with affine groups."""
        affine = self.kv_bits is not None or self.method == "affine"
        if not affine:
            return self
        group = self.kv_group_size or default_kv_group_size(head_dim)
        if head_dim % group:
            raise ValueError(
                f"kv_group_size {group} does not divide the head dimension "
                f"{head_dim} (kv_group_size is one of {list(KV_GROUP_SIZES)})"
            )
        return replace(self, kv_group_size=group)

    def for_model(self, model, prompt_cache=None) -> "KVCacheConfig":
        """This config with ``kv_group_size`` decided for ``model`` when
        ``kv_bits`` is set: the one asked for, else the group of an already
        quantized ``prompt_cache`` layer, else :func:`default_kv_group_size` of
        the model's heads. Every cache of the model and every conversion to
        quantized storage then uses that one group; a group that does not
        divide the heads is a ``ValueError``."""
        if self.kv_bits is None:
            return self
        group = self.kv_group_size
        if group is None:
            quantized = [c for c in prompt_cache or () if hasattr(c, "bits")]
            if quantized:
                group = quantized[0].group_size
        head_dim = model_head_dim(model)
        if group is None:
            group = default_kv_group_size(head_dim)
        if head_dim is not None and head_dim % group:
            raise ValueError(
                f"kv_group_size {group} does not divide the head dimension "
                f"{head_dim} (kv_group_size is one of {list(KV_GROUP_SIZES)})"
            )
        if group == self.kv_group_size:
            return self
        return replace(self, kv_group_size=group)

    @classmethod
    def from_options(cls, base: Optional["KVCacheConfig"] = None, **options):
        """``base`` (or the defaults) with ``options`` applied; ``None`` values are
        ignored and an unknown option is a ``ValueError`` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown KV-cache option(s): {', '.join(unknown)}")
        values = {}
        if base is not None:
            values = {f.name: getattr(base, f.name) for f in fields(base)}
        values.update({k: v for k, v in options.items() if v is not None})
        return cls(**values)


# The fields that configure a quantization method (VeloxQuant-MLX's names),
# apart from the memory options that command lines and requests name directly.
_NAMES = [f.name for f in fields(KVCacheConfig)]
METHOD_FIELDS = tuple(_NAMES[_NAMES.index("method") :])
