"""Tuning (``quantize --tune``): search the plan's overrides for a model that meets the targets, within a budget,
and say why. Every candidate is a plan (the same config, other overrides), rewritten and *run* by onnxruntime on
held rows whose float outputs were computed once.

``budget``     the budget, its clock, the options
``trial``      candidates, trials, changes, ranked nodes, the trial cache
``search``     the decisions (ranges, sensitivity rounds, remedies); driven by a ``Bench``
``lab``        the Bench that builds and runs candidates with onnxruntime
``sensitivity`` pure ranking and gain
``remedies/``  one module per remedy, each proposing candidates for one node
``speed``      nodes slower in int8 kept float, taken only when measured faster
``tuner``      ``tune(TuneJob) -> Tuned``: what the quantize job calls

Measured trials are cached in a file keyed by model, calibration, rows and candidate, so a re-run is instant and,
with a budget in trials, deterministic. The result is the plan's overrides: ``--plan`` reproduces the model.
"""
