"""Finding, loading, quantizing and saving models.

The on-disk layout is the one upstream mlx-lm uses: ``config.json`` (with a
``quantization`` entry for quantized models), weights in ``model*.safetensors``
under the parameter names of ``mlx_lm.models.<model_type>``, and the tokenizer
files next to them.  Folders written by either project load in the other.
"""

import copy
import importlib
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .gguf import is_gguf_path, load_gguf
from .models.quantized_linear import add_prefill_path
from .tokenizer_utils import TokenizerWrapper, load_tokenizer

# config.json model_type values served by another architecture module.
MODEL_TYPE_ALIASES = {"mistral": "llama"}

# Files fetched from the Hugging Face Hub: configs, weights, custom code, tokenizers.
HUB_FILE_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]

# Files that make up a tokenizer (plus generation defaults and custom code).
TOKENIZER_FILE_PATTERNS = [
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
    "*.py",
]

MAX_SHARD_BYTES = 5 << 30

QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)

_MODELS_DIR = Path(__file__).parent / "models"


class ModelNotFoundError(ValueError):
    """The model is neither a local folder nor obtainable from the Hugging Face Hub."""


def get_model_path(
    path_or_hf_repo: Union[str, Path], revision: Optional[str] = None
) -> Path:
    """Return a local folder for ``path_or_hf_repo``, downloading it from the Hub if needed."""
    local = Path(path_or_hf_repo).expanduser()
    if local.is_dir():
        return local

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = str(path_or_hf_repo)
    try:
        return Path(
            snapshot_download(repo, revision=revision, allow_patterns=HUB_FILE_PATTERNS)
        )
    except HFValidationError:
        problem = "is neither a local folder nor a valid Hugging Face repo id"
    except RepositoryNotFoundError:
        problem = (
            "is not a local folder and no such Hugging Face repo is accessible "
            "(it may be private or gated: log in with `hf auth login`)"
        )
    except RevisionNotFoundError:
        problem = f"has no revision '{revision}' on the Hugging Face Hub"
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            how = "downloads are disabled (HF_HUB_OFFLINE=1)"
        else:
            how = "the Hugging Face Hub cannot be reached"
        problem = f"is not a local folder, is not in the Hugging Face cache, and {how}"
    # Raised outside the handlers so the user sees one error, not a chain.
    raise ModelNotFoundError(f"Model '{repo}' {problem}.")


# transformers writes the floats JSON has no literal for as {"__float__": "Infinity"}
# (and "-Infinity", "NaN"), so that every parser reads its config.json.
_TAGGED_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _untag_floats(value):
    if isinstance(value, dict):
        if value.keys() == {"__float__"} and value["__float__"] in _TAGGED_FLOATS:
            return _TAGGED_FLOATS[value["__float__"]]
        return {k: _untag_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag_floats(v) for v in value]
    return value


def _tag_floats(value):
    if isinstance(value, float) and not math.isfinite(value):
        text = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        return {"__float__": text}
    if isinstance(value, dict):
        return {k: _tag_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tag_floats(v) for v in value]
    return value


def hf_repo_to_path(hf_repo: str) -> Path:
    """The local folder of a Hugging Face repo, downloaded if needed (upstream's
    name; :func:`get_model_path` also takes local folders)."""
    return get_model_path(hf_repo)


def load_config(model_path: Path) -> dict:
    """Read ``config.json``; an ``eos_token_id`` in ``generation_config.json`` wins.
    Tagged non-finite floats (``{"__float__": "Infinity"}``) come back as floats."""
    model_path = Path(model_path)
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in {model_path}")
    config = _untag_floats(json.loads(config_file.read_text()))

    generation_file = model_path / "generation_config.json"
    if generation_file.is_file():
        try:
            eos = json.loads(generation_file.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def supported_model_types() -> list:
    """Model types this package can build: its architecture modules and their aliases."""
    modules = [
        p.stem
        for p in _MODELS_DIR.glob("*.py")
        if "class ModelArgs" in p.read_text(encoding="utf-8")
    ]
    return sorted(modules + list(MODEL_TYPE_ALIASES))


def get_model_classes(config: dict) -> Tuple[type, type]:
    """Return ``(Model, ModelArgs)`` of the architecture named by ``config["model_type"]``."""
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        raise ValueError(
            f"Model type {model_type!r} is not supported. "
            f"Supported model types: {', '.join(supported_model_types())}."
        )
    module_name = MODEL_TYPE_ALIASES.get(model_type, model_type)
    arch = importlib.import_module(f"mlx_lm.models.{module_name}")
    return arch.Model, arch.ModelArgs


def _quantization_of(config: dict) -> Optional[dict]:
    """The MLX quantization parameters a config describes, or None if not quantized.

    Sets ``config["quantization"]`` when only a ``quantization_config`` is given.
    """
    if "quantization" in config:
        return config["quantization"]
    legacy = config.get("quantization_config")
    if not legacy:
        return None
    method = legacy.get("quant_method")
    if method is None and "bits" in legacy and "group_size" in legacy:
        quantization = legacy
    elif method == "mxfp4":
        quantization = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    else:
        raise ValueError(f"Quantization method {method!r} is not supported.")
    config["quantization"] = quantization
    config["quantization_config"] = quantization
    return quantization


# The packed formats other than affine keep their scales as uint8 and allow
# one (bits, group size) each.
_SCALED_FORMATS = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}


