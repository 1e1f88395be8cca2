"""Gemma 3 text decoder: interleaved sliding-window (local) and global layers."""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import (
    BaseModelArgs,
    Parallel,
    create_attention_mask,
    pass_hidden,
    receive_hidden,
    scaled_dot_product_attention,
)
from .cache import KVCache, RotatingKVCache
from .rope_utils import initialize_rope, unpack_rope_parameters


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int = 1152
    num_hidden_layers: int = 26
    intermediate_size: int = 6912
    num_attention_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1.0e-6
    vocab_size: int = 262144
    num_key_value_heads: int = 1
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    query_pre_attn_scalar: float = 256
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    layer_types: Optional[List[str]] = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.layer_types is None:
            pattern = self.sliding_window_pattern
            self.layer_types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        # transformers 5 nests the rope settings per attention kind.
        params = self.rope_parameters or {}
        self.rope_theta, self.rope_scaling = unpack_rope_parameters(
            params.get("full_attention"), self.rope_theta, self.rope_scaling
        )
        self.rope_local_base_freq = params.get("sliding_attention", {}).get(
            "rope_theta", self.rope_local_base_freq
        )


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the learned weight is an offset from 1."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, is_sliding: bool):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.is_sliding = is_sliding
        self.scale = args.query_pre_attn_scalar**-0.5

        dim, head_dim = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)

        if is_sliding:
            self.rope = initialize_rope(head_dim, args.rope_local_base_freq, False)
        else:
            self.rope = initialize_rope(
                head_dim,
                args.rope_theta,
                False,
                args.rope_scaling,
                args.max_position_embeddings,
            )

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = 0 if cache is None else cache.offset
        q = self.rope(self.q_norm(q), offset=offset)
        k = self.rope(self.k_norm(k), offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        out = scaled_dot_product_attention(
            q, k, v, cache=cache, scale=self.scale, mask=mask
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Residual block with norms both before and after attention and MLP."""

    def __init__(self, args: ModelArgs, is_sliding: bool):
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.is_sliding = is_sliding
        self.self_attn = Attention(args, is_sliding)
        self.mlp = MLP(dim, args.intermediate_size)
        self.input_layernorm = RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = RMSNorm(dim, eps=eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps=eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        r = self.self_attn(self.input_layernorm(x), mask, cache)
        h = x + self.post_attention_layernorm(r)
        r = self.mlp(self.pre_feedforward_layernorm(h))
        return h + self.post_feedforward_layernorm(r)


class Gemma3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden_size = args.hidden_size
        self.sliding_window = args.sliding_window
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            TransformerBlock(args, is_sliding=kind == "sliding_attention")
            for kind in args.layer_types
        ]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    # Set by shard_pipeline: this rank runs only its own layers.
    pipeline_group = None

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None):
        group = self.pipeline_group
        if group is not None and group.rank() > 0:
            h = receive_hidden(inputs, self.hidden_size, self.norm.weight.dtype, group)
        else:
            h = (
                self.embed_tokens(inputs)
                if input_embeddings is None
                else input_embeddings
            )
            h = h * mx.array(self.hidden_size**0.5, dtype=h.dtype)
        if cache is None:
            cache = [None] * len(self.layers)

        # Local layers see only the last `sliding_window` positions.
        masks = {}
        for layer, c in zip(self.layers, cache):
            if layer.is_sliding not in masks:
                window = self.sliding_window if layer.is_sliding else None
                masks[layer.is_sliding] = create_attention_mask(h, c, window)

        for layer, c in zip(self.layers, cache):
            h = layer(h, masks[layer.is_sliding], c)
        return self.norm(pass_hidden(h, group))


class Model(Parallel, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Gemma3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None):
        h = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        return [
            (
                RotatingKVCache(max_size=self.args.sliding_window, keep=0)
                if layer.is_sliding
                else KVCache()
            )
            for layer in self.layers
        ]
