"""Properties of the quantization arithmetic, and bit-exact agreement with onnxruntime's QuantizeLinear."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from qconv.numeric import qmath
from tests.conftest import make_model, run_model

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
ranges = st.tuples(finite, finite).map(sorted)


@settings(max_examples=200, deadline=None)
@given(r=ranges, qt=st.sampled_from(["uint8", "int8", "uint16", "int16"]), sym=st.booleans())
def test_zero_is_exactly_representable(r, qt, sym):
    qp = qmath.choose_qparams(r[0], r[1], qmath.qtype(qt), sym)
    q = qmath.quantize(np.zeros(3, np.float32), qp)
    assert np.all(qmath.dequantize(q, qp) == 0.0)


@settings(max_examples=200, deadline=None)
@given(r=ranges, qt=st.sampled_from(["uint8", "int8"]), sym=st.booleans(), data=st.data())
def test_round_trip_error_within_half_a_step(r, qt, sym, data):
    qp = qmath.choose_qparams(r[0], r[1], qmath.qtype(qt), sym)
    lo, hi = min(r[0], 0.0) + 0.0, max(r[1], 0.0) + 0.0  # + 0.0 turns -0.0 into 0.0
    x = data.draw(arrays(np.float32, 20, elements=st.floats(lo, hi, width=32)))
    err = np.abs(qmath.dequantize(qmath.quantize(x, qp), qp) - x)
    scale = float(qp.scale)
    assert np.all(err <= scale / 2 + 1e-6 * max(1.0, abs(lo), abs(hi)))


@settings(max_examples=100, deadline=None)
@given(r=ranges, qt=st.sampled_from(["uint8", "int8"]))
def test_values_outside_the_range_saturate(r, qt):
    t = qmath.qtype(qt)
    qp = qmath.choose_qparams(r[0], r[1], t, False)
    q = qmath.quantize(np.array([-1e30, 1e30], np.float32), qp)
    assert q[0] == t.qmin and q[1] == t.qmax


@settings(max_examples=100, deadline=None)
@given(w=arrays(np.float32, (4, 6), elements=st.floats(-10, 10, width=32, allow_subnormal=False)))
def test_symmetric_per_channel_weights(w):
    qp = qmath.weight_qparams(w, qmath.qtype("int8"), True, axis=0)
    assert qp.scale.shape == (4,) and np.all(qp.zero_point == 0)
    q = qmath.quantize(w, qp)
    assert q.min() >= -127  # restricted range: -128 never used, so the range is symmetric
    # the largest magnitude of each channel maps to +-127 exactly (unless the channel is all zero)
    absmax = np.abs(w).max(axis=1)
    nz = absmax > 1e-30  # below that the scale would underflow float32; such channels quantize to 0
    assert np.all(np.abs(q).max(axis=1)[nz] == 127)


def test_constant_zero_range_gets_unit_scale():
    qp = qmath.choose_qparams(0.0, 0.0, qmath.qtype("uint8"), False)
    assert float(qp.scale) == 1.0 and int(qp.zero_point) == 0


def test_bias_overflow_widens_weight_scale():
    bias = np.array([1e6], np.float32)
    widened = qmath.widen_weight_scale_for_bias(bias, 1e-3, np.array([1e-6], np.float32))
    qp = qmath.bias_qparams(bias, 1e-3, widened)
    q = qmath.quantize(bias, qp)
    assert np.abs(q.astype(np.int64)).max() < 2**31 - 1
    assert abs(float(qmath.dequantize(q, qp)[0]) - 1e6) / 1e6 < 1e-6


@pytest.mark.parametrize("qt,axis", [("uint8", None), ("int8", None), ("int8", 1), ("uint8", 1)])
def test_quantize_matches_onnxruntime_bit_exactly(qt, axis):
    rng = np.random.default_rng(3)
    x = (rng.normal(0, 3, (2, 5, 7)) * rng.choice([1, 100], (2, 5, 7))).astype(np.float32)
    x.flat[:6] = [0.5, 1.5, 2.5, -0.5, -2.5, 1e9]  # halves (round to even) and a saturating value
    if axis is None:
        qp = qmath.choose_qparams(-4.0, 6.0, qmath.qtype(qt), False)
    else:
        qp = qmath.choose_qparams(np.linspace(-4, -1, 5), np.linspace(1, 9, 5), qmath.qtype(qt), False, axis)
    kw = {"axis": axis} if axis is not None else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kw),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], **kw)]
    elem = TensorProto.UINT8 if qt == "uint8" else TensorProto.INT8
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                       [helper.make_tensor_value_info("q", elem, None), helper.make_tensor_value_info("d", TensorProto.FLOAT, None)],
                       [numpy_helper.from_array(qp.scale, "s"), numpy_helper.from_array(qp.zero_point, "z")], opset=13)
    q_ort, d_ort = run_model(model, {"x": x})
    np.testing.assert_array_equal(qmath.quantize(x, qp), q_ort)
    np.testing.assert_array_equal(qmath.dequantize(q_ort, qp), d_ort)


def test_sqnr():
    a = np.ones(10)
    assert qmath.sqnr_db(a, a) == float("inf")
    assert abs(qmath.sqnr_db(a, a * 1.1) - 20.0) < 1e-9
