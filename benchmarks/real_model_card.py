"""Model cards of the two real checkpoints on this machine: file, load, memory, speed.

For each GGUF fetched by ``benchmarks/real_models.py`` (SmolLM2-135M-Instruct
Q4_1, Gemma-3-270M Q4_K_M):

* file size, and the bytes of the loaded model's parameters;
* ``mlx_lm.load`` time and resident memory, each load in a fresh interpreter
  (the peak resident set is reset just before loading and read after it, so
  the figure is what loading adds on top of the imported libraries), with the
  tokenizer already cached, plus one first load with an empty tokenizer cache;
  and the same for the weights alone (``load_gguf(..., tokenizer=False)``),
  whose peak is compared with the loaded parameters' bytes;
* prefill and decode tokens/s and the KV cache bytes at the end, greedy, for
  the full cache and for ``compact_kv_budget`` (what ``--compact-kv-budget``
  sets), the setups alternated ``--repeats`` times; medians with min and max.

The prompt is the GPL-3 text (``/usr/share/common-licenses/GPL-3``) cut to
``--prompt-tokens``.  Prints a table and writes JSON.

Usage:
    python benchmarks/real_models.py   # fetch the files once
    python benchmarks/real_model_card.py [--models smollm2,gemma3]
        [--prompt-tokens 2048] [--max-tokens 128] [--budget 512] [--repeats 3]
        [--json benchmarks/real_model_card.json]
"""

# First: mlx_lm puts an optimized BLAS in front of MLX's only if it is imported
# before mlx.core.
import mlx_lm  # isort: skip

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import real_models

from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

HERE = Path(__file__).resolve().parent
TEXT = Path("/usr/share/common-licenses/GPL-3")
MB = 1e6

# Run in a fresh interpreter: loads the model (argv[2] "load": mlx_lm.load;
# "weights": the weights alone) and reports time and memory.
LOAD_PROBE = """
import json, sys, time
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.gguf import load_gguf

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set (VmHWM) to the current one
start = time.perf_counter()
if sys.argv[2] == "load":
    model, tokenizer = mlx_lm.load(sys.argv[1])
else:
    model, _, _ = load_gguf(sys.argv[1], tokenizer=False)
seconds = time.perf_counter() - start
weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
print(json.dumps({"load_s": seconds, "rss_before": before,
                  "peak_rss": status("VmHWM"), "rss_after": status("VmRSS"),
                  "model_bytes": weights}))
"""


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def summary(values):
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def load_probe(path: Path, mode: str, cache_dir=None):
    env = dict(os.environ)
    if cache_dir is not None:
        env["MLX_LM_CACHE"] = str(cache_dir)
    out = subprocess.run(
        [sys.executable, "-c", LOAD_PROBE, str(path), mode],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["added"] = result["peak_rss"] - result["rss_before"]
    return result


def measure_load(path: Path, repeats: int):
    with tempfile.TemporaryDirectory() as empty:
        cold = load_probe(path, "load", cache_dir=empty)
    load_probe(path, "load")  # make sure the default tokenizer cache is filled
    full, weights = [], []
    for _ in range(repeats):
        full.append(load_probe(path, "load"))
        weights.append(load_probe(path, "weights"))
    model_bytes = full[0]["model_bytes"]
    return {
        "model_bytes": model_bytes,
        "load_s": summary([r["load_s"] for r in full]),
        "first_load_s": cold["load_s"],
        "weights_load_s": summary([r["load_s"] for r in weights]),
        "weights_peak_added_bytes": summary([r["added"] for r in weights]),
        "weights_peak_over_model": summary([r["added"] / model_bytes for r in weights]),
        "load_peak_added_bytes": summary([r["added"] for r in full]),
        "load_rss_after_bytes": summary([r["rss_after"] for r in full]),
    }


def run_generation(model, prompt, max_tokens, budget):
    options = {}
    if budget is not None:
        options = {"compact_kv_budget": budget, "compact_mode": "stream"}
    cache = make_prompt_cache(model, **options)
    start = time.perf_counter()
    n = 0
    for n, (token, _) in enumerate(
        generate_step(
            prompt, model, max_tokens=max_tokens, prompt_cache=cache, **options
        ),
        start=1,
    ):
        if n == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    return {
        "prefill_tps": prompt.size / (first - start),
        "decode_tps": (n - 1) / (end - first),
        "kv_bytes": sum(c.nbytes for c in cache),
        "tokens": n,
    }


def measure_speed(path: Path, args):
    model, tokenizer = mlx_lm.load(str(path))
    ids = tokenizer.encode(TEXT.read_text())[: args.prompt_tokens]
    prompt = mx.array(ids)
    setups = {"full": None, f"budget {args.budget}": args.budget}
    runs = {name: [] for name in setups}
    run_generation(model, prompt[:256], 8, None)  # warm up
    for i in range(args.repeats):
        for name, budget in setups.items():
            result = run_generation(model, prompt, args.max_tokens, budget)
            say(f"  {name} run {i + 1}: {result}")
            runs[name].append(result)
    out = {}
    for name, results in runs.items():
        out[name] = {
            key: summary([r[key] for r in results])
            for key in ("prefill_tps", "decode_tps", "kv_bytes")
        }
    return {"prompt_tokens": int(prompt.size), "setups": out}


def fmt(s, scale=1.0, digits=1):
    return (
        f"{s['median'] / scale:.{digits}f} "
        f"({s['min'] / scale:.{digits}f}-{s['max'] / scale:.{digits}f})"
    )


def print_table(cards):
    print(
        "| model | file MB | model MB | load s (first) | weights: peak added / model |"
        " load: peak added MB | setup | prefill tok/s | decode tok/s | KV MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, card in cards.items():
        load = card["load"]
        for i, (setup, s) in enumerate(card["speed"]["setups"].items()):
            head = (
                f"| {name} | {card['file_bytes'] / MB:.1f} | "
                f"{load['model_bytes'] / MB:.1f} | "
                f"{fmt(load['load_s'], digits=2)} ({load['first_load_s']:.1f}) | "
                f"{fmt(load['weights_peak_over_model'], digits=2)} | "
                f"{fmt(load['load_peak_added_bytes'], MB, digits=0)} |"
                if i == 0
                else "| | | | | | |"
            )
            print(
                f"{head} {setup} | {fmt(s['prefill_tps'])} | {fmt(s['decode_tps'])} |"
                f" {s['kv_bytes']['median'] / MB:.1f} |"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=HERE / "real_model_card.json")
    args = parser.parse_args()
    names = args.models.split(",")
    for name in names:
        if name not in real_models.FILES:
            raise ValueError(f"--models: unknown model {name!r}")
        if real_models.path(name) is None:
            raise ValueError(f"{name} is not fetched: python benchmarks/real_models.py")
    if not TEXT.is_file():
        raise ValueError(f"the prompt text {TEXT} is missing")

    cards = {}
    for name in names:
        path = real_models.path(name)
        say(f"{name}: load")
        card = {
            "file": real_models.FILES[name],
            "file_bytes": path.stat().st_size,
            "load": measure_load(path, args.repeats),
        }
        say(f"{name}: generation")
        card["speed"] = measure_speed(path, args)
        cards[name] = card
    print_table(cards)
    result = {
        "command": " ".join(["python", "benchmarks/real_model_card.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "blas": mlx_lm._blas.blas_info()["path"],
        "mlx": mx.__version__,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "budget": args.budget,
        "repeats": args.repeats,
        "models": cards,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
