"""Append tokens one at a time to a KV cache: buffer reallocations, time, and the
worst ratio of buffer slots to tokens held from 1K tokens on.

Compares the fork's ``KVCache`` (geometric growth) with a baseline that grows
by a fixed 256 slots through cut-and-concatenate (defined below) and, when
``--upstream-python`` names an interpreter that can import upstream mlx-lm,
with upstream's ``KVCache``.

Example:

    python benchmarks/bench_kv_growth.py --tokens 32768 --dtype float16 \
        --upstream-python /path/to/other/venv/bin/python --json kv.json
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import mlx.core as mx

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


class FixedStepCache:
    """Baseline: on overflow, cut the buffer to the used part and concatenate
    ``step`` more zero slots (one full copy per 256 tokens)."""

    def __init__(self, step: int = 256):
        self.step = step
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys, values):
        start = self.offset
        stop = start + keys.shape[2]
        if self.keys is None or stop > self.keys.shape[2]:
            batch, heads, count, _ = keys.shape
            slots = -(-count // self.step) * self.step
            fresh_k = mx.zeros((batch, heads, slots, keys.shape[3]), keys.dtype)
            fresh_v = mx.zeros((batch, heads, slots, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = fresh_k, fresh_v
            else:
                used_k = self.keys[..., :start, :]
                used_v = self.values[..., :start, :]
                self.keys = mx.concatenate([used_k, fresh_k], axis=2)
                self.values = mx.concatenate([used_v, fresh_v], axis=2)
        self.keys[..., start:stop, :] = keys
        self.values[..., start:stop, :] = values
        self.offset = stop
        return self.keys[..., :stop, :], self.values[..., :stop, :]


def measure(cache, config: dict) -> dict:
    """Time ``config['tokens']`` single-token appends to ``cache``."""
    shape = (config["batch"], config["kv_heads"], 1, config["head_dim"])
    dtype = DTYPES[config["dtype"]]
    keys = mx.random.normal(shape).astype(dtype)
    values = mx.random.normal(shape).astype(dtype)
    mx.eval(keys, values)
    if hasattr(mx, "reset_peak_memory"):
        mx.reset_peak_memory()
    every = config["eval_every"]
    quarter = max(config["tokens"] // 4, 1)
    reallocations, capacity, marks, worst = 0, 0, [], 0.0
    start = time.perf_counter()
    for i in range(config["tokens"]):
        fetched = cache.update_and_fetch(keys, values)
        if cache.keys.shape[2] != capacity:
            reallocations += 1
            capacity = cache.keys.shape[2]
        if i + 1 >= 1024:
            worst = max(worst, capacity / (i + 1))
        if (i + 1) % every == 0 or (i + 1) % quarter == 0:
            mx.eval(fetched)
        if (i + 1) % quarter == 0:
            marks.append(time.perf_counter())
    mx.eval(fetched)
    seconds = time.perf_counter() - start
    # Cost per token in the first and the last quarter of the context: equal when
    # appending does not get dearer as the cache grows.
    bounds = [start] + marks
    quarters = [1e6 * (b - a) / quarter for a, b in zip(bounds, bounds[1:])]
    result = {
        "reallocations": reallocations,
        "capacity": capacity,
        "seconds": seconds,
        "us_per_token": 1e6 * seconds / config["tokens"],
        "us_per_token_by_quarter": quarters,
        # Buffer slots over tokens held, at its worst from 1K tokens on.
        "worst_resident_over_held": worst,
    }
    if hasattr(mx, "get_peak_memory"):
        result["peak_mb"] = mx.get_peak_memory() / 2**20
    return result


def _import_cache_module():
    """Import ``mlx_lm.models.cache`` without running the package __init__
    files (only ``mlx`` is needed that way)."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mlx_lm is not importable from this interpreter")
    root = list(spec.submodule_search_locations)[0]
    for name, path in (
        ("mlx_lm", root),
        ("mlx_lm.models", os.path.join(root, "models")),
    ):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    from mlx_lm.models import cache

    version = "unknown"
    version_file = os.path.join(root, "_version.py")
    if os.path.exists(version_file):
        scope = {}
        with open(version_file) as f:
            exec(f.read(), scope)
        version = scope.get("__version__", version)
    return cache, version, root


def _upstream_worker(config: dict):
    """Runs under the other interpreter: measure its KVCache, print JSON."""
    cache_module, version, root = _import_cache_module()
    result = measure(cache_module.KVCache(), config)
    result.update(version=version, location=root)
    print(json.dumps(result))


def run_upstream(python: str, config: dict) -> dict:
    """Measure upstream's KVCache in a separate interpreter, or explain why not."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return {"skipped": f"no executable interpreter at {python}"}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as neutral:
        done = subprocess.run(
            [
                os.path.abspath(python),
                os.path.abspath(__file__),
                "--worker",
                json.dumps(config),
            ],
            cwd=neutral,
            env=env,
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"skipped": f"upstream run failed: {reason}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows):
    header = f"{'cache':<28}{'reallocs':>9}{'capacity':>10}{'seconds':>9}"
    header += f"{'us/token':>10}{'first q':>9}{'last q':>9}{'peak MB':>9}"
    header += f"{'resident/held':>15}"
    print(header)
    print("-" * len(header))
    for name, r in rows:
        if "skipped" in r:
            print(f"{name:<28}skipped: {r['skipped']}")
            continue
        peak = f"{r['peak_mb']:>9.1f}" if "peak_mb" in r else f"{'-':>9}"
        quarters = r.get("us_per_token_by_quarter") or [float("nan")]
        print(
            f"{name:<28}{r['reallocations']:>9}{r['capacity']:>10}"
            f"{r['seconds']:>9.3f}{r['us_per_token']:>10.1f}"
            f"{quarters[0]:>9.1f}{quarters[-1]:>9.1f}{peak}"
            f"{r.get('worst_resident_over_held', float('nan')):>15.3f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="evaluate after this many appends (1 = like decoding)",
    )
    parser.add_argument(
        "--upstream-python",
        help="interpreter that can import upstream mlx-lm (skipped when absent)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        _upstream_worker(json.loads(args.worker))
        return
    for name in ("tokens", "batch", "kv_heads", "head_dim", "eval_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")

    from mlx_lm.models.cache import KVCache

    config = {
        "tokens": args.tokens,
        "batch": args.batch,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "eval_every": args.eval_every,
    }
    fork = KVCache()
    rows = [("geometric (this fork)", measure(fork, config))]
    rows[0][1]["allocations_counter"] = fork.allocations
    rows.append(("fixed 256-step concatenate", measure(FixedStepCache(), config)))
    if args.upstream_python:
        upstream = run_upstream(args.upstream_python, config)
        label = f"upstream mlx-lm {upstream.get('version', '')}".strip()
        rows.append((label, upstream))

    print(
        f"{args.tokens} single-token appends, B={args.batch}, "
        f"{args.kv_heads} kv heads, head_dim {args.head_dim}, {args.dtype}, "
        f"eval every {args.eval_every}"
    )
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": dict(rows)}, f, indent=2)


if __name__ == "__main__":
    main()
