"""qconv kernels: the kernel cost tables int8 plans weigh (time a model's, measure an op-kind one, show one)."""

from __future__ import annotations

from pathlib import Path

import click

from qconv.cli.common import calib_options_from, data_options, guarded
from qconv.cli.console import table
from qconv.errors import UsageError
from qconv.jobs import kernels as jobs


@click.command("kernels")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Rows of MODEL's inputs (calibrates, then times on the first).")
@click.option("--calib", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A calibration file of MODEL (in place of --data, when its inputs' sizes can be read from it).")
@click.option("--measure", is_flag=True, help="Without MODEL: measure the op-kind table of this CPU (about 10 s); needs -o.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table to this file (pin it with --kernels FILE on other runs and machines).")
@click.option("--kernels", "spec", default="shipped", show_default=True, metavar="shipped|FILE", help="Without MODEL: the table to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@data_options
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@guarded
def kernels_cmd(term, model, data, calib, measure, output, spec, as_json, quiet, **kwargs):
    """Time MODEL's nodes for `--kernels auto`, or show / measure an op-kind kernel table.

    int8 plans keep float the regions where int8 runs slower than float on this CPU, counting the
    conversions at their borders. With `--kernels auto` (the default) the costs are MODEL's own nodes,
    timed float and all-int8 on one row by onnxruntime's profiler, once per model and machine (cached;
    the first int8 `quantize` or `plan` of a model times it too). Pin a table with -o FILE and
    `--kernels FILE` so that CI and other machines plan the same bytes.

    \b
    Examples:
      qconv kernels model.onnx --data calib.npy -o model.kernels.json
      qconv kernels                         # the shipped op-kind table of this CPU family
      qconv kernels --measure -o cpu.json   # measure this CPU's op-kind table
    """
    from qconv.jobs.plan import PlanJob
    from qconv.plan.config import QuantConfig

    opts = calib_options_from(kwargs)
    if model is not None:
        if measure:
            raise UsageError("--measure measures the op-kind table: drop MODEL, or drop --measure to time MODEL")
        job = PlanJob(model=model, data=data, calib=calib, config=QuantConfig(bias_correction=None), calib_options=opts)
        with term.progress() as progress:
            tab, path = jobs.timed(job, progress)
        term.info(f"timed {len(tab.data['nodes'])} nodes of {model}: cached in {path}")
    elif measure:
        if output is None:
            raise UsageError("--measure writes a file: give -o FILE (and pin it with --kernels FILE)")
        tab = jobs.measured()
    else:
        tab = jobs.shown(spec)
    if output is not None:
        jobs.write(tab, output)
        term.info(f"kernel table written to {output} (digest {tab.digest})")
    if as_json:
        term.print_json({**tab.summary(), "table": tab.data})
        return
    if quiet:
        return
    term.info(f"kernel table: {tab.name} (digest {tab.digest})")
    if tab.data.get("nodes"):
        nodes = sorted(tab.data["nodes"].items(), key=lambda kv: -(kv[1][0] - kv[1][1]))
        rows = [[n, f"{q / 1e3:.1f}", f"{f / 1e3:.1f}"] for n, (q, f) in nodes[:15]]
        term.print(table("nodes int8 slows most (us a row)", ["node", "int8", "float"], rows))
        return
    rows = []
    for key, points in sorted(tab.data["ops"].items()):
        pairs = zip(sorted(points["float"]), sorted(points["int8"]))
        rows.append([key, "  ".join(f"{int(f[0])}:{q[1] / f[1]:.2f}x" if f[1] else "-" for f, q in pairs)])
    term.print(table("int8 time / float time, by channel count", ["op kind", "channels: ratio"], rows))
