import sys
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
sys.path.insert(0, str(here / "mlx_lm"))
from _version import __version__  # noqa: E402

requirements = [
    "mlx>=0.31.2",
    "numpy",
    "transformers>=4.45",
    "huggingface-hub",
    "sentencepiece",
    "jinja2",
    "protobuf",
    "safetensors",
    "gguf",
]

setup(
    name="mlx-lm",
    version=__version__,
    description="mlx-lm fork: long-context generation in bounded KV-cache memory",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["mlx_lm", "mlx_lm.*"]),
    package_data={"mlx_lm": ["demo_model/*"]},
    include_package_data=True,
    install_requires=requirements,
    extras_require={
        "cpu": ["mlx[cpu]"],
        "cuda13": ["mlx[cuda13]"],
        "test": ["openai", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "mlx_lm.generate = mlx_lm.generate:main",
            "mlx_lm.convert = mlx_lm.convert:main",
            "mlx_lm.cache_prompt = mlx_lm.cache_prompt:main",
            "mlx_lm.server = mlx_lm.server:main",
            "mlx_lm.calibrate_kv = mlx_lm.calibrate_kv:main",
        ]
    },
)
