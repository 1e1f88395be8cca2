"""Long-context quality of bounded KV caches, measured against the full cache.

Each cache setup is a name, keyword arguments that go to both
``make_prompt_cache`` and ``generate_step``, and whether it is meant to evict.
On held-out text (the standard-library files that the demo model's training
script keeps out of training) every setup gets:

* perplexity: the end of each document is teacher-forced one token per model
  call after the rest was prefilled in chunks, the way generation feeds a
  prompt, so eviction happens exactly as it would while generating; the ratio
  to the full cache's perplexity is reported;
* agreement: the full cache continues each document greedily (free-running,
  one token per call, up to the context length); every setup is then
  teacher-forced on that continuation and scored by the fraction of positions
  where its greedy token is the full cache's and by the mean KL(full || setup)
  of the next-token distributions;
* retrieval: the training script's passkey task over a grid of prompt lengths
  and needle depths, the answer greedy-decoded by ``generate_step``;
* evictions: the per-layer maximum of ``offset - size()``. A setup meant to
  evict that never evicted is an error (exit status 1).

Usage:
    python benchmarks/eval_long_context.py [--model PATH] [--configs full,max_kv_size=512]
        [--docs N] [--context N] [--retrieval-trials N] [--json PATH] [--plot PATH] [--quick]

A setup in ``--configs`` is ``full`` or ``key=value`` pairs joined by ``+``;
a value ending in ``%`` is that share of the context, e.g. ``max_kv_size=25%``.
"""

# Before mlx.core, so that matrix products use the optimized BLAS on Linux.
import mlx_lm  # noqa: F401 isort: skip

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlx_lm.generate import cache_hook, generate_step
from mlx_lm.models.cache import KVCacheConfig, make_prompt_cache
from mlx_lm.utils import load, resolve_model_argument

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stdlib_corpus as corpus  # noqa: E402

# The demo model trains on sequences up to this length; it also bounds the run time.
MAX_DEFAULT_CONTEXT = 2048


class NoEvictionError(ValueError):
    """A setup meant to evict kept every token it was fed."""


@dataclass
class CacheSetup:
    """A named cache configuration; ``kwargs`` are ``KVCacheConfig`` options."""

    name: str
    kwargs: dict = field(default_factory=dict)
    evicts: bool = False

    @property
    def config(self):
        return KVCacheConfig.from_options(**self.kwargs)


@dataclass
class NeedleCase:
    prompt: list
    answer: list
    length: int
    depth: int  # percent of the prompt before the planted line


def default_setups(context, shares=(25, 50, 75)):
    """The full cache, then rotating caches and the three sliding-window strategies,
    each holding ``shares`` percent of ``context``."""
    budgets = [context * share // 100 for share in shares]
    fixed = {"window_strategy": "fixed", "window_prefix": 4}
    attention = {"window_strategy": "attention", "window_prefix": 4}
    setups = [CacheSetup("full")]
    setups += [
        CacheSetup(f"max_kv_size={b}", {"max_kv_size": b}, True) for b in budgets
    ]
    for b in budgets:
        setups += [
            CacheSetup(f"window fifo {b}", {"window_size": b}, True),
            CacheSetup(f"window fixed {b}", {"window_size": b, **fixed}, True),
            CacheSetup(f"window attention {b}", {"window_size": b, **attention}, True),
        ]
    return setups


def _option_value(text, context):
    if text.endswith("%"):
        return max(1, round(context * float(text[:-1]) / 100))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_setups(spec, context):
    """Parse ``full,max_kv_size=512,compact_kv_budget=50%+compact_keep_recent=64``."""
    setups = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item == "full":
            setups.append(CacheSetup("full"))
            continue
        kwargs = {}
        for pair in item.split("+"):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"cache setup {item!r}: {pair!r} is not option=value")
            kwargs[key] = _option_value(value, context)
        name = "+".join(f"{k}={v}" for k, v in kwargs.items())
        setup = CacheSetup(name, kwargs)
        setup.evicts = setup.config.evicts
        setups.append(setup)
    return setups


# ----------------------------------------------------------------------------
# The cache path shared with generation


