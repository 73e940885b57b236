"""Evaluation (float vs quantized through onnxruntime) and the report built from it."""
