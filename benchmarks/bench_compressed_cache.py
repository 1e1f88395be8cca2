"""Memory, speed and quality of ``CompressedKVCache`` next to the full KV cache.

Sections (``--sections``, default all):

* memory: KV bytes in use and peak memory after prefilling contexts of
  2K/4K/8K/32K tokens and decoding a few, full cache vs budgets 512/1024/2048
  (the bundled model; a small random-weight model above its ``--max-demo-context``);
* latency: one compaction event of every layer at 8K context (8K -> budget,
  and the steady-state budget + margin -> budget) for 16 and 36 layers, next
  to the memory-bandwidth bound (bytes moved / bandwidth of a large MLX copy);
* decode: tokens/s with and without compression at a context of at least
  4x the budget, and the share of decode time spent compacting (amortised);
* prefill: time and peak memory of an 8K-token prompt, budget 2048 vs full;
* quality: ``eval_long_context.py`` for every policy x scope with 25/50/75%
  of the context evicted, next to the full cache and ``max_kv_size``.

Targets are printed as measured ratios with met / NOT MET; they are not
asserted. ``--quick`` shrinks every section to a smoke run.

Usage:
    python benchmarks/bench_compressed_cache.py [--sections memory,latency,...]
        [--quick] [--json PATH] [--model PATH] [--quality-args "--context 1024"]
"""

# First: mlx_lm puts an optimized BLAS in front of MLX's only if it is imported
# before mlx.core (float32 matrix products are several times faster).
import mlx_lm  # noqa: F401 isort: skip

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_lm.generate import generate_step
from mlx_lm.models.cache import (
    COMPACT_SCOPES,
    DEFAULT_COMPACT_POLICY,
    KEY_SCORERS,
    PER_TOKEN_POLICIES,
    CompressedKVCache,
    KVCacheConfig,
    compact_prompt_cache,
    default_compact_margin,
    make_prompt_cache,
)
from mlx_lm.utils import get_model_classes, load, resolve_model_argument

SECTIONS = ("memory", "latency", "decode", "prefill", "quality")
DEFAULTS = KVCacheConfig()
MIB = 2**20


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def int_list(text):
    return [int(x) for x in text.split(",") if x]


def random_model(layers=2, hidden=64, heads=2, kv_heads=1, vocab=4096, seed=0):
    """A llama with random weights, for contexts the bundled model was not made for."""
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 1 << 16,
        "tie_word_embeddings": True,
    }
    model_class, args_class = get_model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def random_prompt(n, vocab, seed=0):
    return mx.random.randint(3, vocab, (n,), key=mx.random.key(seed))


def cache_options(budget, keep_recent):
    if budget is None:
        return {}
    # Streaming compaction: the cache stays near the budget during the prompt too.
    return {
        "compact_kv_budget": budget,
        "compact_keep_recent": keep_recent,
        "compact_mode": "stream",
    }


def run_generation(model, prompt, budget, keep_recent, max_tokens, prefill_step):
    """Prefill ``prompt`` and decode ``max_tokens``; returns timings and memory."""
    options = cache_options(budget, keep_recent)
    cache = make_prompt_cache(model, **options)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    first = None
    for n, _ in enumerate(
        generate_step(
            prompt,
            model,
            max_tokens=max_tokens,
            prompt_cache=cache,
            prefill_step_size=prefill_step,
            **options,
        ),
        start=1,
    ):
        if n == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    compressed = [c for c in cache if isinstance(c, CompressedKVCache)]
    keys = cache[0].state[0]
    return {
        "kv_heads": keys.shape[1],
        "head_dim": keys.shape[3],
        "budget": budget,
        "prefill_s": first - start,
        "decode_tps": (max_tokens - 1) / max(end - first, 1e-9),
        "kv_bytes": sum(c.nbytes for c in cache),
        "peak_bytes": mx.get_peak_memory(),
        "peak_over_start_bytes": mx.get_peak_memory() - before,
        "compactions": max((c.compactions for c in compressed), default=0),
        "held": max(c.size() for c in cache),
        "offset": max(c.offset for c in cache),
    }


# ----------------------------------------------------------------------------
# Sections


