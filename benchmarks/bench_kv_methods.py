"""KV quantization methods on a real model: memory held, quality and speed.

For fp16, affine ``kv_bits`` 8/4/3/2 and every method of ``mlx_lm.models.kv_quant``
at each of ``--bits`` (keys and values alike: ``bits=b, value_bits=b``):

- bits per value as held: the cache's ``nbytes`` over the values it holds
  (layers holding the method's codes), next to the codecs' accounting, and
  the KV bytes of the whole cache after ``--length`` and ``--long`` tokens;
- perplexity and KL(fp16 || setup) over a ``--length``-token document of
  licence texts (``/usr/share/common-licenses``), fed in 256-token chunks, so
  every prediction attends to quantized keys and values (KL at 128 positions);
- needle recall: ``ruler.py``'s needle tasks at ``--needle-length`` tokens;
- prefill tokens/s over the ``--long`` document and decode tokens/s after it.

Calibrated methods are calibrated first (``mlx_lm.calibrate_kv``) on Python's
pydoc topics, not on the evaluation text. Then the best method at about 3
bits is combined with compaction at 50% evicted (snapkv, once): perplexity
over the last 256 tokens of the document fed one by one after the rest was
compacted, and needle recall.

Usage:
    python benchmarks/bench_kv_methods.py --model smollm2 --json out.json
    python benchmarks/bench_kv_methods.py --model gemma3 --bits 2,3,4 --long 8192
"""

# Before mlx.core, so that matrix products use the optimized BLAS on Linux.
import mlx_lm  # noqa: F401 isort: skip

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_lm.calibrate_kv import calibrate
from mlx_lm.models import kv_quant
from mlx_lm.models.cache import CodecKVCache, KVCacheConfig, make_prompt_cache
from mlx_lm.models.cache_hook import cache_hook
from mlx_lm.models.kv_quant import KeyNormObserver
from mlx_lm.utils import load

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models  # noqa: E402
import ruler  # noqa: E402
from eval_ruler import answer, forced_tail  # noqa: E402

LICENCES = Path("/usr/share/common-licenses")
CHUNK = 256
KL_POSITIONS = 128
# The needle tasks that both real models pass with the full cache at 2K
# (README, "Measured quality, and the defaults it chose").
NEEDLE_TASKS = ["niah_noise_number", "niah_essay_number"]


def licence_tokens(tokenizer, n):
    files = sorted(p for p in LICENCES.iterdir() if p.is_file())
    text = "\n\n".join(p.read_text(errors="replace") for p in files)
    ids = tokenizer.encode(text)
    if len(ids) < n:
        raise SystemExit(f"the licence texts give {len(ids)} tokens, {n} asked")
    return mx.array(ids[:n])


def setups(bits_list, calibrations):
    out = [("fp16", {})]
    out += [(f"affine {b}", {"kv_bits": b}) for b in (8, 4, 3, 2)]
    for method in kv_quant.ZERO_CALIBRATION_METHODS + kv_quant.CALIBRATED_METHODS:
        for b in bits_list:
            if b not in kv_quant.METHOD_BITS[method]:
                continue
            options = {"method": method, "bits": b, "value_bits": b}
            if method == "turboquant_rvq":
                options["num_residuals"] = 1
            if method in kv_quant.CALIBRATED_METHODS:
                options["calibration"] = calibrations[(method, b)]
            out.append((f"{method} {b}", options))
    # Residual passes, outlier channels apart, asymmetric bits.
    tq = {"method": "turboquant_rvq"}
    out += [
        (
            "turboquant_rvq 1x2 / V4",
            {**tq, "bits": 1, "num_residuals": 2, "value_bits": 4},
        ),
        (
            "turboquant_rvq 3 + 2 outliers",
            {
                **tq,
                "bits": 3,
                "num_residuals": 1,
                "value_bits": 3,
                "outlier_observer": KeyNormObserver(2),
            },
        ),
        (
            "turboquant_rvq 4 + 2 outliers",
            {
                **tq,
                "bits": 4,
                "num_residuals": 1,
                "value_bits": 4,
                "outlier_observer": KeyNormObserver(2),
            },
        ),
        ("affine K8/V4", {"method": "affine", "bits": 8, "value_bits": 4}),
    ]
    return out


def coded_bits(cache):
    """(held, accounted) bits per value over the layers holding codes."""
    layers = [c for c in cache if isinstance(c, CodecKVCache)]
    if not layers:
        return None, None
    values = sum(
        c.keys[0].shape[1] * c.key_codec.head_dim * c.offset * 2 for c in layers
    )
    held = sum(c.nbytes for c in layers) * 8 / values
    accounted = sum(c.bits_per_value for c in layers) / len(layers)
    return held, accounted


