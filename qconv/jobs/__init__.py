"""The jobs the CLI runs: each takes a job value (options as ``kw_only`` dataclasses, checked by ``check()``
before anything is read or written) and returns plain values for the CLI to render.

``plan``       ``run_plan``      load -> calibrate (or read statistics) -> plan             (``qconv plan``)
``quantize``   ``run_quantize``  ... -> plan -> apply -> evaluate [-> tune] -> report     (``qconv quantize``)
``compare``    ``run_compare``   any two models on the same data -> report               (``qconv report``)
``calibrate``  ``run_calibrate`` the statistics file, merges, exports                    (``qconv calibrate``)
``tokenize``   ``run_tokenize``  a text file as windows of token ids                      (``qconv tokenize``)
"""

from qconv.jobs.calibrate import CalibrateJob, run_calibrate
from qconv.jobs.compare import CompareJob, run_compare
from qconv.jobs.plan import CalibOptions, PlanJob, run_plan
from qconv.jobs.quantize import QuantizeJob, run_quantize
from qconv.measure.evaluate import EvalOptions

__all__ = ["CalibOptions", "CalibrateJob", "CompareJob", "EvalOptions", "PlanJob", "QuantizeJob", "run_calibrate", "run_compare",
           "run_plan", "run_quantize"]
