"""Put an optimized BLAS in front of the reference BLAS of MLX's Linux CPU wheel.

The ``mlx[cpu]`` wheel links ``libmlx.so`` against a plain reference BLAS, which
makes float32 matrix products an order of magnitude slower than they could be.
``libmlx.so`` only needs the standard ``cblas_*`` symbols, and the dynamic linker
resolves them in the global namespace first.  So if a library exporting them
(OpenBLAS, MKL) is opened with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported,
MLX binds to it instead of its bundled copy.

This module does that once, at import time, on Linux only.  Environment:

- ``MLX_LM_NO_BLAS=1``: do nothing.
- ``MLX_LM_BLAS=/path/to/lib.so``: use this library instead of searching.

``blas_info()`` tells what happened.
"""

import ctypes
import ctypes.util
import glob
import os
import platform
import sys

_info = {"path": None, "loaded": False, "reason": "not attempted"}


def _candidates():
    """Yield library paths or sonames to try, best first."""
    triplet = f"{platform.machine()}-linux-gnu"
    for flavour in ("openblas-pthread", "openblas-openmp", "openblas-serial"):
        yield f"/usr/lib/{triplet}/{flavour}/libopenblas.so.0"
    yield f"/usr/lib/{triplet}/libopenblas.so.0"
    # Fedora / RHEL (pthread build first), then Arch, Alpine and friends.
    yield "/usr/lib64/libopenblasp.so.0"
    yield "/usr/lib64/libopenblas.so.0"
    yield "/usr/lib/libopenblas.so.0"
    # conda / venv installs of MKL or OpenBLAS.
    for pattern in ("libmkl_rt.so*", "libopenblas*.so*"):
        yield from sorted(glob.glob(os.path.join(sys.prefix, "lib", pattern)))
    found = ctypes.util.find_library("openblas")
    if found:
        yield found


def _exports_sgemm(path):
    """Open ``path`` privately; True when it has ``cblas_sgemm``."""
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError:
        return False
    return hasattr(lib, "cblas_sgemm")


def _preload():
    if not sys.platform.startswith("linux"):
        return "not Linux: MLX uses the platform BLAS"
    if os.environ.get("MLX_LM_NO_BLAS", "") not in ("", "0"):
        return "disabled by MLX_LM_NO_BLAS"
    if "mlx.core" in sys.modules:
        return "mlx.core was imported before mlx_lm; its BLAS is already bound"

    chosen = os.environ.get("MLX_LM_BLAS")
    if chosen:
        if not _exports_sgemm(chosen):
            _info["path"] = chosen
            return f"MLX_LM_BLAS={chosen} cannot be opened or has no cblas_sgemm"
        return _make_global(chosen, "chosen by MLX_LM_BLAS")
    for path in _candidates():
        if _exports_sgemm(path):
            return _make_global(path, "found on the system")
    return "no optimized BLAS exporting cblas_sgemm was found"


def _make_global(path, reason):
    # Opening it again with RTLD_GLOBAL promotes it to the global scope.
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _info["path"] = path
    _info["loaded"] = True
    return reason


def blas_info():
    """Return ``{"path", "loaded", "reason"}`` describing the BLAS preload."""
    return dict(_info)


_info["reason"] = _preload()
