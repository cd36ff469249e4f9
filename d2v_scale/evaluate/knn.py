"""k-nearest-neighbour classification of frozen features and top-k accuracy (dinov2 `eval/knn.py`).

Cosine similarity to a labelled memory bank, the k most similar neighbours vote for their class with
weights softmax(similarity / T) (dinov2: k 20, T 0.07). With `leave_one_out` the queries are the bank
itself and each sample's own entry is left out (the monitor's single-set mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, leave_one_out: bool = False, chunk: int = 1024) -> torch.Tensor:
    """bank (N, D), bank_labels (N,), queries (Q, D) -> class scores (Q, C), rows summing to 1."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0] - (1 if leave_one_out else 0))
    if k < 1:
        raise ValueError("the kNN memory bank needs at least 2 samples")
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.T                                  # (q, N)
        if leave_one_out:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = float("-inf")
        top, idx = sim.topk(k, dim=1)                                               # (q, k)
        weights = (top / temperature).softmax(dim=1)                                # (q, k)
        scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        out.append(scores.scatter_add_(1, bank_labels.to(sim.device)[idx], weights))  # (q, C)
    return torch.cat(out)


def accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent ({"top1": .., "top5": ..}); k is capped at the number of classes."""
    labels = labels.to(scores.device)
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices              # (Q, k)
    hit = ranked == labels[:, None]
    return {f"top{k}": 100.0 * float(hit[:, :k].any(dim=1).float().mean()) for k in ks}
