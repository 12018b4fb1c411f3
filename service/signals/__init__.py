"""The guard's signals, one file each; every module of this package is imported so that its signals register.

LEGACY is what a bundle without a `signals` list in its manifest runs (bundles built before the list existed).
"""

from __future__ import annotations

import importlib
import pkgutil

from service.signals.base import (
    REGISTRY,
    ImageModel,
    Prediction,
    Signal,
    SignalResult,
    above,
    confidence_drop,
    entropy_bits,
    softmax,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

LEGACY = ("detrigger", "masked_ae", "strip", "activation")

__all__ = ["LEGACY", "REGISTRY", "ImageModel", "Prediction", "Signal", "SignalResult", "above", "confidence_drop",
           "entropy_bits", "softmax"]  # fmt: skip
