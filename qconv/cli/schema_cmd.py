"""qconv schema: the JSON Schema of a file qconv writes, for CI steps that validate what they parse."""

from __future__ import annotations

import click

from qconv.cli.common import guarded
from qconv.jobs.calibrate import SCHEMAS, schema


@click.command("schema")
@click.argument("name", type=click.Choice(SCHEMAS))
@guarded
def schema_cmd(term, name):
    """Print the JSON Schema (draft 2020-12) of NAME: report, plan or calibration.

    \b
    Example:
      qconv schema report > qconv-report.schema.json
      check-jsonschema --schemafile qconv-report.schema.json build/report.json
    """
    term.print_json(schema(name))
