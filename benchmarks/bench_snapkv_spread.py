"""Where a question's attention should go: SnapKV's symmetric pooling against
the forward spread that ``score_snapkv`` uses.

Both variants score the prompt by the attention of its last
``SNAPKV_WINDOW`` queries (compact_mode=once); they differ only in how a
key's weight is shared with its neighbours: SnapKV's mean over a centred
window of 5 (kvpress's kernel) or this package's maximum over the
``SNAPKV_SPREAD`` tokens before each position. Each answers the needle
tasks of ``ruler.py`` with half (or ``--evicted``) of the prompt evicted.

Usage:
    python benchmarks/bench_snapkv_spread.py [--model smollm2] [--length 1024] [--trials 2]
"""

# Before mlx.core, so that matrix products use the optimized BLAS on Linux.
import mlx_lm  # noqa: F401 isort: skip

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

from mlx_lm.models import cache as kv
from mlx_lm.models import eviction
from mlx_lm.utils import load

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_ruler  # noqa: E402
import real_models  # noqa: E402
import ruler  # noqa: E402

TASKS = ["niah_noise_number", "niah_essay_number", "niah_multikey", "qa"]


def centred_mean(weights: mx.array, width: int = 5) -> mx.array:
    pad = width // 2
    padded = mx.pad(weights, [(0, 0)] * (weights.ndim - 1) + [(pad + 1, pad)])
    total = mx.cumsum(padded, axis=-1)
    return (total[..., width:] - total[..., :-width]) / width


def score_symmetric(keys, queries, scale, left_padding=None):
    """score_snapkv with the forward spread swapped for a centred mean."""
    spread = eviction._spread_forward
    eviction._spread_forward = lambda x, width: centred_mean(x)
    try:
        return eviction.score_snapkv(keys, queries, scale, left_padding)
    finally:
        eviction._spread_forward = spread


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--evicted", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    path = real_models.path(args.model)
    if path is None:
        raise SystemExit(f"{args.model} is not fetched: run benchmarks/real_models.py")
    model, tokenizer = load(str(path))
    chat = "instruct" in path.name.lower()
    kv.QUERY_SCORERS["snapkv-centred"] = score_symmetric
    kv.COMPACT_POLICIES["snapkv-centred"] = score_symmetric
    tasks = ruler.build_tasks(tokenizer, chat, args.length, args.trials, 0, TASKS)
    rows = {}
    for policy in ("snapkv-centred", "snapkv"):
        scores = []
        for task in tasks:
            budget = round(len(task.prompt) * (100 - args.evicted) / 100)
            config = kv.KVCacheConfig(
                compact_kv_budget=budget, compact_policy=policy, compact_mode="once"
            )
            cache = kv.make_prompt_cache(model, config=config)
            reply = eval_ruler.answer(
                model, tokenizer, cache, config, mx.array(task.prompt), task
            )
            scores.append(task.score(reply))
        rows[policy] = scores
        print(f"{policy:<16} {sum(scores) / len(scores):.2f}  {scores}", flush=True)
    if args.json:
        out = {"settings": vars(args), "tasks": [t.name for t in tasks], "scores": rows}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
