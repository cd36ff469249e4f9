"""`--task text_classification`: GLUE-style sentence(-pair) classification and regression, fairseq's
`sentence_prediction` task and criterion (fairseq/tasks/sentence_prediction.py, criterions/
sentence_prediction.py) on data2vec 2.0's `data2vec_text_classification` model: the pretrained text
encoder + RoBERTa's classification head on `<s>` (models/sentence.py), cross-entropy, or MSE for a
regression task (STS-B, one output); accuracy, F1, Matthews correlation, Pearson/Spearman on the
validation shards (evaluate/glue_metrics.py), the best checkpoint picked by the GLUE task's metric
(the data2vec yamls' best_checkpoint_metric). The shards come from `d2v-shard glue`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data import DataError, SentenceCodec, check_shards, find_shards, sample_counts
from ..dist import Dist
from ..evaluate import EvalShards, EvalStream, extract
from ..evaluate.glue_metrics import classification_metrics, regression_metrics
from ..models import SentenceClassifier
from ..pretrained import EncoderWeights, finetune_encoder
from .task import Task, with_head

SHARD_FIX = "make them with `d2v-shard glue FILE.tsv DST --spm MODEL --task rte` (or --sentence1/--label COL)"
# the data2vec 2.0 yamls' checkpoint.best_checkpoint_metric (examples/data2vec/config/v2/text_finetuning/)
METRICS = ("accuracy", "mcc", "f1", "acc_and_f1", "pearson", "spearman", "pearson_and_spearman")


def glue_shards(path: str, source: str, allow_pipe: bool = False) -> tuple[EvalShards, dict]:
    """Checked `d2v-shard glue` shards and the index's "glue" record (labels, regression, metric)."""
    shards = find_shards(path, allow_pipe)
    glue = shards.index.get("glue")
    if not isinstance(glue, dict):
        raise DataError(f"{source} {path}: not sentence shards of `d2v-shard glue` (no 'glue' record in an index.json "
                        f"beside them); {SHARD_FIX}")
    check_shards(shards, "text", f"{source} {path}", every_local=False)
    counts = sample_counts(shards)
    if sum(counts) < 2:
        raise DataError(f"{source} {path} holds {sum(counts)} samples; fine-tuning needs at least 2")
    return EvalShards(shards.urls, counts, len(glue.get("labels") or []), source), {**glue, "index": shards.index}


