import json
import shutil
import tempfile
import unittest
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
    _pick_detokenizer,
    load_tokenizer,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
BPE_DIR = FIXTURES / "bpe"
SPM_DIR = FIXTURES / "spm"

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?\n  indented, twice\n\nend",
    "héllo wörld — 日本語 🙂",
    "Café 中文文本，你好世界。😀🚀 👍🏽 Ελληνικά ok",
    " leading space and trailing space ",
]


def stream(detokenizer, ids):
    """Feed ids one at a time; return every segment read along the way."""
    detokenizer.reset()
    segments = []
    for token in ids:
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    return segments


class TestFixtures(unittest.TestCase):
    def test_vocab_sizes_and_specials(self):
        bpe = load_tokenizer(BPE_DIR)
        spm = load_tokenizer(SPM_DIR)
        self.assertEqual(len(bpe), 384)
        self.assertEqual(len(spm), 459)
        self.assertEqual(bpe.convert_ids_to_tokens(bpe.eos_token_id), "<|im_end|>")
        self.assertEqual(spm.convert_ids_to_tokens([0, 1, 2]), ["<unk>", "<s>", "</s>"])
        self.assertEqual(spm.convert_tokens_to_ids("<0xE6>"), 3 + 0xE6)

    def test_multibyte_chars_span_several_tokens(self):
        # The streaming tests below are only meaningful if some characters
        # really are split over tokens in both fixtures.
        for path in (BPE_DIR, SPM_DIR):
            tok = load_tokenizer(path)
            self.assertGreater(len(tok.encode("日", add_special_tokens=False)), 1)
        spm = load_tokenizer(SPM_DIR)
        pieces = spm.convert_ids_to_tokens(spm.encode("🚀", add_special_tokens=False))
        self.assertIn("<0xF0>", pieces)


