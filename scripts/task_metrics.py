"""The quality ledger's task metrics as ``--metric`` functions (qconv.measure.usermetric), so tuning can aim at what the
ledger scores instead of output cosine. Each takes the float model's outputs and the other model's on one feed (dicts of
output name -> array, in the graph's output order) and returns (total, count), summed over feeds:

    qconv quantize MODEL --data CALIB --eval-data TUNE --tune \\
        --metric scripts/task_metrics.py:yolov8_boxes --min-metric 0.95

  yolov8_boxes    YOLOv8 [N, 4 + classes, anchors]: fp32's detections after NMS (score 0.25, IoU 0.5) that the model also
                  makes (same class, box IoU > 0.5), over fp32's detections
  picodet_boxes   PicoDet's four levels (scores, then distance distributions): the same
  det_map_iou     a text detector's probability map: IoU of the pixels above 0.3

Used by bench_tune_split (its ``--task-metric``); the functions are the ledger's own (scripts/bench_ledger.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench_ledger import det_map_rows, layout_rows, yolo_rows  # noqa: E402


def _summed(rows, ref: dict, got: dict) -> tuple[float, float]:
    total, count = rows(list(ref.values()), list(got.values()), None)
    return float(total.sum()), float(count.sum())


def yolov8_boxes(ref: dict, got: dict) -> tuple[float, float]:
    return _summed(yolo_rows, ref, got)


def picodet_boxes(ref: dict, got: dict) -> tuple[float, float]:
    return _summed(layout_rows, ref, got)


def det_map_iou(ref: dict, got: dict) -> tuple[float, float]:
    return _summed(det_map_rows, ref, got)


# bench_tune_split's --task-metric: the ledger task each function scores
BY_TASK = {"yolov8_doclaynet": "yolov8_boxes", "picodet_layout": "picodet_boxes", "ppocrv4_det": "det_map_iou"}
