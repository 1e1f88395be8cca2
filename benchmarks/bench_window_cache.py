"""Memory and speed of sliding-window KV caches against the full cache.

For every setup (full cache, ``max_kv_size``, the three window strategies and,
at the same budget, ``compact_kv_budget`` with each key-scoring policy,
optionally with ``--kv-bits``) a prompt of random token ids is prefilled and
``--decode-tokens`` tokens are generated greedily with ``generate_step``. The
table lists the KV bytes held per sequence at the end, tokens held and evicted
(summed over layers), prefill and decode throughput, and decode time relative
to the ``fifo`` window. A windowed setup that never evicted is an error (exit
status 1): its figures would say nothing about eviction.

A second table isolates what the ``attention`` strategy adds to one attention
call: the explicit softmax(QK^T) and the per-key sums handed to the cache,
against the fused kernel, for one decode query over a full window.

Example:

    python benchmarks/bench_window_cache.py --prompt-tokens 2048 --window 512 \\
        --decode-tokens 256 --json window.json
"""

# Before mlx.core, so that matrix products use the optimized BLAS on Linux.
import mlx_lm  # noqa: F401 isort: skip

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx

from mlx_lm.generate import generate_step
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import (
    KEY_SCORERS,
    KVCache,
    SlidingWindowKVCache,
    cache_eviction_stats,
    make_prompt_cache,
)
from mlx_lm.utils import load, resolve_model_argument


def setups(window, prefix, span):
    """(name, cache options) of every setup compared."""
    size = {"window_size": window, "window_attention_span": span}
    return [
        ("full", {}),
        (f"max_kv_size={window}", {"max_kv_size": window}),
        ("window fifo", dict(size, window_strategy="fifo")),
        ("window fixed", dict(size, window_strategy="fixed", window_prefix=prefix)),
        (
            "window attention",
            dict(size, window_strategy="attention", window_prefix=prefix),
        ),
    ] + [
        (
            f"compact {policy}",
            {
                "compact_kv_budget": window,
                "compact_policy": policy,
                "compact_mode": "stream",
            },
        )
        for policy in KEY_SCORERS
    ]


def run_setup(model, prompt, options, args):
    """One generation: returns its figures (throughput in tokens per second)."""
    cache = make_prompt_cache(model, **options)
    quant = {}
    if args.kv_bits is not None:
        quant = dict(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    steps = generate_step(
        prompt,
        model,
        max_tokens=args.decode_tokens,
        prompt_cache=cache,
        prefill_step_size=args.prefill_step,
        **options,
        **quant,
    )
    start = time.perf_counter()
    next(steps)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    produced = sum(1 for _ in steps)
    decode = time.perf_counter() - start
    stats = cache_eviction_stats(cache)
    return {
        "kv_bytes": sum(c.nbytes for c in cache),
        "held": stats["current_size"],
        "evicted": stats["tokens_evicted"],
        "evictions": stats["total_evictions"],
        "prefill_tps": prompt.size / prefill,
        "decode_tps": produced / decode,
    }


def attention_call_cost(model, window, span, repeats):
    """Microseconds per decode attention call over ``window + span`` keys, with
    and without handing the weights to an attention-scored window."""
    args = model.args
    head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    n_kv = args.num_key_value_heads or args.num_attention_heads
    keys_len = window + span
    q = mx.random.normal((1, args.num_attention_heads, 1, head_dim))
    k = mx.random.normal((1, n_kv, keys_len, head_dim))
    v = mx.random.normal((1, n_kv, keys_len, head_dim))
    mx.eval(q, k, v)
    scale = head_dim**-0.5

    def fused():
        return scaled_dot_product_attention(q, k, v, None, scale, None)

    def observed():
        cache = SlidingWindowKVCache(
            KVCache(), window, "attention", eviction_attention_window=span
        )
        return scaled_dot_product_attention(q, k, v, cache, scale, None)

    timings = {}
    for name, call in (("fused", fused), ("observed", observed)):
        mx.eval(call())
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                mx.eval(call())
            runs.append((time.perf_counter() - start) / repeats * 1e6)
        timings[name] = statistics.median(runs)
    timings["keys"] = keys_len
    return timings


def format_table(rows):
    head = (
        f"{'setup':<20}{'KV MiB':>8}{'held':>7}{'evicted':>9}{'evictions':>11}"
        f"{'prefill t/s':>13}{'decode t/s':>12}{'vs fifo':>9}"
    )
    fifo = next((r["decode_tps"] for r in rows if r["name"] == "window fifo"), None)
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{fifo / r['decode_tps']:>9.2f}" if fifo else f"{'-':>9}"
        lines.append(
            f"{r['name']:<20}{r['kv_bytes'] / 2**20:>8.2f}{r['held']:>7d}"
            f"{r['evicted']:>9d}{r['evictions']:>11d}{r['prefill_tps']:>13.1f}"
            f"{r['decode_tps']:>12.1f}{ratio}"
        )
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="default: the bundled demo model")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument(
        "--window", type=int, default=512, help="window, max_kv_size and budget"
    )
    p.add_argument("--prefix", type=int, default=4, help="prefix of fixed/attention")
    p.add_argument("--span", type=int, default=32, help="window_attention_span")
    p.add_argument("--prefill-step", type=int, default=512)
    p.add_argument("--kv-bits", type=int, default=None)
    p.add_argument("--kv-group-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs per setup (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = load(resolve_model_argument(args.model))
    vocab = model.args.vocab_size
    prompt = mx.random.randint(
        0, vocab, (args.prompt_tokens,), key=mx.random.key(args.seed)
    )
    compared = setups(args.window, args.prefix, args.span)
    runs = {name: [] for name, _ in compared}
    # Round-robin, so that a busy spell of the machine hits every setup alike.
    for repeat in range(args.repeats):
        for name, options in compared:
            runs[name].append(run_setup(model, prompt, options, args))
            tps = runs[name][-1]["decode_tps"]
            print(
                f"run {repeat + 1}, {name}: {tps:.1f} decode tokens/s", file=sys.stderr
            )
    rows = []
    for name, options in compared:
        row = dict(runs[name][-1], name=name, options=options)
        for key in ("prefill_tps", "decode_tps"):
            row[key] = statistics.median(r[key] for r in runs[name])
        rows.append(row)
    print(format_table(rows))
    cost = attention_call_cost(model, args.window, args.span, repeats=200)
    extra = cost["observed"] / cost["fused"]
    print(
        f"\none decode attention call over {cost['keys']} keys: fused "
        f"{cost['fused']:.1f} us, with weights for the attention strategy "
        f"{cost['observed']:.1f} us ({extra:.2f}x)"
    )
    print(
        f"prompt {args.prompt_tokens} random tokens (prefill chunks of "
        f"{args.prefill_step}), {args.decode_tokens} greedy tokens, window "
        f"{args.window} (+{args.span} block), kv_bits {args.kv_bits}, median of "
        f"{args.repeats} runs"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows, "attention": cost}, f)
    idle = [r["name"] for r in rows if r["name"] != "full" and r["evicted"] == 0]
    if idle:
        print(f"FAIL: no eviction in {', '.join(idle)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
