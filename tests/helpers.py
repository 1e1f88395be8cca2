"""Tiny random-weight models for tests: built in code, optionally written as a folder."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lm.tokenizer_utils import load_tokenizer
from mlx_lm.utils import get_model_classes

FIXTURES = Path(__file__).parent / "fixtures"
BPE_TOKENIZER = FIXTURES / "tokenizers" / "bpe"


def tiny_config(model_type="llama", vocab_size=None, **overrides):
    """A config dict for a two-layer model with GQA, small enough for quick tests."""
    if vocab_size is None:
        vocab_size = len(load_tokenizer(BPE_TOKENIZER)._tokenizer)
    config = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    }
    config.update(overrides)
    return config


def tiny_model(seed=0, **config_overrides):
    """Return ``(model, config)`` with random float32 weights drawn from ``seed``."""
    config = tiny_config(**config_overrides)
    model_class, args_class = get_model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model, config


def tiny_tokenizer():
    return load_tokenizer(BPE_TOKENIZER)


def write_model_dir(path, model, config, tokenizer_dir=BPE_TOKENIZER):
    """Write ``model`` as a loadable folder (config, weights, tokenizer files)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    return path