def infer_quant_config(path: str, module: nn.Module, weights: dict) -> dict:
    """``{"group_size", "bits", "mode"}`` that the saved weight ``path`` of the
    (still unquantized) ``module`` was packed with, read from the shapes and
    dtypes of its codes and scales: 32-bit words of ``bits``-bit codes across
    the input width, one scale per group. ``ValueError`` for a packing no mode
    makes."""
    width = module.weight.shape[-1]
    words = weights[f"{path}.weight"].shape[-1]
    scales = weights[f"{path}.scales"]
    bits, group_size = words * 32 // width, width // scales.shape[-1]
    if scales.dtype != mx.uint8:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    mode = _SCALED_FORMATS.get((bits, group_size))
    if mode is None:
        raise ValueError(
            f"{path}: uint8 scales, {bits}-bit codes in groups of {group_size} "
            "match no quantization mode"
        )
    return {"group_size": group_size, "bits": bits, "mode": mode}


def load_model(
    model_path: Path,
    lazy: bool = False,
    strict: bool = True,
    model_config: Optional[Dict[str, Any]] = None,
    get_model_classes: Callable[[dict], Tuple[type, type]] = get_model_classes,
) -> Tuple[nn.Module, dict]:
    """Build the model in ``model_path`` and load its weights.

    ``model_config`` entries override ``config.json``.  With ``lazy`` the weights
    are only read from disk when first used. ``get_model_classes`` maps the
    config to ``(Model, ModelArgs)`` (another architecture source than this
    package's). Layers quantized differently from the config's default and not
    listed in it are read at their own packing (:func:`infer_quant_config`).
    Returns ``(model, config)``.
    """
    model_path = Path(model_path)
    config = load_config(model_path)
    config.update(model_config or {})

    weights = {}
    weight_files = sorted(model_path.glob("model*.safetensors"))
    if not weight_files and strict:
        raise FileNotFoundError(f"No model*.safetensors in {model_path}")
    for weight_file in weight_files:
        weights.update(mx.load(str(weight_file)))

    model_class, args_class = get_model_classes(config)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)

    quantization = _quantization_of(config)
    if quantization is not None:

        default = {
            "group_size": quantization["group_size"],
            "bits": quantization["bits"],
            "mode": quantization.get("mode", "affine"),
        }

        def should_quantize(path, module):
            # Per-layer entries (a dict of parameters, or False) come first.
            if path in quantization:
                return quantization[path]
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
                return False
            try:
                found = infer_quant_config(path, module, weights)
            except (ValueError, KeyError, AttributeError, ZeroDivisionError):
                return True
            return True if found == default else found

        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=should_quantize,
        )
        add_prefill_path(model)

    model.eval()
    model.load_weights(list(weights.items()), strict=strict)
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def load(
    path_or_hf_repo: Union[str, Path],
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: Optional[str] = None,
) -> Union[
    Tuple[nn.Module, TokenizerWrapper], Tuple[nn.Module, TokenizerWrapper, dict]
]:
    """Load a model and its tokenizer from a local folder, a GGUF file or a Hugging Face repo.

    Returns ``(model, tokenizer)``, or ``(model, tokenizer, config)`` with
    ``return_config``.
    """
    if adapter_path is not None:
        raise ValueError(f"adapter_path={adapter_path!r}: adapters are not supported.")
    if is_gguf_path(path_or_hf_repo):
        model, tokenizer, config = load_gguf(
            Path(path_or_hf_repo).expanduser(), model_config, tokenizer_config
        )
        return (model, tokenizer, config) if return_config else (model, tokenizer)
    model_path = get_model_path(path_or_hf_repo, revision)
    model, config = load_model(model_path, lazy=lazy, model_config=model_config)
    tokenizer = load_tokenizer(
        model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id")
    )
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


