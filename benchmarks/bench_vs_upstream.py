"""This fork against upstream mlx-lm from PyPI, on the same checkpoints, in one run.

Upstream lives in its own virtual environment (created on first use, reused after).
Every measurement is a fresh process; the implementations take turns so that a noisy
machine slows them alike, and the table shows medians and ratios. Three contenders:

- ``fork``: this checkout, with the optimized BLAS it loads on Linux;
- ``upstream``: mlx-lm from PyPI as installed (MLX's bundled reference BLAS on Linux);
- ``upstream+blas``: the same, with the optimized BLAS preloaded (``LD_PRELOAD``), to
  compare code rather than BLAS.

    python benchmarks/bench_vs_upstream.py --quick
    python benchmarks/bench_vs_upstream.py --models demo,smol --json vs_upstream.json
"""

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
DEFAULT_ENV = REPO / ".bench" / "upstream-venv"

# Runs inside either implementation; uses only API that both share.
WORKER = r"""
import json, sys, time
from pathlib import Path
spec = json.loads(sys.argv[1])
import mlx_lm
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

model, config = load_model(Path(spec["model"]))
if spec.get("dtype"):
    model.set_dtype(getattr(mx, spec["dtype"]))
mx.eval(model.parameters())
weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
mx.random.seed(0)
if spec.get("prompt"):
    prompt = mx.array(spec["prompt"][: spec["context"]])
else:
    prompt = mx.random.randint(0, config["vocab_size"], (spec["context"],))
cache_opts = dict(spec["cache"])
kv_bits = cache_opts.pop("kv_bits", None)
kv_group_size = cache_opts.pop("kv_group_size", 64)
kv_start = {}
if "quantized_kv_start" in cache_opts:
    kv_start["quantized_kv_start"] = cache_opts.pop("quantized_kv_start")
cache = make_prompt_cache(model, **cache_opts)
mx.reset_peak_memory()
times = []
start = time.perf_counter()
# No prefill step given: each implementation's own default chunk length.
chunks = {"prefill_step_size": spec["prefill_step"]} if spec["prefill_step"] else {}
for _ in generate_step(prompt, model, max_tokens=spec["decode"], prompt_cache=cache,
                       kv_bits=kv_bits, kv_group_size=kv_group_size, **kv_start,
                       **chunks):
    times.append(time.perf_counter())
    if len(times) == 1:
        prefill_peak = mx.get_peak_memory()
        mx.reset_peak_memory()
prefill = times[0] - start
decode = (times[-1] - times[0]) / max(len(times) - 1, 1)
kv_bytes = sum(c.nbytes for c in cache)
peak = max(prefill_peak, mx.get_peak_memory())
decode_peak = mx.get_peak_memory()
# Decoding reads every weight once per token through vector-matrix products, so
# the fastest read of a 256 MiB matrix that way, in any layout, is its limit.
big = mx.random.uniform(shape=(8192, 8192))
row, col = mx.ones((1, 8192)), mx.ones((8192, 1))
mx.eval(big, row, col)
reads = []
for product in (lambda: row @ big, lambda: row @ big.T, lambda: big @ col):
    for _ in range(5):
        t = time.perf_counter(); mx.eval(product()); reads.append(time.perf_counter() - t)
bandwidth = big.nbytes / min(reads)
print(json.dumps({
    "prefill_tps": spec["context"] / prefill,
    "decode_tps": 1.0 / decode,
    "peak_gb": peak / 1e9,
    "decode_peak_gb": decode_peak / 1e9,
    "kv_bytes": kv_bytes,
    "weight_bytes": weight_bytes,
    "bandwidth_gbs": bandwidth / 1e9,
    "decode_bound_tps": bandwidth / (weight_bytes + kv_bytes),
}))
"""


def find_blas():
    sys.path.insert(0, str(REPO))
    from mlx_lm._blas import blas_info

    return blas_info().get("path")


def ensure_upstream(env: Path, version: str) -> Path:
    python = env / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {env} with mlx-lm=={version} from PyPI ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    extra = ["mlx[cpu]"] if sys.platform.startswith("linux") else []
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"mlx-lm=={version}"] + extra,
        check=True,
    )
    return python


