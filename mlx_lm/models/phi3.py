"""Phi-3: fused qkv and gate/up projections, optional partial rotary dims."""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .rope_utils import initialize_rope


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_theta: float = 10000
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.rope_parameters:
            self.partial_rotary_factor = self.rope_parameters.get(
                "partial_rotary_factor", self.partial_rotary_factor
            )
        if self.rope_scaling:
            # LongRoPE needs the pre-training context length, which Phi-3
            # configs keep at the top level.
            self.rope_scaling = {
                "original_max_position_embeddings": self.original_max_position_embeddings,
                **self.rope_scaling,
            }


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5

        q_dim = self.n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, q_dim + 2 * kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, args.hidden_size, bias=False)
        self.rope = initialize_rope(
            int(self.head_dim * args.partial_rotary_factor),
            args.rope_theta,
            args.rope_traditional,
            args.rope_scaling,
            args.max_position_embeddings,
        )

    def project(self, x: mx.array):
        B, L, _ = x.shape
        q_dim = self.n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = mx.split(self.qkv_proj(x), [q_dim, q_dim + kv_dim], axis=-1)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class Model(llama.Model):
    @staticmethod
    def build_layer(args: ModelArgs, layer_type: str) -> llama.TransformerBlock:
        return llama.TransformerBlock(
            args,
            Attention(args),
            MLP(args.hidden_size, args.intermediate_size),
            use_sliding=layer_type == "sliding_attention",
        )
