"""The ``qconv`` command group."""

from __future__ import annotations

import click

from qconv import __version__
from qconv.cli.calibrate import calibrate_group
from qconv.cli.inspect_cmd import inspect_cmd
from qconv.cli.kernels_cmd import kernels_cmd
from qconv.cli.plan_cmd import plan_cmd
from qconv.cli.quantize import quantize_cmd
from qconv.cli.report_cmd import report_cmd
from qconv.cli.schema_cmd import schema_cmd
from qconv.cli.tokenize_cmd import tokenize_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qconv")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug):
    """Quantize ONNX models: calibrate on your data, rewrite to int8, and measure what it cost.

    Exit codes: 0 success, 1 error, 2 usage error, 3 failed quality gate.
    """


cli.add_command(calibrate_group)
cli.add_command(plan_cmd)
cli.add_command(quantize_cmd)
cli.add_command(inspect_cmd)
cli.add_command(report_cmd)
cli.add_command(schema_cmd)
cli.add_command(kernels_cmd)
cli.add_command(tokenize_cmd)


def main() -> None:
    cli(prog_name="qconv")