def make_smol(folder: Path):
    """A random-weight llama in SmolLM-135M's shape, written once."""
    if (folder / "config.json").exists():
        return folder
    sys.path.insert(0, str(REPO))
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    }
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(folder / "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run(python, spec, preload=None, fork=False):
    env = dict(os.environ)
    if preload:
        env["LD_PRELOAD"] = preload
    cwd = REPO if fork else tempfile.gettempdir()
    if fork:
        env["PYTHONPATH"] = str(REPO)
    else:
        env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [str(python), "-c", WORKER, json.dumps(spec)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "?"}
    return json.loads(out.stdout.strip().splitlines()[-1])


SETTINGS = ("full", "max_kv_size", "kv_bits=8", "kv_bits=4", "compact", "window")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,smol", help="demo, smol or folders")
    p.add_argument("--contexts", default="128,512,2048,8192")
    p.add_argument("--decode", type=int, default=32, help="Decode steps per run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--upstream-version", default="0.32.2")
    p.add_argument("--upstream-env", type=Path, default=DEFAULT_ENV)
    p.add_argument("--budget", type=int, default=512, help="For the eviction rows")
    p.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"cache rows to run, from {','.join(SETTINGS)}",
    )
    p.add_argument(
        "--upstream-max-context",
        type=int,
        default=2048,
        help="longest prompt given to upstream with MLX's reference BLAS "
        "(its 8K prefill of the 135M model takes the better part of an hour)",
    )
    p.add_argument(
        "--prefill-step",
        type=int,
        default=None,
        help="prompt chunk for both (default: each one's own, 256 here on the CPU, "
        "2048 upstream)",
    )
    p.add_argument("--quick", action="store_true", help="demo model, 512/2048, 1 run")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.quick:
        a.models, a.contexts, a.runs = "demo", "512,2048", 1
    chosen = a.settings.split(",")
    for name in chosen:
        if name not in SETTINGS:
            p.error(f"--settings: unknown row {name!r}; choose from {SETTINGS}")

    upstream = ensure_upstream(a.upstream_env, a.upstream_version)
    blas = find_blas()
    contenders = [("fork", sys.executable, None, True)]
    contenders.append(("upstream", upstream, None, False))
    if blas:
        contenders.append(("upstream+blas", upstream, blas, False))

    folders = {}
    for name in a.models.split(","):
        if name == "demo":
            folders[name] = REPO / "mlx_lm" / "demo_model"
        elif name == "smol":
            folders[name] = make_smol(REPO / ".bench" / "smol-135m-random")
        else:
            folders[name] = Path(name).resolve()

    b = a.budget
    # (row, kind, cache options, whether upstream has an equivalent)
    settings = [
        ("full", "full", {}, True),
        (f"max_kv_size={b}", "max_kv_size", {"max_kv_size": b}, True),
        ("kv_bits=8", "kv_bits=8", {"kv_bits": 8}, True),
        ("kv_bits=4", "kv_bits=4", {"kv_bits": 4}, True),
        (
            f"compact_kv_budget={b}",
            "compact",
            {"compact_kv_budget": b, "compact_mode": "stream"},
            False,
        ),
        (f"window_size={b}", "window", {"window_size": b}, False),
    ]
    rows = []
    for model_name, folder in folders.items():
        config = json.loads((folder / "config.json").read_text())
        head_dim = config.get("head_dim") or (
            config["hidden_size"] // config["num_attention_heads"]
        )
        # Upstream's default group of 64 does not fit heads narrower than 64.
        group = 32 if head_dim % 64 else 64
        for context in [int(c) for c in a.contexts.split(",")]:
            for label, kind, cache, upstream_has_it in settings:
                if kind not in chosen or (kind != "full" and context <= b):
                    continue
                spec = {
                    "model": str(folder),
                    "context": context,
                    "decode": a.decode,
                    "cache": (
                        dict(cache, kv_group_size=group)
                        if "kv_bits" in cache
                        else cache
                    ),
                    "prefill_step": a.prefill_step,
                    "dtype": "float32",
                }
                results = {}
                for _ in range(a.runs):
                    for name, python, preload, fork in contenders:
                        if not fork and not upstream_has_it:
                            continue
                        if name == "upstream" and context > a.upstream_max_context:
                            continue
                        results.setdefault(name, []).append(
                            run(python, spec, preload, fork)
                        )
                rows.append((model_name, context, label, results))
                print_row(rows[-1], flush=True)

    print()
    print(targets(rows, b))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                [
                    {"model": m, "context": c, "cache": l, "runs": r}
                    for m, c, l, r in rows
                ],
                f,
                indent=2,
            )


