"""Tokenizer loading and streaming detokenization.

A streaming detokenizer turns generated token ids into text one id at a time.
``last_segment`` hands out only text that is final: a character whose UTF-8
bytes are spread over several tokens is held back until it is complete, so a
stream never shows a replacement character that the full decode would not.
"""

import codecs
import json
import os
from functools import partial
from pathlib import Path

from transformers import AutoTokenizer

SPM_MARKER = "\u2581"
# Proper prefixes of the patterns that transformers' space clean-up rewrites
# (" .", " ,", " ' ", " n't", " 've", ...).
CLEANUP_PATTERN_STARTS = (" ", " '", " 'v", " 'r", " n", " n'")


class StreamingDetokenizer:
    """Common part of the streaming detokenizers; subclasses add
    ``add_token(token_id)`` and ``finalize()``.

    Usage::

        detok = tokenizer.detokenizer
        for token in tokens:
            detok.add_token(token)
            print(detok.last_segment, end="")
        detok.finalize()
        print(detok.last_segment)

    After ``finalize()``, ``text`` equals ``tokenizer.decode(tokens)``.
    """

    def reset(self):
        self.text = ""
        self.tokens = []
        self.offset = 0

    @property
    def last_segment(self):
        """Text added since the previous read of this property."""
        start, self.offset = self.offset, len(self.text)
        return self.text[start:]


class NaiveStreamingDetokenizer(StreamingDetokenizer):
    """Works with any tokenizer by calling its ``decode``.

    New tokens are decoded together with the tokens of the previous committed
    chunk as context, and only the text beyond the context's own decode is
    appended; this keeps word-joining rules (leading-space stripping, ``##``
    pieces, ...) identical to a full decode while each call stays short.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        # When decode() cleans up spaces (" ," -> ",", " n't" -> "n't", ...)
        # text ending in the start of such a pattern may still change once
        # the next token arrives, so it is held back.
        probe = tokenizer.encode("a ,b", add_special_tokens=False)
        cleans = " ," not in tokenizer.decode(probe)
        self._unstable_tails = CLEANUP_PATTERN_STARTS if cleans else ()
        self.reset()

    def reset(self):
        super().reset()
        self._context_start = 0
        self._pending_start = 0

    def _decode_pending(self):
        context = self.tokens[self._context_start : self._pending_start]
        both = self._tokenizer.decode(context + self.tokens[self._pending_start :])
        if not context:
            return both
        # Normally the context's own text is a prefix of ``both``; should the
        # new tokens rewrite its tail, only the part that differs is new.
        before = self._tokenizer.decode(context)
        return both[len(os.path.commonprefix([before, both])) :]

    def add_token(self, token):
        self.tokens.append(token)
        new = self._decode_pending()
        if new.endswith(("\ufffd",) + self._unstable_tails):
            return
        self.text += new
        self._context_start = self._pending_start
        self._pending_start = len(self.tokens)

    def finalize(self):
        if self._pending_start < len(self.tokens):
            self.text += self._decode_pending()
            self._context_start = self._pending_start
            self._pending_start = len(self.tokens)


class _ByteStreamDetokenizer(StreamingDetokenizer):
    """Shared logic for detokenizers that map each id to raw bytes.

    An incremental UTF-8 decoder emits complete characters and keeps the
    bytes of an unfinished one for the next token.
    """

    def __init__(self, tokenizer, trim_space=False):
        self._trim_space = trim_space
        vocab = tokenizer.get_vocab()
        self._pieces = [b""] * (max(vocab.values()) + 1)
        for piece, idx in vocab.items():
            self._pieces[idx] = self._piece_bytes(piece)
        self.reset()

    def _piece_bytes(self, piece):
        raise NotImplementedError

    def reset(self):
        super().reset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._started = False

    def _append(self, chunk):
        if not chunk:
            return
        if not self._started:
            self._started = True
            if self._trim_space and chunk[0] == " ":
                chunk = chunk[1:]
        self.text += chunk

    def add_token(self, token):
        self.tokens.append(token)
        piece = self._pieces[token] if 0 <= token < len(self._pieces) else b""
        self._append(self._utf8.decode(piece))

    def finalize(self):
        self._append(self._utf8.decode(b"", final=True))


class SPMStreamingDetokenizer(_ByteStreamDetokenizer):
    """SentencePiece-style vocabularies: ``▁`` marks a space and ``<0xNN>``
    pieces stand for single bytes (byte fallback).

    With ``trim_space`` the single space that starts the text is dropped, as
    the ``Strip`` step of the Llama / Mistral decoder does.
    """

    def __init__(self, tokenizer, trim_space=True):
        super().__init__(tokenizer, trim_space=trim_space)

    def _piece_bytes(self, piece):
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace(SPM_MARKER, " ").encode("utf-8")


def _gpt2_unicode_to_byte():
    """Inverse of GPT-2's reversible byte -> printable character table.

    Printable Latin-1 bytes stand for themselves; the remaining bytes are
    given the code points 256, 257, ... in increasing byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if chr(b) not in table:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class BPEStreamingDetokenizer(_ByteStreamDetokenizer):
    """Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, ...), whose pieces
    are written with the GPT-2 byte-to-character table."""

    _char_to_byte = _gpt2_unicode_to_byte()

    def _piece_bytes(self, piece):
        table = self._char_to_byte
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        # Added tokens are stored as plain text.
        return piece.encode("utf-8")


