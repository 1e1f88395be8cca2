"""Quantized weights on the CPU: this package's float32 paths vs MLX's own layers.

``mlx_lm.load`` gives quantized layers the CPU paths of
``mlx_lm.models.quantized_linear`` (float32 compute, a dequantized weight for
prompt chunks). This loads one quantized model and runs ``generate_step`` with
those layers and with MLX's ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding``
swapped back in, alternating ``--repeats`` times in one process; it prints
prefill and decode tokens/s (medians, min-max) and the first generated token.
First it times one 576 x 1536 4-bit layer (group 64) per dtype, at 1 and 256
rows, both ways.

Usage:
    mlx_lm.convert --hf-path mlx_lm/demo_model --mlx-path /tmp/demo-q4 -q --q-bits 4
    python benchmarks/bench_quantized_weights.py --model /tmp/demo-q4 [--prompt-tokens 512]
        [--max-tokens 16] [--repeats 2]

The prompt is the GPL-3 text. Any quantized model folder or GGUF file works.
"""

# First: mlx_lm puts an optimized BLAS in front of MLX's only if it is imported
# before mlx.core.
import mlx_lm  # isort: skip

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_lm.generate import generate_step
from mlx_lm.models import quantized_linear as ql

TEXT = Path("/usr/share/common-licenses/GPL-3")
# The classes of each variant, by the kind of layer.
VARIANTS = {
    "MLX layers": {"linear": nn.QuantizedLinear, "embedding": nn.QuantizedEmbedding},
    "float32 paths": {"linear": ql.QuantizedLinear, "embedding": ql.QuantizedEmbedding},
}


def use(model, classes):
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            module.__class__ = classes["linear"]
        elif isinstance(module, nn.QuantizedEmbedding):
            module.__class__ = classes["embedding"]


def time_ms(fn, n=10):
    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    return (time.perf_counter() - start) / n * 1000


def layer_table():
    print("| dtype | rows | MLX layer ms | float32 path ms |")
    print("| --- | --- | --- | --- |")
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        linear = nn.Linear(576, 1536, bias=False)
        linear.set_dtype(dtype)
        layer = linear.to_quantized(group_size=64, bits=4)
        for rows in (1, 256):
            x = mx.random.normal((1, rows, 576)).astype(dtype)
            times = []
            for classes in VARIANTS.values():
                layer.__class__ = classes["linear"]
                times.append(time_ms(lambda: layer(x), n=3 if rows > 1 else 20))
            print(f"| {dtype} | {rows} | {times[0]:.2f} | {times[1]:.2f} |")


def run(model, prompt, max_tokens):
    start = time.perf_counter()
    for n, (token, _) in enumerate(generate_step(prompt, model, max_tokens=max_tokens)):
        if n == 0:
            first, first_token = time.perf_counter(), token
    end = time.perf_counter()
    return prompt.size / (first - start), (max_tokens - 1) / (end - first), first_token


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    layer_table()
    model, tokenizer = mlx_lm.load(args.model)
    if not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        raise ValueError(f"{args.model} has no quantized layers")
    prompt = mx.array(tokenizer.encode(TEXT.read_text())[: args.prompt_tokens])

    results = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, classes in VARIANTS.items():
            use(model, classes)
            results[name].append(run(model, prompt, args.max_tokens))

    def cell(values):
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    print(f"model {args.model}, prompt {prompt.size} tokens")
    print("| layers | prefill tok/s | decode tok/s | first token |")
    print("| --- | --- | --- | --- |")
    for name, runs in results.items():
        prefill, decode, first = zip(*runs)
        print(f"| {name} | {cell(prefill)} | {cell(decode)} | {first[0]} |")


if __name__ == "__main__":
    main()
