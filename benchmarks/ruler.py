"""RULER-style long-context tasks, built locally from text this machine has.

Every task is a prompt of about a given number of tokens and the strings a
correct answer contains. Haystacks are natural English (Python's ``pydoc_data``
topics and the licence texts under ``/usr/share/common-licenses``) or RULER's
repeated-noise filler. The tasks follow RULER (arXiv 2404.06654): needles
with number or word values, several keys (one asked), several values under
one key, several keys asked at once, variable tracking, common-word
frequency, and a question about a fact stated in a document. A reply scores
the fraction of the expected strings it contains (case-insensitive).
"""

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

LICENCES = Path("/usr/share/common-licenses")

NOISE = (
    "The grass is green. The sky is blue. The sun is yellow. "
    "Here we go. There and back again. "
)

# Keys and word values; all are single common words, so that a tokenizer
# splits none of them into many pieces.
WORDS = (
    "apple anchor badge basket beacon blanket bottle bridge candle canyon "
    "carpet castle cello cherry cloud comet copper cotton crystal desert "
    "dragon eagle ember falcon feather forest fountain garden glacier hammer "
    "harbor helmet island jacket jungle kettle ladder lantern lemon marble "
    "meadow mirror monkey needle orchid otter paddle pepper pillow planet "
    "pocket puzzle rabbit ribbon river rocket saddle salmon shadow silver "
    "spider spoon statue tiger tomato tunnel velvet violin walnut whistle "
    "willow window winter wizard zebra"
).split()


@dataclass
class Task:
    name: str
    prompt: list  # token ids
    expected: list  # strings the reply must contain
    max_tokens: int
    depth: int = -1  # percent of the haystack before the (first) needle
    meta: dict = field(default_factory=dict)

    def score(self, reply: str) -> float:
        reply = reply.lower()
        return sum(e.lower() in reply for e in self.expected) / len(self.expected)


