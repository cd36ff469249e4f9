"""`--task image_classification`: fairseq's `mae_image_classification` recipe (examples/data2vec/models/
mae_image_classification.py, tasks/image_classification.py): timm RandAugment, Mixup/CutMix with
SoftTargetCrossEntropy, drop path, layer-wise lr decay; top-1/top-5 on the validation shards.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from ..config import ConfigError
from ..data import DataError, ImageCodec, Labelled, eval_codec, finetune_transform
from ..dist import Dist, all_reduce_sum
from ..errors import one_line
from ..evaluate import EvalShards, EvalStream, check_same_classes, eval_shards
from ..evaluate.features import eval_loader
from ..models import Classifier
from ..pretrained import EncoderWeights, finetune_encoder
from .task import Task, with_head


def build_mixup(cfg, num_classes: int) -> Mixup | None:
    """cfg: FinetuneConfig. timm's Mixup/CutMix with label smoothing, as fairseq builds it (mode batch)."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


class ImageClassification(Task):
    name = "image_classification"
    modality = "image"
    metric = "val/top1"
    export_kind = "classifier"

    num_classes = 0

    def prepare(self, weights: EncoderWeights, world: int) -> EvalShards:
        cfg, f = self.cfg, self.cfg.finetune
        try:
            finetune_transform(cfg.model.image.img_size, f)
        except (AssertionError, ValueError, KeyError) as e:
            raise ConfigError(f"--finetune.auto_augment={f.auto_augment!r} is not a timm policy ({one_line(e)}): use "
                              "e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, or none") from None
        train = eval_shards(cfg.data.path, "image", "--train", cfg.data.allow_pipe)
        val = eval_shards(f.val, "image", "--val", cfg.data.allow_pipe)
        check_same_classes(train, val)
        train_classes = train.num_classes
        num_classes = f.num_classes or train_classes or val.num_classes
        if not num_classes:
            raise ConfigError("the number of classes is unknown (no classes.json beside the shards): set "
                              "--finetune.num_classes")
        if f.num_classes and train_classes and f.num_classes < train_classes:
            raise ConfigError(f"--finetune.num_classes={f.num_classes} but the --train shards hold {train_classes} "
                              "classes: the head needs one output per class; set it to the shards' count (or leave it 0)")
        if weights.head and weights.head["head.weight"].shape[0] != num_classes:
            raise ConfigError(f"--init {f.init} is a classifier with a {weights.head['head.weight'].shape[0]}-class "
                              f"head and the shards hold {num_classes} classes: fine-tune the pretrained encoder "
                              "instead (its run directory or `d2v export` file), or use shards of the same classes")
        self.num_classes = num_classes
        self.mixup = build_mixup(f, num_classes)
        return val

    def describe(self) -> str:
        return f"{self.num_classes} classes"

    def build_model(self, weights: EncoderWeights) -> Classifier:
        """The pretrained encoder + a new head, or the weights' head when they are a classifier."""
        f = self.cfg.finetune
        encoder = finetune_encoder(weights, f.drop_path, self.cfg.run.seed)
        return with_head(Classifier(encoder, weights.cfg.model.embed_dim, self.num_classes, f.pool), weights)

    def train_codec(self) -> Labelled:
        m, f = self.cfg.model, self.cfg.finetune
        return Labelled(ImageCodec(m.image.img_size, self.cfg.data.crop_scale, m.image.in_chans,
                                   transform=finetune_transform(m.image.img_size, f), reseed=True,
                                   max_pixels=self.cfg.data.max_image_pixels), self.num_classes)

    def val_codec(self) -> Labelled:
        return eval_codec(self.cfg, self.num_classes)

    def loss(self, model, batch: dict, step: int, dist: Dist, dtype: torch.dtype) -> torch.Tensor:
        """Mix (numpy's RNG), forward, soft-target (or label-smoothed) cross-entropy."""
        x = batch["source"].to(dist.device, non_blocking=True)                  # (B, 3, H, W)
        y = batch["label"].to(dist.device)                                      # (B,)
        if self.mixup is not None:
            x, target = self.mixup(x, y)                                        # (B, C) soft targets
        logits = model(x.to(dtype)).float()                                     # (B, C)
        if self.mixup is not None:
            return SoftTargetCrossEntropy()(logits, target)
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.finetune.label_smoothing)

    @torch.no_grad()
    def validate(self, model, stream: EvalStream, dist: Dist, dtype: torch.dtype, num_workers: int) -> dict[str, float]:
        """Top-1/top-5 (top-C with fewer classes) and the loss over every validation sample."""
        sums = torch.zeros(4, dtype=torch.float64)                              # top1, top5, loss, samples
        for batch in eval_loader(stream, num_workers):
            if "error" in batch:
                raise DataError(batch["error"])
            logits = model(batch["source"].to(dist.device).to(dtype)).float().cpu()   # (B, C)
            y = batch["label"]
            keep = y >= 0                                                       # padding batches: -1
            logits, y = logits[keep], y[keep]
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums += torch.tensor([float((ranked[:, 0] == y).sum()), float((ranked == y[:, None]).any(1).sum()),
                                  float(F.cross_entropy(logits, y, reduction="sum")) if len(y) else 0.0,
                                  float(len(y))], dtype=torch.float64)
        top1, top5, loss, n = all_reduce_sum(sums.to(dist.device)).cpu().tolist()
        return {"val/top1": 100 * top1 / n, "val/top5": 100 * top5 / n, "val/loss": loss / n}

    def export_info(self, state: dict[str, torch.Tensor]) -> dict:
        return {"num_classes": int(state["head.weight"].shape[0])}
