"""Loading, converting, quantizing and saving models (mlx_lm.utils, mlx_lm.convert)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mlx_lm import convert as convert_fn
from mlx_lm.convert import main as convert_main
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import (
    ModelNotFoundError,
    get_model_classes,
    get_model_path,
    infer_quant_config,
    load,
    load_config,
    load_model,
    make_shards,
    save_config,
    save_model,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO_ROOT / "tests" / "fixtures" / "tokenizers" / "bpe"

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 0,
    "eos_token_id": 1,
}
PROMPT = mx.array([[5, 17, 42, 300, 7, 99, 1, 250]])


def hf_weights(config, seed=0):
    """Random float32 weights under Hugging Face's LlamaForCausalLM names."""
    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv_dim = head_dim * config["num_key_value_heads"]

    def rand(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": rand(config["vocab_size"], hidden),
        "model.norm.weight": np.ones(hidden, np.float32),
        "lm_head.weight": rand(config["vocab_size"], hidden),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        weights.update(
            {
                f"{layer}.input_layernorm.weight": np.ones(hidden, np.float32),
                f"{layer}.post_attention_layernorm.weight": np.ones(hidden, np.float32),
                f"{layer}.self_attn.q_proj.weight": rand(hidden, hidden),
                f"{layer}.self_attn.k_proj.weight": rand(kv_dim, hidden),
                f"{layer}.self_attn.v_proj.weight": rand(kv_dim, hidden),
                f"{layer}.self_attn.o_proj.weight": rand(hidden, hidden),
                f"{layer}.mlp.gate_proj.weight": rand(inter, hidden),
                f"{layer}.mlp.up_proj.weight": rand(inter, hidden),
                f"{layer}.mlp.down_proj.weight": rand(hidden, inter),
            }
        )
    return weights


def write_hf_folder(path, config=CONFIG):
    """A Hugging Face style checkpoint folder: config, weights, tokenizer."""
    path = Path(path)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    save_file(hf_weights(config), str(path / "model.safetensors"), {"format": "pt"})
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy(item, path / item.name)
    return path


def quantized_layers(model):
    return {
        name: (module.group_size, module.bits)
        for name, module in model.named_modules()
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


class TestUtils(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = Path(cls.tmp.name)
        cls.hf_path = write_hf_folder(cls.root / "hf")
        cls.model, cls.tokenizer = load(cls.hf_path)
        cls.logits = cls.model(PROMPT)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def out(self, name):
        return self.root / name

    def assert_logits_close(self, model, rtol):
        """Check the relative (L2) error of ``model``'s logits; return it."""
        logits = model(PROMPT)
        self.assertEqual(logits.shape, self.logits.shape)
        diff = mx.linalg.norm(logits - self.logits) / mx.linalg.norm(self.logits)
        self.assertLess(diff.item(), rtol)
        return diff.item()

    def test_load_local_folder(self):
        self.assertIsInstance(self.tokenizer, TokenizerWrapper)
        self.assertEqual(self.logits.shape, (1, PROMPT.shape[1], CONFIG["vocab_size"]))
        embed = hf_weights(CONFIG)["model.embed_tokens.weight"]
        self.assertTrue(
            np.array_equal(np.array(self.model.model.embed_tokens.weight), embed)
        )
        # generation_config.json's eos ids override config.json's.
        self.assertEqual(set(self.tokenizer.eos_token_ids), {1, 2})
        model, tokenizer, config = load(str(self.hf_path), return_config=True)
        self.assertEqual(config["eos_token_id"], [1, 2])
        self.assertEqual(get_model_path(str(self.hf_path)), self.hf_path)

    def test_convert_float(self):
        out = convert_fn(self.hf_path, self.out("float"))
        for name in [
            "model.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
        ]:
            self.assertTrue((out / name).is_file(), name)
        with safe_open(str(out / "model.safetensors"), "numpy") as f:
            self.assertEqual(f.metadata(), {"format": "mlx"})
        config = json.loads((out / "config.json").read_text())
        self.assertEqual(list(config), sorted(config))
        self.assertNotIn("quantization", config)
        model, _ = load(out)
        self.assertEqual(self.assert_logits_close(model, 1e-6), 0.0)

    def test_convert_quantized_cli(self):
        out = self.out("q4")
        convert_main(["--hf-path", str(self.hf_path), "--mlx-path", str(out), "-q"])
        config = json.loads((out / "config.json").read_text())
        expected = {"group_size": 64, "bits": 4, "mode": "affine"}
        self.assertEqual(config["quantization"], expected)
        self.assertEqual(config["quantization_config"], expected)
        model, _ = load(out)
        layers = quantized_layers(model)
        self.assertIn("model.layers.0.self_attn.q_proj", layers)
        self.assertIn("model.embed_tokens", layers)
        self.assertEqual(set(layers.values()), {(64, 4)})
        # 4 bits on random weights: about 30% relative error, while an unrelated
        # model of the same shape is off by about 140%.
        self.assertGreater(self.assert_logits_close(model, 0.4), 0.0)

    def test_convert_8bit_close_and_dequantize(self):
        quantized = convert_fn(
            self.hf_path, self.out("q8"), quantize=True, q_bits=8, q_group_size=32
        )
        q_model, _ = load(quantized)
        self.assertEqual(set(quantized_layers(q_model).values()), {(32, 8)})
        self.assert_logits_close(q_model, 0.03)

        restored = convert_fn(quantized, self.out("deq"), dequantize=True)
        config = json.loads((restored / "config.json").read_text())
        self.assertNotIn("quantization", config)
        self.assertNotIn("quantization_config", config)
        model, _ = load(restored)
        self.assertEqual(quantized_layers(model), {})
        err = mx.abs(model(PROMPT) - q_model(PROMPT)).max().item()
        self.assertLess(err, 1e-4)

    def test_convert_dtype(self):
        out = convert_fn(self.hf_path, self.out("f16"), dtype="float16")
        weights = mx.load(str(out / "model.safetensors"))
        self.assertEqual({w.dtype for w in weights.values()}, {mx.float16})
        model, _ = load(out)
        self.assertEqual(model.model.embed_tokens.weight.dtype, mx.float16)
        self.assert_logits_close(model, 0.01)

    def test_convert_bad_arguments(self):
        existing = self.out("existing")
        existing.mkdir()
        with self.assertRaisesRegex(ValueError, "existing"):
            convert_fn(self.hf_path, existing)
        # Bad values fail before anything is loaded (the source does not exist).
        missing = self.root / "no-such-folder"
        for kwargs, word in [
            ({"quantize": True, "q_bits": 7}, "q_bits=7"),
            ({"quantize": True, "q_group_size": 48}, "q_group_size=48"),
            ({"dtype": "int8"}, "int8"),
            ({"quantize": True, "dequantize": True}, "dequantize"),
        ]:
            with self.assertRaisesRegex(ValueError, word):
                convert_fn(missing, self.out("never"), **kwargs)
        self.assertFalse(self.out("never").exists())

    def test_python_m_convert(self):
        out = self.out("cli")
        proc = subprocess.run(
            [sys.executable, "-m", "mlx_lm.convert", "--hf-path", str(self.hf_path)]
            + ["--mlx-path", str(out), "--dtype", "bfloat16"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        weights = mx.load(str(out / "model.safetensors"))
        self.assertEqual({w.dtype for w in weights.values()}, {mx.bfloat16})

        proc = subprocess.run(
            [sys.executable, "-m", "mlx_lm.convert", "--hf-path", str(self.hf_path)]
            + ["--mlx-path", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("already exists", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)

    def test_unknown_model_type(self):
        config = dict(CONFIG, model_type="not_a_real_model")
        folder = write_hf_folder(self.out("unknown"), config)
        with self.assertRaises(ValueError) as ctx:
            load_model(folder)
        message = str(ctx.exception)
        self.assertIn("not_a_real_model", message)
        for model_type in ["llama", "mistral", "qwen2"]:
            self.assertIn(model_type, message)
        self.assertNotIn("base", message.split("Supported model types:")[1])

    def test_mistral_maps_to_llama(self):
        from mlx_lm.models import llama

        self.assertEqual(
            get_model_classes({"model_type": "mistral"}), (llama.Model, llama.ModelArgs)
        )

    def test_missing_repo_offline(self):
        repo = "nobody-here/no-such-model"
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(self.out("hf_home")))
        code = f"from mlx_lm.utils import get_model_path; get_model_path({repo!r})"
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertNotEqual(proc.returncode, 0)
        self.assertEqual(proc.stderr.count("Traceback"), 1, proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        self.assertIn("ModelNotFoundError", last)
        self.assertIn(repo, last)
        self.assertIn("HF_HUB_OFFLINE", last)

        with self.assertRaisesRegex(ModelNotFoundError, "valid Hugging Face repo id"):
            get_model_path("no such // model")

    def test_save_model_shards(self):
        out = self.out("sharded")
        save_model(out, self.model, max_shard_bytes=100_000)
        save_config(CONFIG, out / "config.json")
        files = sorted(p.name for p in out.glob("model*.safetensors"))
        self.assertGreater(len(files), 2)
        self.assertEqual(files[0], f"model-00001-of-{len(files):05d}.safetensors")

        index = json.loads((out / "model.safetensors.index.json").read_text())
        weight_map = index["weight_map"]
        stored = {}
        for name in files:
            with safe_open(str(out / name), "numpy") as f:
                self.assertEqual(f.metadata(), {"format": "mlx"})
                stored.update(dict.fromkeys(f.keys(), name))
        self.assertEqual(weight_map, stored)
        self.assertEqual(list(weight_map), sorted(weight_map))
        total = sum(v.nbytes for v in mx.load(str(out / files[0])).values())
        self.assertLessEqual(total, 100_000)

        model, _ = load_model(out)
        self.assertEqual(self.assert_logits_close(model, 1e-6), 0.0)

    def save_mixed(self, out, special, listed):
        """Write the model in 4 bits, groups of 64, but ``special`` in 8 bits,
        groups of 32, which the config's per-layer map names when ``listed``;
        returns the quantized model and its config."""
        model, config = load_model(self.hf_path)
        entry = {"group_size": 32, "bits": 8}

        def predicate(path, module):
            if path == special:
                return entry
            return isinstance(module, nn.Linear) and path != "lm_head"

        nn.quantize(model, 64, 4, class_predicate=predicate)
        config["quantization"] = {"group_size": 64, "bits": 4}
        if listed:
            config["quantization"][special] = entry
        save_model(out, model)
        save_config(config, out / "config.json")
        return model, config

    def test_per_layer_and_legacy_quantization_config(self):
        # Folders written by mixed-precision recipes list per-layer parameters.
        out = self.out("mixed")
        special, entry = "model.layers.1.mlp.down_proj", {"group_size": 32, "bits": 8}
        model, config = self.save_mixed(out, special, listed=True)
        loaded, _ = load_model(out)
        layers = quantized_layers(loaded)
        self.assertEqual(layers[special], (32, 8))
        self.assertEqual(layers["model.layers.0.mlp.down_proj"], (64, 4))
        self.assertNotIn("lm_head", layers)
        self.assertNotIn("model.embed_tokens", layers)
        # Loaded layers may take the dequantized CPU path (another kernel).
        self.assertLess(mx.abs(loaded(PROMPT) - model(PROMPT)).max().item(), 1e-4)

        # Only quantization_config (as some Hub tools leave it) is enough.
        del config["quantization"]
        config["quantization_config"] = {"group_size": 64, "bits": 4, special: entry}
        (out / "config.json").write_text(json.dumps(config))
        loaded, _ = load_model(out)
        self.assertEqual(quantized_layers(loaded), layers)

    def test_unlisted_layer_at_another_packing_is_read_as_packed(self):
        # A layer quantized apart from the default but missing from the
        # config's per-layer map (as some recipes leave it) is read as stored.
        out = self.out("unlisted")
        special = "model.layers.0.self_attn.o_proj"
        model, _ = self.save_mixed(out, special, listed=False)
        loaded, _ = load_model(out)
        layers = quantized_layers(loaded)
        self.assertEqual(layers[special], (32, 8))
        self.assertEqual(layers["model.layers.1.self_attn.o_proj"], (64, 4))
        self.assertLess(mx.abs(loaded(PROMPT) - model(PROMPT)).max().item(), 1e-4)

    def test_custom_model_classes(self):
        seen = []

        def classes(config):
            seen.append(config["model_type"])
            return get_model_classes(config)

        model, _ = load_model(self.hf_path, get_model_classes=classes)
        self.assertEqual(seen, [CONFIG["model_type"]])
        self.assertEqual(self.assert_logits_close(model, 1e-6), 0.0)


class TestInferQuantConfig(unittest.TestCase):
    def test_every_mode(self):
        cases = [
            ("affine", 3, 64),
            ("affine", 4, 32),
            ("affine", 8, 128),
            ("mxfp4", 4, 32),
            ("mxfp8", 8, 32),
            ("nvfp4", 4, 16),
        ]
        for mode, bits, group_size in cases:
            with self.subTest(mode=mode, bits=bits, group_size=group_size):
                layer = nn.Linear(256, 128, bias=False)
                q = layer.to_quantized(group_size=group_size, bits=bits, mode=mode)
                weights = {"l.weight": q.weight, "l.scales": q.scales}
                self.assertEqual(
                    infer_quant_config("l", layer, weights),
                    {"group_size": group_size, "bits": bits, "mode": mode},
                )

    def test_packing_no_mode_makes(self):
        weights = {
            "l.weight": mx.zeros((128, 48), mx.uint32),
            "l.scales": mx.zeros((128, 4), mx.uint8),
        }
        with self.assertRaisesRegex(ValueError, "6-bit"):
            infer_quant_config("l", nn.Linear(256, 128, bias=False), weights)


class TestShardsAndConfigs(unittest.TestCase):
    def test_make_shards(self):
        class Sized:
            def __init__(self, nbytes):
                self.nbytes = nbytes

        small, big = Sized(1 << 20), Sized((1 << 30) + 1)
        self.assertEqual(make_shards({}, 1), [])
        self.assertEqual(make_shards({"a": big}, 1), [{"a": big}])
        shards = make_shards({"a": small, "b": big, "c": small}, 1)
        self.assertEqual(shards, [{"a": small}, {"b": big}, {"c": small}])
        shards = make_shards({k: small for k in "abcde"}, 2.5 / 1024)
        self.assertEqual([list(s) for s in shards], [["a", "b"], ["c", "d"], ["e"]])

    def test_tagged_floats_round_trip(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp)
            tagged = {
                "model_type": "llama",
                "limits": [0.0, {"__float__": "Infinity"}],
                "nested": {"low": {"__float__": "-Infinity"}},
                "not_a_tag": {"__float__": 3, "other": 4},
            }
            (path / "config.json").write_text(json.dumps(tagged))
            config = load_config(path)
            self.assertEqual(config["limits"], [0.0, float("inf")])
            self.assertEqual(config["nested"]["low"], float("-inf"))
            self.assertEqual(config["not_a_tag"], {"__float__": 3, "other": 4})
            save_config(config, path / "config.json")
            # Valid JSON for a strict parser: no bare Infinity or NaN.
            text = (path / "config.json").read_text()
            written = json.loads(text, parse_constant=self.fail)
            self.assertEqual(written["limits"], tagged["limits"])
            self.assertEqual(load_config(path)["limits"], [0.0, float("inf")])


if __name__ == "__main__":
    unittest.main()
