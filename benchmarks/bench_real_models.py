"""Speed of the real models: this fork, upstream mlx-lm and llama.cpp in one run.

SmolLM2-135M-Instruct and Gemma-3-270M (``real_models.py`` fetches them), each
as 4-bit weights (SmolLM2's own Q4_1 codes kept as MLX affine 4-bit in groups of
32; Gemma's Q4_K_M dequantized, then quantized to 4 bits in groups of 64) and
as float32. Prompts are natural text (the licence texts of
``/usr/share/common-licenses``, repeated), cut to each context length. Every
measurement is a fresh process, the engines take turns, and the table shows
medians with min and max:

- ``fork``: this checkout, with the optimized BLAS it loads;
- ``upstream``: mlx-lm from PyPI in its own environment (MLX's reference BLAS),
  and ``upstream+blas``: the same with the optimized BLAS preloaded; both read
  the same converted folder as the fork;
- ``llama.cpp``: ``llama-cpp-python`` (``--llama-python`` names an interpreter
  that imports it) on the GGUF file itself, 2 threads. Its 4-bit rows are
  SmolLM2's very file; Gemma's file is Q4_K_M, not the MLX 4-bit weights.

Cache rows: the full cache, ``kv_bits`` 8 and 4 (from token 0 in every
engine; llama.cpp's q8_0 and q4_0 cache with flash attention),
``compact_kv_budget`` and ``window_size`` at a quarter of the context (the
fork only). Per row: prefill tokens/s, time to first token, decode tokens/s
over ``--decode`` tokens, peak memory.

    python benchmarks/bench_real_models.py --json benchmarks/results/real_speed.json
    python benchmarks/bench_real_models.py --models smollm2-q4 --contexts 512 --runs 1
    python benchmarks/bench_real_models.py --report first.json second.json
"""

# Before mlx.core, so that matrix products use the optimized BLAS on Linux.
import mlx_lm  # noqa: F401 isort: skip

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import real_models  # noqa: E402
from bench_vs_upstream import DEFAULT_ENV, ensure_upstream, find_blas, run  # noqa: E402

LICENCES = Path("/usr/share/common-licenses")
FOLDERS = REPO / ".bench" / "real"
MODELS = ("smollm2-q4", "smollm2-f32", "gemma3-q4", "gemma3-f32")
SETTINGS = ("full", "kv_bits=8", "kv_bits=4", "compact", "window")

# Runs under the llama-cpp-python interpreter; prints one JSON line.
LLAMA_WORKER = r"""
import json, resource, sys, time
import llama_cpp
spec = json.loads(sys.argv[1])
kv = {8: llama_cpp.GGML_TYPE_Q8_0, 4: llama_cpp.GGML_TYPE_Q4_0}.get(spec["kv_bits"])
extra = dict(type_k=kv, type_v=kv, flash_attn=True) if kv is not None else {}
llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=spec["context"] + spec["decode"] + 8,
                      n_threads=2, n_threads_batch=2, n_batch=512, verbose=False, **extra)
prompt = spec["prompt"][: spec["context"]]
start = time.perf_counter()
llm.eval(prompt)
token = llm.sample(top_k=1)
first = time.perf_counter()
for _ in range(spec["decode"] - 1):
    llm.eval([token])
    token = llm.sample(top_k=1)
end = time.perf_counter()
print(json.dumps({
    "prefill_tps": len(prompt) / (first - start),
    "ttft_s": first - start,
    "decode_tps": (spec["decode"] - 1) / (end - first),
    "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
}))
"""


def prepare(name: str) -> tuple:
    """(MLX folder, GGUF file) of ``name``, converting once under .bench/real."""
    from mlx_lm.convert import convert

    family, weights = name.split("-")
    fetch = (
        real_models.fetch_smollm2 if family == "smollm2" else real_models.fetch_gemma3
    )
    gguf = fetch()
    folder = FOLDERS / name
    if not (folder / "config.json").exists():
        FOLDERS.mkdir(parents=True, exist_ok=True)
        if family == "smollm2" and weights == "f32":
            # The Q4_1 codes dequantized: the same weights in float32.
            codes = prepare("smollm2-q4")[0]
            convert(str(codes), str(folder), dequantize=True, dtype="float32")
        else:
            convert(gguf=gguf, mlx_path=str(folder), quantize=(name == "gemma3-q4"))
    return folder, Path(gguf)


