"""Train the small demo model shipped in ``mlx_lm/demo_model``.

Everything here is reproducible on any machine with Python installed: the
training text is the ``*.py`` source of the Python standard library that came
with the interpreter (test suites and site-packages left out), the tokenizer is
a byte-level BPE trained on that text, and the network is a tiny Llama trained
with PyTorch (on the CPU, or ``--device cuda`` where a GPU is present; the
``--stdlib`` option points a machine with another Python at a copy of the
same stdlib). The folder written at the end uses Hugging Face Llama
names and formats, so ``transformers`` and ``mlx_lm`` both load it.

A fraction of the training sequences are synthetic long-range recall tasks
(a ``# passkey: NNNNN`` line planted in the code, asked for at the end) and a
fraction are chat-formatted, so that the model can copy from far back in its
context and the chat template means something. Three attention heads start
wired as an induction circuit (``wire_induction``), because from a random start
that circuit forms later than an hour of CPU training reaches.

Usage:
    python benchmarks/train_demo_model.py --time-budget 3300
    python benchmarks/train_demo_model.py --eval-only
"""

import argparse
import ast
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from stdlib_corpus import (
    HELD_OUT_PERCENT,
    KEY_DIGITS,
    PLANT,
    QUESTION,
    SKIP_DIRS,
    split_corpus,
    stdlib_files,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "mlx_lm" / "demo_model"
DEFAULT_CARD = REPO / "benchmarks" / "demo_model_card.json"

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|eos|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT_ASKS = [
    "Show me the function `{name}` from `{module}`.",
    "Write `{name}` as it is defined in the Python standard library module `{module}`.",
    "How is `{name}` implemented in `{module}`?",
]


# ----------------------------------------------------------------------------
# Corpus


# ----------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def write_tokenizer_files(tok, out, max_len):
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def token_stream(tok, files):
    """Concatenate files as <|bos|> text <|eos|> into one int32 array."""
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    parts = []
    for enc in tok.encode_batch([t for _, t in files], add_special_tokens=False):
        parts.append(np.array([bos] + enc.ids + [eos], dtype=np.int32))
    return np.concatenate(parts)


# ----------------------------------------------------------------------------
# Model: a plain Llama whose parameter names are Hugging Face's


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x * scale)


def rope_tables(length, head_dim, theta, device=None):
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1).to(device)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # Non-interleaved convention: dimension i pairs with i + head_dim / 2.
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    turned = torch.cat([-second, first], dim=-1)
    return x * cos + turned * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, hd = cfg["hidden_size"], cfg["head_dim"]
        self.n_q, self.n_kv, self.hd = (
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
            hd,
        )
        self.q_proj = nn.Linear(d, self.n_q * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_q * hd, d, bias=False)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_q, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.n_q // self.n_kv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, f = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, dropout=0.0):
        super().__init__()
        self.dropout = dropout
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    def forward(self, x, cos, sin):
        h = self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + F.dropout(h, self.dropout, self.training)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + F.dropout(h, self.dropout, self.training)


class Backbone(nn.Module):
    def __init__(self, cfg, dropout):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(
            Block(cfg, dropout) for _ in range(cfg["num_hidden_layers"])
        )
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class TinyLlama(nn.Module):
    """Causal LM; ``state_dict`` keys equal LlamaForCausalLM's."""

    def __init__(self, cfg, dropout=0.0):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, dropout)
        if not cfg["tie_word_embeddings"]:
            self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def forward(self, ids):
        cos, sin = rope_tables(
            ids.shape[1], self.cfg["head_dim"], self.cfg["rope_theta"], ids.device
        )
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        if self.cfg["tie_word_embeddings"]:
            return self.model.norm(x) @ self.model.embed_tokens.weight.T
        return self.lm_head(self.model.norm(x))


