"""Regenerate the real-model reference fixtures used by tests/test_gguf.py.

For each real GGUF checkpoint (benchmarks/real_models.py) transformers
dequantizes the file to float32 and runs one forward pass over the first
``--tokens`` tokens of a licence text on this machine.  For every position the
fixture keeps the ids and logits of the reference's ``--top`` highest logits,
which is enough to check both the logits and the greedy token of our loader
without storing full vocabulary rows.

Needs torch, transformers and accelerate:
    python benchmarks/real_models.py && python benchmarks/make_gguf_reference.py
"""

import argparse
import time
from pathlib import Path

import numpy as np
import real_models
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT_DIR = Path(__file__).resolve().parent.parent / "tests/fixtures/gguf_reference"
TEXT = Path("/usr/share/common-licenses/GPL-3")


def reference(name: str, n_tokens: int, top: int) -> dict:
    gguf = real_models.path(name)
    if gguf is None:
        raise SystemExit(f"{name}: run benchmarks/real_models.py first")
    folder, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    ids = tokenizer(TEXT.read_text())["input_ids"][:n_tokens]
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=torch.float32
    )
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    print(f"{name}: {len(ids)} tokens in {time.perf_counter() - start:.1f} s")
    values, indices = torch.topk(logits, top, dim=-1)
    return {
        "tokens": np.array(ids, dtype=np.int32),
        "top_ids": indices.numpy().astype(np.int32),
        "top_logits": values.numpy().astype(np.float32),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--tokens", type=int, default=1100)
    parser.add_argument("--top", type=int, default=16)
    args = parser.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for name in args.models.split(","):
        np.savez_compressed(
            OUT_DIR / f"{name}.npz", **reference(name, args.tokens, args.top)
        )


if __name__ == "__main__":
    main()
