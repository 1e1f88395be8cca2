"""Attention against a quantized KV cache on the CPU: float32 copy vs quantized product.

``mlx_lm.models.base`` attends to a quantized cache through a float32 copy of
the layer's keys and values for prompt chunks and for half-precision models
(``_attend_dequantized``). This runs ``generate_step`` with the full cache,
``kv_bits=4`` and ``kv_bits=8``, once as shipped and once with the quantized
product forced everywhere (the behaviour before), alternating the two
``--repeats`` times in one process; it prints prefill and decode tokens/s
(medians, min-max) and the first generated token of each, and writes JSON.

Usage:
    python benchmarks/bench_quantized_attention.py [--model PATH] [--prompt-tokens 2048]
        [--max-tokens 16] [--repeats 3] [--json PATH]

Without ``--model`` the bundled demo model is used; the prompt is the GPL-3 text.
"""

# First: mlx_lm puts an optimized BLAS in front of MLX's only if it is imported
# before mlx.core.
import mlx_lm  # isort: skip

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lm.generate import generate_step
from mlx_lm.models import base

TEXT = Path("/usr/share/common-licenses/GPL-3")
SETUPS = {"full cache": {}, "kv_bits=4": {"kv_bits": 4}, "kv_bits=8": {"kv_bits": 8}}
SHIPPED = base._attend_dequantized
PATHS = {"quantized product": lambda queries: False, "float32 copy": SHIPPED}


def run(model, prompt, max_tokens, options):
    start = time.perf_counter()
    for n, (token, _) in enumerate(
        generate_step(prompt, model, max_tokens=max_tokens, **options)
    ):
        if n == 0:
            first, first_token = time.perf_counter(), token
    end = time.perf_counter()
    return {
        "prefill_tps": prompt.size / (first - start),
        "decode_tps": (max_tokens - 1) / (end - first),
        "first_token": first_token,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    model_path = args.model or str(Path(mlx_lm.__file__).parent / "demo_model")
    model, tokenizer = mlx_lm.load(model_path)
    prompt = mx.array(tokenizer.encode(TEXT.read_text())[: args.prompt_tokens])
    dtype = next(
        str(v.dtype)
        for _, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating)
    )

    runs = {(p, s): [] for p in PATHS for s in SETUPS}
    for _ in range(args.repeats):
        for path, attend in PATHS.items():
            base._attend_dequantized = attend
            for setup, options in SETUPS.items():
                runs[path, setup].append(run(model, prompt, args.max_tokens, options))
    base._attend_dequantized = SHIPPED

    def cell(results, key):
        values = [r[key] for r in results]
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    print(f"model {model_path} ({dtype}), prompt {prompt.size} tokens")
    print("| cache | attention | prefill tok/s | decode tok/s | first token |")
    print("| --- | --- | --- | --- | --- |")
    for setup in SETUPS:
        for path in PATHS:
            results = runs[path, setup]
            print(
                f"| {setup} | {path} | {cell(results, 'prefill_tps')} | "
                f"{cell(results, 'decode_tps')} | {results[0]['first_token']} |"
            )
    if args.json:
        out = {
            "command": " ".join(["python", *sys.argv]),
            "model": model_path,
            "dtype": dtype,
            "prompt_tokens": int(prompt.size),
            "runs": {f"{s} / {p}": r for (p, s), r in runs.items()},
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
