"""Convert a PaliGemma 2 checkpoint into ONNX graphs for ONNX Runtime (see README.md)."""
