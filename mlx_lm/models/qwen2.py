"""Qwen2 / Qwen2.5: the Llama layout with biases on the q/k/v projections."""

from dataclasses import dataclass

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000


class Model(llama.Model):
    @staticmethod
    def build_layer(args: ModelArgs, layer_type: str) -> llama.TransformerBlock:
        return llama.TransformerBlock(
            args,
            llama.Attention(args, qkv_bias=True, out_bias=False),
            llama.MLP(args.hidden_size, args.intermediate_size),
            use_sliding=layer_type == "sliding_attention",
        )