def check_quantization(group_size: int, bits: int) -> None:
    """Raise ``ValueError`` unless MLX can quantize with these parameters."""
    if bits not in QUANT_BITS:
        raise ValueError(f"q_bits={bits!r} is not one of {QUANT_BITS}.")
    if group_size not in QUANT_GROUP_SIZES:
        raise ValueError(
            f"q_group_size={group_size!r} is not one of {QUANT_GROUP_SIZES}."
        )


def quantize_model(
    model: nn.Module,
    config: dict,
    q_group_size: int = 64,
    q_bits: int = 4,
) -> Tuple[nn.Module, dict]:
    """Quantize every layer that supports it (affine mode) in place.

    Layers whose input size is not a multiple of ``q_group_size`` stay as they
    are.  Returns the model and a copy of ``config`` with its quantization entry.
    """
    check_quantization(q_group_size, q_bits)
    if "quantization" in config:
        raise ValueError("The model is already quantized.")

    def quantizable(_, module):
        return (
            hasattr(module, "to_quantized")
            and module.weight.shape[-1] % q_group_size == 0
        )

    nn.quantize(model, q_group_size, q_bits, class_predicate=quantizable)
    quantized_config = copy.deepcopy(config)
    quantized_config["quantization"] = {
        "group_size": q_group_size,
        "bits": q_bits,
        "mode": "affine",
    }
    quantized_config["quantization_config"] = quantized_config["quantization"]
    return model, quantized_config


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace quantized linear and embedding layers by float ones, in place."""
    replaced = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            out_dims = module.weight.shape[0]
            plain = nn.Linear(1, out_dims, bias="bias" in module)
            if "bias" in module:
                plain.bias = module.bias
        elif isinstance(module, nn.QuantizedEmbedding):
            plain = nn.Embedding(1, 1)
        else:
            continue
        plain.weight = mx.dequantize(
            module.weight,
            module.scales,
            module.get("biases"),
            module.group_size,
            module.bits,
            module.mode,
        )
        replaced.append((name, plain))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return model


def make_shards(weights: dict, max_file_size_gb: float = MAX_SHARD_BYTES >> 30) -> list:
    """Split ``weights`` (name -> array, in order) into dicts of at most
    ``max_file_size_gb`` GiB each; a tensor larger than that has a dict of its
    own, since one tensor is never split. No weights give no shards."""
    limit = max_file_size_gb * 2**30
    shards, size = [], 0
    for name, value in weights.items():
        if not shards or size + value.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    return shards


def save_model(
    save_path: Union[str, Path],
    model: nn.Module,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Write the parameters as safetensors shards of at most ``max_shard_bytes``.

    One shard is ``model.safetensors``; more are ``model-00001-of-0000N.safetensors``.
    ``model.safetensors.index.json`` maps every parameter to its file.
    """
    save_path = Path(save_path)
    save_path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    shards = make_shards(weights, max_shard_bytes / 2**30) or [{}]

    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        if len(shards) == 1:
            file_name = "model.safetensors"
        else:
            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(
            str(save_path / file_name), shard, metadata={"format": "mlx"}
        )
        weight_map.update(dict.fromkeys(shard, file_name))

    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (save_path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def save_config(config: dict, config_path: Union[str, Path]) -> None:
    """Write ``config`` as JSON with sorted keys, mirroring ``quantization`` into
    ``quantization_config`` as Hugging Face tools expect; non-finite floats are
    tagged, so that the file stays JSON every parser reads."""
    config = dict(config)
    config.pop("_name_or_path", None)
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    text = json.dumps(_tag_floats(config), indent=4, sort_keys=True, allow_nan=False)
    Path(config_path).write_text(text)


def copy_tokenizer_files(
    src_path: Union[str, Path], dst_path: Union[str, Path]
) -> list:
    """Copy tokenizer, chat template, generation config and custom code files.

    Returns the names of the copied files.
    """
    src_path, dst_path = Path(src_path), Path(dst_path)
    dst_path.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in TOKENIZER_FILE_PATTERNS:
        for src in sorted(src_path.glob(pattern)):
            if src.is_file() and src.name not in copied:
                shutil.copy(src, dst_path / src.name)
                copied.append(src.name)
    return copied


DEMO_MODEL_PATH = Path(__file__).parent / "demo_model"


def resolve_model_argument(model: Optional[str]) -> str:
    """The ``--model`` value to load: the bundled demo model when none was given."""
    if model is not None:
        return model
    if not (DEMO_MODEL_PATH / "config.json").is_file():
        raise ModelNotFoundError(
            f"no --model given and the bundled demo model is missing at {DEMO_MODEL_PATH}"
        )
    print(
        f"No --model given: using the bundled demo model ({DEMO_MODEL_PATH}). "
        "Pass --model to use another.",
        file=sys.stderr,
    )
    return str(DEMO_MODEL_PATH)
