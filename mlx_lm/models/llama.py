"""Llama family (Llama 2/3/3.x, Mistral and other Llama-shaped checkpoints)."""

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
    # Shape of the network.
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rms_norm_eps: float
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    # Positions: older configs use rope_theta/rope_scaling, newer ones rope_parameters.
    max_position_embeddings: Optional[int] = None
    rope_theta: float = 10000
    rope_scaling: Optional[Dict[str, Any]] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    rope_traditional: bool = False
    # Mistral-style sliding-window attention, for all or some layers.
    sliding_window: Optional[int] = None
    layer_types: Optional[List[str]] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.sliding_window is None:
            # Nothing to slide over: every layer attends to all tokens, as
            # transformers does (Mistral 7B v0.2+ say sliding_window: null).
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        elif self.layer_types is None:
            # A window without layer_types (Mistral 7B v0.1, Phi-3) windows
            # every layer.
            self.layer_types = ["sliding_attention"] * self.num_hidden_layers
        self.rope_theta, self.rope_scaling = unpack_rope_parameters(
            self.rope_parameters, self.rope_theta, self.rope_scaling
        )


class Attention(nn.Module):
    """Grouped-query self-attention with separate q/k/v/o projections.

    ``qkv_bias`` / ``out_bias`` default to ``args.attention_bias``.
    """

    def __init__(self, args: ModelArgs, qkv_bias=None, out_bias=None):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5

        if qkv_bias is None:
            qkv_bias = args.attention_bias
        if out_bias is None:
            out_bias = args.attention_bias
        dim = args.hidden_size
        q_dim = self.n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, q_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(q_dim, dim, bias=out_bias)
        self.rope = initialize_rope(
            self.head_dim,
            args.rope_theta,
            args.rope_traditional,
            args.rope_scaling,
            args.max_position_embeddings,
        )

    def project(self, x: mx.array):
        """Queries, keys and values as [B, heads, L, head_dim] (before RoPE)."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.project(x)
        offset = 0 if cache is None else cache.offset
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        out = scaled_dot_product_attention(
            q, k, v, cache=cache, scale=self.scale, mask=mask
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block around the given attention and MLP modules."""

    def __init__(self, args: ModelArgs, self_attn, mlp, use_sliding: bool = False):
        super().__init__()
        self.use_sliding = use_sliding
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(
            args.hidden_size, eps=args.rms_norm_eps
        )

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, layers: list):
        super().__init__()
        self.sliding_window = args.sliding_window
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    # Set by shard_pipeline: this rank runs only its own layers.
    pipeline_group = None

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None):
        group = self.pipeline_group
        if group is not None and group.rank() > 0:
            h = receive_hidden(
                inputs, self.norm.weight.shape[0], self.norm.weight.dtype, group
            )
        elif input_embeddings is None:
            h = self.embed_tokens(inputs)
        else:
            h = input_embeddings
        if cache is None:
            cache = [None] * len(self.layers)

        # One mask per attention kind, built from the first layer of that kind.
        masks = {}
        for layer, c in zip(self.layers, cache):
            if layer.use_sliding not in masks:
                window = self.sliding_window if layer.use_sliding else None
                masks[layer.use_sliding] = create_attention_mask(h, c, window)

        for layer, c in zip(self.layers, cache):
            h = layer(h, masks[layer.use_sliding], c)
        return self.norm(pass_hidden(h, group))


class Model(Parallel, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(
            args, [self.build_layer(args, kind) for kind in args.layer_types]
        )
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Only models with sliding layers need their own cache layout; the
        # others keep the generic one (which honours max_kv_size).
        if "sliding_attention" in args.layer_types:
            self.make_cache = self._sliding_cache

    @staticmethod
    def build_layer(args: ModelArgs, layer_type: str) -> TransformerBlock:
        """One decoder layer; architectures derived from Llama override this."""
        return TransformerBlock(
            args,
            Attention(args),
            MLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias),
            use_sliding=layer_type == "sliding_attention",
        )

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

    def _sliding_cache(self):
        return [
            (
                RotatingKVCache(max_size=self.args.sliding_window)
                if layer.use_sliding
                else KVCache()
            )
            for layer in self.layers
        ]
