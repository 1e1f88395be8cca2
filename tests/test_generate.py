import io
import os
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import mlx.core as mx
from helpers import tiny_model, tiny_tokenizer, write_model_dir

from mlx_lm import batch_generate, generate, stream_generate
from mlx_lm.generate import (
    cache_hook,
    default_prefill_step_size,
    generate_step,
    main,
    maybe_quantize_kv_cache,
    speculative_generate_step,
)
from mlx_lm.models.cache import (
    KVCacheConfig,
    QuantizedKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlx_lm.sample_utils import make_logits_processors, make_sampler

REPO = Path(__file__).resolve().parent.parent


def reference_greedy(model, prompt, n):
    """Greedy continuation by re-running the whole sequence without a cache."""
    tokens = list(prompt)
    out = []
    for _ in range(n):
        logits = model(mx.array(tokens)[None])[0, -1]
        t = mx.argmax(logits).item()
        out.append(t)
        tokens.append(t)
    return out


class TestGenerateStep(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, cls.config = tiny_model(seed=1)
        cls.tokenizer = tiny_tokenizer()
        cls.prompt = cls.tokenizer.encode("def add(a, b):\n    return a + b\n")

    def greedy(self, prompt=None, n=12, **kwargs):
        prompt = mx.array(self.prompt if prompt is None else prompt)
        return [t for t, _ in generate_step(prompt, self.model, max_tokens=n, **kwargs)]

    def test_matches_uncached_reference(self):
        self.assertEqual(self.greedy(), reference_greedy(self.model, self.prompt, 12))

    def test_chunked_prefill_gives_same_tokens(self):
        self.assertEqual(self.greedy(prefill_step_size=3), self.greedy())

    def test_max_tokens(self):
        self.assertEqual(len(self.greedy(n=5)), 5)
        self.assertEqual(self.greedy(n=0), [])

    def test_logprobs_are_normalized(self):
        _, logprobs = next(generate_step(mx.array(self.prompt), self.model))
        self.assertAlmostEqual(mx.logsumexp(logprobs).item(), 0.0, places=4)

    def test_logit_bias_forces_token(self):
        target = 7
        procs = make_logits_processors(logit_bias={target: 1e4})
        self.assertEqual(self.greedy(n=6, logits_processors=procs), [target] * 6)

    def test_repetition_penalty_sees_history(self):
        # A huge penalty forbids any token already in the prompt or output.
        procs = make_logits_processors(
            repetition_penalty=1e6, repetition_context_size=1000
        )
        out = self.greedy(n=8, logits_processors=procs)
        seen = set(self.prompt)
        for t in out:
            self.assertNotIn(t, seen)
            seen.add(t)

    def test_seeded_sampling_reproducible(self):
        sampler = make_sampler(temp=1.0)
        mx.random.seed(3)
        a = self.greedy(sampler=sampler)
        mx.random.seed(3)
        b = self.greedy(sampler=sampler)
        self.assertEqual(a, b)

    def test_kv_bits_quantizes_cache(self):
        # head_dim 32 so that a group of 32 fits.
        model, _ = tiny_model(seed=1, hidden_size=128)
        prompt = mx.array(self.prompt)
        cache = make_prompt_cache(model)
        out = [
            t
            for t, _ in generate_step(
                prompt,
                model,
                max_tokens=4,
                prompt_cache=cache,
                kv_bits=8,
                kv_group_size=32,
            )
        ]
        self.assertEqual(len(out), 4)
        self.assertTrue(all(isinstance(c, QuantizedKVCache) for c in cache))
        # 8-bit keys and values barely change greedy decoding of a tiny model.
        self.assertEqual(
            out[:2], [t for t, _ in generate_step(prompt, model, max_tokens=2)]
        )

    def test_kv_group_size_defaults_to_what_the_heads_allow(self):
        # 64 does not divide head_dim 32: left unset, the group falls back to 32;
        # asked for explicitly, 64 is an error that names it.
        model, _ = tiny_model(seed=1, hidden_size=128)
        prompt = mx.array(self.prompt)
        cache = make_prompt_cache(model)
        for _ in generate_step(
            prompt, model, max_tokens=2, prompt_cache=cache, kv_bits=8
        ):
            pass
        self.assertEqual({c.group_size for c in cache}, {32})
        wide, _ = tiny_model(seed=1, hidden_size=256)
        cache = make_prompt_cache(wide)
        for _ in generate_step(
            prompt, wide, max_tokens=2, prompt_cache=cache, kv_bits=8
        ):
            pass
        self.assertEqual({c.group_size for c in cache}, {64})
        with self.assertRaisesRegex(ValueError, "kv_group_size 64 does not divide"):
            for _ in generate_step(
                prompt, model, max_tokens=2, kv_bits=8, kv_group_size=64
            ):
                pass

    def test_quantized_kv_start_delays_quantization(self):
        # head_dim 32: the 16 wide heads of self.model cannot be quantized.
        model, _ = tiny_model(seed=1, hidden_size=128)
        cache = make_prompt_cache(model)
        for _ in generate_step(
            mx.array(self.prompt),
            model,
            max_tokens=2,
            prompt_cache=cache,
            kv_bits=4,
            quantized_kv_start=10_000,
        ):
            pass
        self.assertFalse(any(isinstance(c, QuantizedKVCache) for c in cache))

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "kv_bits"):
            self.greedy(kv_bits=7)
        with self.assertRaisesRegex(ValueError, "max_kv_size"):
            self.greedy(max_kv_size=0)
        with self.assertRaisesRegex(ValueError, "prompt"):
            self.greedy(prompt=[])
        with self.assertRaisesRegex(ValueError, "layers"):
            self.greedy(prompt_cache=make_prompt_cache(self.model)[:1])

    def test_progress_callback(self):
        calls = []
        self.greedy(
            n=1,
            prefill_step_size=4,
            prompt_progress_callback=lambda d, t: calls.append((d, t)),
        )
        total = len(self.prompt)
        self.assertEqual(calls[0], (0, total))
        self.assertEqual(calls[-1], (total, total))
        done = [d for d, _ in calls]
        self.assertEqual(done, sorted(done))

    def test_default_prefill_chunk(self):
        step = default_prefill_step_size()
        self.assertEqual(step, 256 if mx.default_device() == mx.cpu else 2048)
        calls = []
        total = 2 * step + 88
        prompt = (self.prompt * (total // len(self.prompt) + 1))[:total]
        self.greedy(
            prompt=prompt,
            n=1,
            prompt_progress_callback=lambda d, t: calls.append(d),
        )
        self.assertEqual(calls, [0, step, 2 * step, total - 1, total])
        with self.assertRaisesRegex(ValueError, "prefill_step_size must be positive"):
            self.greedy(prefill_step_size=0)


class TestSpeculative(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, _ = tiny_model(seed=1)
        cls.other, _ = tiny_model(seed=2, num_hidden_layers=1)
        cls.prompt = mx.array(tiny_tokenizer().encode("import os\nimport sys\n"))

    def run_spec(self, draft, n=15, k=3):
        return list(
            speculative_generate_step(
                self.prompt, self.model, draft, num_draft_tokens=k, max_tokens=n
            )
        )

    def test_self_draft_matches_greedy_and_accepts(self):
        expected = [t for t, _ in generate_step(self.prompt, self.model, max_tokens=15)]
        out = self.run_spec(self.model)
        self.assertEqual([t for t, _, _ in out], expected)
        self.assertTrue(any(d for _, _, d in out))

    def test_foreign_draft_still_exact(self):
        expected = [t for t, _ in generate_step(self.prompt, self.model, max_tokens=15)]
        for k in (1, 2, 4):
            out = self.run_spec(self.other, k=k)
            self.assertEqual([t for t, _, _ in out], expected, f"k={k}")

    def test_stream_generate_with_draft(self):
        tok = tiny_tokenizer()
        plain = generate(self.model, tok, self.prompt, max_tokens=10)
        spec = generate(
            self.model, tok, self.prompt, max_tokens=10, draft_model=self.other
        )
        self.assertEqual(plain, spec)


class TestStreamAndBatch(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model, _ = tiny_model(seed=1)
        cls.tokenizer = tiny_tokenizer()

    def test_stream_text_matches_decode(self):
        responses = list(
            stream_generate(self.model, self.tokenizer, "print(", max_tokens=10)
        )
        tokens = [r.token for r in responses]
        text = "".join(r.text for r in responses)
        self.assertEqual(text, self.tokenizer.decode(tokens))
        self.assertEqual(responses[-1].finish_reason, "length")
        self.assertTrue(all(r.finish_reason is None for r in responses[:-1]))
        self.assertEqual(responses[-1].generation_tokens, 10)

    def test_eos_stops_generation(self):
        first = next(stream_generate(self.model, self.tokenizer, "x =", max_tokens=5))
        tokenizer = tiny_tokenizer()
        tokenizer.add_eos_token(first.token)
        responses = list(stream_generate(self.model, tokenizer, "x =", max_tokens=5))
        self.assertEqual(len(responses), 1)
        self.assertEqual(responses[0].finish_reason, "stop")
        self.assertEqual(responses[0].text, "")

    def test_batch_matches_single(self):
        prompts = [
            self.tokenizer.encode("for i in range(10):"),
            self.tokenizer.encode("x"),
            self.tokenizer.encode("class Foo(object):\n    def"),
        ]
        result = batch_generate(
            self.model, self.tokenizer, prompts, max_tokens=8, return_token_ids=True
        )
        for p, ids in zip(prompts, result.token_ids):
            single = [
                t for t, _ in generate_step(mx.array(p), self.model, max_tokens=8)
            ]
            self.assertEqual(ids, single)
        self.assertEqual(result.texts[0], self.tokenizer.decode(result.token_ids[0]))

    def test_batch_per_prompt_max_tokens(self):
        prompts = [self.tokenizer.encode("a"), self.tokenizer.encode("b")]
        result = batch_generate(
            self.model,
            self.tokenizer,
            prompts,
            max_tokens=[2, 5],
            return_token_ids=True,
        )
        self.assertEqual([len(t) for t in result.token_ids], [2, 5])
        with self.assertRaisesRegex(ValueError, "max_tokens"):
            batch_generate(self.model, self.tokenizer, prompts, max_tokens=[1])


# Every way of bounding the cache, each of which converts layers on its own.
BOUNDS = [
    dict(max_kv_size=8),
    dict(compact_kv_budget=8, compact_keep_recent=2),
    dict(window_size=8),
]


def quantized_groups(cache):
    return {c.group_size for c in cache if hasattr(c, "bits")}


class TestKVGroupSize(unittest.TestCase):
    """kv_bits with every bound, for heads 64 does not divide (Phi-3's are 96)."""

    @classmethod
    def setUpClass(cls):
        # hidden_size / 4 heads: head_dim 32, 96 and 64.
        cls.models = {
            hd: tiny_model(seed=1, vocab_size=64, hidden_size=4 * hd)[0]
            for hd in (32, 96, 64)
        }
        cls.prompt = mx.arange(3, 23)

    def test_every_bound_and_head_width(self):
        for head_dim, expected in ((32, 32), (96, 32), (64, 64)):
            for bound in BOUNDS:
                with self.subTest(head_dim=head_dim, **bound):
                    model = self.models[head_dim]
                    cache = make_prompt_cache(model, **bound)
                    steps = generate_step(
                        self.prompt,
                        model,
                        max_tokens=6,
                        prompt_cache=cache,
                        kv_bits=4,
                        prefill_step_size=8,
                        **bound,
                    )
                    self.assertEqual(len(list(steps)), 6)
                    self.assertEqual(len(quantized_groups(cache)), 1)
                    self.assertEqual(quantized_groups(cache), {expected})
                    self.assertTrue(all(hasattr(c, "bits") for c in cache))

    def test_stream_generate(self):
        tokenizer = tiny_tokenizer()
        for bound in BOUNDS:
            with self.subTest(**bound):
                responses = stream_generate(
                    self.models[96],
                    tokenizer,
                    self.prompt,
                    max_tokens=4,
                    kv_bits=4,
                    **bound,
                )
                self.assertEqual(len(list(responses)), 4)

    def test_group_must_divide_the_heads(self):
        # Refused before the first token: asked for, or no group fits at all.
        narrow, _ = tiny_model(seed=1, vocab_size=64)
        for model, group, head_dim in ((self.models[96], 64, 96), (narrow, None, 16)):
            with self.subTest(head_dim=head_dim):
                steps = generate_step(
                    self.prompt,
                    model,
                    kv_bits=4,
                    kv_group_size=group,
                    max_kv_size=8,
                    quantized_kv_start=10_000,
                )
                message = (
                    f"kv_group_size 64 does not divide the head dimension {head_dim}"
                )
                with self.assertRaisesRegex(ValueError, message):
                    next(steps)
        # Without the model, nothing decides the group: asking is an error.
        with self.assertRaisesRegex(ValueError, "needs a kv_group_size"):
            maybe_quantize_kv_cache(make_prompt_cache(narrow), 0, None, 4)
        with self.assertRaisesRegex(ValueError, "needs a kv_group_size"):
            cache_hook(KVCacheConfig(kv_bits=4), make_prompt_cache(narrow))

    def test_speculative_decides_per_model(self):
        # Main heads 64 wide, draft heads 32: each model gets its own group.
        main_model, draft = self.models[64], self.models[32]
        for bound in (dict(max_kv_size=12), dict(window_size=12)):
            with self.subTest(**bound):
                cache = make_prompt_cache(main_model, **bound)
                cache += make_prompt_cache(draft, **bound)
                steps = speculative_generate_step(
                    self.prompt[:10],
                    main_model,
                    draft,
                    max_tokens=4,
                    prompt_cache=cache,
                    kv_bits=8,
                    **bound,
                )
                self.assertEqual(len(list(steps)), 4)
                n = len(main_model.layers)
                self.assertEqual(quantized_groups(cache[:n]), {64})
                self.assertEqual(quantized_groups(cache[n:]), {32})

    def test_batch_generate(self):
        responses = batch_generate(
            self.models[96],
            tiny_tokenizer(),
            [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7]],
            max_tokens=3,
            kv_bits=4,
            compact_kv_budget=8,
            compact_keep_recent=2,
            return_prompt_caches=True,
        )
        self.assertEqual(len(responses.texts), 2)

    def test_prompt_cache_file(self):
        # Saved quantized with a group of 32 although the heads allow 64: the
        # continuation keeps the file's group.
        model = self.models[64]
        for bound in BOUNDS:
            with self.subTest(**bound):
                cache = make_prompt_cache(model, **bound)
                steps = generate_step(
                    self.prompt,
                    model,
                    max_tokens=0,
                    prompt_cache=cache,
                    kv_bits=4,
                    kv_group_size=32,
                    **bound,
                )
                list(steps)
                with tempfile.TemporaryDirectory() as d:
                    path = os.path.join(d, "cache.safetensors")
                    save_prompt_cache(path, cache)
                    loaded = load_prompt_cache(path)
                steps = generate_step(
                    mx.arange(30, 40),
                    model,
                    max_tokens=4,
                    prompt_cache=loaded,
                    kv_bits=4,
                    **bound,
                )
                self.assertEqual(len(list(steps)), 4)
                self.assertEqual(quantized_groups(loaded), {32})


class TestPromptCacheResume(unittest.TestCase):
    def test_resume_equals_uninterrupted(self):
        model, _ = tiny_model(seed=4)
        tok = tiny_tokenizer()
        prefix = tok.encode("def main():\n    args = parse()\n")
        suffix = tok.encode("    return 0\n", add_special_tokens=False)
        full = [
            t for t, _ in generate_step(mx.array(prefix + suffix), model, max_tokens=10)
        ]

        cache = make_prompt_cache(model)
        for _ in generate_step(
            mx.array(prefix), model, max_tokens=0, prompt_cache=cache
        ):
            pass
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "prefix.safetensors")
            save_prompt_cache(path, cache)
            loaded = load_prompt_cache(path)
        resumed = [
            t
            for t, _ in generate_step(
                mx.array(suffix), model, max_tokens=10, prompt_cache=loaded
            )
        ]
        self.assertEqual(resumed, full)


class TestCLI(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        model, config = tiny_model(seed=5)
        cls.model_dir = str(write_model_dir(Path(cls.tmp.name) / "m", model, config))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            main(list(argv))
        return out.getvalue(), err.getvalue()

    def test_bad_flags_fail_before_loading(self):
        bad = [
            ["--max-kv-size", "0"],
            ["--max-kv-size", "-5"],
            ["--kv-bits", "7"],
            ["--temp", "-1"],
            ["--top-p", "1.5"],
            ["--max-tokens", "-2"],
            ["--chat-template-config", "{not json"],
            ["--prompt-cache-file", "/nonexistent/cache.safetensors"],
            ["--num-draft-tokens", "0"],
            ["--xtc-probability", "2"],
            ["--xtc-threshold", "0.9"],
            ["--presence-penalty", "inf"],
            ["--frequency-context-size", "0"],
        ]
        for flags in bad:
            err = io.StringIO()
            with redirect_stderr(err), self.assertRaises(SystemExit) as ctx:
                # A model path that does not exist proves the flag check came first.
                main(["--model", "/nonexistent/model"] + flags)
            self.assertEqual(ctx.exception.code, 2, flags)
            self.assertIn(flags[0], err.getvalue(), flags)
            self.assertNotIn("Traceback", err.getvalue())

    def test_generate_cli(self):
        from mlx_lm import load

        out, _ = self.run_main(
            "--model",
            self.model_dir,
            "--prompt",
            "import",
            "--max-tokens",
            "5",
            "--ignore-chat-template",
            "--verbose",
            "false",
        )
        model, tokenizer = load(self.model_dir)
        self.assertEqual(out, generate(model, tokenizer, "import", max_tokens=5) + "\n")

    def test_verbose_stats_and_progress(self):
        out, err = self.run_main(
            "--model",
            self.model_dir,
            "--prompt",
            "import os, sys, json, time",
            "--max-tokens",
            "3",
            "--ignore-chat-template",
            "--prefill-step-size",
            "2",
        )
        self.assertIn("Generation: 3 tokens", out)
        self.assertIn("Prefill:", err)

    def test_cache_prompt_then_generate(self):
        from mlx_lm.cache_prompt import main as cache_main

        tok = tiny_tokenizer()
        prefix, suffix = "def main():\n", "    pass\n"
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "c.safetensors")
            with redirect_stdout(io.StringIO()):
                cache_main(
                    [
                        "--model",
                        self.model_dir,
                        "--prompt",
                        prefix,
                        "--prompt-cache-file",
                        path,
                        "--ignore-chat-template",
                    ]
                )
            resumed, _ = self.run_main(
                "--prompt-cache-file",
                path,
                "--prompt",
                suffix,
                "--max-tokens",
                "6",
                "--ignore-chat-template",
                "--verbose",
                "false",
            )
        ids = tok.encode(prefix) + tok.encode(suffix, add_special_tokens=False)
        from mlx_lm import load

        model, tokenizer = load(self.model_dir)
        expected = generate(model, tokenizer, ids, max_tokens=6)
        self.assertEqual(resumed, expected + "\n")

    def test_module_entry_point(self):
        proc = subprocess.run(
            [sys.executable, "-m", "mlx_lm.generate", "--kv-bits", "9"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        self.assertEqual(proc.returncode, 2)
        self.assertIn("--kv-bits", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
    unittest.main()
