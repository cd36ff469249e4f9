"""Evaluation of pretrained encoders: features of labelled shards split across ranks (features.py),
kNN (knn.py) and linear (linear.py) probes, `d2v probe` (probe.py) and the pretraining kNN monitor
(monitor.py). Trainer-level modules: they use the data loaders and, for the monitor, the live engines."""
from __future__ import annotations

from .features import EvalShards, EvalStream, check_same_classes, eval_shards, extract, pooled
from .knn import accuracy, knn_scores
from .linear import linear_probe
from .monitor import KnnMonitor
from .probe import probe

__all__ = ["EvalShards", "EvalStream", "KnnMonitor", "accuracy", "check_same_classes", "eval_shards", "extract",
           "knn_scores", "linear_probe", "pooled", "probe"]
