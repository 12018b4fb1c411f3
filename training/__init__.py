"""Offline builder of the guard bundle: attacked classifier, restoration autoencoders, Neural Cleanse,
STRIP bank and calibrated thresholds, exported to ONNX with a manifest. Run `python -m training --help`."""
