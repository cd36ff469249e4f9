"""Data2Vec1: the data2vec 1 student (encoder + regression head) and its loss, one module for DeepSpeed.

Mirrors fairseq `examples/data2vec/models/data2vec_audio.py: Data2VecAudioModel.forward`,
`data2vec_text.py: Data2VecTextEncoder.forward`, and data2vec_vision `beit/modeling_cyclical.py:
VisionTransformerForCyclicalTraining` with the step of `beit/engine_for_cyclical.py`:

* the student sees every token; the masked ones are replaced by the encoder's learned mask
  embedding (`mask_token`, `mask_emb`, the `<mask>` token); its output at the masked tokens goes
  through the regression head (vision: after the final LayerNorm);
* the teacher runs unmasked in eval mode and gives per-block results (`model.d2v1.target`: block
  outputs for vision, FFN outputs before the last residual for speech and text), turned into
  targets by `targets.make_targets`;
* what the EMA tracks, as the references do: vision, the whole model (`ModelEmaV2`); speech, the
  Transformer without the positional convolution (`ema_layers_only`: `pos_conv` is copied, not
  averaged) and without the CNN (`ema_transformer_only`: the teacher reads the student's
  `pre_encoder_features`); text, the blocks (`ema_transformer_layers_only`: token and position
  embeddings and the embedding LayerNorm are copied). A copied module always equals the student's
  at the next forward, so the teacher runs the student's own modules there and keeps no copy.

Returns the summed loss and `sample_size` (masked tokens on this rank, a device tensor); the training
step divides by the global masked count, as fairseq's trainer does.
"""
from __future__ import annotations

import torch
from torch import nn

from ..d2v import mean_std, var_stats
from ..masking import MaskInfo
from ..models import build_encoder
from .masks import loss_mask, loss_positions
from .targets import make_targets, regression_loss

# encoder attributes the teacher does not hold (the student's are used): see the module docstring
NOT_IN_TEACHER = {"image": None, "audio": ("feature_extractor", "feature_norm", "feature_proj", "pos_conv", "mask_emb"),
                  "text": ("embed_tokens", "embed_positions", "norm_embed")}


class Data2Vec1(nn.Module):
    def __init__(self, cfg):
        """cfg: ModelConfig with algorithm=data2vec."""
        super().__init__()
        self.cfg = cfg
        self.modality = cfg.modality
        self.encoder = build_encoder(cfg)
        self.encoder.reset_parameters()
        skip = NOT_IN_TEACHER[cfg.modality]
        if skip is not None:          # read by the teacher's copy (teacher.py: teacher_copy)
            self.encoder.local_modules = skip
            self.encoder.ema_local_encoder = False
        D = cfg.embed_dim
        if cfg.d2v1.head_layers == 1:
            self.head = nn.Linear(D, D)
        else:                         # data2vec_text head_layers=2: D -> 2D -> D
            self.head = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        if cfg.modality in ("image", "text"):   # BEiT trunc_normal(0.02) / BERT N(0, 0.02); audio: torch default
            for m in self.head.modules():
                if isinstance(m, nn.Linear):
                    (nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02) if cfg.modality == "image"
                     else nn.init.normal_(m.weight, std=0.02))
                    nn.init.zeros_(m.bias)
        self.encoder.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward(self, source: torch.Tensor, mask: torch.Tensor | MaskInfo, teacher,
                padding_mask: torch.Tensor | None = None, layer_keep: list[bool] | None = None,
                padded: bool | None = None) -> dict:
        """source: (B, ...) batch; mask: (B, T) bool (True = masked) or the text code (masks.py), or
        the step's MaskInfo (with its loss positions, made on the host); teacher: the EMA teacher
        (replicated or partitioned: teacher/), its blocks run by `teacher_layers`; padded: as
        `Data2Vec.forward`."""
        code = mask.mask if isinstance(mask, MaskInfo) else mask
        ids = mask.ids_masked if isinstance(mask, MaskInfo) else None
        ids = ids if ids is not None else loss_positions(code)                   # (B, K) (here: a host wait)
        masked = loss_mask(code)                                                  # (B, T)
        enc = self.encoder
        feats, pad = enc.local_features(source, padding_mask, padded)            # (B, T, D), the batch's padding
        clean = feats.detach()                                                    # what the teacher reads
        if code.dtype != torch.bool:                                             # text: random replacements
            feats = enc.local_features(torch.where(code >= 2, code - 2, source), padding_mask, False)[0]
        if pad is not None:
            masked = masked & ~pad
        x, _ = enc(feats, None, 1, pad, layer_keep=layer_keep, mask=masked)      # (B, E+T, D)
        x = x[:, enc.num_extra_tokens:]                                           # (B, T, D)
        with torch.no_grad():
            y = make_targets(self.teacher_layers(teacher, source, clean, pad), self.cfg)

        # the loss positions, gathered at the host's count K; those left over (shorter rows, padding)
        # weigh 0 and the count stays on the device: nothing sized by the data, no host round trip
        D = x.shape[-1]
        keep = torch.gather(masked, 1, ids).flatten()                             # (B*K,)
        pred = self.head(torch.gather(x, 1, ids[..., None].expand(-1, -1, D))).float().flatten(0, 1)  # (B*K, D)
        y_m = torch.gather(y, 1, ids[..., None].expand(-1, -1, y.shape[-1])).flatten(0, 1)          # (B*K, D)
        loss = regression_loss(pred, y_m, self.cfg, keep)
        out = {"loss": loss, "loss_reg": loss, "sample_size": keep.sum(),
               "pred_stats": var_stats(pred, keep), "target_stats": var_stats(y_m, keep)}
        out["pred_var"] = mean_std(out["pred_stats"])
        out["target_var"] = mean_std(out["target_stats"])
        return out

    def teacher_layers(self, teacher, source: torch.Tensor, feats: torch.Tensor,
                       pad: torch.Tensor | None) -> list[torch.Tensor]:
        """The teacher's per-block results (B, T, D) on the unmasked input, eval mode. `teacher`: a
        replicated or partitioned teacher (`block_results` runs its blocks, gathering each one for a
        partitioned teacher); the modules it does not hold are the student's."""
        s = self.encoder

        def embed(t: nn.Module):                      # t: the teacher's encoder, its non-block weights in place
            if self.modality == "image":              # its own patch embedding, CLS and position bias
                return t.embed(t.local_features(source)[0], None, 1, None)
            if self.modality == "audio":              # fairseq TransformerEncoder.extract_features
                x = feats if pad is None else feats.masked_fill(pad.unsqueeze(-1), 0.0)
                pos = x
                for blk in s.pos_conv:                # the student's (copied by the EMA)
                    pos = blk(pos)                                                # (B, T, D)
                return t.norm_pre(x + pos), None, pad
            was = s.embed_drop.training               # the student's embeddings (copied), no dropout
            s.embed_drop.eval()
            try:
                return s.embed(feats, None, 1, pad)                               # (B, T, D)
            finally:
                s.embed_drop.train(was)

        E, pick = s.num_extra_tokens, 1 if self.cfg.d2v1.target == "ffn" else 0
        return [r[pick][:, E:] for r in teacher.block_results(embed)]             # (B, T, D) each
