"""KV quantization methods: each one a codec (encode, decode) in its own module,
all held by :class:`~mlx_lm.models.cache.CodecKVCache`.

Zero-calibration methods work on any model as is; calibrated ones read
artifacts that ``python -m mlx_lm.calibrate_kv`` writes (an
:class:`NpyArtifactStore` folder). Values are held by a codec of their own:
float16 at ``value_bits=16``, affine groups under ``method="affine"``, else the
TurboQuant scalar codec (one pass) at ``value_bits``.
"""

import json
import os
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from .codec import AffineCodec, Codec, Float16Codec, pack, unpack
from .commvq import CommVQCodec
from .outliers import KeyNormObserver, OutlierCodec
from .polarquant import PolarQuantCodec
from .qjl import QJLCodec
from .rabitq import RaBitQCodec
from .ratequant import RateQuantCodec, allocate_bits, logit_errors
from .spectral import SpectralCodec, calibrate_spectral_rotation
from .turboquant import TurboQuantCodec
from .vecinfer import VecInferCodec

ZERO_CALIBRATION_METHODS = ("turboquant_rvq", "qjl", "polarquant", "rabitq")
CALIBRATED_METHODS = ("vecinfer", "spectral", "ratequant", "commvq")
KV_METHODS = ZERO_CALIBRATION_METHODS + CALIBRATED_METHODS + ("affine",)
_CODECS = {
    c.name: c
    for c in (
        TurboQuantCodec,
        QJLCodec,
        PolarQuantCodec,
        RaBitQCodec,
        VecInferCodec,
        SpectralCodec,
        RateQuantCodec,
        CommVQCodec,
        AffineCodec,
        Float16Codec,
    )
}
# Under outlier_observer, any method's codec is wrapped; files name it
# "outliers".
_CODECS["outliers"] = OutlierCodec
# The key widths (bits per value) each method accepts.
METHOD_BITS = {
    "turboquant_rvq": range(1, 9),
    "qjl": range(1, 9),
    "polarquant": range(1, 8),
    "rabitq": range(1, 9),
    "vecinfer": range(1, 5),
    "spectral": range(1, 9),
    "ratequant": range(1, 9),
    "commvq": range(1, 5),
    "affine": (2, 3, 4, 5, 6, 8),
}
VALUE_BITS = (1, 2, 3, 4, 5, 6, 8, 16)


