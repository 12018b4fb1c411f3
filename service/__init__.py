"""backdoor-guard serving side: torch-free code that loads the bundle and judges inputs on ONNX Runtime."""
