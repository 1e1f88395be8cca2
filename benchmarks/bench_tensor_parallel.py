"""Tensor or pipeline parallelism on this machine: two ranks on loopback
(MLX's ring backend) against one process, for one model.

Reports, per cache option: whether the greedy tokens match, each rank's
weights + KV bytes against one process's, and decode speed; then the traffic
per decoded token (counted from the model's shapes: two all-reduces of the
hidden state per layer, one for the embedding lookup, one gather of the
logits; with ``--pipeline``: one send of the hidden state per rank boundary
and one gather of it) and the time of those collectives measured alone, and
the score all-reduce of layer/model-scope compaction (tensor parallelism: one
per compaction and layer).
On one machine two ranks share two cores: the speed is not what separate
machines would give, the correctness and memory are.

    python benchmarks/bench_tensor_parallel.py --json benchmarks/results/tensor_parallel_demo.json
    python benchmarks/bench_tensor_parallel.py --model PATH --pipeline \
        --json benchmarks/results/pipeline_smollm2.json
"""

import mlx_lm  # noqa: F401 isort: skip

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

OPTIONS = {
    "full": {},
    "kv_bits 8": {"kv_bits": 8, "quantized_kv_start": 0},
    "budget 128, layer scope": {"compact_kv_budget": 128, "compact_scope": "layer"},
    "window 128": {"window_size": 128},
}
PROMPT = Path(mlx_lm.__file__).with_name("generate.py").read_text()[:3000]


def timed_collectives(group, shapes, repeats=50):
    """Seconds per call of all_sum (or all_gather) of each named shape."""
    found = {}
    for name, (shape, gather) in shapes.items():
        x = mx.ones(shape, dtype=mx.float32)
        op = mx.distributed.all_gather if gather else mx.distributed.all_sum
        mx.eval(op(x, group=group))
        start = time.perf_counter()
        for _ in range(repeats):
            mx.eval(op(x, group=group))
        found[name] = (time.perf_counter() - start) / repeats
    return found


def worker(a):
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load, resolve_model_argument

    group = mx.distributed.init()
    model, tokenizer = load(resolve_model_argument(a.model))
    if group.size() > 1:
        model.pipeline(group) if a.pipeline else model.shard(group)
    mx.eval(model.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    prompt = mx.array(tokenizer.encode(PROMPT))
    out = {"size": group.size(), "weights": weights, "options": {}}
    for name, kv in OPTIONS.items():
        cache = make_prompt_cache(model, **kv)
        tokens, tps = [], 0.0
        for r in stream_generate(
            model, tokenizer, prompt, max_tokens=a.tokens, prompt_cache=cache, **kv
        ):
            tokens.append(r.token)
            tps = r.generation_tps
        kv_bytes = sum(c.nbytes for c in cache)
        out["options"][name] = {"tokens": tokens, "kv_bytes": kv_bytes, "tps": tps}
    if group.size() > 1:
        args = model.args
        hidden, vocab = args.hidden_size, args.vocab_size
        out["collectives_s"] = timed_collectives(
            group,
            {
                "hidden all-reduce": ((1, 1, hidden), False),
                "logits gather": ((vocab // group.size(), 1, 1), True),
                "scores all-reduce (1K tokens)": ((1, 1024), False),
            },
        )
        if a.pipeline:  # a send per boundary, then a gather of the hidden state
            out["per_token"] = {
                "all_reduces": 0,
                "all_reduce_bytes": 0,
                "sends": group.size() - 1,
                "send_bytes": hidden * 4,
                "gather_bytes": hidden * 4,
            }
        else:
            out["per_token"] = {
                "all_reduces": 2 * len(model.layers) + 1,
                "all_reduce_bytes": hidden * 4,
                "sends": 0,
                "send_bytes": 0,
                "gather_bytes": vocab // group.size() * 4,
            }
    Path(f"{a.out}.{group.rank()}").write_text(json.dumps(out))
    mx.clear_streams()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled demo model")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--pipeline", action="store_true", help="layers per rank, not heads")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    with tempfile.TemporaryDirectory() as tmp:
        me = [sys.executable, __file__, "--worker", "--tokens", str(a.tokens)]
        me += ["--model", a.model] if a.model else []
        me += ["--pipeline"] if a.pipeline else []
        subprocess.run(me + ["--out", f"{tmp}/one"], check=True)
        launch = ["mlx.launch", "-n", "2", "--backend", "ring", "--"]
        subprocess.run(launch + me + ["--out", f"{tmp}/two"], check=True)
        one = json.loads(Path(f"{tmp}/one.0").read_text())
        ranks = [json.loads(Path(f"{tmp}/two.{r}").read_text()) for r in range(2)]
    rank = ranks[0]
    print(
        f"{'cache':26s} {'tokens':>7s} {'memory/rank':>12s} {'tok/s 1':>8s} {'tok/s 2':>8s}"
    )
    rows = {}
    for name in OPTIONS:
        alone, split = one["options"][name], rank["options"][name]
        same = all(r["options"][name]["tokens"] == alone["tokens"] for r in ranks)
        ratio = (rank["weights"] + split["kv_bytes"]) / (
            one["weights"] + alone["kv_bytes"]
        )
        rows[name] = {
            "same_tokens": same,
            "memory_ratio": ratio,
            "tps_one": alone["tps"],
            "tps_two": split["tps"],
        }
        print(
            f"{name:26s} {'same' if same else 'DIFFER':>7s} {ratio:12.3f} "
            f"{alone['tps']:8.1f} {split['tps']:8.1f}"
        )
    per, coll = rank["per_token"], rank["collectives_s"]
    print(
        f"per decoded token: {per['all_reduces']} all-reduces and {per['sends']} sends "
        f"of {max(per['all_reduce_bytes'], per['send_bytes'])} B "
        f"(an all-reduce of that size: {1e6 * coll['hidden all-reduce']:.0f} us here), "
        f"one gather of {per['gather_bytes']} B per rank (logits-sized: "
        f"{1e6 * coll['logits gather']:.0f} us); a score all-reduce of 1K tokens: "
        f"{1e6 * coll['scores all-reduce (1K tokens)']:.0f} us"
    )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "model": a.model or "demo",
                    "mode": "pipeline" if a.pipeline else "tensor",
                    "rows": rows,
                    "per_token": per,
                    "collectives_s": coll,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
