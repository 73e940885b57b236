"""Calibration tables for TensorRT, from a calibration's per-tensor ranges (pure: bytes and text, no files).

TensorRT's int8 needs one symmetric dynamic range per tensor, amax = max(|min|, |max|) of the chosen range:
- ``trt_table_flatbuffers``: the table onnxruntime's TensorRT execution provider reads
  (``trt_int8_calibration_table_name``): a flatbuffers ``TrtTable { dict: [KeyValue { key, value }] }`` with
  the tensor name as key and amax as a decimal string, keys sorted (the layout onnxruntime's
  ``write_calibration_table`` writes);
- ``trt_table_json``: the same ranges as onnxruntime's JSON form, {tensor: {"highest": hi, "lowest": lo}};
- ``trt_native_cache``: the plain-text cache TensorRT's ``IInt8Calibrator`` reads back (``readCalibrationCache``):
  a header line, then ``name: <float32 scale as 8 hex digits>`` with scale = amax / 127.
"""

from __future__ import annotations

import json
import struct

import flatbuffers

TRT_HEADER = "TRT-8601-EntropyCalibration2"


def dynamic_ranges(ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{tensor: amax} for every tensor with a finite range, sorted by name."""
    out = {}
    for name in sorted(ranges):
        lo, hi = ranges[name]
        amax = max(abs(float(lo)), abs(float(hi)))
        if amax == amax and amax != float("inf"):
            out[name] = amax
    return out


def trt_table_flatbuffers(ranges: dict[str, tuple[float, float]]) -> bytes:
    builder = flatbuffers.Builder(1024)
    entries = []
    for name, amax in dynamic_ranges(ranges).items():
        key, value = builder.CreateString(name), builder.CreateString(repr(amax))
        builder.StartObject(2)
        builder.PrependUOffsetTRelativeSlot(0, key, 0)
        builder.PrependUOffsetTRelativeSlot(1, value, 0)
        entries.append(builder.EndObject())
    builder.StartVector(4, len(entries), 4)
    for entry in reversed(entries):  # prepended: the last one first, so the vector reads in key order
        builder.PrependUOffsetTRelative(entry)
    table_dict = builder.EndVector()
    builder.StartObject(1)
    builder.PrependUOffsetTRelativeSlot(0, table_dict, 0)
    builder.Finish(builder.EndObject())
    return bytes(builder.Output())


def trt_table_json(ranges: dict[str, tuple[float, float]]) -> str:
    table = {name: {"highest": float(ranges[name][1]), "lowest": float(ranges[name][0])} for name in dynamic_ranges(ranges)}
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def trt_native_cache(ranges: dict[str, tuple[float, float]]) -> str:
    lines = [TRT_HEADER]
    for name, amax in dynamic_ranges(ranges).items():
        scale = struct.unpack(">I", struct.pack(">f", amax / 127.0))[0]
        lines.append(f"{name}: {scale:08x}")
    return "\n".join(lines) + "\n"
