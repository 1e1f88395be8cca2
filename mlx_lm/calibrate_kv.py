"""Calibrate a KV quantization method on a model and some of the user's text.

``python -m mlx_lm.calibrate_kv --model M --method vecinfer --bits 2 --text
notes.txt --output calib/`` runs the model over the text, records every
layer's keys (and queries, for ``ratequant``), fits the method's artifacts and
writes them as an :class:`~mlx_lm.models.kv_quant.NpyArtifactStore`. Using
them is one line: ``KVCacheConfig(method="vecinfer", bits=2,
calibration="calib/")``, or ``--kv-method vecinfer --kv-bits 2
--kv-calibration calib/`` on any command line.
"""

import argparse
from typing import Optional

import mlx.core as mx
import numpy as np

from .models import cache as kv
from .models import kv_quant
from .tokenizer_utils import TokenizerWrapper

DEFAULT_TOKENS = 2048
# Queries kept per layer for ratequant's logit errors.
QUERY_SAMPLE = 256


class _Recorder(kv.KVCache):
    """A plain cache that also keeps the queries attention hands it."""

    query_window = 1 << 30

    def __init__(self):
        super().__init__()
        self.queries = []

    def observe_queries(self, queries, scale):
        self.queries.append(queries * scale)


def default_text() -> str:
    """English prose that every Python install has (its pydoc topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def record(model, tokens: mx.array, chunk: int = 256):
    """Keys ``[H, N, D]`` and a sample of queries ``[n_heads, M, D]`` of every
    layer (float32 NumPy) after running ``tokens`` through ``model``."""
    cache = [_Recorder() for _ in model.layers]
    for start in range(0, tokens.shape[0], chunk):
        model(tokens[None, start : start + chunk], cache=cache)
        mx.eval([c.state for c in cache])
    keys, queries = [], []
    rng = np.random.default_rng(0)
    for layer in cache:
        keys.append(np.array(layer.state[0][0].astype(mx.float32)))
        q = np.array(mx.concatenate(layer.queries, axis=2)[0].astype(mx.float32))
        pick = np.sort(rng.choice(q.shape[1], min(QUERY_SAMPLE, q.shape[1]), False))
        queries.append(q[:, pick])
    return keys, queries


def calibrate(
    model,
    tokenizer,
    method: str,
    output: str,
    bits: int = 2,
    text: Optional[str] = None,
    num_tokens: int = DEFAULT_TOKENS,
    **settings,
) -> kv_quant.NpyArtifactStore:
    """Fit ``method``'s artifacts on ``num_tokens`` tokens of ``text`` (default:
    :func:`default_text`) and write them to the folder ``output``."""
    if method not in kv_quant.CALIBRATED_METHODS:
        raise ValueError(
            f"method must be one of {list(kv_quant.CALIBRATED_METHODS)} (the others "
            f"need no calibration), got {method!r}"
        )
    config = kv.KVCacheConfig(method=method, bits=bits, **settings)
    if num_tokens < 16:
        raise ValueError(f"num_tokens must be at least 16, got {num_tokens}")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    text = text if text is not None else default_text()
    # Far more characters than tokens needed, without encoding a whole book.
    ids = tokenizer.encode(text[: 16 * num_tokens])[:num_tokens]
    if len(ids) < 16:
        raise ValueError(f"the text gives {len(ids)} tokens; calibration needs 16")
    keys, queries = record(model, mx.array(ids))
    manifest = {"method": method, "bits": bits, "tokens": len(ids)}
    if method == "ratequant":
        errors = [
            kv_quant.logit_errors(k, q, config.seed) for k, q in zip(keys, queries)
        ]
        manifest["bit_allocation"] = kv_quant.allocate_bits(errors, bits)
        layers = [{} for _ in keys]
    else:
        codec = {
            "vecinfer": kv_quant.VecInferCodec,
            "spectral": kv_quant.SpectralCodec,
            "commvq": kv_quant.CommVQCodec,
        }[method]
        layers = [
            codec.calibrate(
                k,
                bits=bits,
                num_subspaces=config.num_subspaces,
                use_hadamard=config.use_hadamard,
                seed=config.seed + i,
            )
            for i, k in enumerate(keys)
        ]
    store = kv_quant.NpyArtifactStore(output)
    store.save(manifest, layers)
    return store


def main(argv=None):
    from .utils import DEMO_MODEL_PATH, load

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled demo model")
    p.add_argument(
        "--method", required=True, help=", ".join(kv_quant.CALIBRATED_METHODS)
    )
    p.add_argument("--bits", type=int, default=2, help="Key bits per value")
    p.add_argument("--text", help="A UTF-8 text file (default: Python's pydoc topics)")
    p.add_argument("--num-tokens", type=int, default=DEFAULT_TOKENS)
    p.add_argument("--output", required=True, help="Folder to write")
    args = p.parse_args(argv)
    if args.method not in kv_quant.CALIBRATED_METHODS:
        p.error(f"--method must be one of {', '.join(kv_quant.CALIBRATED_METHODS)}")
    try:
        kv.KVCacheConfig(method=args.method, bits=args.bits)
    except ValueError as e:
        p.error(str(e).replace("bits", "--bits"))
    if args.num_tokens < 16:
        p.error(f"--num-tokens must be at least 16, got {args.num_tokens}")
    text = None
    if args.text is not None:
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"cannot read --text {args.text}: {e}")
    model, tokenizer = load(args.model or str(DEMO_MODEL_PATH))
    store = calibrate(
        model, tokenizer, args.method, args.output, args.bits, text, args.num_tokens
    )
    print(
        f"Wrote {args.method} calibration ({store.manifest['tokens']} tokens) to {store.path}"
    )


if __name__ == "__main__":
    main()
