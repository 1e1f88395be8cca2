"""Qwen3: the Llama layout with per-head RMSNorm on queries and keys."""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import llama, qwen2


@dataclass
class ModelArgs(qwen2.ModelArgs):
    # Sliding windows as in Qwen2 (use_sliding_window, max_window_layers).
    max_position_embeddings: int = 40960


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)

    def project(self, x: mx.array):
        q, k, v = super().project(x)
        return self.q_norm(q), self.k_norm(k), v


class Model(llama.Model):
    @staticmethod
    def build_layer(args: ModelArgs, layer_type: str) -> llama.TransformerBlock:
        return llama.TransformerBlock(
            args,
            Attention(args),
            llama.MLP(args.hidden_size, args.intermediate_size),
            use_sliding=layer_type == "sliding_attention",
        )
