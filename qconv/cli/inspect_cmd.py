"""qconv inspect: what a model holds and what qconv would do with it."""

from __future__ import annotations

import collections
from pathlib import Path

import click

from qconv import io, pipeline, runtime
from qconv.calib.collect import activation_tensors
from qconv.cli.common import guarded
from qconv.cli.console import table
from qconv.config import QuantConfig
from qconv.graph import ai_onnx_opset
from qconv.planner import build_plan


def inspect_model(model_path: Path, calib_path: Path | None, per_tensor: bool) -> dict:
    config = QuantConfig(per_channel=not per_tensor)
    prepared = pipeline.load(model_path, config)
    sess = runtime.session(prepared.model, threads=1, optimize=False)
    if calib_path:
        calib = pipeline.load_calibration(calib_path, prepared)
        ranges = calib.ranges()
        nonfinite, masks = calib.nonfinite(), calib.mask_like()
    else:  # structure only: every activation assumed to have a usable range
        ranges = {n: (0.0, 1.0) for n in activation_tensors(prepared.model)}
        nonfinite, masks = {}, {}
    plan = build_plan(prepared.model, ranges, config, nonfinite, masks)
    return {
        "model": str(model_path),
        "ir_version": prepared.original.ir_version,
        "opset": ai_onnx_opset(prepared.original),
        "producer": f"{prepared.original.producer_name} {prepared.original.producer_version}".strip(),
        "inputs": [{"name": i.name, "type": i.type, "shape": list(i.shape)} for i in sess.get_inputs()],
        "outputs": [{"name": o.name, "type": o.type, "shape": list(o.shape)} for o in sess.get_outputs()],
        "ops": dict(sorted(collections.Counter(n.op_type for n in prepared.original.graph.node).items())),
        "intake": prepared.notes,
        "would_quantize": plan.by_op(),
        "kept_float": [{"name": n.name, "op_type": n.op_type, "reason": n.reason, "code": n.code} for n in plan.nodes if n.kept_float],
        "kept_float_groups": plan.kept_float_groups(),
        "ranges_checked": bool(calib_path),
        "size_bytes": io.model_size_bytes(model_path),
    }


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also apply range checks (masks, inf/NaN) from this calibration file.")
@click.option("--per-tensor", is_flag=True, help="Plan per-tensor weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@guarded
def inspect_cmd(term, model, calib, per_tensor, as_json, quiet):
    """Show MODEL's inputs, outputs, opset and ops, and which nodes would be quantized (and why not).

    \b
    Example:
      qconv inspect model.onnx
      qconv inspect model.onnx --calib model.calib.json --json | jq '.kept_float'
    """
    info = inspect_model(model, calib, per_tensor)
    if as_json:
        term.print_json(info)
        return
    term.print(f"[bold]{info['model']}[/bold]  IR {info['ir_version']}, opset {info['opset']}, {info['size_bytes']:,} bytes, producer {info['producer'] or '-'}")
    term.print(table("Inputs", ["name", "type", "shape"], [[i["name"], i["type"], i["shape"]] for i in info["inputs"]]))
    term.print(table("Outputs", ["name", "type", "shape"], [[o["name"], o["type"], o["shape"]] for o in info["outputs"]]))
    term.print(table("Ops (after intake)", ["op", "quantized", "float", "integer"],
                     [[k, v["quantized"], v["float"], v["integer"]] for k, v in info["would_quantize"].items()]))
    for note in info["intake"]:
        term.print(f"intake: {note}")
    reasons = collections.Counter((n["op_type"], n["reason"]) for n in info["kept_float"])
    if reasons:
        term.print(table("Kept in float", ["op", "nodes", "why"], [[op, c, r] for (op, r), c in sorted(reasons.items())]))
    if not info["ranges_checked"]:
        term.print("[dim]range checks (attention masks, inf/NaN) need calibration: add --calib FILE[/dim]")
