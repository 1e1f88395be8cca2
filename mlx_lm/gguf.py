"""Reading GGUF files (llama.cpp's format) into MLX models.

The header is parsed here (one pass over the metadata, so a 262k-token
vocabulary takes a fraction of a second); block layouts and dequantization come
from the ``gguf`` package, llama.cpp's own Python library.  Tensors whose GGUF
blocks are exactly an affine code over 32 values (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q4_K, Q5_K) become MLX affine quantized weights with the same
codes, scales and offsets; every other type is dequantized by ``gguf`` to
``dtype``.  Tensors are read one row chunk at a time with plain file reads and
written into preallocated MLX arrays, so the load never holds a second copy of
the weights.

Config and tokenizer come from the file's metadata; the tokenizer is built by
transformers' GGUF support.
"""

import hashlib
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .models.quantized_linear import add_prefill_path

GROUP_SIZE = 32

# GGUF architecture -> config.json model_type.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}

# GGUF per-block tensor names -> parameter names inside ``model.layers.N``.
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Architectures whose block tensors differ from the table above.
BLOCK_TENSOR_OVERRIDES = {
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"ffn_up": "mlp.gate_up_proj"},
}

TOP_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Tensors that carry RoPE settings rather than weights.
ROPE_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")

TOKENIZER_CACHE = (
    Path(os.environ.get("MLX_LM_CACHE", "~/.cache/mlx_lm")).expanduser()
    / "gguf-tokenizers"
)

# Elements decoded per read; bounds the temporary memory of a load.
CHUNK_ELEMENTS = 1 << 20


def _constants():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES, GGMLQuantizationType


# Types whose blocks are an exact affine code over 32 values, and its bits.
EXACT_BITS = {
    "Q4_0": 4,
    "Q4_1": 4,
    "Q5_0": 5,
    "Q5_1": 5,
    "Q8_0": 8,
    "Q4_K": 4,
    "Q5_K": 5,
}


def _affine_headers(qtype_name: str, blocks: np.ndarray):
    """Scales and offsets of each 32-value group of exact affine GGUF blocks.

    ``blocks`` is [rows, n_blocks, block_bytes] uint8; both results are
    [rows, n_groups] float32, so that value = scale * code + offset.
    """

    def half(lo):
        return (
            blocks[..., lo : lo + 2].copy().view(np.float16)[..., 0].astype(np.float32)
        )

    if qtype_name in ("Q4_1", "Q5_1"):
        return half(0), half(2)
    if qtype_name in ("Q4_K", "Q5_K"):
        from gguf.quants import Q4_K

        rows, n_blocks, _ = blocks.shape
        sc, m = Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))
        sc = sc.reshape(rows, n_blocks, 8).astype(np.float32)
        m = m.reshape(rows, n_blocks, 8).astype(np.float32)
        scales = half(0)[..., None] * sc
        offsets = -half(2)[..., None] * m
        return scales.reshape(rows, -1), offsets.reshape(rows, -1)
    # Q4_0, Q5_0, Q8_0: signed codes around the middle of the range.
    d = half(0)
    return d, d * -float(1 << (EXACT_BITS[qtype_name] - 1))


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [rows, n] in MLX's packing: a little-endian bit stream in uint32 words."""
    rows, n = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes).view(np.uint32)
    if bits == 4:
        pairs = codes[:, 0::2] | (codes[:, 1::2] << 4)
        return np.ascontiguousarray(pairs).view(np.uint32)
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((codes[..., None] >> shifts) & 1).reshape(rows, n * bits)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)


# GGUF metadata value types with a fixed width, as struct formats.
SCALAR_FORMATS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
STRING, ARRAY = 8, 9


class TensorInfo(NamedTuple):
    name: str
    shape: Tuple[int, ...]  # GGUF order: fastest dimension first
    tensor_type: object  # gguf.GGMLQuantizationType
    data_offset: int  # absolute, in bytes
    n_bytes: int


class HeaderReader:
    """Sequential little-endian reads over a memory-mapped GGUF header."""

    def __init__(self, buffer):
        self.buffer, self.pos = buffer, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        length = self.take("Q")
        if self.pos + length > len(self.buffer):
            raise ValueError(f"a string of {length} bytes runs past the end")
        text = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return text.decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_kind, count = self.take("IQ")
            if item_kind == STRING:
                return [self.string() for _ in range(count)]
            fmt = SCALAR_FORMATS[item_kind]
            width = struct.calcsize(fmt)
            if self.pos + count * width > len(self.buffer):
                raise ValueError(f"an array of {count} values runs past the end")
            items = np.frombuffer(self.buffer, "<" + fmt, count, self.pos)
            self.pos += count * width
            return items.tolist()
        return self.take(SCALAR_FORMATS[kind])


