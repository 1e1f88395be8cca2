"""Prefill and decode speed with the optimized BLAS that ``import mlx_lm`` loads, against
MLX's bundled reference BLAS (``MLX_LM_NO_BLAS=1``).

Each measurement runs in a fresh process (the BLAS is chosen at import time); the two
settings alternate so that drift on a shared machine hits both alike.

    python benchmarks/bench_blas.py --prompt-tokens 512 --runs 3 --json blas.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import mlx_lm
import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm._blas import blas_info

cfg = json.loads(sys.argv[1])
args = llama.ModelArgs.from_dict(cfg)
mx.random.seed(0)
model = llama.Model(args)
model.set_dtype(getattr(mx, cfg["dtype"]))
mx.eval(model.parameters())
tokens = mx.random.randint(0, cfg["vocab_size"], (1, cfg["prompt_tokens"]))
cache = make_prompt_cache(model)
start = time.perf_counter()
mx.eval(model(tokens, cache=cache))
prefill = time.perf_counter() - start
y = mx.array([[1]])
start = time.perf_counter()
for _ in range(cfg["decode_tokens"]):
    y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
    mx.eval(y)
decode = time.perf_counter() - start
print(json.dumps({
    "prefill_tps": cfg["prompt_tokens"] / prefill,
    "decode_tps": cfg["decode_tokens"] / decode,
    "blas": blas_info(),
}))
"""


def run_once(config, use_blas):
    env = dict(os.environ)
    env.pop("MLX_LM_NO_BLAS", None)
    if not use_blas:
        env["MLX_LM_NO_BLAS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(config)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--hidden-size", type=int, default=576)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--json", default=None, help="Write the results here")
    a = p.parse_args()
    # SmolLM-135M's shape by default.
    config = {
        "model_type": "llama",
        "hidden_size": a.hidden_size,
        "num_hidden_layers": a.layers,
        "intermediate_size": a.hidden_size * 8 // 3,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "dtype": a.dtype,
    }
    results = {"optimized": [], "reference": []}
    for _ in range(a.runs):
        results["optimized"].append(run_once(config, True))
        results["reference"].append(run_once(config, False))
    blas = results["optimized"][0]["blas"]
    if not blas.get("loaded"):
        print(f"warning: no optimized BLAS was loaded ({blas.get('reason')})")

    def median(name, key):
        return statistics.median(r[key] for r in results[name])

    rows = []
    for key, label in (
        ("prefill_tps", "prefill tok/s"),
        ("decode_tps", "decode tok/s"),
    ):
        fast, slow = median("optimized", key), median("reference", key)
        rows.append((label, fast, slow, fast / slow))
    print(
        f"model: llama {a.layers} layers, hidden {a.hidden_size}, {a.dtype}; "
        f"prompt {a.prompt_tokens} tokens; {a.runs} runs each, medians"
    )
    print(f"optimized BLAS: {blas.get('path')}")
    print(f"{'':16}{'optimized':>12}{'reference':>12}{'speed-up':>10}")
    for label, fast, slow, ratio in rows:
        print(f"{label:16}{fast:12.1f}{slow:12.1f}{ratio:9.1f}x")
    if a.json:
        summary = {
            label: {"optimized": f, "reference": s, "ratio": r}
            for label, f, s, r in rows
        }
        with open(a.json, "w") as f:
            json.dump(
                {"config": config, "blas": blas, "summary": summary, "runs": results},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
