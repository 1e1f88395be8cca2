"""RULER-style quality of bounded KV caches on real models, against the full cache.

For each context length: the tasks of ``ruler.py`` are built (seeded), the
full cache answers all of them first, and a task it scores below
``--pass-score`` on is reported and left out (it cannot judge eviction).
Every cache setup then answers the rest, greedy, through ``generate_step``.
Perplexity and KL(full || setup) come from the last ``--score-tokens`` of
natural-text documents, fed one token per call after the rest was prefilled
in chunks, so that eviction happens as while generating.

A setup is a family (options) at a share of the context evicted: its bound
(``compact_kv_budget``, ``max_kv_size`` or ``window_size``) is
``(1 - evicted) * context`` tokens. Setups in ``compact_mode=once`` hold the
prompt whole until it is read, so they share one prefill per cache layout and
each only decodes. A setup meant to evict that never did fails the run.

Usage:
    python benchmarks/eval_ruler.py --model smollm2 --quick
    python benchmarks/eval_ruler.py --model gemma3 --lengths 4096,8192 \\
        --evicted 25,50,75,90 --trials 3 --json out.json --plot out.png
"""

# Before mlx.core, so that matrix products use the optimized BLAS on Linux.
import mlx_lm  # noqa: F401 isort: skip

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_lm.generate import cache_hook, generate_step
from mlx_lm.models.cache import (
    CompressedKVCache,
    KVCacheConfig,
    default_compact_margin,
    make_prompt_cache,
)
from mlx_lm.utils import load

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models  # noqa: E402
import ruler  # noqa: E402

# name -> options; the bound is added per share evicted.
STREAM = {"compact_mode": "stream"}
ONCE = {"compact_mode": "once"}
FAMILIES = {
    "keydiff": {"compact_policy": "keydiff", **STREAM},
    "keydiff sink4": {"compact_policy": "keydiff", "compact_sink_tokens": 4, **STREAM},
    "keydiff layer": {"compact_policy": "keydiff", "compact_scope": "layer", **STREAM},
    "keydiff model": {"compact_policy": "keydiff", "compact_scope": "model", **STREAM},
    "l2-low": {"compact_policy": "l2-low", **STREAM},
    "l2-high": {"compact_policy": "l2-high", **STREAM},
    "snapkv": {"compact_policy": "snapkv", **STREAM},
    "keydiff once": {"compact_policy": "keydiff", **ONCE},
    "l2-low once": {"compact_policy": "l2-low", **ONCE},
    "snapkv once": {"compact_policy": "snapkv", **ONCE},
    "snapkv once layer": {"compact_policy": "snapkv", "compact_scope": "layer", **ONCE},
    "snapkv once model": {"compact_policy": "snapkv", "compact_scope": "model", **ONCE},
    "snapkv once sink4": {"compact_policy": "snapkv", "compact_sink_tokens": 4, **ONCE},
    "max_kv_size": {"max_kv_size": None},
    "window fifo": {"window_size": None},
    "window fixed": {
        "window_size": None,
        "window_strategy": "fixed",
        "window_prefix": 4,
    },
    "window attention": {
        "window_size": None,
        "window_strategy": "attention",
        "window_prefix": 4,
    },
}
QUICK_FAMILIES = [
    "snapkv once",
    "keydiff once",
    "keydiff",
    "keydiff sink4",
    "max_kv_size",
]


class NoEvictionError(ValueError):
    """A setup meant to evict kept every token it was fed."""


def setup_options(family, context, evicted):
    """KVCacheConfig options of ``family`` with ``evicted`` percent of ``context`` gone."""
    options = dict(FAMILIES[family])
    bound = max(1, round(context * (100 - evicted) / 100))
    for key in ("max_kv_size", "window_size"):
        if key in options:
            options[key] = bound
            return options
    options["compact_kv_budget"] = bound
    return options


def fork(cache):
    """Independent copies of prefilled layers (buffers written in place are
    rebound to new handles, so the original stays as it was)."""
    twins = []
    for layer in cache:
        twin = copy.copy(layer)
        for name in ("keys", "values"):
            stored = getattr(layer, name, None)
            if isinstance(stored, mx.array):
                setattr(twin, name, stored[...])
            elif isinstance(stored, tuple):
                setattr(twin, name, tuple(p[...] for p in stored))
        twins.append(twin)
    return twins


def layout(model, config):
    """What a prefill depends on: each layer's class and window."""
    return tuple(
        (type(c).__name__, getattr(c, "max_size", None))
        for c in make_prompt_cache(model, config=config)
    )


