"""qconv: quantize ONNX models with streaming calibration and a readable report."""

__version__ = "0.1.0"
