"""What the jobs that write reports share: labels for top-1, and the report's last step."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qconv import clock
from qconv.errors import QconvError
from qconv.measure.thresholds import Thresholds
from qconv.report.build import complete
from qconv.report.gates import evaluate_gates
from qconv.report.write import write_reports


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


def finish(report: dict, gates: Thresholds, paths) -> dict:
    """The last step of every report: its gate (passed with no checks when none was asked for; tuning sets its
    targets' own), every schema key present, then written."""
    if "gate" not in report:
        report["gate"] = evaluate_gates(gates, report)
    report["cost"] = clock.summary()  # what the run took, up to here (None outside a recording)
    write_reports(complete(report), paths)
    return report
