"""One quantization job from start to report: what ``qconv quantize`` calls (the CLI only parses and renders)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qconv import io, pipeline, runtime
from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM
from qconv.config import QuantConfig
from qconv.errors import QconvError, UsageError
from qconv.data import FeedSource, InputSpec
from qconv.report.build import build_comparison_report, build_report
from qconv.report.layers import dequantized_of
from qconv.report.gates import Gates, evaluate_gates
from qconv.report.write import check_report_paths, write_reports


@dataclass
class QuantizeJob:
    model: Path
    out: Path
    settings: dict = field(default_factory=dict)  # QuantConfig fields given on the command line
    calib: Path | None = None
    data: Path | None = None
    force_calib: bool = False
    eval_data: Path | None = None
    eval_labels: Path | None = None
    batch_size: int = 1
    samples: int | None = None
    bins: int = DEFAULT_BINS
    momentum: float = DEFAULT_MOMENTUM
    method: str | None = None
    percentile: float | None = None
    threads: int | None = None
    latency: bool = True
    gates: Gates = field(default_factory=Gates)
    reports: tuple = ()

    def check(self) -> QuantConfig:
        """Validate the options together, before any work; returns the config (method from the CLI)."""
        config = QuantConfig(**self.settings, method=self.method or "minmax",
                             percentile=99.999 if self.percentile is None else self.percentile)
        if config.needs_calibration:
            if (self.calib is None) == (self.data is None):
                raise UsageError(f"--mode {config.mode} needs calibration: give exactly one of --calib FILE or --data DATA")
            if self.calib is not None and self.eval_data is None:
                raise UsageError("with --calib, give --eval-data so the report has data to measure on")
        elif self.calib is not None:
            raise UsageError(f"--mode {config.mode} takes no calibration file: drop --calib (--data, if given, is used for evaluation"
                             f"{' and GPTQ' if config.mode == 'int4' else ''})")
        if self.eval_labels is not None and self.eval_data is None:
            raise UsageError("--eval-labels needs --eval-data (labels must match the evaluated rows)")
        has_eval = (self.eval_data or self.data) is not None
        self.gates.check_options(self.eval_labels is not None, self.latency and has_eval, has_eval)
        check_report_paths(self.reports, self.model)
        io.check_output_path(self.out, self.model, self.calib, self.data, self.eval_data)
        return config


def load_labels(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    if not path.exists():
        raise QconvError(f"labels file not found: {path}")
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for broken files
        raise QconvError(f"cannot read labels {path} (expected a .npy of integer class ids): {exc}") from None
    if labels.dtype.kind not in "iu":
        raise QconvError(f"labels {path} have dtype {labels.dtype}; expected integer class ids")
    return labels.reshape(-1)


def run_quantize(job: QuantizeJob, progress=pipeline._no_progress) -> tuple[dict, pipeline.Result]:
    """Quantize, evaluate, write the model; return the report and the result. Nothing is written on error."""
    config = job.check()
    labels = load_labels(job.eval_labels)
    prepared = pipeline.load(job.model, config)
    eval_path = job.eval_data or job.data
    eval_source = pipeline.feeds_for(prepared, eval_path, job.batch_size) if eval_path else None
    calibration, calib_feeds = None, None
    if config.needs_calibration:
        if job.calib is not None:
            calibration = pipeline.load_calibration(job.calib, prepared, job.force_calib)
        else:
            source = pipeline.feeds_for(prepared, job.data, job.batch_size, job.samples)
            calibration = pipeline.calibrate(prepared, source, job.threads, progress, config.method, job.bins,
                                             job.momentum, config)
        recorded = calibration.options
        config = QuantConfig(**job.settings, method=job.method or recorded.get("method", "minmax"),
                             percentile=job.percentile if job.percentile is not None else float(recorded.get("percentile", 99.999)))
    elif config.mode == "int4" and job.data is not None:
        calib_feeds = pipeline.feeds_for(prepared, job.data, job.batch_size, job.samples)
    result = pipeline.quantize(prepared, calibration, config, calib_feeds)
    evaluation = {}
    if eval_source is not None:
        evaluation = pipeline.evaluate(prepared, result, eval_source, labels, job.threads, progress, job.latency)
    size_q = pipeline.save_quantized(result, job.out, prepared)
    report = build_report(prepared, result, calibration, str(job.out), io.model_size_bytes(job.model), size_q,
                          evaluation, str(eval_path) if eval_path else None)
    if job.gates.any():
        report["gate"] = evaluate_gates(job.gates, report)
    write_reports(report, job.reports)
    return report, result


@dataclass
class CompareJob:
    original: Path
    quantized: Path
    data: Path
    eval_labels: Path | None = None
    batch_size: int = 1
    threads: int | None = None
    latency: bool = True
    gates: Gates = field(default_factory=Gates)
    reports: tuple = ()

    def check(self) -> None:
        self.gates.check_options(self.eval_labels is not None, self.latency, True)
        check_report_paths(self.reports, self.original, self.quantized, self.data)


def run_compare(job: CompareJob, progress=pipeline._no_progress) -> dict:
    """Compare any two models on the same data: outputs, task accuracy, latency and every shared tensor."""
    job.check()
    original, quantized = io.load_model(job.original), io.load_model(job.quantized)
    labels = load_labels(job.eval_labels)
    initializers = {t.name for t in original.graph.initializer}
    specs = [InputSpec.from_value_info(i) for i in original.graph.input if i.name not in initializers]
    source = FeedSource(job.data, specs, batch_size=job.batch_size)
    threads = job.threads or runtime.default_threads()
    evaluation = pipeline.compare_models(original, quantized, source, labels, threads, progress, dequantized_of(quantized),
                                         latency_models=(str(job.original), str(job.quantized)) if job.latency else None)
    report = build_comparison_report(str(job.original), str(job.quantized), original, quantized, evaluation, str(job.data))
    if job.gates.any():
        report["gate"] = evaluate_gates(job.gates, report)
    write_reports(report, job.reports)
    return report