class NpyArtifactStore:
    """A folder of calibration artifacts: ``manifest.json`` (method and its
    settings) and ``layer_NNN/<name>.npy``, one array per file."""

    def __init__(self, path: str):
        self.path = os.fspath(path)

    @property
    def manifest(self) -> Dict:
        name = os.path.join(self.path, "manifest.json")
        if not os.path.exists(name):
            raise ValueError(f"{self.path!r} holds no calibration (no manifest.json)")
        with open(name) as f:
            return json.load(f)

    def layer(self, index: int) -> Dict[str, mx.array]:
        folder = os.path.join(self.path, f"layer_{index:03d}")
        if not os.path.isdir(folder):
            raise ValueError(f"calibration {self.path!r} has no layer {index}")
        return {
            name[:-4]: mx.array(np.load(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder))
            if name.endswith(".npy")
        }

    def save(self, manifest: Dict, layers):
        """Write ``manifest`` and one dict of arrays per layer."""
        os.makedirs(self.path, exist_ok=True)
        for i, arrays in enumerate(layers):
            folder = os.path.join(self.path, f"layer_{i:03d}")
            os.makedirs(folder, exist_ok=True)
            for name, array in arrays.items():
                a = np.array(
                    array.astype(mx.float32) if array.dtype == mx.bfloat16 else array
                )
                np.save(os.path.join(folder, f"{name}.npy"), a)
        with open(os.path.join(self.path, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)


def _artifacts(config, layer: int) -> Optional[Dict[str, mx.array]]:
    """Calibration of ``layer`` from ``config.calibration`` and the per-layer
    lists of the config's own fields."""
    found = {}
    if config.calibration is not None:
        store = config.calibration
        if not isinstance(store, NpyArtifactStore):
            store = NpyArtifactStore(store)
        made_for = store.manifest.get("method")
        if made_for != config.method:
            raise ValueError(
                f"calibration {store.path!r} was made for {made_for!r}, not "
                f"method={config.method!r}"
            )
        if (
            config.method in ("vecinfer", "ratequant")
            and store.manifest.get("bits") != config.bits
        ):
            raise ValueError(
                f"calibration {store.path!r} was made for bits="
                f"{store.manifest.get('bits')}, not bits={config.bits}"
            )
        found = store.layer(layer)
    per_layer = {
        "smooth_factors": "smooth_factors",
        "rotations": "rotations",
        "codebook": {"vecinfer": "codebooks", "commvq": "magnitude_codebooks"}.get(
            config.method
        ),
    }
    for field, name in per_layer.items():
        given = getattr(config, field)
        if given is None:
            continue
        if field == "codebook" and name is None:
            # One codebook of 2**bits levels for every layer (turboquant_rvq).
            found["codebook"] = mx.array(given, dtype=mx.float32)
        else:
            found[name] = mx.array(given[layer])
    return found or None


def key_codec(config, head_dim: int, layer: int = 0) -> Codec:
    """The codec of ``config.method`` for the keys of ``layer``, its outlier
    channels held apart when ``config.outlier_observer`` picks them."""
    codec = _method_codec(config, head_dim, layer)
    observer = config.outlier_observer
    if observer is None:
        return codec
    return OutlierCodec(head_dim, codec, observer.num_channels, config.outlier_bits)


def _method_codec(config, head_dim: int, layer: int) -> Codec:
    method, bits, seed = config.method, config.bits, config.seed + layer
    artifacts = _artifacts(config, layer)
    if method == "turboquant_rvq":
        return TurboQuantCodec(
            head_dim,
            bits,
            config.num_residuals,
            config.use_hadamard,
            seed,
            artifacts=artifacts,
        )
    if method == "qjl":
        return QJLCodec(head_dim, bits, config.sketch_dim, seed, artifacts=artifacts)
    if method == "polarquant":
        return PolarQuantCodec(
            head_dim, bits, config.use_hadamard, seed, artifacts=artifacts
        )
    if method == "rabitq":
        return RaBitQCodec(
            head_dim,
            bits,
            config.num_clusters,
            config.use_hadamard,
            seed,
            artifacts=artifacts,
        )
    if method == "vecinfer":
        return VecInferCodec(
            head_dim,
            bits,
            config.num_subspaces,
            config.use_hadamard,
            seed,
            artifacts=artifacts,
        )
    if method == "spectral":
        return SpectralCodec(
            head_dim, bits, config.signal_bits, config.noise_bits, artifacts=artifacts
        )
    if method == "ratequant":
        if config.bit_allocation is not None:
            bits = config.bit_allocation[layer]
        elif config.calibration is not None:
            bits = NpyArtifactStore(config.calibration).manifest["bit_allocation"][
                layer
            ]
        else:
            raise ValueError(
                "method 'ratequant' is calibrated: pass bit_allocation (bits per "
                "layer) or calibration=<folder of python -m mlx_lm.calibrate_kv>"
            )
        return RateQuantCodec(head_dim, bits, config.use_hadamard, seed)
    if method == "commvq":
        return CommVQCodec(head_dim, bits, seed, artifacts=artifacts)
    if method == "affine":
        return AffineCodec(head_dim, bits, config.kv_group_size or 64)
    raise ValueError(f"method must be one of {list(KV_METHODS)}, got {method!r}")


def value_codec(config, head_dim: int, layer: int = 0) -> Codec:
    """The codec of the values of ``layer`` (``value_bits``; 16: float16)."""
    if config.value_bits == 16:
        return Float16Codec(head_dim)
    if config.method == "affine":
        return AffineCodec(head_dim, config.value_bits, config.kv_group_size or 64)
    # A seed apart from the keys': the two rotations are independent.
    return TurboQuantCodec(
        head_dim, config.value_bits, 1, config.use_hadamard, config.seed + 7919 + layer
    )


def rebuild_codec(name: str, head_dim: int, settings: Dict, artifacts) -> Codec:
    """A codec from what :attr:`Codec.settings` and :attr:`Codec.artifacts` held."""
    if isinstance(settings, dict) and "inner" in settings:
        name = "outliers"
    if name not in _CODECS:
        raise ValueError(f"unknown KV codec {name!r}; known: {sorted(_CODECS)}")
    return _CODECS[name](head_dim, **settings, artifacts=dict(artifacts or {}))
