"""backdoor-guard serving side: torch-free code that loads the bundle and judges inputs on ONNX Runtime."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("backdoor-guard")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
