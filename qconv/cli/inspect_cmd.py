"""qconv inspect: what a model holds and what qconv would do with it."""

from __future__ import annotations

from pathlib import Path

import click

from qconv.cli.common import guarded
from qconv.cli.console import table
from qconv.cli.quantize import render_groups
from qconv.jobs.calibrate import run_inspect


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
    info = run_inspect(model, calib, per_tensor)
    if as_json:
        term.print_json(info)
        return
    term.print(f"[bold]{info['model']}[/bold]  IR {info['ir_version']}, opset {info['opset']}, {info['size_bytes']:,} bytes, producer {info['producer'] or '-'}")
    term.print(table("Inputs", ["name", "type", "shape"], [[i["name"], i["type"], i["shape"]] for i in info["inputs"]]))
    term.print(table("Outputs", ["name", "type", "shape"], [[o["name"], o["type"], o["shape"]] for o in info["outputs"]]))
    if info.get("quantized_already"):  # no plan for a quantized model: what it holds
        ops = ", ".join(f"{c} {op}" for op, c in info["quantized_already"].items())
        qdq = "QuantizeLinear" in info["quantized_already"] and not any(k.startswith("QLinear") for k in info["quantized_already"])
        hint = "; qconv quantize --format qoperator turns its QDQ pairs into QLinear ops" if qdq else ""
        term.print(f"[bold yellow]already quantized[/bold yellow]: {ops}{hint}")
        if info.get("quantized_io"):
            rows = [[k, v["role"], v["type"], f"{v['scale']:.6g}", v["zero_point"]] for k, v in info["quantized_io"].items()]
            term.print(table("Integer inputs/outputs (x = (q - zero_point) * scale)", ["tensor", "role", "type", "scale", "zero point"], rows))
        term.print(table("Ops", ["op", "nodes"], [[k, v] for k, v in info["ops"].items()]))
        return
    term.print(table("Ops (after intake)", ["op", "quantized", "float", "integer"],
                     [[k, v["quantized"], v["float"], v["integer"]] for k, v in info["would_quantize"].items()]))
    for note in info["intake"]:
        term.print(f"intake: {note}")
    render_groups(term, info["kept_float_groups"])
    if not info["ranges_checked"]:
        term.print("[dim]range checks (attention masks, inf/NaN) need calibration: add --calib FILE[/dim]")
