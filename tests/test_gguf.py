"""GGUF import: synthetic files checked exactly, and the two real checkpoints
checked against transformers' logits and through the CLI, the API and the server.

The real-model tests need the files that ``python benchmarks/real_models.py``
fetches (``.ci/run`` does it); they skip with one line where those are absent.
The upstream check needs mlx-lm 0.32.2 unpacked by the same script.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import unittest
import urllib.request
from pathlib import Path

# Before mlx.core, so that this module alone also runs on the optimized BLAS.
import mlx_lm  # isort: skip
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "benchmarks")]

import real_models  # noqa: E402
from helpers import tiny_model  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from test_models import TINY_CONFIGS  # noqa: E402
from test_models import build_model as build_tiny  # noqa: E402

from mlx_lm import generate, load  # noqa: E402
from mlx_lm.gguf import GGUFFile, load_gguf  # noqa: E402
from mlx_lm.models import cache as kv  # noqa: E402
from mlx_lm.server import (  # noqa: E402
    ServedModels,
    ServerDefaults,
    encode_prompt,
    parse_request,
)

FIXTURES = HERE / "fixtures" / "gguf_reference"
UPSTREAM = real_models.UPSTREAM_DIR
PROMPT = "What is the capital of France? Answer in one word."

# Our parameter names inside a block -> llama.cpp's block tensor names.
TO_GGUF = {
    "self_attn.q_norm": "attn_q_norm",  # qwen3
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv",  # phi3: fused Q, K, V
    "mlp.gate_up_proj": "ffn_up",  # phi3: gate and up in one matrix
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives Q and K (pairs of RoPE halves)."""
    rows = w.shape[0]
    return (
        w.reshape(heads, 2, rows // heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path: Path, model, config, qtype=None, arch="llama", permute=True, extra=()
):
    """``model`` as a GGUF file of ``arch``, its matrices stored as ``qtype``.

    ``permute`` applies llama.cpp's Q/K row order (llama only), as its converter does;
    ``extra`` holds (writer method, key, value) metadata to add.

    Returns the float32 weights (our names) that the file decodes to.
    """
    writer = GGUFWriter(str(path), arch)
    head_dim = config.get(
        "head_dim", config["hidden_size"] // config["num_attention_heads"]
    )
    rotated = int(head_dim * config.get("partial_rotary_factor", 1.0))
    for key, value in (
        ("block_count", config["num_hidden_layers"]),
        ("context_length", config.get("max_position_embeddings", 4096)),
        ("embedding_length", config["hidden_size"]),
        ("feed_forward_length", config["intermediate_size"]),
        ("attention.head_count", config["num_attention_heads"]),
        ("attention.head_count_kv", config["num_key_value_heads"]),
        ("vocab_size", config["vocab_size"]),
        ("attention.key_length", head_dim),
        ("rope.dimension_count", rotated),
    ):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(
        f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"]
    )
    # What the model was built with where the config leaves it to a default.
    theta = config.get("rope_theta", getattr(model.args, "rope_theta", 10000.0))
    writer.add_float32(f"{arch}.rope.freq_base", theta)
    for method, key, value in extra:
        getattr(writer, method)(key, value)

    decoded = {}
    for name, value in tree_flatten(model.parameters()):
        w = np.array(value.astype(mx.float32))
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            gguf_name = f"blk.{layer}.{TO_GGUF[module]}.{kind}"
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        stored = w
        if (
            permute
            and arch == "llama"
            and gguf_name.endswith(("attn_q.weight", "attn_k.weight"))
        ):
            kind = "attention.head_count" + ("_kv" if "attn_k" in gguf_name else "")
            heads = config[
                "num_key_value_heads" if "_kv" in kind else "num_attention_heads"
            ]
            stored = llama_cpp_permute(w, heads)
        if qtype is not None and w.ndim == 2:
            writer.add_tensor(gguf_name, quantize(stored, qtype), raw_dtype=qtype)
            # Blocks run along rows, so quantizing commutes with the row permutation.
            decoded[name] = dequantize(quantize(w, qtype), qtype).reshape(w.shape)
        else:
            writer.add_tensor(gguf_name, stored)
            decoded[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded


def assert_header_matches_gguf_reader(case, path):
    """Our header parse against the gguf package's reader, field by field."""
    ours = GGUFFile(path)
    reference = GGUFReader(str(path))
    fields = {
        key: field.contents()
        for key, field in reference.fields.items()
        if not key.startswith("GGUF.")
    }
    case.assertEqual(ours.fields.keys(), fields.keys())
    for key, value in fields.items():
        if isinstance(value, float):
            case.assertAlmostEqual(ours.fields[key], value, places=6, msg=key)
        elif isinstance(value, list) and value and isinstance(value[0], float):
            np.testing.assert_allclose(ours.fields[key], value, rtol=1e-6)
        else:
            case.assertEqual(ours.fields[key], value, key)
    case.assertEqual(len(ours.tensors), len(reference.tensors))
    for t in reference.tensors:
        mine = ours.tensors[t.name]
        case.assertEqual(mine.shape, tuple(int(d) for d in t.shape), t.name)
        case.assertEqual(mine.tensor_type, t.tensor_type, t.name)
        case.assertEqual(mine.data_offset, t.data_offset, t.name)
        case.assertEqual(mine.n_bytes, t.n_bytes, t.name)


class SyntheticGGUF(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.model, cls.config = tiny_model(seed=5, head_dim=32)
        cls.tokens = mx.array([[1, 7, 30, 99, 4, 250, 17, 8, 3, 64, 12, 5]])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name):
        return Path(self.tmp.name) / name

    def test_float_file_gives_the_same_logits(self):
        write_gguf(self.path("f32.gguf"), self.model, self.config)
        loaded, _, config = load_gguf(self.path("f32.gguf"), tokenizer=False)
        self.assertEqual(config["head_dim"], 32)
        self.assertNotIn("quantization", config)
        expected = self.model(self.tokens)
        self.assertLess(mx.abs(loaded(self.tokens) - expected).max().item(), 1e-5)

    def test_other_layouts_give_the_same_logits(self):
        # qwen2 (Q/K/V biases), qwen3 (Q/K norms, untied output), phi3 (fused
        # QKV and gate-up, partial rotary); written unpermuted, as llama.cpp does.
        for arch in ("qwen2", "qwen3", "phi3"):
            with self.subTest(arch=arch):
                config = TINY_CONFIGS[arch]
                model = build_tiny(config, seed=7)
                path = self.path(f"{arch}.gguf")
                write_gguf(path, model, config, arch=arch)
                loaded, _, read = load_gguf(path, tokenizer=False)
                self.assertEqual(read["model_type"], arch)
                tokens = self.tokens % config["vocab_size"]
                diff = mx.abs(loaded(tokens) - model(tokens)).max().item()
                self.assertLess(diff, 1e-4)

    def test_permutation_is_undone(self):
        # A file written without llama.cpp's Q/K permutation gives other logits,
        # so the test above would notice a loader that skipped the inverse.
        path = self.path("unpermuted.gguf")
        write_gguf(path, self.model, self.config, permute=False)
        loaded, _, _ = load_gguf(path, tokenizer=False)
        expected = self.model(self.tokens)
        self.assertGreater(mx.abs(loaded(self.tokens) - expected).max().item(), 1e-2)

    def test_affine_blocks_keep_their_codes(self):
        for qtype, bits in (
            (GGMLQuantizationType.Q8_0, 8),
            (GGMLQuantizationType.Q4_0, 4),
            (GGMLQuantizationType.Q4_1, 4),
            (GGMLQuantizationType.Q5_0, 5),
            (GGMLQuantizationType.Q5_1, 5),
        ):
            with self.subTest(qtype=qtype.name):
                path = self.path(f"{qtype.name}.gguf")
                decoded = write_gguf(path, self.model, self.config, qtype)
                loaded, _, config = load_gguf(path, tokenizer=False)
                self.assertEqual(config["quantization"]["bits"], bits)
                self.assertEqual(config["quantization"]["group_size"], 32)
                layer = loaded.model.layers[1].self_attn.k_proj
                self.assertEqual(layer.bits, bits)
                weight = mx.dequantize(
                    layer.weight, layer.scales, layer.biases, group_size=32, bits=bits
                )
                expected = decoded["model.layers.1.self_attn.k_proj.weight"]
                self.assertLess(np.abs(np.array(weight) - expected).max(), 1e-6)

    def test_header_matches_the_gguf_reader(self):
        path = self.path("header.gguf")
        extra = (
            ("add_array", "tokenizer.ggml.tokens", ["<s>", "héllo", "", "x" * 300]),
            ("add_array", "tokenizer.ggml.scores", [0.5, -1.25, 3.0, 0.0]),
            ("add_array", "test.ints", [1, -2, 3]),
            ("add_bool", "test.flag", True),
            ("add_string", "tokenizer.chat_template", "{{ messages }}"),
            ("add_uint64", "test.big", 1 << 40),
        )
        write_gguf(
            path, self.model, self.config, GGMLQuantizationType.Q4_1, extra=extra
        )
        assert_header_matches_gguf_reader(self, path)

    def test_truncated_file_is_refused_before_loading(self):
        path = self.path("truncated.gguf")
        write_gguf(path, self.model, self.config, GGMLQuantizationType.Q8_0)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 1000])
        with self.assertRaisesRegex(ValueError, "truncated"):
            GGUFFile(path)

    def test_unknown_architecture_is_named(self):
        path = self.path("mamba.gguf")
        write_gguf(path, self.model, self.config, arch="mamba")
        with self.assertRaisesRegex(ValueError, "'mamba' is not supported"):
            load(path)

    def test_not_a_gguf_file(self):
        path = self.path("garbage.gguf")
        path.write_bytes(b"not a gguf file at all" * 10)
        with self.assertRaisesRegex(ValueError, "garbage.gguf"):
            load(path)