class TestDetokenizers(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tokenizers = {
            "bpe": load_tokenizer(BPE_DIR),
            "spm": load_tokenizer(SPM_DIR),
        }

    def test_detokenizer_choice(self):
        self.assertIs(
            self.tokenizers["bpe"]._detokenizer_class, BPEStreamingDetokenizer
        )
        spm_class = self.tokenizers["spm"]._detokenizer_class
        self.assertIs(spm_class.func, SPMStreamingDetokenizer)
        self.assertEqual(spm_class.keywords, {"trim_space": True})
        self.assertIsInstance(
            self.tokenizers["bpe"].detokenizer, BPEStreamingDetokenizer
        )
        self.assertIsInstance(
            self.tokenizers["spm"].detokenizer, SPMStreamingDetokenizer
        )

    def test_pick_detokenizer_from_decoder(self):
        replace = {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}
        no_strip = {
            "decoder": {
                "type": "Sequence",
                "decoders": [replace, {"type": "ByteFallback"}, {"type": "Fuse"}],
            }
        }
        chosen = _pick_detokenizer(no_strip)
        self.assertIs(chosen.func, SPMStreamingDetokenizer)
        self.assertEqual(chosen.keywords, {"trim_space": False})
        self.assertIs(
            _pick_detokenizer({"decoder": {"type": "ByteLevel"}}),
            BPEStreamingDetokenizer,
        )
        for other in [
            {"decoder": {"type": "WordPiece", "prefix": "##"}},
            {"decoder": None},
            {},
        ]:
            self.assertIs(_pick_detokenizer(other), NaiveStreamingDetokenizer)

    def check_stream(self, tok, detokenizer, ids):
        segments = stream(detokenizer, ids)
        full = tok.decode(ids)
        self.assertEqual("".join(segments), full)
        self.assertEqual(detokenizer.text, full)
        self.assertEqual(detokenizer.tokens, list(ids))
        for seg in segments:
            self.assertNotIn("\ufffd", seg)

    def test_streaming_matches_full_decode(self):
        for name, tok in self.tokenizers.items():
            for make in (tok._detokenizer_class, NaiveStreamingDetokenizer):
                detok = make(tok)
                for text in SAMPLES:
                    for specials in (True, False):
                        ids = tok.encode(text, add_special_tokens=specials)
                        with self.subTest(kind=name, cls=detok, text=text):
                            self.check_stream(tok, detok, ids)

    def test_streaming_through_eos_and_chat_markers(self):
        tok = self.tokenizers["bpe"]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "héllo 🙂"}], add_generation_prompt=True
        )
        ids = prompt + tok.encode("日本語", add_special_tokens=False)
        ids += [tok.eos_token_id]
        for make in (BPEStreamingDetokenizer, NaiveStreamingDetokenizer):
            self.check_stream(tok, make(tok), ids)

    def test_partial_character_is_held_back(self):
        for name, tok in self.tokenizers.items():
            ids = tok.encode("日", add_special_tokens=False)
            for make in (tok._detokenizer_class, NaiveStreamingDetokenizer):
                detok = make(tok)
                with self.subTest(kind=name, cls=make):
                    for token in ids[:-1]:
                        detok.add_token(token)
                        self.assertEqual(detok.last_segment, "")
                    detok.add_token(ids[-1])
                    self.assertEqual(detok.last_segment.strip(), "日")

    def test_finalize_flushes_incomplete_bytes(self):
        tok = self.tokenizers["spm"]
        lead = tok.convert_tokens_to_ids(["<0xE6>", "<0x97>"])
        for make in (tok._detokenizer_class, NaiveStreamingDetokenizer):
            detok = make(tok)
            for token in tok.encode("ok", add_special_tokens=False) + lead:
                detok.add_token(token)
            self.assertEqual(detok.last_segment, "ok")
            detok.finalize()
            rest = detok.last_segment
            self.assertEqual(rest[:1], "\ufffd")

    def test_reset_and_fresh_instances(self):
        tok = self.tokenizers["bpe"]
        first, second = tok.detokenizer, tok.detokenizer
        self.assertIsNot(first, second)
        stream(first, tok.encode("abc"))
        first.reset()
        self.assertEqual((first.text, first.tokens, first.last_segment), ("", [], ""))
        ids = tok.encode("wörld")
        self.assertEqual("".join(stream(first, ids)), "wörld")

    def test_leading_space_trimmed_like_decoder(self):
        tok = self.tokenizers["spm"]
        ids = tok.encode("Hello there", add_special_tokens=False)
        self.assertEqual(tok.convert_ids_to_tokens(ids)[0][0], "\u2581")
        self.assertEqual("".join(stream(tok.detokenizer, ids)), "Hello there")
        untrimmed = SPMStreamingDetokenizer(tok, trim_space=False)
        self.assertEqual("".join(stream(untrimmed, ids)), " Hello there")


class TestNaiveWithSpaceCleanup(unittest.TestCase):
    def test_wordpiece_stream_matches_cleaned_decode(self):
        text = "hello world, don't stop. it's ok! we've won? ' yes ' n"
        inner = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        inner.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        inner.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=120, special_tokens=["[UNK]"], show_progress=False
        )
        inner.train_from_iterator([text] * 4, trainer)
        hf = PreTrainedTokenizerFast(
            tokenizer_object=inner,
            unk_token="[UNK]",
            clean_up_tokenization_spaces=True,
        )
        tok = TokenizerWrapper(hf)
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        self.assertIn("don't", full)
        self.assertEqual("".join(stream(tok.detokenizer, ids)), full)