def _decoder_steps(decoder):
    if not isinstance(decoder, dict):
        return []
    if decoder.get("type") == "Sequence":
        return [d for d in decoder.get("decoders", []) if isinstance(d, dict)]
    return [decoder]


def _pick_detokenizer(tokenizer_json):
    """Choose a detokenizer class from the ``decoder`` of tokenizer.json."""
    steps = _decoder_steps(tokenizer_json.get("decoder"))
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"]:
        return BPEStreamingDetokenizer

    marker_to_space = any(
        step.get("type") == "Replace"
        and step.get("pattern", {}).get("String") == SPM_MARKER
        and step.get("content") == " "
        for step in steps
    )
    if marker_to_space and "ByteFallback" in kinds:
        if set(kinds) <= {"Replace", "ByteFallback", "Fuse", "Strip"}:
            trim = any(
                step.get("type") == "Strip"
                and step.get("content") == " "
                and step.get("start", 0) >= 1
                for step in steps
            )
            return partial(SPMStreamingDetokenizer, trim_space=trim)
    return NaiveStreamingDetokenizer


class TokenizerWrapper:
    """A Hugging Face tokenizer plus a streaming detokenizer and EOS set.

    Attributes not defined here are read from and written to the wrapped
    tokenizer.
    """

    def __init__(
        self,
        tokenizer,
        detokenizer_class=NaiveStreamingDetokenizer,
        eos_token_ids=None,
    ):
        self._tokenizer = tokenizer
        self._detokenizer_class = detokenizer_class
        if eos_token_ids is None:
            eos = tokenizer.eos_token_id
            eos_token_ids = [] if eos is None else [eos]
        elif isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self._eos_token_ids = set(eos_token_ids)

    @property
    def detokenizer(self):
        """A fresh streaming detokenizer for this tokenizer."""
        return self._detokenizer_class(self)

    @property
    def eos_token_ids(self):
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids):
        self._eos_token_ids = set() if ids is None else set(ids)

    @property
    def has_chat_template(self):
        return getattr(self._tokenizer, "chat_template", None) is not None

    def apply_chat_template(self, *args, **kwargs):
        kwargs.setdefault("return_dict", False)
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def add_eos_token(self, token):
        """Also stop on ``token``: a token string, or an id as int or digits."""
        if isinstance(token, int) or (isinstance(token, str) and token.isdigit()):
            token_id = int(token)
            if not 0 <= token_id < len(self._tokenizer):
                raise ValueError(f"Token id {token} is outside the vocabulary.")
        else:
            vocab = self._tokenizer.get_vocab()
            if token not in vocab:
                raise ValueError(f"{token!r} is not a token of this tokenizer.")
            token_id = vocab[token]
        self._eos_token_ids.add(token_id)

    def __len__(self):
        return len(self._tokenizer)

    def __getattr__(self, name):
        # Only called for names not found on the wrapper itself.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._tokenizer, name)

    def __setattr__(self, name, value):
        if name == "detokenizer":
            raise AttributeError("The detokenizer cannot be replaced.")
        if name.startswith("_") or name == "eos_token_ids":
            object.__setattr__(self, name, value)
        else:
            setattr(self._tokenizer, name, value)


def _read_json(path):
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fid:
        try:
            return json.load(fid)
        except json.JSONDecodeError as err:
            raise ValueError(f"Could not parse {path}: {err}") from err


def _as_id_list(value):
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return list(value)


def load_tokenizer(model_path, tokenizer_config_extra=None, eos_token_ids=None):
    """Load the tokenizer in the local folder ``model_path``.

    EOS ids come from ``eos_token_ids`` when given, else from the
    ``eos_token_id`` entries of config.json and generation_config.json, else
    from the tokenizer itself.
    """
    model_path = Path(model_path)
    tokenizer_json = _read_json(model_path / "tokenizer.json")
    detokenizer_class = _pick_detokenizer(tokenizer_json)

    tokenizer = AutoTokenizer.from_pretrained(
        model_path, **(tokenizer_config_extra or {})
    )
    # Older transformers releases do not read chat_template.jinja themselves.
    template_file = model_path / "chat_template.jinja"
    if tokenizer.chat_template is None and template_file.exists():
        tokenizer.chat_template = template_file.read_text(encoding="utf-8")

    if eos_token_ids is None:
        found = []
        for name in ("config.json", "generation_config.json"):
            for idx in _as_id_list(_read_json(model_path / name).get("eos_token_id")):
                if idx not in found:
                    found.append(idx)
        eos_token_ids = found or None

    return TokenizerWrapper(tokenizer, detokenizer_class, eos_token_ids=eos_token_ids)


# Upstream name for the same function.
load = load_tokenizer
