"""Calibration: run the model over data, accumulate per-tensor statistics, store them in a file."""
