"""int4 weight-only: MatMul and Gather weights in blocks of 4-bit values (MatMulNBits, GatherBlockQuantized), by
round-to-nearest or, with calibration rows, GPTQ; everything else stays float."""

from __future__ import annotations

from itertools import islice

from qconv.data import is_cache_name
from qconv.errors import QconvError
from qconv.modes import Applied, Findings
from qconv.modes.common import check_float_only, decisions_from
from qconv.plan import QuantPlan
from qconv.plan.overrides import Overrides

SMOOTH = False


def _has_cache(model) -> bool:
    """A decoder with a KV cache: generation calls it with one new row at a time, where accuracy_level 4 pays."""
    from onnx import TensorProto

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    return any(is_cache_name(i.name) and i.type.tensor_type.elem_type in floats for i in model.graph.input)


def check(overrides: Overrides, config, where: str) -> None:
    check_float_only(overrides, config, where)


def plan(prepared, stats, config, overrides: Overrides) -> QuantPlan:
    from qconv.rewrite.weight_only import int4_decisions

    converted, kept = int4_decisions(prepared.model, config.block_size)
    reasons = {}
    for n in prepared.model.graph.node:
        excluded = config.excluded(n.name, n.op_type)
        ov = overrides.node(n.name)
        if excluded:
            reasons[n.name] = ("excluded", excluded)
        elif ov is not None and ov.precision == "float":
            reasons[n.name] = ("override", "kept float by the plan's override")
        elif n.name in kept:
            reasons[n.name] = ("unsupported", kept[n.name])
        elif n.name not in converted:
            reasons[n.name] = ("mode", "int4 is weight-only: MatMul and Gather weights are converted, the rest stays float")
    return QuantPlan(config, decisions_from(prepared.model, reasons, lambda n: n.name in converted), {}, {}, overrides)


def apply(prepared, p: QuantPlan, calib_feeds=None) -> Applied:
    from qconv.rewrite import weight_only as wo

    config = p.config
    method = config.int4_method if calib_feeds is not None or config.int4_method not in wo.CALIBRATED else "rtn"
    r = wo.quantize_int4(prepared.model, block_size=config.block_size, symmetric=config.symmetric_weights, method=method,
                         calib_feeds=calib_feeds if method in wo.CALIBRATED else None,
                         only_nodes={n.name for n in p.nodes if n.quantized},
                         max_bytes=None if config.size_budget_mb is None else int(config.size_budget_mb * 1e6))
    model, level = r.model, None
    if config.accuracy_level != "auto":
        pinned = int(config.accuracy_level) or None
        model, level = wo.set_accuracy_level(model, pinned), {"chosen": pinned, "rows": None, "why": "pinned by --accuracy-level"}
    elif not _has_cache(model):
        level = {"chosen": None, "rows": None,
                 "why": "no KV cache: every call carries many rows (a prompt, a batch), where accuracy_level 4 ran slower than "
                        "the default kernels (bench_int4: 1.36x a 256-token prompt, while 0.56x a generated token)"}
    elif any(n.op_type == "MatMulNBits" for n in model.graph.node):
        feeds = list(islice(iter(calib_feeds), wo.LEVEL_FEEDS)) if calib_feeds is not None else []
        try:
            model, level = wo.choose_accuracy_level(prepared.model, model, feeds or wo.generated_feeds(model),
                                                    "calibration rows" if feeds else "generated rows (no --data)")
        except QconvError as exc:
            if feeds:
                raise
            level = {"chosen": None, "rows": None, "why": f"no rows to compare the levels on (generated rows did not run: "
                                                          f"{str(exc).splitlines()[0][:160]}): pass --data, or --accuracy-level 4"}
    findings = Findings(int4={"method": method, "block_size": config.block_size,
                              "symmetric": config.symmetric_weights and method != "hqq",
                              "accuracy_level": level, "scalings": r.scalings, "weights": r.quantized})
    return Applied(model, findings, model)
