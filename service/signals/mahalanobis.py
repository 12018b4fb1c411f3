"""How far the image's penultimate features lie from the clean images of the label the model gave it.

A backdoor makes the model map triggered images of every class onto the target label through features that
clean images of that label do not have (the separation spectral signatures, activation clustering and SCAn
exploit at training time). At inference that is a distance: the squared Mahalanobis distance of the
features to the clean mean of the predicted class, under one covariance shared by the classes (Lee et al.
2018), with shrinkage towards a scaled identity so that a few hundred images per class and dead ReLU units
still give an invertible estimate. The means and the precision matrix are fitted at export on clean
calibration images that no threshold is fitted on (the STRIP bank and the repair share), from the exported
classifier's own features, and shipped as the bundle file `feature_gaussian` (hash-verified like every
file). No extra pass: the features come with the classifier's logits.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.signals.base import Prediction, Signal, SignalResult, above

if TYPE_CHECKING:
    from service.bundle import Bundle

SHRINKAGE = 0.1  # weight of the scaled identity in the shared covariance


def fit_gaussian(features: np.ndarray, labels: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """Class means (C, D) and the shrunk shared precision (D, D) of clean features (N, D) with true labels (N,).
    Every class needs at least one image (its mean is otherwise unknown, and the distance would mean nothing)."""
    f = features.astype(np.float64)
    counts = np.bincount(labels, minlength=classes)
    if (counts[:classes] == 0).any() or len(counts) > classes:
        raise ValueError(f"every one of the {classes} classes needs clean images; counts per label: {counts.tolist()}")
    means = np.stack([f[labels == c].mean(axis=0) for c in range(classes)])
    centred = f - means[labels]
    cov = centred.T @ centred / len(f)
    scale = max(float(np.trace(cov)) / len(cov), 1e-12)
    shrunk = (1 - SHRINKAGE) * cov + SHRINKAGE * scale * np.eye(len(cov))
    return {"means": means.astype(np.float32), "precision": np.linalg.inv(shrunk).astype(np.float32)}


class MahalanobisSignal(Signal):
    name = "mahalanobis"
    reference = "feature_gaussian"

    def __init__(self, means: np.ndarray, precision: np.ndarray, threshold: float | None) -> None:
        d = means.shape[-1]
        shapes = means.ndim == 2 and precision.shape == (d, d)
        if not shapes or not (np.isfinite(means).all() and np.isfinite(precision).all()):
            raise ValueError(f"feature_gaussian: means {means.shape} and precision {precision.shape} must be finite, "
                             "(C, D) and (D, D)")  # fmt: skip
        self.means, self.precision = means.astype(np.float64), precision.astype(np.float64)
        # The inverse of a covariance is symmetric positive definite; anything else gives distances that are not
        # distances (zero or negative for every image: a signal that never speaks)
        p = self.precision
        if not np.allclose(p, p.T, rtol=1e-4, atol=1e-6 * float(np.abs(p).max())) or np.linalg.eigvalsh(p).min() <= 0:
            raise ValueError("feature_gaussian: the precision must be symmetric positive definite (an inverse "
                             "covariance)")  # fmt: skip
        self.threshold = threshold

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> MahalanobisSignal:
        from service.bundle import BundleError

        with np.load(io.BytesIO(bundle.verified[cls.reference]), allow_pickle=False) as z:  # the bytes hashed at load
            means, precision = z["means"], z["precision"]
        classes = len(bundle.class_names)
        width = next(o for o in bundle.sessions["classifier"].get_outputs() if o.name == "features").shape[1]
        if means.shape[0] != classes or (isinstance(width, int) and means.shape[1] != width):
            raise BundleError(f"files.{cls.reference}: means {list(means.shape)} must be [{classes}, {width}] (the "
                              "classes, the classifier's features)")  # fmt: skip
        try:
            return cls(means, precision, threshold)
        except ValueError as err:
            raise BundleError(str(err)) from err

    @classmethod
    def fit_reference(
        cls, classify: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], images: np.ndarray, labels: np.ndarray,
        classes: int, path: Path,
    ) -> None:  # fmt: skip
        """Fit the reference from clean images with their true labels and write it to `path` (.npz)."""
        features = np.concatenate([classify(images[i : i + 256])[1] for i in range(0, len(images), 256)])
        gaussian = fit_gaussian(features, labels, classes)
        np.savez(path, means=gaussian["means"], precision=gaussian["precision"])

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        centred = original.features.astype(np.float64) - self.means[original.labels]
        score = ((centred @ self.precision) * centred).sum(axis=1)  # one BLAS product (an einsum is 25x slower)
        return SignalResult(score=score, triggered=above(score, self.threshold), evidence={"score": score})

    @classmethod
    def threshold_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
        return (0.0, np.inf)  # a squared distance