def section_memory(args, demo, demo_vocab):
    rows = []
    for context in args.contexts:
        if context <= args.max_demo_context:
            model, vocab, label = demo, demo_vocab, "demo"
        else:
            model, vocab, label = random_model(), 4096, "random"
        prompt = random_prompt(context, vocab)
        for budget in [None] + [b for b in args.budgets if b < context]:
            say(f"memory: {label} context {context} budget {budget}")
            r = run_generation(
                model, prompt, budget, args.keep_recent, 8, args.prefill_step
            )
            r.update(context=context, model=label)
            if budget is not None and r["compactions"] == 0:
                raise SystemExit(f"FAIL: budget {budget} never evicted at {context}")
            rows.append(r)
    head = f"{'model':<10}{'context':>8}{'budget':>8}{'held':>7}{'KV MiB':>9}{'KV/full':>9}{'peak MiB':>10}{'prefill s':>10}"
    lines = [head, "-" * len(head)]
    full = {}
    for r in rows:
        if r["budget"] is None:
            full[r["context"]] = r["kv_bytes"]
        ratio = r["kv_bytes"] / full[r["context"]]
        lines.append(
            f"{r['model']:<10}{r['context']:>8}{str(r['budget'] or 'full'):>8}{r['held']:>7}"
            f"{r['kv_bytes'] / MIB:>9.2f}{ratio:>9.3f}{r['peak_bytes'] / MIB:>10.1f}"
            f"{r['prefill_s']:>10.2f}"
        )
    return rows, "\n".join(lines)


def time_copy(x):
    """Seconds for one elementwise copy of ``x`` (one read and one write)."""
    start = time.perf_counter()
    y = x * 1.0
    mx.eval(y)
    return time.perf_counter() - start