def prefill(model, cache, config, tokens, step):
    """Feed all but the last token of ``tokens`` as ``generate_step`` does."""
    hook = cache_hook(config, cache)
    first = len(tokens) - 1
    for start in range(0, first, step):
        model(tokens[None, start : min(start + step, first)], cache=cache)
        hook(cache, prompt=True)
        mx.eval([c.state for c in cache])


def reconfigure(cache, config):
    """Point once-mode layers prefilled under one budget at ``config``'s."""
    for layer in cache:
        if isinstance(layer, CompressedKVCache):
            layer.budget = config.compact_kv_budget
            layer.margin = config.compact_margin or default_compact_margin(layer.budget)
            layer.policy = config.policy
            layer.scope = config.compact_scope
            layer.sink_tokens = config.compact_sink_tokens
            layer.keep_recent = config.compact_keep_recent
    return cache


def answer(model, tokenizer, cache, config, tokens, task):
    """Greedy reply to ``task`` from ``cache`` (fed all but ``tokens``' last
    token unless it is empty); stops at EOS, at ``max_tokens`` or once every
    expected string appeared (the score cannot change after that)."""
    out = []
    steps = generate_step(
        tokens, model, max_tokens=task.max_tokens, prompt_cache=cache, kv_config=config
    )
    for token, _ in steps:
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        if task.score(tokenizer.decode(out)) == 1.0:
            break
    return tokenizer.decode(out)


def forced_tail(model, cache, config, doc, n_scored, prefilled=False):
    """Log-probabilities predicting the last ``n_scored`` tokens of ``doc``,
    each fed one per call after the rest was prefilled (skipped when
    ``prefilled``)."""
    first = len(doc) - n_scored - 1
    if not prefilled:
        prefill(model, cache, config, doc[: first + 1], 256)
    hook = cache_hook(config, cache)
    rows = []
    for i in range(first, len(doc) - 1):
        logits = model(doc[None, i : i + 1], cache=cache)[0, -1].astype(mx.float32)
        hook(cache)
        rows.append(logits - mx.logsumexp(logits))
        mx.async_eval(rows[-1])
    return mx.stack(rows)


def held_stats(cache):
    return {
        "evicted": max(c.offset - c.size() for c in cache),
        "kept": sum(c.size() for c in cache) / sum(c.offset for c in cache),
        "kv_bytes": sum(c.nbytes for c in cache),
    }


class Run:
    """Every setup over one model's tasks and documents at one length."""

    def __init__(self, model, tokenizer, tasks, docs, n_scored, prefill_step):
        self.model, self.tokenizer = model, tokenizer
        self.tasks, self.docs, self.n_scored = tasks, docs, n_scored
        self.step = prefill_step
        self.shared = {}  # (layout, item) -> prefilled once-mode cache
        # (layout, item) -> memory that prefill added at its peak
        self.shared_peak = {}
        self.peaks = []  # shared prefills the current setup used

    def _cache(self, config, item, tokens):
        """A cache for ``config`` ready for ``tokens``' last token, and
        whether the rest still has to be fed."""
        cache = make_prompt_cache(self.model, config=config)
        if config.compact_mode != "once" or not config.compact_kv_budget:
            return cache, False
        key = (layout(self.model, config), item)
        if key not in self.shared:
            held = mx.get_active_memory()
            mx.reset_peak_memory()
            prefill(self.model, cache, config, tokens, self.step)
            self.shared[key] = cache
            self.shared_peak[key] = mx.get_peak_memory() - held
        self.peaks.append(self.shared_peak[key])
        return reconfigure(fork(self.shared[key]), config), True

    def setup(self, name, config, full=None):
        record = {"name": name, "options": {}, "tasks": {}, "evicted": 0}
        self.peaks = []
        before = mx.get_active_memory()  # the model and the shared prefills
        mx.reset_peak_memory()
        started = time.perf_counter()
        held = []
        for i, task in enumerate(self.tasks):
            tokens = mx.array(task.prompt)
            cache, ready = self._cache(config, ("task", i), tokens)
            reply = answer(
                self.model,
                self.tokenizer,
                cache,
                config,
                tokens[-1:] if ready else tokens,
                task,
            )
            held.append(held_stats(cache))
            record["tasks"].setdefault(task.name, []).append(task.score(reply))
        nll, kl, logprobs = 0.0, [], []
        for i, doc in enumerate(self.docs):
            head = doc[: len(doc) - self.n_scored]
            cache, ready = self._cache(config, ("doc", i), head)
            lp = forced_tail(self.model, cache, config, doc, self.n_scored, ready)
            targets = doc[len(doc) - self.n_scored :]
            nll -= mx.take_along_axis(lp, targets[:, None], 1).sum().item()
            logprobs.append(lp)
            held.append(held_stats(cache))
            if full is not None:
                ref = full["_logprobs"][i]
                kl.append(mx.mean(mx.sum(mx.exp(ref) * (ref - lp), axis=-1)).item())
        record["_logprobs"] = logprobs
        record["perplexity"] = None
        if self.docs:
            record["perplexity"] = math.exp(nll / (self.n_scored * len(self.docs)))
        record["kl"] = None
        if self.docs:
            record["kl"] = sum(kl) / len(kl) if kl else 0.0
        record["evicted"] = max(h["evicted"] for h in held)
        record["kept"] = sum(h["kept"] for h in held) / len(held)
        record["kv_bytes"] = max(h["kv_bytes"] for h in held)
        # A shared prefill counts for every setup that continued from it.
        # Memory added over what was held before, at the peak; a shared
        # prefill counts for every setup that continued from it.
        added = mx.get_peak_memory() - before
        record["peak_added_bytes"] = max([added] + self.peaks)
        record["seconds"] = round(time.perf_counter() - started, 1)
        return record