def forced_logprobs(model, cache, config, tokens, n_scored, prefill_step, extend=0):
    """Yield float32 log-probabilities predicting each of the last ``n_scored``
    tokens of ``tokens``, then ``extend`` positions past its end.

    Everything before the first fed token goes through the model in chunks of
    ``prefill_step`` (as ``generate_step`` prefills a prompt); the rest is fed
    one token per call, teacher-forced, and past the end each step feeds the
    previous step's most likely token (greedy decoding).
    """
    first = len(tokens) - n_scored - 1
    if first < 0 or n_scored < 1:
        raise ValueError(f"cannot score {n_scored} of {len(tokens)} tokens")
    # As generate_step does: the quantization group is decided for the model.
    config = config.for_model(model, cache)
    after_step = cache_hook(config, cache)
    for start in range(0, first, prefill_step):
        model(tokens[None, start : min(start + prefill_step, first)], cache=cache)
        after_step(cache, prompt=True)
        mx.eval([c.state for c in cache])
    fed = tokens[first : first + 1]
    for i in range(first + 1, len(tokens) + extend):
        logits = model(fed[None], cache=cache)[0, -1].astype(mx.float32)
        after_step(cache)
        logprobs = logits - mx.logsumexp(logits)
        mx.async_eval(logprobs)
        yield logprobs
        fed = (
            tokens[i : i + 1] if i < len(tokens) else mx.argmax(logprobs, keepdims=True)
        )


def evicted_tokens(cache):
    """Tokens each layer has dropped so far (fed minus held)."""
    return [c.offset - c.size() for c in cache]


# ----------------------------------------------------------------------------
# Data


def heldout_stream(tokenizer):
    """Held-out stdlib files as one token list, each file wrapped in BOS ... EOS."""
    _, _, held = corpus.split_corpus()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = []
    for _, text in held:
        stream += bos + tokenizer.encode(text, add_special_tokens=False, verbose=False)
        stream += eos
    return stream


def make_documents(stream, n_docs, length):
    """``n_docs`` windows of ``length`` tokens spread evenly over ``stream``."""
    if len(stream) < length:
        raise ValueError(
            f"context {length} is longer than the held-out text ({len(stream)} tokens)"
        )
    room = len(stream) - length
    starts = [i * room // max(n_docs - 1, 1) for i in range(n_docs)]
    return [mx.array(stream[s : s + length]) for s in starts]


def make_needle_cases(tokenizer, stream, lengths, depths, trials, seed):
    """Passkey prompts in the training format, the plant placed on a line start
    as close as possible to ``depth`` percent of the prompt."""
    rng = random.Random(seed)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)
    question = encode(corpus.QUESTION)
    starts_line = {}
    cases = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = "".join(
                    rng.choice("0123456789") for _ in range(corpus.KEY_DIGITS)
                )
                plant = encode(corpus.PLANT.format(key=key))
                n_body = length - len(plant) - len(question)
                if n_body < 2 or n_body > len(stream):
                    raise ValueError(f"retrieval length {length} does not fit")
                start = rng.randrange(0, len(stream) - n_body + 1)
                body = stream[start : start + n_body]
                for t in body:
                    if t not in starts_line:
                        starts_line[t] = tokenizer.decode([t]).startswith("\n")
                spots = [i for i in range(1, n_body) if starts_line[body[i]]] or [1]
                target = depth * length // 100
                at = min(spots, key=lambda i: abs(i - target))
                prompt = body[:at] + plant + body[at:] + question
                cases.append(NeedleCase(prompt, encode(key), length, depth))
    return cases


# ----------------------------------------------------------------------------
# Evaluation


def evaluate_setup(
    model, setup, docs, cases, n_scored, n_generate, prefill_step, continuations=None
):
    """Run one setup over every task.

    Each document is scored on its last ``n_scored`` tokens and then continued
    by ``n_generate`` more: greedily when ``continuations`` is None, else
    teacher-forced on them. Returns the record, the log-probabilities of the
    continuation positions and the continuations.
    """
    record = {"name": setup.name, "kwargs": setup.kwargs, "evicts": setup.evicts}
    config = setup.config
    seen, evicted = 0, 0

    def tally(cache):
        nonlocal seen, evicted
        seen = max(seen, max(c.offset for c in cache))
        evicted = max(evicted, max(evicted_tokens(cache)))

    nll, kept, kv_bytes, tails, made = 0.0, [], [], [], []
    for i, doc in enumerate(docs):
        cache = make_prompt_cache(model, config=config)
        extend = n_generate if continuations is None else 0
        if continuations is not None:
            doc = mx.concatenate([doc, continuations[i]])
        n = n_scored + n_generate - extend
        steps = forced_logprobs(model, cache, config, doc, n, prefill_step, extend)
        logprobs = mx.stack(list(steps))
        targets = doc[len(doc) - n : len(doc) - n + n_scored]
        nll -= mx.take_along_axis(logprobs[:n_scored], targets[:, None], 1).sum().item()
        tails.append(logprobs[n_scored:])
        made.append(mx.argmax(tails[-1], axis=-1).astype(doc.dtype))
        tally(cache)
        kept.append(sum(c.size() for c in cache) / sum(c.offset for c in cache))
        kv_bytes.append(sum(c.nbytes for c in cache))
    record["perplexity"] = math.exp(nll / (n_scored * len(docs)))
    record["kept_fraction"] = sum(kept) / len(kept)
    record["kv_bytes"] = max(kv_bytes)

    grid = {}
    for case in cases:
        cache = make_prompt_cache(model, config=config)
        steps = generate_step(
            mx.array(case.prompt),
            model,
            max_tokens=len(case.answer),
            prompt_cache=cache,
            prefill_step_size=prefill_step,
            kv_config=config,
        )
        hit = [tok for tok, _ in steps] == case.answer
        tally(cache)
        row = grid.setdefault(str(case.length), {})
        row.setdefault(str(case.depth), []).append(hit)
    record["retrieval"] = {
        length: {depth: sum(h) / len(h) for depth, h in row.items()}
        for length, row in grid.items()
    }
    hits = [h for row in grid.values() for hs in row.values() for h in hs]
    record["retrieval_accuracy"] = sum(hits) / len(hits) if hits else None
    record["tokens_fed"] = seen
    record["evicted"] = evicted
    if setup.evicts and evicted == 0:
        raise NoEvictionError(
            f"cache setup {setup.name!r} is meant to evict but kept all {seen} tokens "
            "it was fed; give it a budget below the context length"
        )
    return record, tails, continuations or made


