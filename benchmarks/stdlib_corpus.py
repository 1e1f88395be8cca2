"""The text the demo model is trained and evaluated on, and its recall-task format.

Kept free of heavy imports so that the evaluation harness can use it without PyTorch.
The corpus is the ``*.py`` source of the Python standard library installed with the
running interpreter, test suites and site-packages left out; about 2% of the files,
chosen by a hash of their path, are held out.
"""

import hashlib
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}
HELD_OUT_PERCENT = 2

# The one fixed recall format: the plant goes on its own line somewhere in the
# code; the question closes the sequence and repeats the plant's prefix, so the
# answer is the digits that followed that prefix earlier (an induction copy).
PLANT = "\n# passkey: {key}"
QUESTION = "\n# what is the passkey?\n# passkey: "
KEY_DIGITS = 5


def stdlib_files(root=None):
    """Return (relative path, text) for every stdlib source file, sorted.

    ``root`` defaults to the running interpreter's stdlib; naming a copy of
    another interpreter's lets a machine with a different Python use the same text.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        found.append((rel.as_posix(), path))
    found.sort()
    return root, [
        (rel, p.read_text(encoding="utf-8", errors="replace")) for rel, p in found
    ]


def is_held_out(rel):
    digest = hashlib.sha256(rel.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELD_OUT_PERCENT


def split_corpus(root=None):
    root, files = stdlib_files(root)
    train = [(r, t) for r, t in files if not is_held_out(r)]
    held = [(r, t) for r, t in files if is_held_out(r)]
    return root, train, held