def init_weights(model, seed):
    gen = torch.Generator().manual_seed(seed)
    depth_scale = 1.0 / math.sqrt(2 * model.cfg["num_hidden_layers"])
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        std = 0.02 * (
            depth_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        )
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def wire_induction(model, seed):
    """Start layers 0 and 1 as an induction circuit; training takes it from there.

    From scratch, the circuit that copies from context (a head that looks one
    token back, feeding a head that finds the earlier occurrence of the current
    token and copies what followed it) forms only after a long plateau, longer
    than an hour of this CPU. So the residual stream is split into subspaces
    and three query heads (with the two KV heads they read) get weights
    that implement it:

    - every embedding gets the same constant in the last dimension, and a
      random code for its token in the TOK dimensions;
    - layer 0, query heads 0 and 1 (sharing KV head 0): query and key read only
      the constant, with RoPE phases set so that the scores peak at one and two
      tokens back; their values (the TOK code) land in PREV and PREV2;
    - layer 1, query head ``group`` (KV head 1): the query reads TOK and the key
      reads PREV, through one random projection onto the slowest-turning RoPE
      dimensions, so the score is high where the token before a position equals
      the current token, at any distance; the value (that position's TOK code)
      lands in OUT, which the untied output matrix reads with the same codes.

    Everything else keeps its random start and all weights are trained.
    """
    cfg = model.cfg
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    if cfg["tie_word_embeddings"] or group < 2 or cfg["num_key_value_heads"] < 2:
        raise ValueError(
            "wiring needs untied embeddings and two query heads per KV head"
        )
    width = min(hd, (d - 1) // 4)
    tok, prev, prev2, out = (slice(i * width, (i + 1) * width) for i in range(4))
    const = d - 1
    half = hd // 2
    gen = torch.Generator().manual_seed(seed + 1)
    codes = torch.randn(cfg["vocab_size"], width, generator=gen)
    theta = cfg["rope_theta"] ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    # RMS of an embedding is sqrt((width + width) / d): the constant matches
    # the code's norm, so after the input norm both scale by this factor
    first_gain = math.sqrt(d / (2 * width))

    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, tok] = codes
        emb[:, const] = math.sqrt(width)
        model.lm_head.weight[:, out] = 0.2 * codes

        # layer 0: fixed-offset heads over the 8 fastest RoPE pairs
        attn = model.model.layers[0].self_attn
        pair_amp = 12.0 / (math.sqrt(width) * first_gain)
        for p in range(8):
            attn.k_proj.weight[p, const] = pair_amp
        for head, offset in ((0, 1), (1, 2)):
            rows = head * hd
            for p in range(8):
                angle = float(theta[p]) * offset
                attn.q_proj.weight[rows + p, const] = pair_amp * math.cos(angle)
                attn.q_proj.weight[rows + half + p, const] = -pair_amp * math.sin(angle)
            target = prev if offset == 1 else prev2
            for i in range(width):
                attn.o_proj.weight[target.start + i, rows + i] = 1.0 / first_gain
        for i in range(width):
            attn.v_proj.weight[i, tok.start + i] = 1.0

        # layer 1: content match on the slowest RoPE pairs (nearly position-free)
        attn = model.model.layers[1].self_attn
        slow = list(range(half - 12, half)) + list(range(hd - 12, hd))
        basis, _ = torch.linalg.qr(torch.randn(width, len(slow), generator=gen))
        proj = basis.T  # orthonormal rows, len(slow) x width
        q_rows, kv_rows = group * hd, hd
        for r, dim in enumerate(slow):
            attn.q_proj.weight[q_rows + dim, tok] = 6.0 * proj[r]
            attn.k_proj.weight[kv_rows + dim, prev] = proj[r]
        for i in range(width):
            attn.v_proj.weight[kv_rows + i, tok.start + i] = 1.0
            attn.o_proj.weight[out.start + i, q_rows + i] = 1.0


def make_config(args, tok):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": args.max_len,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not args.wire_induction,
        "initializer_range": 0.02,
        "bos_token_id": tok.token_to_id("<|bos|>"),
        "eos_token_id": tok.token_to_id("<|eos|>"),
        "pad_token_id": tok.token_to_id("<|pad|>"),
        "torch_dtype": "float16",
        "use_cache": True,
    }