def task_means(record, tasks):
    return {t: sum(s) / len(s) for t, s in record["tasks"].items() if t in tasks}


def evaluate_length(model, tokenizer, chat, length, families, shares, args, log):
    """All setups at one context length; returns (records, tasks kept, tasks dropped)."""
    all_tasks = ruler.build_tasks(
        tokenizer, chat, length, args.trials, args.seed, names=args.tasks
    )
    docs = make_docs(tokenizer, length, args.docs, args.seed)
    # First check: the full cache, on every task.
    probe = Run(model, tokenizer, all_tasks, docs, args.score_tokens, args.prefill_step)
    full = probe.setup("full", KVCacheConfig())
    means = task_means(full, ruler.TASKS)
    kept = [t for t, m in means.items() if m >= args.pass_score]
    dropped = {t: m for t, m in means.items() if m < args.pass_score}
    log(f"{length}: full cache task scores {means}; judged on {kept}")
    if not kept:
        raise SystemExit(f"the full cache passes no task at {length} tokens")
    full["tasks"] = {t: full["tasks"][t] for t in kept}
    tasks = [t for t in all_tasks if t.name in kept]
    run = Run(model, tokenizer, tasks, docs, args.score_tokens, args.prefill_step)
    records = [full]
    for family in families:
        for share in shares:
            options = setup_options(family, length, share)
            config = KVCacheConfig.from_options(**options)
            name = f"{family} {share}%"
            record = run.setup(name, config, full)
            record["options"] = options
            if record["evicted"] == 0:
                raise NoEvictionError(
                    f"{name} at {length} tokens is meant to evict but kept every token"
                )
            records.append(record)
            log(
                f"{length} {name}: score {suite_score(record):.3f}, ppl "
                f"{record['perplexity']}, {record['seconds']}s"
            )
    for r in records:
        r["family"] = r["name"].rsplit(" ", 1)[0] if r["options"] else "full"
        r["evicted_share"] = (
            float(r["name"].rsplit(" ", 1)[1][:-1]) if r["options"] else 0
        )
        r["length"] = length
        r["score"] = suite_score(r)
        r["relative_score"] = r["score"] / max(full_score(records), 1e-9)
        r["ppl_ratio"] = r["perplexity"] and r["perplexity"] / full["perplexity"]
        del r["_logprobs"]
    return records, kept, dropped


def suite_score(record):
    means = [sum(s) / len(s) for s in record["tasks"].values()]
    return sum(means) / len(means)


def full_score(records):
    return suite_score(records[0])


def make_docs(tokenizer, length, n_docs, seed):
    """Natural-text documents of ``length`` tokens (BOS first where the
    tokenizer has one), from paragraphs other than a task's haystack start."""
    hay = ruler.Haystacks(tokenizer)
    docs = []
    for i in range(n_docs):
        rng = random.Random(f"{seed}-doc-{length}-{i}")
        text = "\n".join(hay.essay(length + 64, rng))
        ids = tokenizer.encode(text)[:length]
        docs.append(mx.array(ids))
    return docs


