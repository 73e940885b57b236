"""Intake rewrites are exact in float: on onnx's own operator cases, a model normalized by `intake.prepare` (opset
raised to 13, constants folded, divisions by constants as multiplications, gates scaled, BatchNorm folded, ...)
gives the original's outputs to float rounding in onnxruntime. Every input but the first is frozen into an
initializer, so shape math and weights become constants the passes can fold (where inexact rewrites hide).

The function-expanded cases (attention, normalizations, activations written as primitive ops) run by default; the
whole corpus is `large`."""

from __future__ import annotations

import fnmatch
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qconv.errors import QconvError
from qconv.graph import ai_onnx_opset, intake


def _cases(pattern: str):
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases(None) if fnmatch.fnmatch(c.name, pattern) and c.data_sets]


def _frozen(case):
    """The case's model with every input but the first as an initializer, and the first input's feed (or None)."""
    names = [i.name for i in case.model.graph.input]
    values = case.data_sets[0][0]
    if not values or len(values) != len(names) or not isinstance(values[0], np.ndarray):
        return None, None
    try:
        consts = [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names[1:], values[1:])]
    except Exception:  # noqa: BLE001 - sequences, optionals: not tensors to freeze
        return None, None
    m = onnx.ModelProto()
    m.CopyFrom(case.model)
    m.graph.initializer.extend(consts)
    keep = [i for i in m.graph.input if i.name == names[0]]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m, {names[0]: values[0]}


def _run(model: onnx.ModelProto, feed: dict):
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def _mismatch(a, b) -> str | None:
    for k, (x, y) in enumerate(zip(a, b)):
        if isinstance(x, list) or isinstance(y, list):  # a sequence output: its tensors in turn
            if not (isinstance(x, list) and isinstance(y, list)) or len(x) != len(y):
                return f"output {k}: a sequence of {len(x) if isinstance(x, list) else '-'} became {len(y) if isinstance(y, list) else '-'}"
            inner = _mismatch(x, y)
            if inner:
                return f"output {k}, {inner}"
            continue
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {k}: {x.dtype}{x.shape} became {y.dtype}{y.shape}"
        if x.dtype.kind == "f":
            finite = np.abs(x[np.isfinite(x)])
            scale = max(1.0, float(finite.max())) if finite.size else 1.0
            if not np.allclose(x, y, rtol=1e-4, atol=1e-5 * scale, equal_nan=True):
                return f"output {k}: max difference {np.nanmax(np.abs(x.astype(np.float64) - y)):.3g} on values up to {scale:.3g}"
        elif not np.array_equal(x, y):
            return f"output {k}: {x.dtype} values differ"
    return None


def _check(pattern: str) -> int:
    checked, bad = 0, []
    for case in _cases(pattern):
        model, feed = _frozen(case)
        if model is None:
            continue
        try:
            expected = _run(model, feed)
        except Exception:  # noqa: BLE001 - onnxruntime cannot run the original: nothing to compare
            continue
        try:
            prepared, _ = intake.prepare(model, max(13, ai_onnx_opset(model)))
        except QconvError:
            continue  # refused with a message (e.g. the opset converter cannot upgrade it): not a rewrite
        checked += 1
        problem = _mismatch(expected, _run(prepared, feed))
        if problem:
            bad.append(f"{case.name}: {problem}")
    assert not bad, "intake changed outputs beyond float rounding:\n" + "\n".join(bad)
    return checked


def test_intake_is_exact_on_the_expanded_operator_cases():
    assert _check("*_expanded*") > 300


@pytest.mark.large
def test_intake_is_exact_on_every_operator_case():
    assert _check("*") > 1400


def test_mismatch_names_a_changed_output():
    assert _mismatch([np.array([1.0, 2.0], np.float32)], [np.array([1.0, 2.0001], np.float32)]) is None
    assert "max difference" in _mismatch([np.array([1.0, 7.5], np.float32)], [np.array([1.0, 7.417], np.float32)])
    assert "values differ" in _mismatch([np.array([3], np.int64)], [np.array([2], np.int64)])


@pytest.mark.parametrize("pattern", ["test_if_opt", "test_split_to_sequence*"])
def test_intake_keeps_sequences_and_optionals_computed(pattern):
    """Constant folding never turns a sequence or an optional into an initializer (a tensor): test_if_opt's else
    branch, Optional(SequenceConstruct(constant)), was folded into a tensor onnxruntime refused against the branch's
    optional(seq) type; sequence outputs are compared tensor by tensor."""
    assert _check(pattern) >= 1