def export_folder(model, tok, out):
    """Write config, float16 weights and tokenizer files into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    weights = {
        k: v.detach().to("cpu", torch.float16).contiguous()
        for k, v in model.state_dict().items()
    }
    tmp = out / "model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "model.safetensors")
    write_tokenizer_files(tok, out, cfg["max_position_embeddings"])


def load_folder(folder, dropout=0.0):
    cfg = json.loads((folder / "config.json").read_text())
    model = TinyLlama(cfg, dropout)
    weights = {
        k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()
    }
    model.load_state_dict(weights, strict=True)
    return model.eval(), Tokenizer.from_file(str(folder / "tokenizer.json"))


# ----------------------------------------------------------------------------
# Training data


class Batches:
    """Draws plain, recall and chat sequences of a requested length."""

    def __init__(self, tok, stream, chat_examples, rng):
        self.tok, self.stream, self.chats, self.rng = tok, stream, chat_examples, rng
        self.vocab = tok.get_vocab_size()
        vocab = tok.get_vocab()
        line_start = np.zeros(tok.get_vocab_size(), dtype=bool)
        for text, idx in vocab.items():
            line_start[idx] = text.startswith("\u010a")  # byte-level "\n"
        self.line_start = line_start
        self.question = tok.encode(QUESTION, add_special_tokens=False).ids
        self.newline = tok.encode("\n", add_special_tokens=False).ids

    def window(self, n):
        start = self.rng.randrange(0, len(self.stream) - n)
        return self.stream[start : start + n].tolist()

    def recall(self, n, min_gap=0):
        """One recall sequence of exactly n tokens; returns (ids, answer positions, gap)."""
        key = "".join(self.rng.choice("0123456789") for _ in range(KEY_DIGITS))
        plant = self.tok.encode(PLANT.format(key=key), add_special_tokens=False).ids
        answer = self.tok.encode(key, add_special_tokens=False).ids
        tail = self.question + answer + self.newline
        body = self.window(n - len(plant) - len(tail))
        # gap = len(body) - at + len(question) + 1, so this bounds gap >= min_gap
        last = min(len(body), len(body) + len(self.question) + 2 - min_gap)
        spots = [i for i in range(1, last) if self.line_start[body[i]]]
        at = self.rng.choice(spots) if spots else self.rng.randrange(1, max(last, 2))
        ids = body[:at] + plant + body[at:] + tail
        first_answer = len(ids) - len(self.newline) - len(answer)
        gap = first_answer - (at + len(plant) - 1)
        return ids, list(range(first_answer, first_answer + len(answer))), gap

    def repeat(self, n):
        """A segment, code, then the segment again; every repeated token but the
        first is predictable by copying. Half of the segments are code, half
        uniformly random token ids (these teach copying fastest).
        Returns (ids, copy positions)."""
        k = self.rng.randrange(8, n // 4 + 1)
        if self.rng.random() < 0.5:
            first = self.window(k)
        else:
            first = [self.rng.randrange(len(SPECIALS), self.vocab) for _ in range(k)]
        ids = first + self.window(n - 2 * k) + first
        return ids, list(range(n - k + 1, n))

    def chat(self, n):
        ids = []
        while len(ids) < n:
            ids += self.rng.choice(self.chats)
        return ids[:n]

    def batch(self, size, n, recall_frac, chat_frac, repeat_frac=0.0):
        rows, weights = [], torch.zeros(size, n - 1)
        for r in range(size):
            u = self.rng.random()
            if u < recall_frac:
                # half of the plants sit in the first 30% of the sequence
                far = int(0.7 * n) if self.rng.random() < 0.5 else 0
                ids, answer_pos, _ = self.recall(n, min_gap=far)
                for p in answer_pos:
                    weights[r, p - 1] = 1.0
            elif u < recall_frac + repeat_frac:
                ids, copy_pos = self.repeat(n)
                for p in copy_pos:
                    weights[r, p - 1] = 1.0
            elif u < recall_frac + repeat_frac + chat_frac:
                ids = self.chat(n)
            else:
                ids = self.window(n)
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long), weights


def chat_examples(tok, files, rng):
    """Chat pairs asking for a stdlib function and answering with its source."""
    bos = tok.token_to_id("<|bos|>")
    found = []
    for rel, text in files:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                src = ast.get_source_segment(text, node)
                if src and 120 <= len(src) <= 2500:
                    found.append((node.name, module, src))
    texts = []
    for name, module, src in found:
        ask = rng.choice(CHAT_ASKS).format(name=name, module=module)
        texts.append(f"<|user|>\n{ask}<|eos|>\n<|assistant|>\n{src}<|eos|>\n")
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    return [[bos] + e.ids for e in encoded]


# ----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def heldout_nll(model, stream, ctx, batch=4):
    """Mean next-token NLL over non-overlapping windows of the held-out stream."""
    n_win = (len(stream) - 1) // ctx
    rows = [stream[i * ctx : i * ctx + ctx + 1] for i in range(n_win)]
    total, count, targets = 0.0, 0, []
    device = next(model.parameters()).device
    for i in range(0, n_win, batch):
        chunk = torch.tensor(np.stack(rows[i : i + batch]), dtype=torch.long)
        logits = model(chunk[:, :-1].to(device)).cpu()
        loss = F.cross_entropy(
            logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"
        )
        total += loss.item()
        count += chunk[:, 1:].numel()
        targets.append(chunk[:, 1:].flatten().numpy())
    return total / count, count, np.concatenate(targets)


def unigram_nll(train_stream, targets, vocab_size):
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets].mean())


@torch.no_grad()
def recall_accuracy(model, tok, stream, trials, ctx, min_gap, seed, batch=4):
    """Greedy recall of the planted key at >= min_gap tokens back.

    All key digits greedy-correct is the same as the argmax at every answer
    position matching under teacher forcing, so one forward pass per trial
    is enough.
    """
    maker = Batches(tok, stream, [], random.Random(seed))
    cases = [maker.recall(ctx, min_gap=min_gap) for _ in range(trials)]
    hits, gaps = 0, [gap for _, _, gap in cases]
    for i in range(0, trials, batch):
        group = cases[i : i + batch]
        rows = torch.tensor([ids for ids, _, _ in group], dtype=torch.long)
        logits = model(rows.to(next(model.parameters()).device)).cpu()
        for row, (ids, answer_pos, _) in enumerate(group):
            guess = logits[row, [p - 1 for p in answer_pos]].argmax(-1).tolist()
            hits += guess == [ids[p] for p in answer_pos]
    return hits / trials, min(gaps), float(np.mean(gaps))


def hf_logit_check(model, folder, tok, root):
    """Largest |logit difference| between ours and transformers' Llama on a sample."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    text = stdlib_files(root)[1][0][1][:3000]
    ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids[:512]])
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    return float((ours - theirs).abs().max())


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def evaluate(folder, args, card):
    model, tok = load_folder(folder)
    model.to(args.device)
    root, train, held = split_corpus(args.stdlib)
    train_stream = token_stream(tok, train)
    held_stream = token_stream(tok, held)
    t0 = time.time()
    nll, n_tokens, targets = heldout_nll(model, held_stream, args.eval_ctx)
    base = unigram_nll(train_stream, targets, tok.get_vocab_size())
    acc, gap_min, gap_mean = recall_accuracy(
        model,
        tok,
        held_stream,
        args.recall_trials,
        args.eval_ctx,
        args.min_gap,
        args.seed + 1,
    )
    card.update(
        {
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights_dtype": "float16",
            "shipped_folder_bytes": sum(f.stat().st_size for f in folder.iterdir()),
            "data": {
                "source": "Python standard library *.py files: sysconfig.get_paths()['stdlib']",
                "python_version": platform.python_version(),
                "stdlib_path_when_measured": str(root),
                "excluded_dirs": sorted(SKIP_DIRS),
                "order": "sorted by path relative to the stdlib root",
                "held_out_rule": f"sha256(relative path) first 4 bytes little-endian % 100 < {HELD_OUT_PERCENT}",
                "train_files": len(train),
                "held_out_files": [r for r, _ in held],
                "train_tokens": int(len(train_stream)),
                "held_out_tokens": int(len(held_stream)),
            },
            "heldout_eval": {
                "context": args.eval_ctx,
                "predicted_tokens": int(n_tokens),
                "perplexity": round(math.exp(nll), 3),
                "unigram_baseline_perplexity": round(math.exp(base), 3),
            },
            "recall_eval": {
                "format": f"plant {PLANT!r}, ask {QUESTION!r}, greedy decode {KEY_DIGITS} digits",
                "context": args.eval_ctx,
                "trials": args.recall_trials,
                "min_distance_tokens": gap_min,
                "mean_distance_tokens": round(gap_mean, 1),
                "accuracy": acc,
            },
            "hf_transformers_max_abs_logit_diff": hf_logit_check(
                model.cpu(), folder, tok, args.stdlib
            ),
            "eval_seconds": round(time.time() - t0, 1),
        }
    )
    return card