def essay_paragraphs():
    """Paragraphs of English prose: pydoc topics, then licence texts."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    if LICENCES.is_dir():
        texts += [p.read_text(errors="ignore") for p in sorted(LICENCES.iterdir())]
    paragraphs = []
    for text in texts:
        for block in re.split(r"\n\s*\n", text):
            block = " ".join(block.split())
            # Prose only: skip code listings, grammar rules and tables.
            if len(block) > 80 and sum(c.isalpha() for c in block) > 0.7 * len(block):
                paragraphs.append(block)
    return paragraphs


class Haystacks:
    """Filler text of a given token length, cut at paragraph (or sentence)
    boundaries, with tokens counted once per paragraph."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.paragraphs = essay_paragraphs()
        self.lengths = [self.count(p + "\n") for p in self.paragraphs]
        self.noise_tokens = self.count(NOISE)

    def count(self, text):
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def essay(self, n_tokens, rng):
        """Consecutive paragraphs from a random start, wrapping around; the
        last one cut to the words that fill ``n_tokens``."""
        start = rng.randrange(len(self.paragraphs))
        out, total, i = [], 0, start
        while total < n_tokens:
            paragraph, size = self.paragraphs[i], self.lengths[i]
            if total + size > n_tokens:
                words = paragraph.split()
                n = -(-(n_tokens - total) * len(words) // size)
                paragraph = " ".join(words[:n]).rstrip(".,;:") + "."
            out.append(paragraph)
            total += size
            i = (i + 1) % len(self.paragraphs)
        return out

    def noise(self, n_tokens):
        return [NOISE.strip()] * max(1, n_tokens // self.noise_tokens)


def _plant(chunks, needles, depths):
    """Insert each needle as its own line at its depth (percent of the
    characters), at the sentence end nearest to it: a paragraph is split
    there when the depth falls inside one."""
    chunks = list(chunks)
    for depth, needle in sorted(zip(depths, needles), reverse=True):
        target = depth / 100 * sum(len(c) + 1 for c in chunks)
        seen = 0
        for i, chunk in enumerate(chunks):
            if seen + len(chunk) + 1 >= target:
                break
            seen += len(chunk) + 1
        ends = [0, len(chunk)] + [m.end() for m in re.finditer(r"[.;!?] ", chunk)]
        cut = min(ends, key=lambda e: abs(seen + e - target))
        head, tail = chunk[:cut].rstrip(), chunk[cut:].lstrip()
        chunks[i : i + 1] = [x for x in (head, needle, tail) if x]
    return chunks


def _number(rng):
    return str(rng.randrange(1_000_000, 10_000_000))


def _keys(rng, n):
    return rng.sample(WORDS, n)


class TaskBuilder:
    """Builds prompts of about ``length`` tokens for one model.

    ``chat``: ask through the tokenizer's chat template (instruct models),
    the reply's first words given as the start of the assistant turn; else
    a plain completion cue after the question (base models).
    """

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer = tokenizer
        self.chat = chat
        self.hay = Haystacks(tokenizer)

    def encode(self, intro, chunks, question, cue):
        context = "\n".join(chunks)
        if self.chat:
            messages = [
                {"role": "user", "content": f"{intro}\n\n{context}\n\n{question}"}
            ]
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer.encode(text + cue, add_special_tokens=False)
        text = f"{intro}\n\n{context}\n\n{question}\nAnswer: {cue}"
        return self.tokenizer.encode(text)

    def _fill(self, length, fixed_text, haystack, rng):
        room = length - self.hay.count(fixed_text) - (24 if self.chat else 8)
        if room < 64:
            raise ValueError(f"context {length} is too short for the task")
        if haystack == "noise":
            return self.hay.noise(room)
        return self.hay.essay(room, rng)

    def niah(self, length, rng, depth, n_keys=1, n_values=1, n_asked=1, **kw):
        """Needles "The special magic number for KEY is: VALUE." in a haystack;
        ``n_keys`` keys (the others are distractors), ``n_values`` values
        under each, ``n_asked`` keys asked."""
        haystack = kw.get("haystack", "essay")
        kind = kw.get("value", "number")
        keys = _keys(rng, n_keys)
        make = (lambda: _number(rng)) if kind == "number" else None
        pool = [w for w in WORDS if w not in keys]
        values = {
            k: [
                make() if make else pool.pop(rng.randrange(len(pool)))
                for _ in range(n_values)
            ]
            for k in keys
        }
        noun = "special magic number" if kind == "number" else "special magic word"
        needles, depths = [], []
        for i, k in enumerate(keys):
            for v in values[k]:
                needles.append(f"One of the {noun}s for {k} is: {v}.")
                single = n_keys * n_values == 1
                depths.append(depth if single else rng.uniform(5, 95))
        asked = keys[:n_asked]
        rng.shuffle(needles)
        intro = (
            f"A few {noun}s are hidden in the text below. Remember them: "
            "you will be asked about them afterwards."
        )
        if n_asked == 1 and n_values == 1:
            question = f"What is the {noun} for {asked[0]} mentioned in the text?"
            cue = f"The {noun} for {asked[0]} mentioned in the text is"
        else:
            names = ", ".join(asked)
            question = f"What are all the {noun}s for {names} mentioned in the text?"
            cue = f"The {noun}s for {names} mentioned in the text are"
        fixed = intro + question + cue + " ".join(needles)
        chunks = _plant(self._fill(length, fixed, haystack, rng), needles, depths)
        expected = [v for k in asked for v in values[k]]
        max_tokens = 8 + 10 * len(expected)
        return self.encode(intro, chunks, question, cue), expected, max_tokens

    def variable_tracking(self, length, rng, depth, hops=4):
        """A chain VAR A = 12345, VAR B = VAR A, ... hidden in noise; name
        every variable that holds the value."""
        names = [
            "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            for _ in range(hops + 1)
        ]
        value = str(rng.randrange(10_000, 100_000))
        lines = [f"VAR {names[0]} = {value}."]
        lines += [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
        intro = "Remember the variable assignments in the text below; you will be asked about them."
        question = f"Which variables are assigned the value {value}, directly or through other variables?"
        cue = f"The variables assigned the value {value} are:"
        fixed = intro + question + cue + " ".join(lines)
        filler = self._fill(length, fixed, "noise", rng)
        spots = sorted(rng.uniform(5, 95) for _ in lines)
        chunks = _plant(filler, lines, spots)
        return self.encode(intro, chunks, question, cue), names, 8 + 6 * len(names)

    def common_words(self, length, rng, depth, n_common=5):
        """A numbered list of words where ``n_common`` of them recur far more
        often than the rest; name those."""
        words = rng.sample(WORDS, len(WORDS))
        common, rare = words[:n_common], words[n_common:]
        intro = "Below is a numbered list of words. Some words appear much more often than the others."
        question = f"What are the {n_common} most common words in the list above?"
        cue = f"The {n_common} most common words in the list are:"
        per_item = self.hay.count("12. lantern\n")
        room = length - self.hay.count(intro + question + cue) - 24
        n_items = max(40, room // per_item)
        items = []
        for _ in range(n_items):
            pick = rng.random() < 0.35
            items.append(rng.choice(common) if pick else rng.choice(rare))
        chunks = [f"{i + 1}. {w}" for i, w in enumerate(items)]
        return self.encode(intro, chunks, question, cue), common, 8 + 5 * n_common

    def question_answering(self, length, rng, depth):
        """A document of prose with one stated fact and a question on it."""
        person = rng.choice(["Elsa", "Marco", "Priya", "Tomas", "Ingrid", "Kofi"])
        surname = rng.choice(["Brandt", "Okafor", "Lindqvist", "Moreau", "Tanaka"])
        place = (
            rng.choice(WORDS).capitalize()
            + " "
            + rng.choice(["Island", "Valley", "Harbor"])
        )
        year = str(rng.randrange(1700, 1950))
        fact = (
            f"The lighthouse on {place} was built in {year} by an engineer "
            f"named {person} {surname}."
        )
        intro = "Answer the question using the document below."
        question = f"Who built the lighthouse on {place}?"
        cue = f"The lighthouse on {place} was built by"
        chunks = _plant(
            self._fill(length, intro + question + cue + fact, "essay", rng),
            [fact],
            [depth],
        )
        return self.encode(intro, chunks, question, cue), [surname], 16


# name -> (builder method, options). One per RULER category; needles in the
# noise and in prose, with number and word values.
TASKS = {
    "niah_noise_number": ("niah", {"haystack": "noise"}),
    "niah_essay_number": ("niah", {}),
    "niah_essay_word": ("niah", {"value": "word"}),
    "niah_multikey": ("niah", {"n_keys": 4}),
    "niah_multivalue": ("niah", {"n_values": 4}),
    "niah_multiquery": ("niah", {"n_keys": 4, "n_asked": 2}),
    "variable_tracking": ("variable_tracking", {}),
    "common_words": ("common_words", {}),
    "qa": ("question_answering", {}),
}


def build_tasks(tokenizer, chat, length, trials, seed, names=None, depths=(10, 50, 90)):
    """``trials`` prompts of about ``length`` tokens for each task in
    ``names`` (default: all), the depth cycling through ``depths``."""
    builder = TaskBuilder(tokenizer, chat)
    tasks = []
    for name in names or TASKS:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
        method, options = TASKS[name]
        for trial in range(trials):
            rng = random.Random(f"{seed}-{name}-{length}-{trial}")
            depth = depths[trial % len(depths)]
            prompt, expected, max_tokens = getattr(builder, method)(
                length, rng, depth, **options
            )
            tasks.append(Task(name, prompt, expected, max_tokens, depth))
    return tasks
