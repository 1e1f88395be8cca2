"""Convert a Hugging Face checkpoint or a GGUF file to an MLX model folder.

Usage: ``mlx_lm.convert --hf-path <folder or repo> --mlx-path out [-q] [--dtype float16]``
or ``mlx_lm.convert --gguf model.gguf --mlx-path out [-q]``.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_map

from .gguf import convert_gguf
from .utils import (
    QUANT_BITS,
    QUANT_GROUP_SIZES,
    check_quantization,
    copy_tokenizer_files,
    dequantize_model,
    get_model_path,
    load_model,
    quantize_model,
    save_config,
    save_model,
)

DTYPES = ("float16", "bfloat16", "float32")


def convert(
    hf_path: Optional[Union[str, Path]] = None,
    mlx_path: Union[str, Path] = "mlx_model",
    quantize: bool = False,
    q_group_size: int = 64,
    q_bits: int = 4,
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    dequantize: bool = False,
    gguf: Optional[Union[str, Path]] = None,
) -> Path:
    """Write the model at ``hf_path`` (or the GGUF file ``gguf``) to the new folder ``mlx_path``.

    Floating point weights are cast to ``dtype`` (default: the config's
    ``torch_dtype``/``dtype`` when it is one of ``DTYPES``; float32 for GGUF),
    then the model is quantized (``quantize``) or dequantized (``dequantize``).
    GGUF tensors that are MLX affine codes stay as they are; ``quantize``
    re-quantizes the others.  Returns ``mlx_path``.
    """
    mlx_path = Path(mlx_path)
    if mlx_path.exists():
        raise ValueError(
            f"mlx_path {str(mlx_path)!r} already exists; remove it or choose another path."
        )
    if quantize and dequantize:
        raise ValueError("quantize and dequantize cannot both be set.")
    if quantize:
        check_quantization(q_group_size, q_bits)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}.")
    if (hf_path is None) == (gguf is None):
        raise ValueError("Give exactly one of hf_path and gguf.")
    if gguf is not None:
        if dequantize:
            raise ValueError("dequantize does not apply to a GGUF file.")
        if not Path(gguf).expanduser().is_file():
            raise FileNotFoundError(f"No GGUF file at {gguf}")
        print(f"[INFO] Reading {gguf}")
        convert_gguf(
            Path(gguf).expanduser(),
            mlx_path,
            quantize=quantize,
            q_group_size=q_group_size,
            q_bits=q_bits,
            dtype=getattr(mx, dtype or "float32"),
        )
        print(f"[INFO] Saved to {mlx_path}")
        return mlx_path

    model_path = get_model_path(hf_path, revision)
    print(f"[INFO] Loading {model_path}")
    model, config = load_model(model_path, lazy=True)

    dtype = dtype or config.get("torch_dtype") or config.get("dtype")
    if dtype in DTYPES:
        print(f"[INFO] Using dtype {dtype}")
        target = getattr(mx, dtype)
        model.update(
            tree_map(
                lambda w: (
                    w.astype(target) if mx.issubdtype(w.dtype, mx.floating) else w
                ),
                model.parameters(),
            )
        )

    if quantize:
        print(f"[INFO] Quantizing to {q_bits} bits, group size {q_group_size}")
        model, config = quantize_model(model, config, q_group_size, q_bits)
    if dequantize:
        print("[INFO] Dequantizing")
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)

    save_model(mlx_path, model)
    save_config(config, mlx_path / "config.json")
    copy_tokenizer_files(model_path, mlx_path)
    print(f"[INFO] Saved to {mlx_path}")
    return mlx_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face model to MLX format."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--hf-path",
        "--model",
        help="Local folder or Hugging Face repo id of the model.",
    )
    source.add_argument(
        "--gguf", help="A GGUF file (llama.cpp's format) to convert instead."
    )
    parser.add_argument(
        "--mlx-path", default="mlx_model", help="Folder to create (must not exist)."
    )
    parser.add_argument(
        "-q", "--quantize", action="store_true", help="Quantize the weights."
    )
    parser.add_argument(
        "--q-bits", type=int, default=4, choices=QUANT_BITS, help="Bits per weight."
    )
    parser.add_argument(
        "--q-group-size",
        type=int,
        default=64,
        choices=QUANT_GROUP_SIZES,
        help="Weights sharing one scale and bias.",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="Type of the non-quantized weights (default: the config's "
        "torch_dtype; float32 for --gguf).",
    )
    parser.add_argument(
        "-d", "--dequantize", action="store_true", help="Dequantize a quantized model."
    )
    parser.add_argument(
        "--revision", default=None, help="Branch, tag or commit of a Hub repo."
    )
    args = parser.parse_args(argv)
    try:
        convert(**vars(args))
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"Error: {err}")


if __name__ == "__main__":
    main()
