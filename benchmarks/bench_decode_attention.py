"""Decode step time with and without the folded one-token GQA attention, in one process.

``mlx_lm.models.base._fused_attention`` folds the query heads that share a KV head
into one query block for single-token steps on the CPU. This fills a cache to the
given context once, then times decode steps alternately through the fold and through
a plain ``mx.fast.scaled_dot_product_attention`` call, trimming the cache back after
each round so that both see the same context.

    python benchmarks/bench_decode_attention.py --contexts 2048,8192
    python benchmarks/bench_decode_attention.py --model .bench/smol-135m-random --contexts 2048
"""

# First: mlx_lm puts an optimized BLAS in front of MLX's only if it is imported
# before mlx.core.
import mlx_lm  # noqa: F401 isort: skip

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_lm.models import base
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

REPO = Path(__file__).resolve().parent.parent


def unfolded(queries, keys, values, scale, mask):
    return mx.fast.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=mask
    )


def measure(model, vocab, context, rounds, steps):
    mx.random.seed(0)
    prompt = mx.random.randint(0, vocab, (context,))
    cache = make_prompt_cache(model)
    for start in range(0, context, 256):
        model(prompt[None, start : start + 256], cache=cache)
        mx.eval([c.state for c in cache])
    folded = base._fused_attention
    times = {"folded": [], "unfolded": []}
    token = prompt[-1:]
    try:
        for _ in range(rounds):
            for name, attention in (("folded", folded), ("unfolded", unfolded)):
                base._fused_attention = attention
                start = time.perf_counter()
                for _ in range(steps):
                    logits = model(token[None], cache=cache)[:, -1, :]
                    token = mx.argmax(logits, axis=-1)
                    token.item()
                times[name].append(1e3 * (time.perf_counter() - start) / steps)
                for c in cache:
                    c.trim(steps)
    finally:
        base._fused_attention = folded
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "mlx_lm" / "demo_model"))
    p.add_argument("--contexts", default="2048,8192")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=16, help="decode steps per round")
    args = p.parse_args()

    model, config = load_model(Path(args.model))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    print(f"{'context':>8}{'folded ms':>11}{'unfolded ms':>13}{'speedup':>9}")
    for context in [int(c) for c in args.contexts.split(",")]:
        r = measure(model, config["vocab_size"], context, args.rounds, args.steps)
        print(
            f"{context:>8}{r['folded']:>11.2f}{r['unfolded']:>13.2f}"
            f"{r['unfolded'] / r['folded']:>9.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
