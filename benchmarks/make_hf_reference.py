"""Regenerate the Hugging Face reference fixtures used by tests/test_models.py.

For every supported architecture this builds a tiny randomly initialised
transformers model (seeded), saves it as an HF checkpoint folder
(config.json + model.safetensors) under tests/fixtures/hf_reference/<name>/
and stores the float32 logits transformers computes for a fixed token
sequence in ``logits.npy`` next to it (plus the tokens in ``tokens.npy``).

Weights are rounded to float16 before the reference run and saved in float16
to keep the fixtures small; the logits are computed in float32 from those
exact values, so loading the float16 file and upcasting reproduces them.

Needs torch and transformers:  python benchmarks/make_hf_reference.py
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

SEQ_LEN = 40
VOCAB = 128
OUT_DIR = Path(__file__).resolve().parent.parent / "tests/fixtures/hf_reference"

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (config class, causal LM class, config overrides)
ARCHITECTURES = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            head_dim=32,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(head_dim=24, sliding_window=None, tie_word_embeddings=False),
    ),
    # Mistral 7B v0.1's shape: a sliding_window and no layer_types, so every
    # layer is windowed.
    "mistral_sliding": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(sliding_window=8, tie_word_embeddings=False),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(rope_theta=1000000.0, tie_word_embeddings=True),
    ),
    # use_sliding_window with max_window_layers=1: layer 1 is windowed.
    "qwen2_sliding": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        ),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(head_dim=16, rope_theta=1000000.0, tie_word_embeddings=False),
    ),
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            num_hidden_layers=4,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=[
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
            rope_parameters={
                "full_attention": {
                    "rope_type": "linear",
                    "factor": 4.0,
                    "rope_theta": 1000000.0,
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        ),
    ),
    "phi3": (
        transformers.Phi3Config,
        transformers.Phi3ForCausalLM,
        dict(
            partial_rotary_factor=0.5,
            original_max_position_embeddings=256,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
}


# Keys removed from a saved config.json: Qwen2 checkpoints written before
# transformers knew layer_types only say use_sliding_window / max_window_layers.
DROPPED_KEYS = {"qwen2_sliding": ["layer_types"]}

# Each fixture's seed is the base seed plus its place here. New names go at the
# end, so that rebuilding one never changes the weights of the others.
SEED_ORDER = [
    "gemma3_text",
    "llama",
    "mistral",
    "phi3",
    "qwen2",
    "qwen3",
    "mistral_sliding",
    "qwen2_sliding",
]


def randomize(model: torch.nn.Module, gen: torch.Generator, gemma_norms: bool):
    """Replace the default (near-zero) init by weights that give lively logits.

    Every value is rounded to float16 so the saved float16 checkpoint holds
    exactly the weights the reference logits came from.
    """
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name:
            # Gemma norms scale by (1 + w), the others by w.
            value = 0.2 * noise if gemma_norms else 1.0 + 0.2 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif "embed_tokens" in name:
            value = 0.5 * noise
        else:
            value = noise / param.shape[-1] ** 0.5
        param.data.copy_(value.half().float())


def build(name: str, seed: int, tokens: np.ndarray, out_root: Path):
    config_cls, model_cls, overrides = ARCHITECTURES[name]
    config = config_cls(**{**COMMON, **overrides}, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    model = model_cls(config).float().eval()
    randomize(model, gen, gemma_norms=name.startswith("gemma"))

    with torch.no_grad():
        logits = model(torch.tensor(tokens[None], dtype=torch.long)).logits[0]

    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    model.half().save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    if name in DROPPED_KEYS:
        saved = json.loads((folder / "config.json").read_text())
        for key in DROPPED_KEYS[name]:
            saved.pop(key, None)
        (folder / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    np.save(folder / "tokens.npy", tokens.astype(np.int32))
    np.save(folder / "logits.npy", logits.float().numpy())
    print(f"{name}: logits {tuple(logits.shape)} -> {folder}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("names", nargs="*", default=sorted(ARCHITECTURES))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tokens = np.random.default_rng(args.seed).integers(3, VOCAB, size=SEQ_LEN)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        if name not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {name!r}")
        build(name, args.seed + SEED_ORDER.index(name), tokens, args.out_dir)


if __name__ == "__main__":
    main()
