"""Upstream mlx-lm's own unit tests, run against this package.

Downloads the mlx-lm source distribution (``--version``, 0.32.2) from the
package index, unpacks its ``tests/`` into a scratch folder outside this
repository, and runs each file there with ``python -m unittest`` and this
checkout first on the path. Hugging Face downloads are switched off
(``HF_HUB_OFFLINE=1``), except that the model most of the suite loads
(``mlx-community/Qwen1.5-0.5B-Chat-4bit``) is replaced by a tiny random
4-bit qwen2 folder with the test tokenizer: tests that check what that model
writes fail with it, the rest run. A test that needs another hub model errors
at once and is counted as "needs the hub", not as a failure of ours.

Prints, per file: passed, failed, errors, skipped, needs-the-hub, and the
first import error when a file cannot even load; writes the JSON with every
failing test's id and the last line of its error.

    python benchmarks/bench_upstream_tests.py --json benchmarks/results/upstream_tests.json
    python benchmarks/bench_upstream_tests.py --files test_sample_utils.py test_generate.py
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "mlx_lm" / "upstream-sdist"
HUB_ERRORS = (
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "offline mode",
    "HF_HUB_OFFLINE",
    "We couldn't connect",
    "Cannot find an appropriate cached snapshot",
    "not found locally",
)
# Failures that are deliberate: an architecture this fork does not ship, or a
# private helper of upstream's (a leading underscore) that tests pin.
DELIBERATE = {
    "architecture not shipped": re.compile(
        r"cannot import name '\w+' from 'mlx_lm\.models'|No module named 'mlx_lm\.models\."
    ),
    "private helper": re.compile(r"has no attribute '_\w+'|cannot import name '_\w+'"),
}
RESULT = re.compile(r"^(test\w*) \(([\w.]+)\)[^\n]*? \.\.\. (ok|FAIL|ERROR|skipped.*)$")


def fetch_tests(version: str) -> Path:
    """The sdist's tests folder, unpacked under the user cache."""
    target = CACHE / f"mlx_lm-{version}"
    if (target / "tests").is_dir():
        return target / "tests"
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        + [f"mlx-lm=={version}", "-d", str(CACHE), "-q"],
        check=True,
    )
    with tarfile.open(CACHE / f"mlx_lm-{version}.tar.gz") as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name]
        tar.extractall(CACHE, members=members, filter="data")
    return target / "tests"


def sections(output: str):
    """``{test id: error text}`` from unittest's failure sections."""
    found = {}
    for block in re.split(r"\n={50,}\n", output)[1:]:
        head, _, rest = block.partition("\n")
        match = re.match(r"(?:FAIL|ERROR): (\w+) \(([\w.]+)\)", head)
        if match:
            # Between the header's rule and the summary's (in the last block).
            text = rest.split("-" * 70 + "\n", 1)[-1].split("\n" + "-" * 70, 1)[0]
            test, where = match.groups()
            key = where if where.endswith(f".{test}") else f"{where}.{test}"
            found[key] = text.strip()
    return found


STAND_INS = ("mlx-community/Qwen1.5-0.5B-Chat-4bit",)

# Loaded by the interpreter of every test run (the scratch folder is on its
# path): hub ids of STAND_INS resolve to the local tiny folder.
HUB_SHIM = """
import json, os
import huggingface_hub

_local = json.loads(os.environ["UPSTREAM_TESTS_LOCAL_MODELS"])
_download = huggingface_hub.snapshot_download


def snapshot_download(repo_id, *args, **kwargs):
    if repo_id in _local:
        return _local[repo_id]
    return _download(repo_id, *args, **kwargs)


huggingface_hub.snapshot_download = snapshot_download
"""


def write_stand_in(path: Path) -> Path:
    """A two-layer qwen2 with random 4-bit weights and the test tokenizer."""
    import mlx_lm  # noqa: F401 isort: skip
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_lm.utils import (
        copy_tokenizer_files,
        get_model_classes,
        save_config,
        save_model,
    )

    tokenizer = ROOT / "tests" / "fixtures" / "tokenizers" / "bpe"
    vocab = len(
        json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    )
    config = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab + 16,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "quantization": {"group_size": 64, "bits": 4},
    }
    model_class, args_class = get_model_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    nn.quantize(model, 64, 4)
    save_model(path, model)
    save_config(config, path / "config.json")
    copy_tokenizer_files(tokenizer, path)
    return path


