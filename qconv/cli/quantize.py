"""qconv quantize: plan (from calibration, or read a plan file), rewrite, evaluate, report."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import click

from qconv.cli.common import (
    calib_options_from,
    calib_sources,
    config_from,
    data_options,
    eval_options_from,
    finish,
    gate_options,
    gates_from,
    guarded,
    output_options,
    range_options,
    report_options,
    scheme_given,
    scheme_options,
)
from qconv.cli.console import table
from qconv.errors import UsageError
from qconv.jobs import PlanJob, QuantizeJob, run_quantize
from qconv.tune.budget import DEFAULT_ROWS, Budget, TuneOptions


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Quantized model to write.")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Apply this plan (from qconv plan, possibly edited) instead of planning now.")
@calib_sources
@scheme_options
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="Data for the report (default: the calibration data).")
@click.option("--eval-labels", type=click.Path(dir_okay=False, path_type=Path), default=None, help=".npy of class ids, one per eval row: adds top-1 accuracy.")
@click.option("--speed-fallback", is_flag=True,
              help="Profile both models on this CPU, keep float the int8 nodes that run slower, and keep that model only if it measures faster (the choices go into the plan's overrides).")
@click.option("--tune", is_flag=True,
              help="Search per-node ranges, int16 islands and float fallbacks until the targets (the gates given, else output cosine >= 0.999 and not slower than fp32) are met; exit 3 if they are not.")
@click.option("--budget", default="10m", show_default=True, metavar="TIME|Ntrials",
              help="With --tune: how long to search (10m, 90s) or how many candidates to measure (40trials: deterministic).")
@click.option("--tune-rows", type=click.IntRange(min=1), default=DEFAULT_ROWS, show_default=True,
              help="With --tune: eval rows each candidate is measured on (fewer if one float pass over them takes over 3 s).")
@click.option("--write-plan", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the plan the model was made from (tuning's choices are its overrides): reuse it with --plan.")
@report_options
@gate_options
@data_options
@range_options
@output_options
@guarded
def quantize_cmd(term, model, out, plan_file, tune, budget, tune_rows, **kw):
    """Quantize MODEL and write it to OUTPUT, with a report of what it cost.

    Without evaluation data (--calib alone) the model and a report of size, coverage and plan are written;
    fidelity is measured with --eval-data (or on --data).

    \b
    Examples:
      qconv quantize model.onnx -o model.int8.onnx --data calib.npy
      qconv quantize model.onnx -o model.int8.onnx --calib model.calib.json
      qconv quantize model.onnx -o model.int8.onnx --calib model.calib.json \\
          --eval-data val.npy --eval-labels val_labels.npy --report report.json
      qconv quantize model.onnx -o model.int8.onnx --plan model.plan.json --eval-data val.npy
      qconv quantize model.onnx -o model.int8.onnx --calib model.calib.json --eval-data val.npy \\
          --tune --budget 10m --write-plan model.tuned.plan.json
      qconv quantize bert.onnx -o bert.dyn.onnx --mode dynamic --eval-data val.npz
      qconv quantize llm.onnx -o llm.int4.onnx --mode int4 --block-size 32 --data calib.npz
    """
    method, percentile = kw.pop("method"), kw.pop("percentile")
    if plan_file is not None:
        given = scheme_given(click.get_current_context())
        if given or method is not None or percentile is not None:
            raise UsageError(f"--plan fixes the mode, scheme and range methods: drop {', '.join(given + [o for o, v in (('--method', method), ('--percentile', percentile)) if v is not None])} "
                             "(or edit the plan's overrides)")
    ctx = click.get_current_context()
    from click.core import ParameterSource

    if not tune and any(ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE for k in ("budget", "tune_rows")):
        raise UsageError("--budget and --tune-rows set how --tune searches: add --tune")
    evaluation = eval_options_from(kw, kw.pop("eval_data"))
    gates, config = gates_from(kw), config_from(kw)
    if config.mode == "int4" and gates.max_size_mb is not None:  # the gate's size buys 8-bit layers (mixed int4/int8)
        config = dataclasses.replace(config, size_budget_mb=gates.max_size_mb)
    plan = PlanJob(model=model, config=config, method=method, percentile=percentile, calib=kw.pop("calib"), data=kw.pop("data"),
                   force_calib=kw.pop("force_calib"), overrides=kw.pop("overrides"), calib_options=calib_options_from(kw))
    job = QuantizeJob(out=out, planning=plan, plan_file=plan_file, evaluation=evaluation, gates=gates, reports=tuple(kw.pop("reports")),
                      speed_fallback=kw.pop("speed_fallback"), tune=TuneOptions(budget=Budget.parse(budget), rows=tune_rows) if tune else None,
                      write_plan=kw.pop("write_plan"))
    job.check()
    with term.progress() as progress:
        report, _ = run_quantize(job, progress)
    finish(term, report, kw["as_json"], render)


def _fmt(x, spec=".4f"):
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def latency_row(lat: dict, what: str = "latency") -> list:
    change = "-"
    if lat.get("ratio"):
        change = f"{lat['ratio']:.2f}x time"
        if lat.get("ratio_low") is not None:
            change += f" ({lat['ratio_low']:.2f}-{lat['ratio_high']:.2f}, {lat.get('verdict', '')})"
    return [f"{what} (median of {lat['runs']}, {lat['threads']} threads)", f"{lat['original']:.3f} ms", f"{lat['quantized']:.3f} ms", change]


def render(term, report: dict) -> None:
    s = report["size_bytes"]
    rows = [["size", f"{s['original']:,} B", f"{s['quantized']:,} B", f"{s['ratio']:.2f}x smaller"]]
    if report.get("task"):
        t = report["task"]
        rows.append(["top-1", f"{100 * t['original']:.2f}%", f"{100 * t['quantized']:.2f}%", f"{0.0 - t['drop_points']:+.2f} points"])
    if report.get("latency_ms"):
        lat = report["latency_ms"]
        rows.append(latency_row(lat, "latency, the first feed" if lat.get("token") else "latency"))
        if lat.get("token"):
            rows.append(latency_row(lat["token"], f"one more token, cache of {lat['token']['past']}"))
    term.print(table(f"qconv {report['mode']}: {report['model']['input']} -> {report['model']['output']}",
                     ["", "original", "quantized", "change"], rows))
    if report.get("fidelity") is None and report.get("fidelity_reason"):
        term.print(f"fidelity: {report['fidelity_reason']}")
    if report["outputs"]:
        fid = report.get("fidelity") or {}
        title = "Output fidelity (quantized vs original"
        title += f", {fid['rows']} rows" if fid.get("rows") else ""
        title += ", the first calibration rows: give --eval-data for held-out ones)" if (report.get("evaluation") or {}).get("in_sample") else ")"
        term.print(table(title, ["output", "SQNR dB", "cosine", "max abs err", "mean abs err"],
                         [[k, _fmt(v["sqnr_db"], ".2f"), _fmt(v["cosine"], ".6f"), _fmt(v["max_abs_err"], ".4g"), _fmt(v["mean_abs_err"], ".4g")]
                          for k, v in report["outputs"].items()]))
        if fid.get("top1_agreement") is not None:
            term.print(f"top-1 agreement with the original (argmax of the first output): {fid['top1_agreement']:.4f}")
    worst = [r for r in report.get("layers", []) if r["sqnr_db"] is not None][:5]
    if worst:
        rows_used = (report.get("evaluation") or {}).get("layer_rows")
        term.print(table(f"Worst layers (per-tensor SQNR vs float{f', first {rows_used} rows' if rows_used else ''})",
                         ["tensor", "op", "SQNR dB", "cosine"],
                         [[r["tensor"], r["op_type"], _fmt(r["sqnr_db"], ".2f"), _fmt(r["cosine"], ".6f")] for r in worst]))
    n = report["node_summary"]
    term.print(f"nodes: {n['quantized']} quantized ({n['folded_activations']} Relu/Clip folded into their producer), "
               f"{n['float']} kept in float, {n['integer']} integer/shape ops left as they are")
    for t in n.get("tables", []):
        term.print(f"table '{t['tensor']}' ({t['rows']:,} rows, read by {', '.join(t['gathers'])}): stored as int8 rows, one scale a row")
    render_groups(term, n.get("kept_float_groups", []))
    if report.get("tuning"):
        render_tuning(term, report["tuning"])
    for w in report.get("warnings", []):
        term.warn(w)


def render_groups(term, groups: list[dict]) -> None:
    if not groups:
        return
    rows = []
    for g in groups:
        ops = ", ".join(f"{op} {c}" for op, c in g["ops"].items())
        names = ", ".join(e["name"] for e in g["examples"])
        more = g["nodes"] - len(g["examples"])
        rows.append([g["reason"], g["nodes"], ops, names + (f" (+{more} more)" if more > 0 else "")])
    term.print(table("Kept in float", ["why", "nodes", "ops", "e.g."], rows))


def render_tuning(term, t: dict) -> None:
    cached = f", {t['cached_trials']} from the cache" if t.get("cached_trials") else ""
    cached += f", {t['cut_trials']} run from a cut" if t.get("cut_trials") else ""
    term.print(f"tuning: {len(t['trials'])} trials in {t['seconds']:.1f} s{cached} (budget {t['budget']}), measured on {t['rows']} rows "
               f"of {t['data']}")
    b, best = t.get("baseline") or {}, t.get("best") or {}
    if b and best:
        term.print(f"  worst-output cosine on those rows: {_fmt(b.get('cosine'), '.5f')} as planned -> {_fmt(best.get('cosine'), '.5f')} tuned")
    if t["changes"]:
        term.print(table("Tuning changes", ["node / tensor", "change", "why"], [[c["what"], c["change"], c["why"]] for c in t["changes"]]))
    else:
        term.print("  no change measured better than the plan")
    term.print("  targets " + ("reached" if t["reached"] else f"missed: {', '.join(t['missed'])}"))
