"""The kNN monitor of pretraining (`--eval.data=SHARDS --eval.every=N`, as dinov2 / solo-learn log it):
every N steps all ranks classify pooled student and teacher features of labelled shards with kNN
(against `eval.data`, or leave-one-out within it). No gradient, modes and the global RNG (CPU, CUDA)
restored, its own data stream: the loss sequence and the bit-exact resume are unchanged.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ..config import Config
from ..data import DataError, eval_codec
from ..dist import Dist
from .features import EvalShards, EvalStream, extract, pool_all, pooled
from .knn import accuracy, knn_scores


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Every submodule in eval mode inside the block, each back to its own mode after."""
    saved = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def rng_kept(device: torch.device):
    """Fork the CPU RNG (and the current CUDA device's) for the block."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


class KnnMonitor:
    def __init__(self, cfg: Config, dist: Dist, bank: EvalShards, queries: EvalShards | None = None):
        e = cfg.eval
        self.cfg, self.dist, self.bank, self.queries = cfg, dist, bank, queries
        if queries and queries.sentences != bank.sentences:
            raise DataError(f"{bank.source} and {queries.source}: one holds sentences of `d2v-shard glue`, the other "
                            "text blocks of `d2v-shard text`; use shards of one kind")
        codec = eval_codec(cfg, max(bank.num_classes, queries.num_classes if queries else 0), bank.sentences)
        self.streams = [EvalStream(s, codec, e.batch_size, dist.rank, dist.world) for s in (bank, queries) if s]
        self.seconds = 0.0                      # time spent, for the throughput the trainer reports

    def _knn(self, forward, dtype, who: str) -> dict[str, float]:
        e = self.cfg.eval
        f_bank, y_bank = extract(forward, self.streams[0], self.dist, dtype, e.num_workers)
        if len(self.streams) > 1:
            f_query, y_query = extract(forward, self.streams[1], self.dist, dtype, e.num_workers)
        else:
            f_query, y_query = f_bank, y_bank
        num_classes = int(max(y_bank.max(), y_query.max())) + 1
        scores = knn_scores(f_bank[e.pool], y_bank, f_query[e.pool], num_classes, e.k, e.temperature,
                            leave_one_out=len(self.streams) == 1)
        return {f"eval/knn_{k}_{who}": v for k, v in accuracy(scores, y_query).items()}

    def __call__(self, student_encoder: nn.Module, teacher, dtype: torch.dtype,
                 teacher_features=None) -> dict[str, float]:
        """Run on every rank at the same step; returns the same values on every rank. `teacher_features`
        (t_enc, source, padding_mask) -> (tokens (B, E+T, D), token padding): how the model runs its
        teacher on a full input (data2vec 1: `Data2Vec1.teacher_features`, whose audio/text teacher runs
        on the student's CNN or embeddings and positional convolution); None: `t_enc.extract_features`."""
        t0 = time.perf_counter()
        pools = (self.cfg.eval.pool,)
        out = {}
        # the teacher as its last EMA left it (a pending blend waited for), gathered as it runs
        with teacher.reading() as t_enc, rng_kept(self.dist.device), torch.no_grad(), eval_mode(student_encoder, t_enc):
            local = None if t_enc.ema_local_encoder else student_encoder    # audio/text teacher: the student's CNN/embeddings

            def t_forward(x, pad):
                if teacher_features is None:
                    return pooled(t_enc, x, pad, pools, local)
                return pool_all(*teacher_features(t_enc, x, pad), t_enc.num_extra_tokens, pools)
            out.update(self._knn(lambda x, pad: pooled(student_encoder, x, pad, pools), dtype, "student"))
            out.update(self._knn(t_forward, dtype, "teacher"))
        self.seconds += time.perf_counter() - t0
        return out