def chunked_pass(model, config, doc, reference=None, positions=None):
    """NLL over ``doc`` fed in chunks, log-probs at ``positions``, the cache."""
    config = config.for_model(model)
    cache = make_prompt_cache(model, config=config)
    hook = cache_hook(config, cache)
    nll, picked = 0.0, []
    for start in range(0, len(doc) - 1, CHUNK):
        stop = min(start + CHUNK, len(doc) - 1)
        logits = model(doc[None, start:stop], cache=cache)[0].astype(mx.float32)
        hook(cache, prompt=True)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = doc[start + 1 : stop + 1]
        nll -= mx.take_along_axis(lp, targets[:, None], 1).sum().item()
        inside = [p - start for p in positions if start <= p < stop]
        if inside:
            picked.append(lp[mx.array(inside)])
    picked = mx.concatenate(picked)
    kl = None
    if reference is not None:
        kl = mx.mean(mx.sum(mx.exp(reference) * (reference - picked), -1)).item()
    return math.exp(nll / (len(doc) - 1)), kl, picked, cache


def speed(model, config, doc, n_decode=32):
    """Prefill tokens/s over ``doc``, KV bytes after it, decode tokens/s."""
    config = config.for_model(model)
    cache = make_prompt_cache(model, config=config)
    hook = cache_hook(config, cache)
    started = time.perf_counter()
    for start in range(0, len(doc), CHUNK):
        model(doc[None, start : start + CHUNK], cache=cache)
        hook(cache, prompt=True)
        mx.eval([c.state for c in cache])
    prefill = len(doc) / (time.perf_counter() - started)
    kv_bytes = sum(c.nbytes for c in cache)
    token = doc[-1:]
    started = time.perf_counter()
    for _ in range(n_decode):
        logits = model(token[None], cache=cache)[0, -1]
        hook(cache)
        token = mx.argmax(logits, keepdims=True)
        mx.eval(token)
    return prefill, kv_bytes, n_decode / (time.perf_counter() - started)


def needles(model, tokenizer, config, tasks):
    scores = []
    for task in tasks:
        reply = answer(model, tokenizer, None, config, mx.array(task.prompt), task)
        scores.append(task.score(reply))
    return sum(scores) / len(scores)


