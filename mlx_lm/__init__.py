"""LLM inference on MLX: load models, generate text, convert checkpoints."""

# Must stay the first import: the BLAS preload only works before mlx.core loads.
from . import _blas  # isort: skip

import warnings

# `python -m mlx_lm.convert` (or .generate) runs a module this package has
# already imported for its public functions; that is intended, so runpy's
# warning about it is noise.
warnings.filterwarnings(
    "ignore",
    message=r"'mlx_lm\.\w+' found in sys.modules after import of package 'mlx_lm'",
    category=RuntimeWarning,
)

from ._version import __version__
from .convert import convert
from .generate import batch_generate, generate, stream_generate
from .utils import load
