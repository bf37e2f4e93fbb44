"""Readers of quantized weights (packed integers + scales) and their ONNX layouts."""