def natural_prompt(folder: Path, n: int) -> list:
    from mlx_lm.tokenizer_utils import load_tokenizer

    tokenizer = load_tokenizer(folder)
    files = sorted(p for p in LICENCES.iterdir() if p.is_file())
    text = "\n\n".join(p.read_text(errors="replace") for p in files)
    ids = tokenizer.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def run_llama(python: str, spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [python, "-c", LLAMA_WORKER, json.dumps(spec)],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def stats(runs: list, key: str):
    values = [r[key] for r in runs if key in r]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cell(runs, key, fmt=".1f"):
    s = stats(runs, key)
    if s is None:
        return "error" if any("error" in r for r in runs) else "-"
    if len(runs) == 1:
        return format(s["median"], fmt)
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--contexts", default="512,2048,8192")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--engines",
        default="fork,upstream,upstream+blas,llama.cpp",
        help="which to run, from fork,upstream,upstream+blas,llama.cpp",
    )
    p.add_argument(
        "--upstream-max-context",
        type=int,
        default=2048,
        help="longest prompt for upstream with MLX's reference BLAS",
    )
    p.add_argument("--upstream-env", type=Path, default=DEFAULT_ENV)
    p.add_argument("--llama-python", default=None, help="python with llama_cpp")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--report",
        nargs="+",
        default=None,
        help="print the table and goals of these saved JSON files and stop",
    )
    a = p.parse_args(argv)
    if a.report:
        rows = [row for name in a.report for row in json.loads(Path(name).read_text())]
        print(table(rows))
        print()
        print(goals(rows))
        return
    models = a.models.split(",")
    settings = a.settings.split(",")
    engines = a.engines.split(",")
    for given, allowed, flag in (
        (models, MODELS, "--models"),
        (settings, SETTINGS, "--settings"),
        (engines, ("fork", "upstream", "upstream+blas", "llama.cpp"), "--engines"),
    ):
        for value in given:
            if value not in allowed:
                p.error(f"{flag}: unknown {value!r}; choose from {','.join(allowed)}")
    contexts = [int(c) for c in a.contexts.split(",")]
    if "llama.cpp" in engines and not a.llama_python:
        p.error("--llama-python is needed for the llama.cpp engine")

    upstream = None
    if {"upstream", "upstream+blas"} & set(engines):
        upstream = ensure_upstream(a.upstream_env, "0.32.2")
    blas = find_blas()

    rows = []
    for name in models:
        folder, gguf = prepare(name)
        config = json.loads((folder / "config.json").read_text())
        config = config.get("text_config", config)
        head_dim = config.get("head_dim") or (
            config["hidden_size"] // config["num_attention_heads"]
        )
        group = 32 if head_dim % 64 else 64
        prompt = natural_prompt(folder, max(contexts))
        for context in contexts:
            quarter = context // 4
            options = {
                "full": {},
                "kv_bits=8": {"kv_bits": 8, "kv_group_size": group},
                "kv_bits=4": {"kv_bits": 4, "kv_group_size": group},
                "compact": {"compact_kv_budget": quarter},
                "window": {"window_size": quarter},
            }
            for setting in settings:
                cache = dict(options[setting])
                if "kv_bits" in cache:
                    cache["quantized_kv_start"] = 0
                spec = {
                    "model": str(folder),
                    "context": context,
                    "decode": a.decode,
                    "cache": cache,
                    "prefill_step": None,
                    "dtype": None,
                    "prompt": prompt,
                }
                comparable = setting in ("full", "kv_bits=8", "kv_bits=4")
                results = {}
                for _ in range(a.runs):
                    for engine in engines:
                        if engine != "fork" and not comparable:
                            continue
                        if engine == "upstream" and context > a.upstream_max_context:
                            continue
                        if engine == "upstream+blas" and not blas:
                            continue
                        if engine == "llama.cpp":
                            if name.endswith("f32"):
                                continue
                            result = run_llama(
                                a.llama_python,
                                {
                                    "gguf": str(gguf),
                                    "context": context,
                                    "decode": a.decode,
                                    "kv_bits": cache.get("kv_bits"),
                                    "prompt": prompt,
                                },
                            )
                        elif engine == "fork":
                            result = run(sys.executable, spec, fork=True)
                        else:
                            preload = blas if engine == "upstream+blas" else None
                            result = run(upstream, spec, preload)
                        if "prefill_tps" in result and "ttft_s" not in result:
                            result["ttft_s"] = context / result["prefill_tps"]
                        results.setdefault(engine, []).append(result)
                rows.append(
                    {
                        "model": name,
                        "context": context,
                        "setting": setting,
                        "runs": results,
                    }
                )
                print_row(rows[-1])
    print()
    print(table(rows))
    print()
    print(goals(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


def print_row(row):
    parts = [f"{row['model']} {row['context']} {row['setting']}"]
    for engine, runs in row["runs"].items():
        parts.append(
            f"{engine}: prefill {cell(runs, 'prefill_tps')} decode "
            f"{cell(runs, 'decode_tps')} peak {cell(runs, 'peak_gb', '.2f')} GB"
        )
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            parts.append(f"{engine} error: {errors[0]}")
    print(" | ".join(parts), flush=True)


def table(rows) -> str:
    lines = [
        "| model | context | cache | engine | prefill tok/s | TTFT s | decode tok/s | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        for engine, runs in row["runs"].items():
            lines.append(
                f"| {row['model']} | {row['context']} | {row['setting']} | {engine} "
                f"| {cell(runs, 'prefill_tps')} | {cell(runs, 'ttft_s', '.2f')} "
                f"| {cell(runs, 'decode_tps')} | {cell(runs, 'peak_gb', '.2f')} |"
            )
    return "\n".join(lines)


def goals(rows) -> str:
    """Each goal of the performance issue as its worst measured ratio."""

    def median(row, engine, key):
        s = stats(row["runs"].get(engine, []), key)
        return None if s is None else s["median"]

    found = {}

    def add(goal, value, where):
        if value is not None:
            found.setdefault(goal, []).append((value, where))

    full = {(r["model"], r["context"]): r for r in rows if r["setting"] == "full"}
    for r in rows:
        where = f"{r['model']} {r['context']} {r['setting']}"
        fork_decode = median(r, "fork", "decode_tps")
        fork_prefill = median(r, "fork", "prefill_tps")
        if fork_decode is None:
            continue
        for engine in ("upstream", "upstream+blas"):
            other = median(r, engine, "decode_tps")
            if other:
                add("decode >= 1.0x upstream", fork_decode / other, f"{where} {engine}")
        other = median(r, "llama.cpp", "decode_tps")
        if other and r["model"] == "smollm2-q4":
            add("decode >= 0.7x llama.cpp (4-bit)", fork_decode / other, where)
        if (
            r["model"].endswith("q4")
            and r["context"] == 2048
            and r["setting"] == "full"
        ):
            other = median(r, "upstream+blas", "prefill_tps")
            if other:
                add(
                    "prefill >= 1.2x upstream, same BLAS (4-bit, 2K)",
                    fork_prefill / other,
                    where,
                )
            other = median(r, "llama.cpp", "prefill_tps")
            if other and r["model"] == "smollm2-q4":
                add(
                    "prefill >= 0.5x llama.cpp (4-bit, 2K)", fork_prefill / other, where
                )
        base = full.get((r["model"], r["context"]))
        if r["setting"] == "compact" and r["context"] >= 8192 and base:
            base_decode = median(base, "fork", "decode_tps")
            if base_decode:
                add(
                    "compact 1/4 decode >= 1.5x full (8K)",
                    fork_decode / base_decode,
                    where,
                )
    thresholds = {
        "decode >= 1.0x upstream": 1.0,
        "decode >= 0.7x llama.cpp (4-bit)": 0.7,
        "prefill >= 1.2x upstream, same BLAS (4-bit, 2K)": 1.2,
        "prefill >= 0.5x llama.cpp (4-bit, 2K)": 0.5,
        "compact 1/4 decode >= 1.5x full (8K)": 1.5,
    }
    lines = ["| goal | worst ratio | where | result |", "| --- | --- | --- | --- |"]
    for goal, limit in thresholds.items():
        if goal not in found:
            lines.append(f"| {goal} | - | not measured in this run | - |")
            continue
        value, where = min(found[goal])
        verdict = "met" if value >= limit else "not met"
        lines.append(f"| {goal} | {value:.2f} | {where} | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