def evaluate(
    model,
    setups,
    docs,
    cases=(),
    n_scored=None,
    n_generate=32,
    prefill_step=256,
    log=None,
):
    """Evaluate ``setups``, the full cache first (added when missing); returns records.

    The last ``n_scored`` tokens of each document (default: all but the first)
    are scored; then the full cache continues each document greedily for
    ``n_generate`` tokens and every setup is teacher-forced on that
    continuation for agreement and KL divergence.
    """
    n_scored = n_scored or len(docs[0]) - 1
    if n_generate < 1:
        raise ValueError(f"n_generate must be at least 1, got {n_generate}")
    if not any(not s.kwargs for s in setups):
        setups = [CacheSetup("full")] + list(setups)
    setups = sorted(setups, key=lambda s: bool(s.kwargs))
    records, full, full_tails, continuations = [], None, None, None
    for setup in setups:
        started = time.perf_counter()
        record, tails, continuations = evaluate_setup(
            model, setup, docs, cases, n_scored, n_generate, prefill_step, continuations
        )
        if full is None:
            full, full_tails = record, tails
        same = [
            mx.mean(mx.argmax(lp, axis=-1) == t) for lp, t in zip(tails, continuations)
        ]
        kl = [
            mx.mean(mx.maximum(mx.sum(mx.exp(ref) * (ref - lp), axis=-1), 0.0))
            for lp, ref in zip(tails, full_tails)
        ]
        record["ppl_ratio"] = record["perplexity"] / full["perplexity"]
        record["agreement"] = mx.mean(mx.stack(same)).item()
        record["kl"] = mx.mean(mx.stack(kl)).item()
        record["seconds"] = round(time.perf_counter() - started, 1)
        records.append(record)
        if log:
            log(f"{setup.name}: ppl {record['perplexity']:.4f}, {record['seconds']}s")
    return records


# ----------------------------------------------------------------------------
# Reporting


def format_table(records):
    lengths = sorted({int(k) for r in records for k in r["retrieval"]})
    head = f"{'setup':<24}{'kept':>6}{'evicted':>9}{'KV MiB':>8}{'ppl':>9}{'/full':>7}"
    head += f"{'agree':>7}{'KL':>8}" + "".join(f"{f'ret@{n}':>9}" for n in lengths)
    head += f"{'ret':>6}"
    lines = [head, "-" * len(head)]
    for r in records:
        line = f"{r['name']:<24}{r['kept_fraction']:>6.2f}{r['evicted']:>9d}"
        line += f"{r['kv_bytes'] / 2**20:>8.2f}{r['perplexity']:>9.3f}{r['ppl_ratio']:>7.3f}"
        line += f"{r['agreement']:>7.3f}{r['kl']:>8.4f}"
        for n in lengths:
            row = r["retrieval"][str(n)]
            line += f"{sum(row.values()) / len(row):>9.2f}"
        ret = r["retrieval_accuracy"]
        line += f"{ret:>6.2f}" if ret is not None else f"{'-':>6}"
        lines.append(line)
    return "\n".join(lines)


def family(record):
    """Setups differing only in numbers (budgets) belong to one curve."""
    kinds = [
        k if isinstance(v, (int, float)) else f"{k}={v}"
        for k, v in record["kwargs"].items()
    ]
    return "+".join(kinds) or "full"