class TestLoadTokenizer(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = Path(self._tmp.name)

    def tearDown(self):
        self._tmp.cleanup()

    def copy_fixture(self, source, extra_files=None):
        target = self.tmp / source.name
        shutil.copytree(source, target)
        for name, content in (extra_files or {}).items():
            (target / name).write_text(
                content if isinstance(content, str) else json.dumps(content)
            )
        return target

    def test_eos_from_tokenizer(self):
        self.assertEqual(load_tokenizer(BPE_DIR).eos_token_ids, {2})
        self.assertEqual(load_tokenizer(str(SPM_DIR)).eos_token_ids, {2})

    def test_eos_from_config_int_and_list(self):
        path = self.copy_fixture(BPE_DIR, {"config.json": {"eos_token_id": 0}})
        self.assertEqual(load_tokenizer(path).eos_token_ids, {0})
        (path / "config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
        self.assertEqual(load_tokenizer(path).eos_token_ids, {1, 2})

    def test_eos_from_generation_config(self):
        path = self.copy_fixture(
            SPM_DIR,
            {
                "config.json": {"eos_token_id": 2},
                "generation_config.json": {"eos_token_id": [2, 0]},
            },
        )
        self.assertEqual(load_tokenizer(path).eos_token_ids, {0, 2})
        (path / "config.json").unlink()
        (path / "generation_config.json").write_text('{"eos_token_id": 1}')
        self.assertEqual(load_tokenizer(path).eos_token_ids, {1})

    def test_eos_argument_wins(self):
        path = self.copy_fixture(BPE_DIR, {"config.json": {"eos_token_id": 0}})
        self.assertEqual(load_tokenizer(path, eos_token_ids=[1]).eos_token_ids, {1})
        self.assertEqual(load_tokenizer(path, eos_token_ids=5).eos_token_ids, {5})

    def test_tokenizer_config_extra(self):
        tok = load_tokenizer(
            BPE_DIR, tokenizer_config_extra={"eos_token": "<|endoftext|>"}
        )
        self.assertEqual(tok.eos_token_ids, {0})

    def test_bad_tokenizer_json(self):
        path = self.copy_fixture(BPE_DIR, {"tokenizer.json": "{not json"})
        with self.assertRaisesRegex(ValueError, "tokenizer.json"):
            load_tokenizer(path)

    def test_chat_template(self):
        tok = load_tokenizer(BPE_DIR)
        self.assertTrue(tok.has_chat_template)
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "héllo 🙂"},
        ]
        text = tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        self.assertEqual(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nhéllo 🙂<|im_end|>\n<|im_start|>assistant\n",
        )
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        self.assertIsInstance(ids, list)
        self.assertEqual(ids, tok.encode(text, add_special_tokens=False))
        self.assertEqual(ids.count(tok.convert_tokens_to_ids("<|im_start|>")), 3)

    def test_chat_template_from_jinja_file(self):
        self.assertFalse(load_tokenizer(SPM_DIR).has_chat_template)
        template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
        path = self.copy_fixture(SPM_DIR, {"chat_template.jinja": template})
        tok = load_tokenizer(path)
        self.assertTrue(tok.has_chat_template)
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False
        )
        self.assertEqual(text, "[hi]")


class TestTokenizerWrapper(unittest.TestCase):
    def setUp(self):
        self.tok = load_tokenizer(BPE_DIR)

    def test_attribute_proxy(self):
        inner = self.tok._tokenizer
        self.assertEqual(self.tok.encode("abc"), inner.encode("abc"))
        self.assertEqual(self.tok.vocab_size, inner.vocab_size)
        self.tok.model_max_length = 77
        self.assertEqual(inner.model_max_length, 77)
        with self.assertRaises(AttributeError):
            self.tok.no_such_attribute
        with self.assertRaises(AttributeError):
            self.tok.detokenizer = None

    def test_default_eos_and_setter(self):
        wrapper = TokenizerWrapper(self.tok._tokenizer)
        self.assertEqual(wrapper.eos_token_ids, {2})
        self.assertIsInstance(wrapper.detokenizer, NaiveStreamingDetokenizer)
        wrapper.eos_token_ids = [0, 1]
        self.assertEqual(wrapper.eos_token_ids, {0, 1})
        wrapper.eos_token_ids = None
        self.assertEqual(wrapper.eos_token_ids, set())

    def test_add_eos_token(self):
        self.tok.add_eos_token("<|endoftext|>")
        self.tok.add_eos_token(1)
        self.tok.add_eos_token("300")
        self.assertEqual(self.tok.eos_token_ids, {0, 1, 2, 300})

    def test_add_eos_token_unknown(self):
        with self.assertRaisesRegex(ValueError, "<nope>"):
            self.tok.add_eos_token("<nope>")
        with self.assertRaisesRegex(ValueError, "384"):
            self.tok.add_eos_token(384)
        spm = load_tokenizer(SPM_DIR)
        with self.assertRaisesRegex(ValueError, "<nope>"):
            spm.add_eos_token("<nope>")
        self.assertEqual(spm.eos_token_ids, {2})


if __name__ == "__main__":
    unittest.main()
