"""Numerics in pure numpy: quantization parameters and rounding (qmath), the GPTQ/OBC weight update (gptq)."""
