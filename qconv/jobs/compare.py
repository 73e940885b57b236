"""``qconv report``: any two models compared on the same data (outputs, task accuracy, latency, every shared tensor)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qconv import clock, distributed, io, pipeline
from qconv.data import FeedSource, InputSpec
from qconv.jobs.common import finish, load_labels
from qconv.measure.evaluate import EvalOptions, evaluate_models
from qconv.measure.layers import dequantized_of
from qconv.measure import usermetric
from qconv.measure.thresholds import Thresholds
from qconv.report.build import build_comparison_report
from qconv.report.write import check_report_paths
from qconv.rewrite.quantized_io import io_params_of


@dataclass(kw_only=True)
class CompareJob:
    original: Path
    quantized: Path
    data: Path
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    batch_size: int = 1
    gates: Thresholds = field(default_factory=Thresholds)
    reports: tuple = ()
    cast_data: bool = False

    def check(self) -> None:
        distributed.parse_executor(self.evaluation.executor)
        self.gates.check_options(self.evaluation.labels is not None, self.evaluation.latency, True, self.evaluation.metric is not None)
        usermetric.load(self.evaluation.metric)  # a bad --metric fails before any work
        check_report_paths(self.reports, self.original, self.quantized, self.data)


@clock.recorded
def run_compare(job: CompareJob, progress=pipeline.no_progress) -> dict:
    """Compare any two models on the same data: outputs, task accuracy, latency and every shared tensor (the report's
    ``cost``: what the comparison took, qconv.clock)."""
    job.check()
    original, quantized = io.load_model(job.original), io.load_model(job.quantized)
    labels = load_labels(job.evaluation.labels)
    initializers = {t.name for t in original.graph.initializer}
    specs = [InputSpec.from_value_info(i) for i in original.graph.input if i.name not in initializers]
    source = FeedSource(job.data, specs, batch_size=job.batch_size, cast=job.cast_data)
    io_params = io_params_of(quantized)
    evaluation, _ = evaluate_models(str(job.original), str(job.quantized), original, quantized, dequantized_of(quantized),
                                     source, labels, job.evaluation, progress, io=io_params)
    report = build_comparison_report(str(job.original), str(job.quantized), original, quantized, evaluation, str(job.data))
    return finish(report, job.gates, job.reports)
