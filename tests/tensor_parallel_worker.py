"""One rank of a tensor- or pipeline-parallel run, started by ``mlx.launch``
from ``test_distributed.py``: loads the model folder in ``argv[1]``, splits it
over the global group (``argv[4]``: "tensor" or "pipeline"), generates
greedily under each cache option of ``argv[2]`` (JSON: name -> keyword
options) and writes, per option, the tokens and this rank's weight and
KV-cache bytes to ``argv[3]`` (one file per rank)."""

import mlx_lm  # noqa: F401 isort: skip

import json
import sys

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.utils import load

PROMPT = "the quick brown fox jumps over the lazy dog " * 6


def main():
    path, options, out, mode = sys.argv[1:5]
    options = json.loads(options)
    group = mx.distributed.init()
    model, tokenizer = load(path)
    if group.size() > 1:
        model.shard(group) if mode == "tensor" else model.pipeline(group)
    mx.eval(model.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    prompt = mx.array(tokenizer.encode(PROMPT))
    banned = {i: -1e9 for i in tokenizer.eos_token_ids}

    results = {}
    for name, kv in options.items():
        cache = make_prompt_cache(model, **kv)
        tokens = [
            r.token
            for r in stream_generate(
                model,
                tokenizer,
                prompt,
                max_tokens=24,
                prompt_cache=cache,
                logits_processors=make_logits_processors(logit_bias=banned),
                **kv,
            )
        ]
        kv_bytes = sum(c.nbytes for c in cache)
        results[name] = {"tokens": tokens, "weights": weights, "kv_bytes": kv_bytes}
    with open(f"{out}.{group.rank()}", "w") as f:
        json.dump({"size": group.size(), "results": results}, f)
    mx.clear_streams()


if __name__ == "__main__":
    main()