class TextClassification(Task):
    name = "text_classification"
    modality = "text"
    metric = "val/accuracy"
    export_kind = "classifier"

    num_classes = 0
    regression = False
    labels: list[str] | None = None

    def prepare(self, weights: EncoderWeights, world: int) -> EvalShards:
        cfg, f, t = self.cfg, self.cfg.finetune, weights.cfg.model.text
        _, train = glue_shards(cfg.data.path, "--train", cfg.data.allow_pipe)
        val, held = glue_shards(f.val, "--val", cfg.data.allow_pipe)
        if bool(train["regression"]) != bool(held["regression"]) or train.get("labels") != held.get("labels"):
            def kind(g: dict) -> str:
                return "regression targets" if g["regression"] else f"classes {', '.join(g['labels'])}"
            raise DataError(f"--train holds {kind(train)} but --val holds {kind(held)}: shard both TSVs with the same "
                            "--task (or the same --label_names / --regression)")
        for source, g in (("--train", train), ("--val", held)):
            vocab, made = g["index"].get("vocab_size"), g["index"].get("spm", "?")
            if vocab and vocab != t.vocab_size:
                raise DataError(f"{source}: its sentencepiece model ({made}) has {vocab} pieces but the --init encoder "
                                f"embeds {t.vocab_size}: shard the TSVs with the pretraining shards' --spm model")
            if int(g.get("longest", 0)) > t.max_positions:
                raise DataError(f"{source}: sequences of up to {g['longest']} tokens but the encoder has "
                                f"{t.max_positions} positions: reshard with d2v-shard glue --max_positions "
                                f"{t.max_positions}")
        self.regression, self.labels = bool(train["regression"]), train.get("labels")
        self.num_classes = 1 if self.regression else len(self.labels)
        chosen = f.metric or train.get("metric") or ("pearson_and_spearman" if self.regression else "accuracy")
        allowed = METRICS[4:] if self.regression else METRICS[:2] + (METRICS[2:4] if self.num_classes == 2 else ())
        if chosen not in allowed:
            what = "regression" if self.regression else f"{self.num_classes}-class"
            raise ConfigError(f"--finetune.metric={chosen!r}: a {what} task reports {', '.join(allowed)}")
        self.metric = f"val/{chosen}"
        head = weights.head.get("head.out_proj.weight")
        if weights.head and (head is None or head.shape[0] != self.num_classes):
            outputs = "no sentence head" if head is None else f"a {head.shape[0]}-output head"
            raise ConfigError(f"--init {f.init} is a classifier with {outputs} and the task needs {self.num_classes} "
                              "outputs: fine-tune the pretrained encoder instead (its run directory or `d2v export` "
                              "file), or shards of the same classes")
        self.counts = train.get("label_counts") or []
        return val

    def describe(self) -> str:
        if self.regression:
            return f"regression | best by {self.metric}"
        return f"{self.num_classes} classes ({', '.join(self.labels)}) | best by {self.metric}"

    def build_model(self, weights: EncoderWeights) -> SentenceClassifier:
        """The pretrained encoder + a new head (the weights' own when they are a sentence classifier)."""
        f = self.cfg.finetune
        encoder = finetune_encoder(weights, f.drop_path, self.cfg.run.seed)
        return with_head(SentenceClassifier(encoder, weights.cfg.model.embed_dim, self.num_classes, f.pooler_dropout), weights)

    def _codec(self) -> SentenceCodec:
        t = self.cfg.model.text
        return SentenceCodec(t.max_positions, t.vocab_size, 0 if self.regression else self.num_classes,
                             self.regression, t.pad_idx)

    def train_codec(self) -> SentenceCodec:
        return self._codec()

    def val_codec(self) -> SentenceCodec:
        return self._codec()

    def loss(self, model, batch: dict, step: int, dist: Dist, dtype: torch.dtype) -> torch.Tensor:
        """fairseq sentence_prediction: mean cross-entropy, or mean squared error of the one output."""
        x = batch["source"].to(dist.device, non_blocking=True)                  # (B, T) ids
        pad = batch["padding_mask"].to(dist.device)                             # (B, T)
        y = batch["label"].to(dist.device)                                      # (B,) class or target
        logits = model(x, pad).float()                                          # (B, C)
        if self.regression:
            return F.mse_loss(logits.view(-1), y.float())
        return F.cross_entropy(logits, y)

    @torch.no_grad()
    def validate(self, model, stream: EvalStream, dist: Dist, dtype: torch.dtype, num_workers: int) -> dict[str, float]:
        """The task's metrics and loss over every validation sample (predictions gathered from all ranks)."""
        out, y = extract(lambda x, pad: {"logits": model(x, pad)}, stream, dist, dtype, num_workers)
        logits = out["logits"]                                                  # (N, C) fp32
        if self.regression:
            pred = logits.view(-1)                                              # (N,)
            scores = regression_metrics(pred, y.float())
            scores["loss"] = float(F.mse_loss(pred, y.float()))
        else:
            scores = classification_metrics(logits, y.long())
            scores["loss"] = float(F.cross_entropy(logits, y.long()))
        return {f"val/{k}": v for k, v in scores.items()}

    def export_info(self, state: dict[str, torch.Tensor]) -> dict:
        return {"num_classes": int(state["head.out_proj.weight"].shape[0]), "regression": self.regression,
                "labels": self.labels or []}