def med(runs, key):
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def targets(rows, budget):
    """The performance targets as measured ratios, one line each."""
    lines = [f"{'target':<58}{'worst':>8}  result  (where)"]

    def check(name, found, at_least):
        found = [(v, where) for v, where in found if v == v]
        if not found:
            return
        value, where = min(found)
        verdict = "met" if value >= at_least else "NOT MET"
        lines.append(f"{name:<58}{value:>8.2f}  {verdict:<7} ({where})")

    full = {(m, c): r for m, c, l, r in rows if l == "full"}
    ratios = {"decode": [], "prefill": [], "prefill+blas": [], "compact": []}
    peak = []
    for m, c, label, results in rows:
        fork = results.get("fork", [])
        where = f"{m} {c} {label}"
        if label == "full":
            for name, key in (("upstream+blas", "decode"), ("upstream", "decode")):
                if results.get(name):
                    ratios[key].append(
                        (
                            med(fork, "decode_tps") / med(results[name], "decode_tps"),
                            f"{where} vs {name}",
                        )
                    )
            if results.get("upstream"):
                ratios["prefill"].append(
                    (
                        med(fork, "prefill_tps")
                        / med(results["upstream"], "prefill_tps"),
                        where,
                    )
                )
            if results.get("upstream+blas"):
                ratios["prefill+blas"].append(
                    (
                        med(fork, "prefill_tps")
                        / med(results["upstream+blas"], "prefill_tps"),
                        where,
                    )
                )
        elif label.startswith("compact") and (m, c) in full and c >= 4 * budget:
            base = full[(m, c)].get("fork", [])
            ratios["compact"].append(
                (med(fork, "decode_tps") / med(base, "decode_tps"), where)
            )
            limit = med(fork, "weight_bytes") + med(fork, "kv_bytes")
            peak.append((limit * 1.1 / (med(fork, "decode_peak_gb") * 1e9), where))
    check("decode >= 1.0x upstream (no eviction option)", ratios["decode"], 1.0)
    check("prefill >= 20x upstream's default wheel", ratios["prefill"], 20.0)
    check("prefill >= 1.0x upstream with the same BLAS", ratios["prefill+blas"], 1.0)
    check(
        "compact decode >= 1.0x full fork at context >= 4x budget",
        ratios["compact"],
        1.0,
    )
    check("decode peak <= 1.1 x (weights + KV): ratio >= 1", peak, 1.0)
    return "\n".join(lines)


def print_row(row, flush=False):
    model, context, label, results = row
    fork = results.get("fork", [])
    parts = [f"{model:5} {context:6} {label:22}"]
    if any("error" in r for r in fork):
        print(" | ".join(parts + [f"fork: error {fork[0].get('error')}"]), flush=flush)
        return
    parts.append(
        f"fork prefill {med(fork, 'prefill_tps'):8.1f} tok/s decode "
        f"{med(fork, 'decode_tps'):7.1f} tok/s ({med(fork, 'decode_tps') / med(fork, 'decode_bound_tps'):.0%} of bound) "
        f"kv {med(fork, 'kv_bytes') / 1e6:7.1f} MB peak {med(fork, 'peak_gb'):.2f} GB "
        f"(decode {med(fork, 'decode_peak_gb'):.2f})"
    )
    for name in ("upstream", "upstream+blas"):
        if name in results:
            runs = results[name]
            if any("error" in r for r in runs):
                parts.append(f"{name}: error {runs[0].get('error')}")
                continue
            parts.append(
                f"vs {name}: prefill x{med(fork, 'prefill_tps') / med(runs, 'prefill_tps'):.2f} "
                f"decode x{med(fork, 'decode_tps') / med(runs, 'decode_tps'):.2f}"
            )
    print(" | ".join(parts), flush=flush)


if __name__ == "__main__":
    main()