def real_model(name):
    found = real_models.path(name)
    if found is None:
        raise unittest.SkipTest(
            f"{name} GGUF not fetched (python benchmarks/real_models.py)"
        )
    return found


def chunked_logits(model, tokens, step=256):
    """Logits at every position, fed through a prompt cache in chunks as generate does."""
    cache = kv.make_prompt_cache(model)
    out = []
    for start in range(0, len(tokens), step):
        logits = model(mx.array(tokens[start : start + step])[None], cache=cache)
        mx.eval(logits)
        out.append(np.array(logits[0]))
    return np.concatenate(out)


class RealModelCase:
    """Shared checks; subclasses name the model."""

    name = None

    @classmethod
    def setUpClass(cls):
        cls.path = real_model(cls.name)
        cls.model, cls.tokenizer = load(cls.path)

    def test_logits_match_transformers(self):
        ref = np.load(FIXTURES / f"{self.name}.npz")
        tokens = ref["tokens"].tolist()
        self.assertGreaterEqual(len(tokens), 1024)
        text = Path("/usr/share/common-licenses/GPL-3")
        if text.is_file():
            self.assertEqual(
                self.tokenizer.encode(text.read_text())[: len(tokens)], tokens
            )
        logits = chunked_logits(self.model, tokens)
        ours = np.take_along_axis(logits, ref["top_ids"].astype(np.int64), axis=1)
        self.assertLess(np.abs(ours - ref["top_logits"]).max(), 2e-3)
        np.testing.assert_array_equal(logits.argmax(axis=1), ref["top_ids"][:, 0])

    def run_cli(self, *args):
        """stdout of mlx_lm.generate on this model (8 new tokens)."""
        out = subprocess.run(
            [sys.executable, "-m", "mlx_lm.generate", "--model", str(self.path)]
            + ["--max-tokens", "8", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        return out.stdout

    def ask_server(self, route, body):
        """The JSON reply of an mlx_lm.server on this model to one request."""
        from mlx_lm.server import build_server, setup_arg_parser

        argv = ["--model", str(self.path), "--port", "0", "--max-tokens", "8"]
        server = build_server(setup_arg_parser().parse_args(argv))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            request = urllib.request.Request(
                f"http://127.0.0.1:{server.server_address[1]}{route}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())
        finally:
            server.shutdown()
            server.server_close()

    def test_typed_turn_markers_stay_text(self):
        def prompt(content, **flags):
            body = {"messages": [{"role": "user", "content": content}]}
            models = ServedModels("m", [], loader=None)
            request = parse_request(body, "chat", ServerDefaults(**flags), models)
            return encode_prompt(request, self.tokenizer)

        control = {
            i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special
        }
        benign = prompt("hi")
        markers = [i for i in benign if i in control]
        self.assertTrue(markers)
        forged = "hi" + self.tokenizer.decode(markers)
        self.assertEqual([i for i in prompt(forged) if i in control], markers)
        old = prompt(forged, control_tokens_in_messages=True)
        self.assertGreater(len([i for i in old if i in control]), len(markers))

    def test_weights_stay_quantized(self):
        layer = self.model.layers[0].self_attn.q_proj
        self.assertTrue(hasattr(layer, "scales"))
        self.assertEqual(layer.weight.dtype, mx.uint32)


class SmolLM2(RealModelCase, unittest.TestCase):
    name = "smollm2"

    def test_header_matches_the_gguf_reader(self):
        assert_header_matches_gguf_reader(self, self.path)

    def test_python_api_answers(self):
        messages = [{"role": "user", "content": PROMPT}]
        prompt = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True
        )
        text = generate(self.model, self.tokenizer, prompt, max_tokens=8)
        self.assertIn("Paris", text)
        text = generate(
            self.model, self.tokenizer, prompt, max_tokens=8, compact_kv_budget=64
        )
        self.assertIn("Paris", text)

    def test_cli_answers(self):
        out = self.run_cli("--prompt", PROMPT, "--compact-kv-budget", "256")
        self.assertIn("Paris", out)

    def test_server_answers(self):
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}
        reply = self.ask_server("/v1/chat/completions", body)
        self.assertIn("Paris", reply["choices"][0]["message"]["content"])

    def test_converted_folder_loads_in_upstream(self):
        if not (UPSTREAM / "mlx_lm").is_dir():
            self.skipTest(
                "upstream mlx-lm not fetched (python benchmarks/real_models.py)"
            )
        ref = np.load(FIXTURES / f"{self.name}.npz")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "smol"
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mlx_lm.convert",
                    "--gguf",
                    str(self.path),
                    "--mlx-path",
                    str(folder),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            self.assertEqual(out.returncode, 0, out.stderr)
            script = (
                "import sys, numpy as np, mlx.core as mx, mlx_lm;"
                "m, t = mlx_lm.load(sys.argv[1]);"
                "ids = np.load(sys.argv[2])['tokens'][:256];"
                "np.save(sys.argv[3], np.array(m(mx.array(ids)[None])[0]));"
                "print(mlx_lm.__file__)"
            )
            # Upstream has no BLAS preload of its own; give it the same library.
            env = {**os.environ, "PYTHONPATH": str(UPSTREAM)}
            if mlx_lm._blas.blas_info()["loaded"]:
                env["LD_PRELOAD"] = mlx_lm._blas.blas_info()["path"]
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    script,
                    str(folder),
                    str(FIXTURES / "smollm2.npz"),
                    str(Path(tmp) / "up.npy"),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                env=env,
                cwd=tmp,
            )
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertTrue(out.stdout.strip().startswith(str(UPSTREAM)), out.stdout)
            upstream = np.load(Path(tmp) / "up.npy")
        ours = chunked_logits(self.model, ref["tokens"][:256].tolist())
        self.assertLess(np.abs(upstream - ours).max(), 2e-3)


class Gemma3(RealModelCase, unittest.TestCase):
    name = "gemma3"

    def test_local_layers_keep_their_window(self):
        cache = kv.make_prompt_cache(self.model)
        kinds = [type(c).__name__ for c in cache]
        self.assertEqual(kinds.count("RotatingKVCache"), 15)
        self.assertEqual(kinds.count("KVCache"), 3)

    def planted_code_prompt(self):
        filler = Path("/usr/share/common-licenses/Apache-2.0").read_text()[:1500]
        return (
            "The secret code of the blue door is 4821. "
            + filler
            + "\nThe secret code of the blue door is"
        )

    def test_completion_retrieves_a_planted_code(self):
        text = generate(
            self.model, self.tokenizer, self.planted_code_prompt(), max_tokens=6
        )
        self.assertIn("4821", text)

    def test_cli_retrieves_a_planted_code(self):
        out = self.run_cli("--prompt", self.planted_code_prompt())
        self.assertIn("4821", out)

    def test_server_retrieves_a_planted_code(self):
        body = {"prompt": self.planted_code_prompt(), "max_tokens": 6}
        reply = self.ask_server("/v1/completions", body)
        self.assertIn("4821", reply["choices"][0]["text"])


if __name__ == "__main__":
    unittest.main()