def run_file(folder: Path, name: str, timeout: float, local: dict) -> dict:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=f"{ROOT}{os.pathsep}{folder}",
        UPSTREAM_TESTS_LOCAL_MODELS=json.dumps(local),
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "unittest", "-v", name[:-3]],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = done.stderr
    except subprocess.TimeoutExpired as e:
        output = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else ""
        output += f"\nTIMEOUT after {timeout} s"
    errors = sections(output)
    counts = dict(passed=0, failed=0, errors=0, skipped=0, hub=0)
    failing = {}
    load_error = None
    for line in output.splitlines():
        match = RESULT.match(line.strip())
        if not match:
            continue
        test, where, outcome = match.groups()
        # Python 3.11 names the test inside the parentheses too.
        key = where if where.endswith(f".{test}") else f"{where}.{test}"
        text = errors.get(key, "")
        if "_FailedTest" in where:
            # The file (or a class of it) did not import.
            raised = [
                l for l in text.splitlines() if re.match(r"\w+(Error|Exception)", l)
            ]
            load_error = (raised or ["?"])[-1][:300]
            continue
        if outcome == "ok":
            counts["passed"] += 1
        elif outcome.startswith("skipped"):
            counts["skipped"] += 1
        elif any(h in text for h in HUB_ERRORS):
            counts["hub"] += 1
        else:
            counts["failed" if outcome == "FAIL" else "errors"] += 1
            failing[key] = (text.strip().splitlines() or [""])[-1][:300]
    if load_error is None and not any(counts.values()):
        lines = [line for line in output.strip().splitlines() if line.strip()]
        load_error = (lines or ["no output"])[-1][:300]
    reasons = {}
    for key, line in failing.items():
        why = next((k for k, r in DELIBERATE.items() if r.search(line)), "to fix")
        reasons[why] = reasons.get(why, 0) + 1
    return {**counts, "failing": failing, "why": reasons, "load_error": load_error}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version", default="0.32.2")
    p.add_argument("--files", nargs="*", default=None, help="default: every test_*.py")
    p.add_argument("--timeout", type=float, default=600, help="seconds per file")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    tests = fetch_tests(a.version)
    names = a.files or sorted(f.name for f in tests.glob("test_*.py"))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "tests"
        folder.mkdir()
        for f in tests.iterdir():
            if f.is_file():
                (folder / f.name).write_bytes(f.read_bytes())
        (folder / "sitecustomize.py").write_text(HUB_SHIM)
        stand_in = str(write_stand_in(Path(scratch) / "qwen2-tiny-4bit"))
        local = dict.fromkeys(STAND_INS, stand_in)
        results = {}
        for name in names:
            results[name] = run_file(folder, name, a.timeout, local)
            r = results[name]
            print(
                f"{name:28s} passed {r['passed']:3d}  failed {r['failed']:3d}  "
                f"errors {r['errors']:3d}  skipped {r['skipped']:3d}  "
                f"hub {r['hub']:3d}"
                + (f"  LOAD: {r['load_error']}" if r["load_error"] else ""),
                flush=True,
            )
    total = {
        k: sum(r[k] for r in results.values())
        for k in ("passed", "failed", "errors", "skipped", "hub")
    }
    runnable = total["passed"] + total["failed"] + total["errors"]
    why = {}
    for r in results.values():
        for k, n in r["why"].items():
            why[k] = why.get(k, 0) + n
    total["why"] = why
    print(
        f"total: {total['passed']} passed of {runnable} runnable here "
        f"({total['failed']} failed, {total['errors']} errors); {total['skipped']} "
        f"skipped, {total['hub']} need the hub; "
        f"{sum(bool(r['load_error']) for r in results.values())} files did not load"
    )
    print(
        "failing, by reason: " + ", ".join(f"{n} {k}" for k, n in sorted(why.items()))
    )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"version": a.version, "total": total, "files": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
