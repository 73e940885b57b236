"""qconv plan: decide what quantization does to every node and tensor, and write it as an editable JSON plan."""

from __future__ import annotations

from pathlib import Path

import click

from qconv import io
from qconv.cli.common import (
    calib_options_from,
    calib_sources,
    config_from,
    data_options,
    guarded,
    output_options,
    range_options,
    scheme_options,
)
from qconv.cli.quantize import render_groups
from qconv.jobs import PlanJob, run_plan


@click.command("plan")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Plan file to write (JSON).")
@calib_sources
@scheme_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan on stdout too.")
@data_options
@range_options
@output_options
@guarded
def plan_cmd(term, model, out, calib, data, force_calib, overrides, as_json, **kw):
    """Write the plan for MODEL: per node, quantized or float (and why); per tensor, type, granularity,
    range method, range, scale and zero point.

    Edit its "overrides" object, then apply it with `qconv quantize MODEL --plan PLAN -o OUT`
    (an unedited plan gives the same bytes as quantizing directly with the same options).

    \b
    Examples:
      qconv plan model.onnx --calib model.calib.json -o model.plan.json
      qconv plan model.onnx --data calib.npy --per-tensor --method percentile -o model.plan.json
      qconv plan bert.onnx --mode dynamic -o bert.plan.json
    """
    job = PlanJob(model=model, config=config_from(kw), method=kw.pop("method"), percentile=kw.pop("percentile"), calib=calib, data=data,
                  force_calib=force_calib, overrides=overrides, calib_options=calib_options_from(kw))
    job.check()
    io.check_output_path(out, model, calib, data, overrides)
    with term.progress() as progress:
        plan, _ = run_plan(job, progress)
    d = plan.to_dict()
    io.write_json(d, out)
    if as_json:
        term.print_json(d)
        return
    q = sum(n.quantized for n in plan.nodes)
    f = sum(n.kept_float for n in plan.nodes)
    term.print(f"plan ({plan.config.mode}, {plan.config.output_format}): {q} nodes quantized, {f} kept in float, "
               f"{len(plan.tensors)} tensors with parameters")
    render_groups(term, plan.kept_float_groups())
    term.info(f"wrote {out}; edit its \"overrides\", then: qconv quantize {model} --plan {out} -o OUT.onnx")