# ----------------------------------------------------------------------------
# Training


def parse_stages(spec):
    """'len:seqs:recall:share,...' -> list of (length, batch seqs, recall fraction, end)."""
    stages, end = [], 0.0
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) != 4:
            raise ValueError(
                f"bad curriculum stage {item!r}, want len:seqs:recall:share"
            )
        end += float(parts[3])
        stages.append((int(parts[0]), int(parts[1]), float(parts[2]), end))
    return [(n, b, r, e / end) for n, b, r, e in stages]


def current_stage(progress, stages):
    for stage in stages:
        if progress < stage[3]:
            return stage
    return stages[-1]


def train(args):
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t_start = time.time()

    root, train_files, held = split_corpus(args.stdlib)
    print(
        f"stdlib {root}: {len(train_files)} train files, {len(held)} held out",
        flush=True,
    )
    if args.init_from:
        tok = Tokenizer.from_file(str(Path(args.init_from) / "tokenizer.json"))
    elif args.tokenizer:
        tok = Tokenizer.from_file(args.tokenizer)
    else:
        tok = train_tokenizer([t for _, t in train_files], args.vocab)
    stream = token_stream(tok, train_files)
    held_stream = token_stream(tok, held)
    rng = random.Random(args.seed)
    chats = chat_examples(tok, train_files, rng)
    print(
        f"tokenizer {tok.get_vocab_size()} ids; {len(stream)} train tokens; "
        f"{len(chats)} chat examples; setup {time.time() - t_start:.0f}s",
        flush=True,
    )

    cfg = make_config(args, tok)
    if args.init_from:
        model, _ = load_folder(Path(args.init_from), args.dropout)
        model.train()
        cfg = model.cfg
    else:
        model = TinyLlama(cfg, args.dropout)
        init_weights(model, args.seed)
        if args.wire_induction:
            wire_induction(model, args.seed)
    model.to(args.device)
    # bfloat16 matmuls on a GPU; the CPU keeps float32, where the BLAS is fastest
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.device == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    plain = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.1},
            {"params": plain, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    stages = parse_stages(args.curriculum)
    data = Batches(tok, stream, chats, rng)
    eval_data = Batches(tok, held_stream, chats, random.Random(args.seed + 2))

    t_train = time.time()
    step, tokens_seen, last_save = 0, 0, t_train
    while True:
        elapsed = time.time() - t_train
        progress = elapsed / args.time_budget if args.steps == 0 else step / args.steps
        if progress >= 1.0:
            break
        n, size, recall_frac, _ = current_stage(progress, stages)
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, answer_w = data.batch(
            size, n, recall_frac, args.chat_frac, args.repeat_frac
        )
        ids, answer_w = ids.to(args.device), answer_w.to(args.device)
        with autocast:
            logits = model(ids[:, :-1])
        per_tok = F.cross_entropy(
            logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
        ).view(size, n - 1)
        lm_loss = per_tok.mean()
        answer_loss = (per_tok * answer_w).sum() / answer_w.sum().clamp(min=1.0)
        loss = lm_loss + args.answer_weight * answer_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += size * n
        if step % args.log_every == 0:
            rate = tokens_seen / (time.time() - t_train)
            print(
                f"step {step} len {n} lr {lr:.2e} lm {lm_loss.item():.3f} "
                f"answer {answer_loss.item():.3f} tok/s {rate:.0f} "
                f"elapsed {time.time() - t_train:.0f}s",
                flush=True,
            )
        if time.time() - last_save > args.save_every:
            model.eval()
            with torch.no_grad():
                val_ids, val_w = eval_data.batch(4, n, 1.0, 0.0)
                val_ids, val_w = val_ids.to(args.device), val_w.to(args.device)
                val_logits = model(val_ids[:, :-1])
                hits = (
                    (val_logits.argmax(-1) == val_ids[:, 1:])[val_w > 0].float().mean()
                )
                val = F.cross_entropy(
                    val_logits.flatten(0, 1), val_ids[:, 1:].flatten()
                )
            model.train()
            export_folder(model, tok, out)
            last_save = time.time()
            print(
                f"checkpoint step {step}: held-out loss {val:.3f} digit acc {hits:.2f}",
                flush=True,
            )

    train_seconds = time.time() - t_train
    export_folder(model, tok, out)
    card = {
        "model": "Llama-architecture demo model trained from scratch by benchmarks/train_demo_model.py",
        "architecture": {
            k: cfg[k] for k in cfg if k not in ("architectures", "use_cache")
        },
        "training": {
            "seed": args.seed,
            "steps": step,
            "tokens_seen": tokens_seen,
            "train_seconds": round(train_seconds, 1),
            "setup_seconds": round(t_train - t_start, 1),
            "time_budget_seconds": args.time_budget,
            "curriculum": args.curriculum,
            "initialized_from": args.init_from,
            "wired_induction_start": args.wire_induction,
            "optimizer": f"AdamW lr {args.lr} betas (0.9, 0.95) wd 0.1, warmup {args.warmup}, cosine to 10%",
            "answer_loss_weight": args.answer_weight,
            "chat_fraction": args.chat_frac,
            "repeat_fraction": args.repeat_frac,
            "dropout": args.dropout,
            "hardware": {
                "cpu": cpu_name(),
                "torch_threads": args.threads,
                "gpu": (
                    torch.cuda.get_device_name() if args.device == "cuda" else None
                ),
                "torch": torch.__version__,
            },
        },
    }
    return card


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default=str(DEFAULT_OUT), help="folder for the exported model"
    )
    p.add_argument(
        "--card", default=str(DEFAULT_CARD), help="JSON file for the measured numbers"
    )
    p.add_argument(
        "--eval-only", action="store_true", help="re-measure the card from --out"
    )
    p.add_argument("--time-budget", type=float, default=3300.0, help="training seconds")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="fixed step count (overrides --time-budget)",
    )
    p.add_argument(
        "--curriculum",
        default="128:16:0.3:0.25,512:4:0.3:0.25,1024:2:0.3:0.2,2048:1:0.3:0.3",
        help="stages len:batch_seqs:recall_fraction:time_share, in order",
    )
    p.add_argument(
        "--init-from", help="start from the weights and tokenizer of this folder"
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--chat-frac", type=float, default=0.1)
    p.add_argument(
        "--repeat-frac",
        type=float,
        default=0.3,
        help="share of repeated-code sequences",
    )
    p.add_argument("--answer-weight", type=float, default=1.0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument(
        "--tokenizer", help="reuse this tokenizer.json instead of training one"
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=4096, help="max_position_embeddings")
    p.add_argument(
        "--rope-theta",
        type=float,
        default=1e6,
        help="RoPE base; a large one leaves more slowly turning dimensions for "
        "matching content thousands of tokens apart",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to train and evaluate on",
    )
    p.add_argument(
        "--stdlib",
        help="stdlib folder to read instead of the running interpreter's "
        "(a copy of another Python's, for the same corpus on another machine)",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="residual dropout while training (the exported model has none)",
    )
    p.add_argument(
        "--wire-induction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start layers 0-1 as an induction circuit (see wire_induction)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--save-every", type=float, default=300.0, help="checkpoint period, seconds"
    )
    p.add_argument("--eval-ctx", type=int, default=2048)
    p.add_argument("--min-gap", type=int, default=1500)
    p.add_argument("--recall-trials", type=int, default=200)
    p.add_argument(
        "--no-eval", action="store_true", help="skip evaluation after training"
    )
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    card_path = Path(args.card)
    if args.eval_only:
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
    else:
        previous = json.loads(card_path.read_text()) if card_path.exists() else {}
        card = train(args)
        if args.init_from and "training" in previous:
            card["training"]["continues"] = previous["training"]
        if args.no_eval:
            card_path.write_text(json.dumps(card, indent=2) + "\n")
            return
    card = evaluate(Path(args.out), args, card)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