def read_header(path: Path):
    """(metadata dict, {name: TensorInfo}) of a GGUF file, reading no tensor data."""
    sizes, qtypes = _constants()
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        r = HeaderReader(buffer)
        if r.take("4s") != b"GGUF":
            raise ValueError("it does not start with the GGUF magic")
        version, n_tensors, n_fields = r.take("IQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 and 3 are read)")
        fields = {}
        for _ in range(n_fields):
            key = r.string()
            fields[key] = r.value(r.take("I"))
        entries = []
        for _ in range(n_tensors):
            name = r.string()
            shape = r.take(f"{r.take('I')}Q")
            shape = shape if isinstance(shape, tuple) else (shape,)
            kind, offset = r.take("IQ")
            entries.append((name, shape, qtypes(kind), offset))
        alignment = int(fields.get("general.alignment", 32))
        data_start = -(-r.pos // alignment) * alignment
    finally:
        buffer.close()
    tensors = {}
    for name, shape, kind, offset in entries:
        block, block_bytes = sizes[kind]
        n_bytes = int(np.prod(shape)) // block * block_bytes
        tensors[name] = TensorInfo(name, shape, kind, data_start + offset, n_bytes)
    return fields, tensors


class GGUFFile:
    """One GGUF file: its metadata, its tensors' layout, and readers for them."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No GGUF file at {self.path}")
        try:
            self.fields, self.tensors = read_header(self.path)
        except Exception as err:
            raise ValueError(
                f"{self.path} is not a readable GGUF file ({type(err).__name__}: {err})"
            ) from None
        self.architecture = self.field("general.architecture")
        self._check()

    def field(self, key: str, default=None):
        return self.fields.get(key, default)

    def arch_field(self, key: str, default=None):
        return self.field(f"{self.architecture}.{key}", default)

    def _check(self):
        """Refuse, before any tensor is read, what cannot be loaded whole."""
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"{self.path.name}: GGUF architecture {self.architecture!r} is not "
                f"supported (supported: {', '.join(sorted(ARCHITECTURES))})."
            )
        from gguf.quants import dequantize

        sizes, _ = _constants()
        end, checked = 0, set()
        for t in self.tensors.values():
            if t.tensor_type not in checked:
                try:
                    dequantize(
                        np.zeros((1, sizes[t.tensor_type][1]), np.uint8), t.tensor_type
                    )
                except (KeyError, NotImplementedError):
                    raise ValueError(
                        f"{self.path.name}: tensor {t.name} has type "
                        f"{t.tensor_type.name}, which gguf cannot dequantize."
                    ) from None
                checked.add(t.tensor_type)
            end = max(end, int(t.data_offset) + int(t.n_bytes))
        size = self.path.stat().st_size
        if size < end:
            raise ValueError(
                f"{self.path.name} is truncated: {size} bytes, its tensors need {end}."
            )

    def shape(self, name: str) -> Tuple[int, ...]:
        """Tensor shape in row-major order (GGUF lists the fastest dimension first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def read_raw(self, name: str, row_start: int, row_stop: int) -> np.ndarray:
        """Bytes of rows [row_start, row_stop) of a 2D view of the tensor."""
        t = self.tensors[name]
        shape = self.shape(name)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        row_bytes = int(t.n_bytes) // rows
        with open(self.path, "rb") as f:
            f.seek(int(t.data_offset) + row_start * row_bytes)
            data = f.read((row_stop - row_start) * row_bytes)
        return np.frombuffer(data, dtype=np.uint8).reshape(-1, row_bytes)

    def read_float(self, name: str) -> np.ndarray:
        """A small tensor, dequantized to float32."""
        from gguf.quants import dequantize

        shape = self.shape(name)
        raw = self.read_raw(name, 0, int(np.prod(shape[:-1])) if len(shape) > 1 else 1)
        out = dequantize(raw, self.tensors[name].tensor_type)
        return out.astype(np.float32).reshape(shape)

    def load_tensor(
        self,
        name: str,
        dtype: mx.Dtype,
        row_order: Optional[np.ndarray] = None,
        transform=None,
    ):
        """The tensor as MLX arrays: (weight,) or (weight, scales, biases).

        ``row_order`` reorders the rows of a 2D tensor (read whole in that case);
        ``transform`` maps the float values of a non-quantized tensor.
        """
        from gguf.quants import dequantize

        sizes, _ = _constants()
        t = self.tensors[name]
        shape = self.shape(name)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        cols = shape[-1]
        block, block_bytes = sizes[t.tensor_type]
        bits = EXACT_BITS.get(t.tensor_type.name) if transform is None else None
        exact = bits is not None
        if exact:
            outs = [
                mx.zeros((rows, cols * bits // 32), dtype=mx.uint32),
                mx.zeros((rows, cols // GROUP_SIZE), dtype=dtype),
                mx.zeros((rows, cols // GROUP_SIZE), dtype=dtype),
            ]
        else:
            outs = [mx.zeros((rows, cols), dtype=dtype)]
        mx.eval(outs)

        step = rows if row_order is not None else max(1, CHUNK_ELEMENTS // cols)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            raw = self.read_raw(name, start, stop)
            if row_order is not None:
                raw = raw[row_order]
            values = dequantize(raw, t.tensor_type).reshape(stop - start, cols)
            if exact:
                blocks = raw.reshape(stop - start, cols // block, block_bytes)
                scales, offsets = _affine_headers(t.tensor_type.name, blocks)
                wide_scales = np.repeat(scales, GROUP_SIZE, axis=1)
                wide_offsets = np.repeat(offsets, GROUP_SIZE, axis=1)
                safe = np.where(wide_scales == 0, 1, wide_scales)
                codes = np.rint((values - wide_offsets) / safe)
                codes = np.clip(codes, 0, (1 << bits) - 1).astype(np.uint8)
                parts = (_pack(codes, bits), scales, offsets)
            else:
                values = values.astype(np.float32)
                parts = (transform(values) if transform else values,)
            for out, part in zip(outs, parts):
                out[start:stop] = mx.array(part).astype(out.dtype)
            mx.eval(outs)
        if not exact:
            outs[0] = outs[0].reshape(shape)
        return tuple(outs)


def _llama_rope_scaling(gf: GGUFFile) -> Optional[dict]:
    kind = gf.arch_field("rope.scaling.type")
    factor = gf.arch_field("rope.scaling.factor")
    original = gf.arch_field("rope.scaling.original_context_length")
    if kind in (None, "none") or not factor:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise ValueError(f"{gf.path.name}: RoPE scaling type {kind!r} is not supported.")


def _llama3_scaling_from_factors(gf: GGUFFile, head_dim: int, base: float) -> dict:
    """Recover Llama 3.1-style rope_scaling from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores the per-frequency divisors; the standard settings
    (low 1, high 4, original context 8,192) are checked against them.
    """
    from .models.rope_utils import initialize_rope

    stored = gf.read_float("rope_freqs.weight").reshape(-1)
    scaling = {
        "rope_type": "llama3",
        "factor": float(stored.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    rope = initialize_rope(head_dim, base, False, scaling)
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    divisors = np.array(rope._freqs, dtype=np.float64) * inv_freq
    if not np.allclose(divisors, stored, rtol=1e-3):
        raise ValueError(
            f"{gf.path.name}: rope_freqs does not match Llama 3 scaling with "
            f"factor {scaling['factor']}; this RoPE layout is not supported."
        )
    return scaling


def gguf_config(gf: GGUFFile) -> dict:
    """A config.json dict for the architecture module that serves the file."""
    arch = gf.architecture
    heads = int(gf.arch_field("attention.head_count"))
    hidden = int(gf.arch_field("embedding_length"))
    tokens = gf.field("tokenizer.ggml.tokens")
    vocab = gf.arch_field("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        vocab = gf.shape("token_embd.weight")[0]
    head_dim = gf.arch_field("attention.key_length") or hidden // heads
    config = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(gf.arch_field("feed_forward_length")),
        "num_hidden_layers": int(gf.arch_field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(gf.arch_field("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(gf.arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(gf.arch_field("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(gf.arch_field("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in gf.tensors,
    }
    for key in ("bos_token_id", "eos_token_id"):
        value = gf.field(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = int(value)

    if arch in ("llama", "mistral", "qwen2", "qwen3"):
        scaling = _llama_rope_scaling(gf)
        if "rope_freqs.weight" in gf.tensors:
            scaling = _llama3_scaling_from_factors(
                gf, config["head_dim"], config["rope_theta"]
            )
        if scaling:
            config["rope_scaling"] = scaling
        window = gf.arch_field("attention.sliding_window")
        if window:
            config["sliding_window"] = int(window)
        if arch in ("llama", "mistral"):
            config["attention_bias"] = "blk.0.attn_q.bias" in gf.tensors
    elif arch == "gemma3":
        config["sliding_window"] = int(gf.arch_field("attention.sliding_window", 512))
        config["query_pre_attn_scalar"] = int(head_dim)
        # Neither is in the metadata; these are the values Gemma 3 uses.
        config["sliding_window_pattern"] = 6
        config["rope_local_base_freq"] = 10000.0
        factor = gf.arch_field("rope.scaling.factor")
        if factor and float(factor) != 1.0:
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    elif arch == "phi3":
        dims = gf.arch_field("rope.dimension_count")
        if dims:
            config["partial_rotary_factor"] = int(dims) / config["head_dim"]
        original = gf.arch_field("rope.scaling.original_context_length")
        if original:
            config["original_max_position_embeddings"] = int(original)
        if "rope_factors_long.weight" in gf.tensors:
            config["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": gf.read_float("rope_factors_long.weight").tolist(),
                "short_factor": gf.read_float("rope_factors_short.weight").tolist(),
            }
            attn_factor = gf.arch_field("rope.scaling.attn_factor")
            if attn_factor:
                config["rope_scaling"]["attention_factor"] = float(attn_factor)
        window = gf.arch_field("attention.sliding_window")
        if window:
            config["sliding_window"] = int(window)
    return config


def _parameter_name(arch: str, gguf_name: str) -> Optional[str]:
    """Our parameter name for a GGUF tensor name, or None for non-weights."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in ROPE_TENSORS:
        return None
    if stem in TOP_TENSORS:
        return f"{TOP_TENSORS[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk":
        table = {**BLOCK_TENSORS, **BLOCK_TENSOR_OVERRIDES.get(arch, {})}
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in a {arch} model.")


def _unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (pairs of RoPE halves)."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)


def gguf_weights(
    gf: GGUFFile, config: dict, dtype: mx.Dtype = mx.float32
) -> Tuple[Dict[str, mx.array], Dict[str, dict]]:
    """All weights under our parameter names, and the quantization of each layer.

    The second result maps a layer path to ``{"group_size", "bits"}`` for the
    layers kept in their GGUF codes.
    """
    arch = gf.architecture
    weights, quantized = {}, {}
    # The largest tensor first: its temporaries then meet the least other memory.
    names = sorted(gf.tensors, key=lambda n: -int(gf.tensors[n].n_bytes))
    for name in names:
        target = _parameter_name(arch, name)
        if target is None:
            continue
        row_order = None
        if arch in ("llama", "mistral") and name.endswith(
            ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")
        ):
            heads = config["num_attention_heads"]
            if ".attn_k." in name:
                heads = config["num_key_value_heads"]
            row_order = _unpermute_rows(gf.shape(name)[0], heads)
        transform = None
        if arch == "gemma3" and name.endswith("norm.weight"):
            transform = lambda w: w - 1.0  # noqa: E731 (GGUF stores 1 + w)

        if row_order is not None and len(gf.shape(name)) == 1:
            values = gf.read_float(name)[row_order]
            weights[target] = mx.array(values).astype(dtype)
            continue
        parts = gf.load_tensor(name, dtype, row_order=row_order, transform=transform)
        layer = target.rpartition(".")[0]
        if len(parts) == 3:
            weights[target], weights[f"{layer}.scales"], weights[f"{layer}.biases"] = (
                parts
            )
            bits = parts[0].shape[1] // parts[1].shape[1]
            quantized[layer] = {"group_size": GROUP_SIZE, "bits": bits}
        else:
            weights[target] = parts[0]
    return weights, quantized


def quantization_entry(layers: Dict[str, dict]) -> Optional[dict]:
    """A config ``quantization`` entry: the commonest setting, per-layer others."""
    if not layers:
        return None
    settings = [(s["group_size"], s["bits"]) for s in layers.values()]
    group, bits = max(set(settings), key=settings.count)
    entry = {"group_size": group, "bits": bits, "mode": "affine"}
    for layer, s in sorted(layers.items()):
        if (s["group_size"], s["bits"]) != (group, bits):
            entry[layer] = {"group_size": s["group_size"], "bits": s["bits"]}
    return entry


def build_model(config: dict, weights: Dict[str, mx.array], layers: Dict[str, dict]):
    """The model for ``config`` holding ``weights``, quantized layers as given."""
    from .utils import get_model_classes

    model_class, args_class = get_model_classes(config)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if layers:
        nn.quantize(
            model,
            class_predicate=lambda path, module: (
                layers[path]
                if path in layers and hasattr(module, "to_quantized")
                else False
            ),
        )
        add_prefill_path(model)
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


# Special tokens transformers names, and the metadata keys holding their ids.
SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def hf_tokenizer(gf: GGUFFile):
    """The file's tokenizer as a transformers fast tokenizer.

    The metadata is read by ``gf``; transformers' GGUF converters turn it into
    a ``tokenizers`` backend.  Releases of transformers without those
    converters fall back to its own GGUF path, which needs torch.
    """
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            str(gf.path.parent), gguf_file=gf.path.name
        )

    groups = {
        group: {
            name: gf.field(f"tokenizer.{key}")
            for key, name in renames.items()
            if f"tokenizer.{key}" in gf.fields
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocabulary, init_kwargs = groups["tokenizer"], groups["tokenizer_config"]
    if vocabulary.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary unless told not to.
        init_kwargs.setdefault("add_bos_token", True)
    for name, key in SPECIAL_TOKENS.items():
        token_id = gf.field(f"tokenizer.ggml.{key}")
        if token_id is not None:
            init_kwargs[name] = vocabulary["tokens"][token_id]
    backend, extra = convert_gguf_tokenizer(gf.architecture, vocabulary)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **init_kwargs, **extra)


def tokenizer_folder(gf: GGUFFile) -> Path:
    """A folder holding the file's tokenizer in Hugging Face form.

    Building it takes seconds for a large vocabulary, so it is kept under
    ``TOKENIZER_CACHE``, keyed by the file's path, size and modification time.
    Where that cannot be written a temporary folder is used.
    """
    path = gf.path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    folder = TOKENIZER_CACHE / key.hexdigest()[:24]
    if (folder / "tokenizer.json").is_file():
        return folder
    tokenizer = hf_tokenizer(gf)
    try:
        TOKENIZER_CACHE.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=TOKENIZER_CACHE))
    except OSError:
        partial = folder = Path(tempfile.mkdtemp())
    tokenizer.save_pretrained(str(partial))
    if partial != folder:
        try:
            os.replace(partial, folder)
        except OSError:  # another process cached it first
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def load_gguf_tokenizer(gf: GGUFFile, eos_token_ids=None, tokenizer_config=None):
    """A TokenizerWrapper for the file's tokenizer (see ``tokenizer_folder``).

    ``tokenizer_config`` holds extra keyword arguments for transformers.
    """
    from .tokenizer_utils import load_tokenizer

    return load_tokenizer(tokenizer_folder(gf), tokenizer_config, eos_token_ids)


def load_gguf(
    path: Union[str, Path],
    model_config: Optional[dict] = None,
    tokenizer_config: Optional[dict] = None,
    dtype: mx.Dtype = mx.float32,
    tokenizer: bool = True,
):
    """(model, tokenizer, config) from a GGUF file; ``tokenizer=False`` skips it.

    ``model_config`` entries override the config read from the metadata.
    """
    gf = GGUFFile(path)
    config = gguf_config(gf)
    config.update(model_config or {})
    wrapper = None
    if tokenizer:
        wrapper = load_gguf_tokenizer(gf, config.get("eos_token_id"), tokenizer_config)
    weights, layers = gguf_weights(gf, config, dtype)
    quantization = quantization_entry(layers)
    if quantization is not None:
        config["quantization"] = quantization
    model = build_model(config, weights, layers)
    return model, wrapper, config


def is_gguf_path(path_or_repo) -> bool:
    return str(path_or_repo).lower().endswith(".gguf") and os.path.isfile(
        os.path.expanduser(str(path_or_repo))
    )


def convert_gguf(
    gguf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    quantize: bool = False,
    q_group_size: int = 64,
    q_bits: int = 4,
    dtype: mx.Dtype = mx.float32,
) -> Path:
    """Write a GGUF file as an MLX model folder (config, safetensors, tokenizer).

    Layers kept in their GGUF codes stay as they are; with ``quantize`` the
    layers that had to be dequantized are quantized to ``q_bits``.
    """
    from .utils import copy_tokenizer_files, save_config, save_model

    mlx_path = Path(mlx_path)
    gf = GGUFFile(gguf_path)
    config = gguf_config(gf)
    weights, layers = gguf_weights(gf, config, dtype)
    model = build_model(config, weights, layers)
    del weights
    if quantize:
        added = {}

        def still_float(path, module):
            if path in layers or not hasattr(module, "to_quantized"):
                return False
            if module.weight.shape[-1] % q_group_size:
                return False
            added[path] = {"group_size": q_group_size, "bits": q_bits}
            return True

        nn.quantize(model, q_group_size, q_bits, class_predicate=still_float)
        layers = {**layers, **added}
    quantization = quantization_entry(layers)
    if quantization is not None:
        config["quantization"] = quantization
    save_model(mlx_path, model)
    save_config(config, mlx_path / "config.json")
    copy_tokenizer_files(tokenizer_folder(gf), mlx_path)
    return mlx_path
