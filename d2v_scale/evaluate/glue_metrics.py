"""GLUE metrics as fairseq's `sentence_prediction` criterion reports them (criterions/sentence_prediction.py:
accuracy; `report_mcc`: Matthews correlation; `report_acc_and_f1`: binary F1 of class 1 beside accuracy;
`report_pearson_and_spearman`: both correlations of a regression head), in plain torch: sklearn's
`matthews_corrcoef` / `f1_score` and scipy's `pearsonr` / `spearmanr` (ties: average ranks).
"""
from __future__ import annotations

import torch


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """pred, y: (N,) class indices -> fraction correct."""
    return float((pred == y).double().mean()) if len(y) else 0.0


def f1_binary(pred: torch.Tensor, y: torch.Tensor, positive: int = 1) -> float:
    """F1 of the positive class (sklearn f1_score, average="binary"); 0 when nothing is positive."""
    tp = float(((pred == positive) & (y == positive)).sum())
    fp = float(((pred == positive) & (y != positive)).sum())
    fn = float(((pred != positive) & (y == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corr(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Multi-class Matthews correlation (sklearn matthews_corrcoef, Gorodkin's R_K); 0 when undefined."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64)          # (C true, C predicted)
    conf.index_put_((y.long(), pred.long()), torch.ones(len(y), dtype=torch.float64), accumulate=True)
    t, p = conf.sum(1), conf.sum(0)                                            # (C,), (C,)
    n, c = conf.sum(), conf.trace()
    cov_yp = c * n - (t * p).sum()
    cov_pp, cov_yy = n * n - (p * p).sum(), n * n - (t * t).sum()
    denom = (cov_pp * cov_yy).sqrt()
    return float(cov_yp / denom) if denom > 0 else 0.0


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of (N,) values (scipy pearsonr's statistic); 0 when a side is constant."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def ranks(x: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N,) 1-based ranks, ties sharing their average rank (scipy rankdata "average")."""
    x = x.double()
    order = x.argsort()
    sorted_x = x[order]
    r = torch.empty_like(x)
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()                                           # last rank of each tie group
    avg = ends - (counts.double() - 1) / 2                                     # (G,) average rank per group
    r[order] = avg[inverse]
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson of the average ranks (scipy spearmanr)."""
    return pearson(ranks(a), ranks(b))


def classification_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """logits (N, C), y (N,) -> accuracy, Matthews correlation and (two classes) F1 of class 1, in percent
    as the GLUE leaderboard writes them."""
    pred = logits.argmax(1)                                                    # (N,)
    out = {"accuracy": 100 * accuracy(pred, y), "mcc": 100 * matthews_corr(pred, y, logits.shape[1])}
    if logits.shape[1] == 2:
        out["f1"] = 100 * f1_binary(pred, y)
        out["acc_and_f1"] = (out["accuracy"] + out["f1"]) / 2                 # fairseq's acc_and_f1
    return out


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """pred, target (N,) -> Pearson, Spearman and their mean (fairseq's pearson_and_spearman), in percent."""
    p, s = 100 * pearson(pred, target), 100 * spearman(pred, target)
    return {"pearson": p, "spearman": s, "pearson_and_spearman": (p + s) / 2}
