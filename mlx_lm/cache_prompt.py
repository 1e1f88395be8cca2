"""``mlx_lm.cache_prompt``: run a long prompt once and save its KV cache to a file.

``mlx_lm.generate --prompt-cache-file FILE --prompt "..."`` then continues from the saved
state, feeding only the new text.
"""

import argparse
import json
import sys
import time

import mlx.core as mx

from .generate import (
    add_kv_cache_arguments,
    add_prefill_argument,
    generate_step,
    kv_config_from_args,
)
from .models.cache import make_prompt_cache, save_prompt_cache


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Save the KV cache of a prompt to a file.")
    p.add_argument("--model", default=None, help="Local folder or Hugging Face repo")
    p.add_argument("--prompt", required=True, help="Prompt to cache, or - for stdin")
    p.add_argument(
        "--prompt-cache-file", required=True, help="Output .safetensors file"
    )
    p.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Cache the prompt as-is instead of as the start of a user message",
    )
    p.add_argument("--eos-token", default=None, help="Override the EOS token")
    add_kv_cache_arguments(p)
    add_prefill_argument(p)
    return p


def main(argv=None):
    from .utils import load, resolve_model_argument

    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    try:
        kv_config = kv_config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    tokenizer_config = {}
    if args.eos_token is not None:
        tokenizer_config["eos_token"] = args.eos_token
    model_path = resolve_model_argument(args.model)
    model, tokenizer = load(model_path, tokenizer_config=tokenizer_config)

    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if tokenizer.has_chat_template and not args.ignore_chat_template:
        # Leave the user message open so that the prompt given at generation time
        # continues it.
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=False,
            continue_final_message=True,
        )
    else:
        ids = tokenizer.encode(text)

    cache = make_prompt_cache(model, config=kv_config)
    start = time.perf_counter()

    def report(done, total):
        rate = done / max(time.perf_counter() - start, 1e-9)
        print(
            f"\rProcessed {done}/{total} tokens ({rate:.1f} tok/s)", end="", flush=True
        )

    for _ in generate_step(
        mx.array(ids),
        model,
        max_tokens=0,
        prompt_cache=cache,
        prefill_step_size=args.prefill_step_size,
        kv_config=kv_config,
        prompt_progress_callback=report,
    ):
        pass
    print()
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
    metadata = {
        "model": str(model_path),
        "tokenizer_config": json.dumps(tokenizer_config),
    }
    save_prompt_cache(args.prompt_cache_file, cache, metadata)
    print(f"Saved {len(ids)} tokens to {args.prompt_cache_file}")


if __name__ == "__main__":
    main()