def measure_bandwidth(mib=256, repeats=5):
    """Bytes per second of a large MLX array copy (read plus write)."""
    x = mx.random.uniform(shape=(mib * MIB // 4,))
    mx.eval(x)
    return 2 * x.nbytes / min(time_copy(x) for _ in range(repeats))


def time_compaction(
    layers, heads, head_dim, held, budget, margin, dtype, scope, policy, repeats
):
    """Seconds for one compaction of every layer, the bytes it has to move at
    least, and seconds for an MLX copy moving as many bytes (the bandwidth
    bound), each the best of ``repeats`` taken in turn so that both see the
    same load.

    ``held`` is the number of tokens at the event. With ``held`` below
    ``2 * budget`` the event is the steady one of decoding: the layers were
    compacted before and only the ``held - budget`` newest tokens are scored.
    """
    steady = held < 2 * budget
    shape = (1, heads, held, head_dim)
    keys = mx.random.normal(shape).astype(dtype)
    values = mx.random.normal(shape).astype(dtype)
    mx.eval(keys, values)
    slot = heads * head_dim * keys.itemsize
    scored = held - budget if steady and policy in PER_TOKEN_POLICIES else held
    # Read the keys to score; read and write the kept keys and values.
    moved = layers * (scored * slot + 2 * budget * 2 * slot)
    copied = mx.zeros((moved // 8,), mx.float32)
    mx.eval(copied)
    best, bound = float("inf"), float("inf")
    for _ in range(repeats):
        bound = min(bound, time_copy(copied))
        caches = [
            CompressedKVCache(
                budget, keep_recent=32, policy=policy, scope=scope, margin=margin
            )
            for _ in range(layers)
        ]
        if steady:
            fresh = held - budget
            for c in caches:
                c.update_and_fetch(keys, values)
            compact_prompt_cache(caches, slack=0)
            for c in caches:
                c.update_and_fetch(keys[..., :fresh, :], values[..., :fresh, :])
        else:
            for c in caches:
                c.update_and_fetch(keys, values)
        mx.eval([c.state for c in caches])
        start = time.perf_counter()
        compact_prompt_cache(caches, slack=0)
        mx.eval([c.state for c in caches] + [c._kept_scores for c in caches])
        best = min(best, time.perf_counter() - start)
        del caches
    return best, moved, bound


def section_latency(args, bandwidth):
    rows = []
    for layers in args.latency_layers:
        for size, label in (
            (args.latency_context, f"{args.latency_context}->budget"),
            (
                args.latency_budget + default_compact_margin(args.latency_budget) + 1,
                "steady",
            ),
        ):
            for scope in args.latency_scopes:
                say(f"latency: {layers} layers, {label}, scope {scope}")
                seconds, moved, bound = time_compaction(
                    layers,
                    args.latency_heads,
                    args.latency_head_dim,
                    size,
                    args.latency_budget,
                    default_compact_margin(args.latency_budget),
                    getattr(mx, args.latency_dtype),
                    scope,
                    DEFAULT_COMPACT_POLICY["stream"],
                    args.repeats,
                )
                rows.append(
                    dict(
                        layers=layers,
                        event=label,
                        held=size,
                        scope=scope,
                        ms=seconds * 1e3,
                        bytes_moved=moved,
                        bound_ms=bound * 1e3,
                        ratio=seconds / bound,
                        copy_bytes_per_s=moved / bound,
                    )
                )
    head = f"{'layers':>7} {'event':<14}{'held':>7}{'scope':>7}{'ms':>9}{'MiB moved':>11}{'bound ms':>10}{'x bound':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['layers']:>7} {r['event']:<14}{r['held']:>7}{r['scope']:>7}{r['ms']:>9.2f}"
            f"{r['bytes_moved'] / MIB:>11.1f}{r['bound_ms']:>10.2f}{r['ratio']:>9.2f}"
        )
    dims = f"{args.latency_heads} KV heads x {args.latency_head_dim}, {args.latency_dtype}, budget {args.latency_budget}"
    rates = [r["copy_bytes_per_s"] / 1e9 for r in rows]
    lines.append(
        f"({dims}; bound = an MLX copy of the same bytes timed alongside, "
        f"{min(rates):.1f}-{max(rates):.1f} GB/s; large copy {bandwidth / 1e9:.1f} GB/s)"
    )
    return rows, "\n".join(lines)


def section_decode(args, model, vocab):
    prompt = random_prompt(args.decode_context, vocab, seed=1)
    rows = []
    for budget in [None] + args.decode_budgets:
        say(f"decode: context {args.decode_context} budget {budget}")
        r = run_generation(
            model,
            prompt,
            budget,
            args.keep_recent,
            args.decode_tokens,
            args.prefill_step,
        )
        r["compaction_share"] = None
        if budget is not None:
            margin = default_compact_margin(budget)
            event, _, _ = time_compaction(
                len(model.layers),
                r["kv_heads"],
                r["head_dim"],
                budget + margin + 1,
                budget,
                margin,
                mx.float32,
                DEFAULTS.compact_scope,
                DEFAULT_COMPACT_POLICY["stream"],
                args.repeats,
            )
            per_token = event / (margin + 1)
            r["compaction_event_ms"] = event * 1e3
            r["compaction_share"] = per_token * r["decode_tps"]
        rows.append(r)
    full_tps = rows[0]["decode_tps"]
    head = f"{'budget':>8}{'context':>9}{'tok/s':>9}{'x full':>8}{'compactions':>13}{'event ms':>10}{'compact %':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        share = r["compaction_share"]
        lines.append(
            f"{str(r['budget'] or 'full'):>8}{args.decode_context:>9}{r['decode_tps']:>9.1f}"
            f"{r['decode_tps'] / full_tps:>8.2f}{r['compactions']:>13}"
            f"{r.get('compaction_event_ms', 0):>10.2f}"
            f"{'-' if share is None else f'{100 * share:.2f}':>11}"
        )
    lines.append(
        f"(decode of {args.decode_tokens} tokens; compactions per layer over prefill "
        "and decode; compact % = steady event ms / (margin + 1) x tokens/s)"
    )
    return rows, "\n".join(lines)


def section_prefill(args, model, vocab):
    prompt = random_prompt(args.prefill_context, vocab, seed=2)
    rows = []
    for step in args.prefill_steps:
        for budget in (None, args.prefill_budget):
            say(
                f"prefill: {args.prefill_context} tokens, chunks {step}, budget {budget}"
            )
            r = run_generation(model, prompt, budget, args.keep_recent, 1, step)
            r["prefill_step"] = step
            rows.append(r)
    head = f"{'chunk':>7}{'budget':>8}{'seconds':>9}{'speedup':>9}{'peak MiB':>10}{'peak/full':>11}"
    lines = [head, "-" * len(head)]
    for full, comp in zip(rows[::2], rows[1::2]):
        for r in (full, comp):
            lines.append(
                f"{r['prefill_step']:>7}{str(r['budget'] or 'full'):>8}{r['prefill_s']:>9.2f}"
                f"{full['prefill_s'] / r['prefill_s']:>9.2f}{r['peak_bytes'] / MIB:>10.1f}"
                f"{r['peak_bytes'] / full['peak_bytes']:>11.2f}"
            )
    return rows, "\n".join(lines)


def quality_configs(args):
    """Harness setups: every policy x scope at each eviction share, next to the
    full cache and max_kv_size keeping the same share."""
    setups = ["full"]
    for evicted in args.evicted:
        kept = f"{100 - evicted}%"
        setups.append(f"max_kv_size={kept}")
        for policy in args.policies:
            for scope in args.scopes:
                setups.append(
                    f"compact_kv_budget={kept}+compact_policy={policy}"
                    f"+compact_scope={scope}+compact_mode=stream"
                )
    return ",".join(setups)


def section_quality(args):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import eval_long_context

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quality.json"
        argv = ["--configs", quality_configs(args), "--json", str(out)]
        argv += shlex.split(args.quality_args)
        if args.model:
            argv += ["--model", args.model]
        say("quality: eval_long_context.py " + " ".join(shlex.quote(a) for a in argv))
        status = eval_long_context.main(argv)
        if status:
            raise SystemExit(f"FAIL: the quality harness exited with {status}")
        report = json.loads(out.read_text())
    return report, "(table printed above by eval_long_context.py)"


def targets(results):
    """The issue's targets, as measured ratios."""
    found = []

    def add(name, value, ok, detail):
        found.append(dict(target=name, value=value, met=ok, detail=detail))

    decode = results.get("decode")
    if decode:
        shares = [
            r["compaction_share"] for r in decode if r["compaction_share"] is not None
        ]
        add(
            "compaction amortised < 5% of decode time",
            max(shares),
            max(shares) < 0.05,
            "worst budget, event latency / (margin + 1) x tokens/s",
        )
        full = decode[0]
        for r in decode[1:]:
            if full["offset"] >= 4 * r["budget"]:
                ratio = r["decode_tps"] / full["decode_tps"]
                add(
                    f"decode budget {r['budget']} >= full at context {full['offset']}",
                    ratio,
                    ratio >= 1.0,
                    "tokens/s ratio",
                )
    prefill = results.get("prefill")
    if prefill:
        for full, comp in zip(prefill[::2], prefill[1::2]):
            speedup = full["prefill_s"] / comp["prefill_s"]
            add(
                f"prefill {comp['offset']} tokens budget {comp['budget']} (chunks {comp['prefill_step']}) >= 2x faster",
                speedup,
                speedup >= 2.0,
                "full seconds / compressed seconds",
            )
    latency = results.get("latency")
    if latency:
        worst = max(r["ratio"] for r in latency)
        add(
            "compaction within 3x of the bandwidth bound",
            worst,
            worst <= 3.0,
            "worst compaction time / time of an MLX copy of the same bytes",
        )
    quality = results.get("quality")
    if quality:
        records = quality["results"]
        full = next(r for r in records if not r["kwargs"])
        context = quality["settings"]["context"]
        half = [
            r
            for r in records
            if r["kwargs"].get("compact_kv_budget") == round(context / 2)
        ]
        for r in half:
            kw = r["kwargs"]
            if (kw.get("compact_policy"), kw.get("compact_scope")) == (
                DEFAULT_COMPACT_POLICY["stream"],
                DEFAULTS.compact_scope,
            ):
                base = full["retrieval_accuracy"] or 0.0
                share = r["retrieval_accuracy"] / base if base else float("nan")
                add(
                    "50% evicted: default keeps retrieval >= 85% of full",
                    share,
                    share >= 0.85 if base else None,
                    f"{r['retrieval_accuracy']:.2f} vs {base:.2f}"
                    + ("" if base else ": the full cache retrieves nothing"),
                )
    lines = [f"{'target':<72}{'value':>9}  result"]
    verdicts = {True: "met", False: "NOT MET", None: "n/a"}
    for t in found:
        lines.append(
            f"{t['target']:<72}{t['value']:>9.3f}  {verdicts[t['met']]}  ({t['detail']})"
        )
    return found, "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--model", default=None, help="default: the bundled demo model")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--json", default=None, help="write every measurement here")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="compute dtype of the model (float32 is the CPU backend's fast path)",
    )
    p.add_argument("--keep-recent", type=int, default=32)
    p.add_argument("--prefill-step", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--contexts", type=int_list, default=[2048, 4096, 8192, 32768])
    p.add_argument("--budgets", type=int_list, default=[512, 1024, 2048])
    p.add_argument("--max-demo-context", type=int, default=8192)
    p.add_argument("--latency-layers", type=int_list, default=[16, 36])
    p.add_argument("--latency-context", type=int, default=8192)
    p.add_argument("--latency-budget", type=int, default=2048)
    p.add_argument("--latency-heads", type=int, default=8)
    p.add_argument("--latency-head-dim", type=int, default=128)
    p.add_argument("--latency-dtype", default="float32")
    p.add_argument("--latency-scopes", default="layer,model,head")
    p.add_argument("--decode-context", type=int, default=8192)
    p.add_argument("--decode-budgets", type=int_list, default=[512, 1024, 2048])
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prefill-context", type=int, default=8192)
    p.add_argument("--prefill-budget", type=int, default=2048)
    p.add_argument("--prefill-steps", type=int_list, default=[2048, 512, 256])
    p.add_argument("--evicted", type=int_list, default=[25, 50, 75])
    p.add_argument("--policies", default=",".join(KEY_SCORERS))
    p.add_argument("--scopes", default=",".join(COMPACT_SCOPES))
    p.add_argument(
        "--quality-args",
        default="",
        help="extra arguments for eval_long_context.py, e.g. '--context 1024 --docs 1'",
    )
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    for s in args.sections:
        if s not in SECTIONS:
            p.error(
                f"--sections: unknown section {s!r}; choose from {', '.join(SECTIONS)}"
            )
    args.latency_scopes = args.latency_scopes.split(",")
    args.policies = args.policies.split(",")
    args.scopes = args.scopes.split(",")
    if args.quick:
        args.contexts, args.budgets = [1024, 2048], [256, 512]
        args.latency_layers, args.latency_context, args.latency_budget = [4], 2048, 512
        args.latency_scopes, args.repeats = ["layer"], 1
        args.decode_context, args.decode_budgets, args.decode_tokens = 2048, [512], 32
        args.prefill_context, args.prefill_budget, args.prefill_steps = 2048, 512, [512]
        args.evicted, args.policies, args.scopes = (
            [50],
            [DEFAULT_COMPACT_POLICY["stream"]],
            [DEFAULTS.compact_scope],
        )
        args.quality_args = args.quality_args or "--quick --context 512"
    return args


def main(argv=None):
    args = parse_args(argv)
    model_path = resolve_model_argument(args.model)
    demo, tokenizer = load(model_path)
    demo.set_dtype(getattr(mx, args.dtype))
    vocab = demo.args.vocab_size
    results, tables = {}, {}
    bandwidth = measure_bandwidth(64 if args.quick else 256)
    results["bandwidth_bytes_per_s"] = bandwidth
    for section in args.sections:
        if section == "memory":
            results[section], tables[section] = section_memory(args, demo, vocab)
        elif section == "latency":
            results[section], tables[section] = section_latency(args, bandwidth)
        elif section == "decode":
            results[section], tables[section] = section_decode(args, demo, vocab)
        elif section == "prefill":
            results[section], tables[section] = section_prefill(args, demo, vocab)
        elif section == "quality":
            results[section], tables[section] = section_quality(args)
        print(f"\n== {section} ==\n{tables[section]}", flush=True)
    results["targets"], table = targets(results)
    print(f"\n== targets ==\n{table}")
    results["settings"] = {k: v for k, v in vars(args).items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