def format_table(records):
    tasks = list(records[0]["tasks"])
    head = f"{'setup':<24}{'kept':>6}{'KV MiB':>8}{'ppl/full':>9}{'KL':>8}"
    head += "".join(f"{t[:12]:>13}" for t in tasks) + f"{'score':>7}{'/full':>7}"
    lines = [head, "-" * len(head)]
    for r in records:
        line = f"{r['name']:<24}{r['kept']:>6.2f}{r['kv_bytes'] / 2**20:>8.2f}"
        if r["kl"] is None:
            line += f"{'-':>9}{'-':>8}"
        else:
            line += f"{r['ppl_ratio']:>9.3f}{r['kl']:>8.4f}"
        line += "".join(
            f"{sum(r['tasks'][t]) / len(r['tasks'][t]):>13.2f}" for t in tasks
        )
        line += f"{r['score']:>7.2f}{r['relative_score']:>7.2f}"
        lines.append(line)
    return "\n".join(lines)


def plot(results, path):
    """Relative suite score against the share evicted: one panel per model and
    length, one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, length) for m, by in results.items() for length in by]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 4), squeeze=False
    )
    for ax, (model, length) in zip(axes[0], panels):
        records = results[model][length]["records"]
        curves = {}
        for r in records:
            if r["options"]:
                curves.setdefault(r["family"], []).append(r)
        for family, members in curves.items():
            members.sort(key=lambda r: r["evicted_share"])
            ax.plot(
                [0] + [r["evicted_share"] for r in members],
                [1] + [r["relative_score"] for r in members],
                "o-",
                label=family,
            )
        ax.set_title(f"{model}, {length} tokens")
        ax.set_xlabel("% of the context evicted")
        ax.set_ylabel("suite score / full cache")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def _shares(text):
    return [float(x) if "." in x else int(x) for x in text.split(",") if x]


def _names(text):
    return [x for x in text.split(",") if x]


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a path")
    p.add_argument("--lengths", type=_ints, default=None, help="context lengths")
    p.add_argument(
        "--evicted", type=_shares, default=None, help="percent of the context evicted"
    )
    p.add_argument(
        "--tasks", type=_names, default=None, help=f"among: {', '.join(ruler.TASKS)}"
    )
    p.add_argument(
        "--families",
        default=None,
        help=f"comma-separated setups among: {', '.join(FAMILIES)}",
    )
    p.add_argument("--trials", type=int, default=2, help="prompts per task")
    p.add_argument("--docs", type=int, default=1, help="perplexity documents")
    p.add_argument("--score-tokens", type=int, default=64)
    p.add_argument("--pass-score", type=float, default=0.5)
    p.add_argument("--prefill-step", type=int, default=256)
    p.add_argument("--chat", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one length, few setups")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument(
        "--plot-from", nargs="*", default=None, help="draw --plot from these JSON files"
    )
    return p.parse_args(argv)


DEFAULT_LENGTHS = {"smollm2": [2048, 4096, 8192], "gemma3": [4096, 8192, 16384, 32768]}


def main(argv=None):
    args = parse_args(argv)
    if args.plot_from:
        results = {}
        for f in args.plot_from:
            results.update(json.loads(Path(f).read_text())["results"])
        plot(results, args.plot)
        return 0
    name = args.model
    path = real_models.path(name) if name in real_models.FILES else Path(name)
    if path is None:
        raise SystemExit(f"{name} is not fetched: run python benchmarks/real_models.py")
    lengths = args.lengths or DEFAULT_LENGTHS.get(name, [2048])
    families = args.families.split(",") if args.families else list(FAMILIES)
    shares = args.evicted or [25, 50, 75, 90]
    if args.quick:
        lengths = args.lengths or lengths[:1]
        families = args.families.split(",") if args.families else QUICK_FAMILIES
        shares = args.evicted or [50, 75]
        args.trials = 1
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown setups {unknown}; known: {', '.join(FAMILIES)}")
    model, tokenizer = load(str(path))
    chat = args.chat == "yes" or (
        args.chat == "auto"
        and tokenizer.chat_template is not None
        and "instruct" in path.name.lower()
    )
    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    started = time.perf_counter()
    results = {}
    for length in lengths:
        t0 = time.perf_counter()
        try:
            records, kept, dropped = evaluate_length(
                model, tokenizer, chat, length, families, shares, args, say
            )
        except NoEvictionError as e:
            say(f"FAIL: {e}")
            return 1
        print(f"\n{name}, {length} tokens (tasks the full cache failed: {dropped})")
        print(format_table(records))
        results[str(length)] = {
            "records": records,
            "tasks": kept,
            "dropped": dropped,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    total = round(time.perf_counter() - started, 1)
    print(f"\n{total} s in all")
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
    settings.update(lengths=lengths, families=families, evicted=shares, chat=chat)
    if args.json:
        out = {"settings": settings, "seconds": total, "results": {name: results}}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.plot:
        plot({name: results}, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
