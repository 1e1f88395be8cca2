"""Qwen2 / Qwen2.5: the Llama layout with biases on the q/k/v projections."""

from dataclasses import dataclass

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000
    # Qwen configs carry a sliding_window even where it is off: it applies only
    # with use_sliding_window, and then (without layer_types) to the layers from
    # max_window_layers on. The defaults are transformers'.
    use_sliding_window: bool = False
    max_window_layers: int = 28

    def __post_init__(self):
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None and self.sliding_window is not None:
            self.layer_types = [
                "sliding_attention" if i >= self.max_window_layers else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        super().__post_init__()


class Model(llama.Model):
    @staticmethod
    def build_layer(args: ModelArgs, layer_type: str) -> llama.TransformerBlock:
        return llama.TransformerBlock(
            args,
            llama.Attention(args, qkv_bias=True, out_bias=False),
            llama.MLP(args.hidden_size, args.intermediate_size),
            use_sliding=layer_type == "sliding_attention",
        )