def plot(records, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("ppl_ratio", "perplexity / full cache"),
        ("agreement", "greedy agreement with full cache"),
        ("kl", "mean KL(full || setup)"),
        ("retrieval_accuracy", "passkey retrieval accuracy"),
    ]
    curves = {}
    for r in sorted(records, key=lambda r: r["kept_fraction"]):
        curves.setdefault(family(r), []).append(r)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (key, label) in zip(axes.flat, panels):
        for name, members in curves.items():
            shown = [r for r in members if r[key] is not None]
            xs = [r["kept_fraction"] for r in shown]
            style = "k*" if name == "full" else "o-"
            ax.plot(xs, [r[key] for r in shown], style, label=name, markersize=8)
        ax.set_xlabel("fraction of the KV cache kept")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Command line


def _int_list(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default=None, help="model folder or repo (default: the demo model)"
    )
    p.add_argument(
        "--configs",
        default=None,
        help="cache setups (default: full, then max_kv_size and windows fifo, "
        "fixed and attention at 25/50/75%%)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help=f"document length (default: max_position_embeddings, at most {MAX_DEFAULT_CONTEXT})",
    )
    p.add_argument("--docs", type=int, default=2, help="held-out documents")
    p.add_argument(
        "--score-tokens",
        type=int,
        default=None,
        help="tokens scored per document (default: a quarter of the context)",
    )
    p.add_argument(
        "--generate-tokens", type=int, default=32, help="greedy tokens for agreement"
    )
    p.add_argument(
        "--retrieval-trials", type=int, default=1, help="trials per length and depth"
    )
    p.add_argument(
        "--lengths",
        type=_int_list,
        default=None,
        help="retrieval prompt lengths (default: 25,50,100%% of the context)",
    )
    p.add_argument(
        "--depths",
        type=_int_list,
        default=None,
        help="needle depths in percent (default: 10,50,90)",
    )
    p.add_argument(
        "--prefill-step",
        type=int,
        default=256,
        help="prefill chunk, as generate_step's prefill_step_size",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="compute dtype",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument(
        "--plot", default=None, help="write a PNG of quality vs. cache kept here"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one document, fewer tokens and prompts, default setups at 50%% only",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.model = resolve_model_argument(args.model)
    model, tokenizer, config = load(args.model, return_config=True)
    model.set_dtype(getattr(mx, args.dtype))
    context = args.context or min(
        config["max_position_embeddings"], MAX_DEFAULT_CONTEXT
    )
    shares = (25, 50, 75)
    if args.quick:
        shares, args.docs = (50,), 1
        args.score_tokens = args.score_tokens or 128
        args.generate_tokens = min(args.generate_tokens, 16)
        args.lengths = args.lengths or [context // 4, context]
        args.depths = args.depths or [10, 90]
    lengths = args.lengths or [context // 4, context // 2, context]
    depths = args.depths or [10, 50, 90]
    n_scored = args.score_tokens or context // 4
    setups = (
        parse_setups(args.configs, context)
        if args.configs
        else default_setups(context, shares)
    )
    stream = heldout_stream(tokenizer)
    docs = make_documents(stream, args.docs, context - args.generate_tokens)
    cases = make_needle_cases(
        tokenizer, stream, lengths, depths, args.retrieval_trials, args.seed
    )
    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    say(
        f"{args.model}: {len(setups)} setups, {args.docs} documents of {context} "
        f"tokens, {len(cases)} retrieval prompts"
    )
    try:
        records = evaluate(
            model,
            setups,
            docs,
            cases,
            n_scored,
            args.generate_tokens,
            args.prefill_step,
            log=say,
        )
    except NoEvictionError as e:
        say(f"FAIL: {e}")
        return 1
    print(format_table(records))
    doc_len = context - args.generate_tokens
    print(
        f"\nPerplexity: last {n_scored} tokens of {args.docs} held-out documents of "
        f"{doc_len} tokens, fed one at a time after prefill chunks of "
        f"{args.prefill_step}. Agreement and KL: teacher-forced on the full cache's "
        f"greedy {args.generate_tokens}-token continuation of each document. "
        f"Retrieval: {args.retrieval_trials} trial(s) per length x depth {depths}%. "
        "Evicted: per-layer maximum of offset - size(). Kept: size / offset."
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
    settings.update(
        context=context, score_tokens=n_scored, lengths=lengths, depths=depths
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": settings, "results": records}, indent=2) + "\n"
        )
    if args.plot:
        plot(records, args.plot, f"{Path(args.model).name}, context {context}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