def format_table(rows):
    head = (
        "| setup | bits/value held | accounted | KV MiB @len | KV MiB @long | "
        "ppl | ppl vs fp16 | KL | needles | prefill tok/s | decode tok/s |"
    )
    lines = [head, "|" + " --- |" * 11]
    base = rows[0]["ppl"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        mib = lambda b: None if b is None else b / 2**20
        lines.append(
            f"| {r['name']} | {fmt(r['bits_held'], '.3f')} | {fmt(r['bits_accounted'], '.3f')} "
            f"| {fmt(mib(r['kv_bytes']), '.2f')} | {fmt(mib(r.get('kv_bytes_long')), '.2f')} "
            f"| {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.2f}% | {fmt(r['kl'], '.4f')} "
            f"| {fmt(r.get('needles'), '.2f')} | {fmt(r.get('prefill_tps'), '.0f')} "
            f"| {fmt(r.get('decode_tps'), '.1f')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--bits", default="1,2,3,4")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--long", type=int, default=8192)
    p.add_argument("--needle-length", type=int, default=2048)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument(
        "--speed",
        default="fp16,affine 8,affine 4,turboquant_rvq 3,turboquant_rvq 4,qjl 3,polarquant 3",
        help="setups timed at --long tokens (comma-separated names; 'all')",
    )
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--json")
    args = p.parse_args(argv)
    path = (
        real_models.path(args.model)
        if args.model in real_models.FILES
        else Path(args.model)
    )
    if path is None:
        raise SystemExit(
            f"{args.model} is not fetched: run python benchmarks/real_models.py"
        )
    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    model, tokenizer = load(str(path))
    bits_list = [int(b) for b in args.bits.split(",")]
    doc = licence_tokens(tokenizer, args.length)
    long_doc = licence_tokens(tokenizer, args.long)
    chat = tokenizer.chat_template is not None and "instruct" in path.name.lower()
    tasks = ruler.build_tasks(
        tokenizer, chat, args.needle_length, args.trials, 0, NEEDLE_TASKS
    )
    positions = sorted(
        range(
            args.length // 2, args.length - 1, max(1, args.length // 2 // KL_POSITIONS)
        )
    )[:KL_POSITIONS]

    folder = tempfile.mkdtemp(prefix="kv-calibration-")
    calibrations = {}
    for method in kv_quant.CALIBRATED_METHODS:
        for b in bits_list:
            if b in kv_quant.METHOD_BITS[method]:
                target = f"{folder}/{method}-{b}"
                calibrate(
                    model,
                    tokenizer,
                    method,
                    target,
                    b,
                    num_tokens=args.calibration_tokens,
                )
                calibrations[(method, b)] = target
    say(f"calibrated in {folder}")

    timed = None if args.speed == "all" else set(args.speed.split(","))
    rows, reference = [], None
    started = time.perf_counter()
    for name, options in setups(bits_list, calibrations):
        config = KVCacheConfig(**options)
        ppl, kl, picked, cache = chunked_pass(model, config, doc, reference, positions)
        if reference is None:
            reference = picked
        held, accounted = coded_bits(cache)
        row = {
            "name": name,
            "options": {
                k: repr(v) if k == "outlier_observer" else v
                for k, v in options.items()
                if k != "calibration"
            },
            "ppl": ppl,
            "kl": kl,
            "bits_held": held,
            "bits_accounted": accounted,
            "kv_bytes": sum(c.nbytes for c in cache),
        }
        del cache
        row["needles"] = needles(model, tokenizer, config, tasks)
        if timed is None or name in timed:
            prefill, kv_long, decode = speed(model, config, long_doc)
            row.update(prefill_tps=prefill, kv_bytes_long=kv_long, decode_tps=decode)
        rows.append(row)
        say(
            f"{name}: ppl {ppl:.3f} kl {kl} needles {row['needles']:.2f} "
            f"({time.perf_counter() - started:.0f} s)"
        )
        mx.clear_cache()

    print(
        f"\n{args.model}: {args.length}-token document, {len(tasks)} needle prompts "
        f"of {args.needle_length} tokens, speed at {args.long} tokens"
    )
    print(format_table(rows))

    # The best method near 3 bits (lowest perplexity), with compaction.
    near3 = [
        r
        for r, (_, options) in zip(rows, setups(bits_list, calibrations))
        if options.get("method")
        and options.get("bits") == 3
        and "outlier_observer" not in options
    ]
    combined = []
    if near3:
        best = min(near3, key=lambda r: r["ppl"])
        budget = args.length // 2
        n_scored = 256
        for label, options in (
            ("fp16", {}),
            (best["name"], dict(best["options"])),
            ("fp16 + compact 50%", {"compact_kv_budget": budget}),
            (
                f"{best['name']} + compact 50%",
                {**best["options"], "compact_kv_budget": budget},
            ),
        ):
            if options.get("method") in kv_quant.CALIBRATED_METHODS:
                options["calibration"] = calibrations[
                    (options["method"], options["bits"])
                ]
            config = KVCacheConfig(**options).for_model(model)
            cache = make_prompt_cache(model, config=config)
            lp = forced_tail(model, cache, config, doc, n_scored)
            targets = doc[len(doc) - n_scored :]
            nll = -mx.take_along_axis(lp, targets[:, None], 1).sum().item()
            combined.append(
                {
                    "name": label,
                    "ppl_tail": math.exp(nll / n_scored),
                    "kv_bytes": sum(c.nbytes for c in cache),
                    "evicted": max(c.offset - c.size() for c in cache),
                    "needles": needles(
                        model,
                        tokenizer,
                        KVCacheConfig(
                            **{
                                **options,
                                **(
                                    {"compact_kv_budget": args.needle_length // 2}
                                    if "compact_kv_budget" in options
                                    else {}
                                ),
                            }
                        ),
                        tasks,
                    ),
                }
            )
        print(
            f"\nWith compaction (budget {budget} of {args.length}; perplexity of "
            f"the last {n_scored} tokens fed one by one; needles at half of "
            f"{args.needle_length})"
        )
        print(
            "| setup | KV MiB | tokens evicted | tail ppl | needles |\n| --- | --- | --- | --- | --- |"
        )
        for r in combined:
            print(
                f"| {r['name']} | {r['kv_bytes'] / 2**20:.2f} | {r['evicted']} | "
                f"{r['ppl_tail']:.3f} | {r['needles']:.2f} |"
            )
    total = time.perf_counter() - started
    print(f"\n{total:.0f} s in all")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": args.model,
                    "length": args.length,
                    "long": args.long,
                    "needle_length": args.needle_length,
                    "needle_prompts": len(tasks),
                    "rows": rows,
                    "combined": combined,
                    "seconds": round(total),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
