"""Dense CRF refinement of blended class scores (DeepLab v1/v2): pure arrays in, probabilities out.

The fully connected CRF of Krähenbühl and Koltun (2011), as DeepLab applies it after its network:

- unary energy: minus the log of the softmax of the blended logits (or of the stored probabilities);
- a Gaussian spatial kernel (`gaussian_sxy`, weight `gaussian_compat`): nearby pixels agree;
- a bilateral appearance kernel (`bilateral_sxy`, `bilateral_srgb`, weight `bilateral_compat`):
  nearby pixels of similar colour agree, so class boundaries snap to the image's edges;
- `iterations` of mean-field inference; the result is each pixel's marginal class probability.

The implementation is pydensecrf2 (Krähenbühl's C++ code with its permutohedral-lattice filtering).
The pairwise features are built here from absolute image coordinates, so a window of a large image
gets the very lattice that the whole image gets: what a window refines differs from the whole-image
result only through the pixels it cannot see. Kernels reach a few `bilateral_sxy`, and each
iteration passes messages that far again, but the influence decays quickly: with a halo of 4 x
`bilateral_sxy` (the default) a block refined alone matches the whole-image refinement on all but a
few pixels in 100,000 (tests/test_refinement.py; bench/refine.py measures 1 to 4 sigmas). This
module has no Ray and no Zarr; `refinement` runs it over a mosaic block by block.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, MissingDependencyError

HALO_SIGMAS = 4.0  # default halo, in units of the larger kernel's spatial sigma
MIN_PROBABILITY = 1e-6  # floor of stored probabilities before their log is taken
COLOUR_RANGE = (-255.0, 510.0)  # scaled colours are clipped here: outliers and fill values stay finite


@dataclass(frozen=True)
class CRFSettings:
    """The dense CRF's parameters.

    The smoothness kernel, the appearance kernel's colour sigma and weight, and the 5 iterations are
    those of pydensecrf's worked example (DeepLab v1 ran 10). The appearance kernel's spatial sigma
    is 50 px rather than that example's 80: on generated aerial scenes it gave nearly the same
    boundary accuracy (0.951 against 0.957; mIoU 0.941 against 0.936) with a 200 px halo instead of
    320, so 43% rather than 72% more pixels per 2048 px block (docs/models.md). Tune them on
    validation data: they depend on the pixel size and on how sharp the model's boundaries are.

    Args:
        iterations: mean-field iterations.
        gaussian_sxy: spatial sigma of the smoothness kernel, px.
        gaussian_compat: weight of the smoothness kernel (Potts).
        bilateral_sxy: spatial sigma of the appearance kernel, px.
        bilateral_srgb: colour sigma of the appearance kernel, in 8-bit levels (see `ColourScale`).
        bilateral_compat: weight of the appearance kernel (Potts).
        halo: pixels of context read around each block; None means 4 x the larger spatial sigma.
    """

    iterations: int = 5
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    halo: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.iterations <= 100:
            raise ConfigError(f"iterations={self.iterations}: use 1 to 100 mean-field iterations (5 is usual)")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value}: a kernel's sigma must be a positive number")
        for name in ("gaussian_compat", "bilateral_compat"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value}: a kernel's weight must be zero or positive")
        if self.halo is not None and self.halo < 0:
            raise ConfigError(f"halo={self.halo}: use a number of pixels >= 0, or leave it unset")

    @property
    def reach(self) -> int:
        """Pixels of context each block reads beyond its edges."""
        if self.halo is not None:
            return self.halo
        return math.ceil(HALO_SIGMAS * max(self.bilateral_sxy, self.gaussian_sxy))

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "halo": self.reach}


@dataclass(frozen=True)
class ColourScale:
    """Maps raw source values to the 0..255 scale that `bilateral_srgb` is measured in, the same for every window.

    The first three bands are used (one band is used three times). 8-bit images map as they are;
    others are stretched linearly between per-band low and high values fixed once per image (a
    window's own percentiles would give each block a different colour space, and seams).
    """

    low: tuple[float, float, float] = (0.0, 0.0, 0.0)
    high: tuple[float, float, float] = (255.0, 255.0, 255.0)

    @classmethod
    def from_sample(cls, sample: np.ndarray, percentiles: tuple[float, float] = (2.0, 98.0)) -> ColourScale:
        """The 2nd and 98th percentiles per band of `sample`, (C, n) raw values of valid pixels."""
        bands = _rgb_bands(sample).astype(np.float64)
        bands = bands[:, np.isfinite(bands).all(axis=0)]
        if bands.shape[1] == 0:
            return cls()
        lows, highs = np.percentile(bands, percentiles, axis=1)
        return cls(tuple(float(v) for v in lows), tuple(float(v) for v in highs))  # type: ignore[arg-type]

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(C, h, w) raw values as (h, w, 3) float32 on the 0..255 scale, clipped to COLOUR_RANGE (NaN to 0)."""
        bands = _rgb_bands(image).astype(np.float32)
        low = np.asarray(self.low, np.float32)[:, None, None]
        span = np.maximum(np.asarray(self.high, np.float32) - np.asarray(self.low, np.float32), 1e-9)[:, None, None]
        scaled = np.nan_to_num((bands - low) * (255.0 / span), nan=0.0)
        return np.ascontiguousarray(np.clip(scaled, *COLOUR_RANGE).transpose(1, 2, 0))

    def as_dict(self) -> dict[str, Any]:
        return {"low": list(self.low), "high": list(self.high)}


def _rgb_bands(values: np.ndarray) -> np.ndarray:
    return values[:3] if values.shape[0] >= 3 else np.repeat(values[:1], 3, axis=0)


def unary_energy(scores: np.ndarray, kind: str) -> np.ndarray:
    """(C, h*w) float32 minus log probabilities; nodata pixels (NaN) get 0 for every class (no opinion).

    Args:
        scores: (C, h, w) blended logits, or probabilities when `kind` is "probabilities".
    """
    c = scores.shape[0]
    s = scores.reshape(c, -1).astype(np.float32)
    nodata = np.isnan(s[0])
    s = np.where(nodata, np.float32(0), s)
    if kind == "logits":
        top = s.max(axis=0)
        log_total = np.log(np.exp(s - top).sum(axis=0))
        energy = (top + log_total) - s  # -log softmax
    elif kind == "probabilities":
        energy = -np.log(np.maximum(s, MIN_PROBABILITY))
    else:
        raise ConfigError(f"scores kind {kind!r}: expected 'logits' or 'probabilities'")
    energy[:, nodata] = 0.0
    return np.ascontiguousarray(energy, dtype=np.float32)


def pairwise_features(
    origin: tuple[int, int], shape: tuple[int, int], sxy: float, colour: np.ndarray | None = None, srgb: float = 1.0
) -> np.ndarray:
    """(d, h*w) float32 features: absolute x and y over `sxy`, then each colour channel over `srgb`."""
    (y0, x0), (h, w) = origin, shape
    ys = np.arange(y0, y0 + h, dtype=np.float64) / sxy
    xs = np.arange(x0, x0 + w, dtype=np.float64) / sxy
    rows = 2 + (0 if colour is None else colour.shape[-1])
    features = np.empty((rows, h, w), np.float32)
    features[0] = xs[None, :]
    features[1] = ys[:, None]
    if colour is not None:
        features[2:] = colour.transpose(2, 0, 1) / np.float32(srgb)
    return features.reshape(rows, -1)


def require() -> Any:
    """pydensecrf2's `densecrf` module; raises MissingDependencyError naming the fix when it is not installed."""
    try:
        from pydensecrf import densecrf
    except ImportError:
        raise MissingDependencyError(
            "dense CRF refinement needs pydensecrf2: pip install 'tessera[crf]' (it builds with a C++ compiler; "
            "on Debian: apt install g++ python3-dev)"
        ) from None
    return densecrf


def refine(
    scores: np.ndarray, kind: str, colour: np.ndarray, origin: tuple[int, int], settings: CRFSettings
) -> np.ndarray:
    """Mean-field marginals of the dense CRF over one window.

    Args:
        scores: (C, h, w) blended logits or probabilities; NaN marks nodata.
        kind: "logits" or "probabilities".
        colour: (h, w, 3) float32 appearance on the 0..255 scale (`ColourScale.apply`).
        origin: (y0, x0) of the window in the image, so every window shares one lattice.
        settings: the CRF's parameters.

    Returns:
        (C, h, w) float32 class probabilities; NaN where `scores` is NaN.
    """
    densecrf = require()
    c, h, w = scores.shape
    if colour.shape[:2] != (h, w):
        raise ValueError(f"colour {colour.shape[:2]} does not match scores {(h, w)}")
    crf = densecrf.DenseCRF(h * w, c)
    crf.setUnaryEnergy(unary_energy(scores, kind))
    crf.addPairwiseEnergy(pairwise_features(origin, (h, w), settings.gaussian_sxy), compat=settings.gaussian_compat)
    crf.addPairwiseEnergy(
        pairwise_features(origin, (h, w), settings.bilateral_sxy, colour, settings.bilateral_srgb),
        compat=settings.bilateral_compat,
    )
    q = np.asarray(crf.inference(settings.iterations), dtype=np.float32).reshape(c, h, w)
    q[:, np.isnan(scores[0])] = np.nan
    return q
