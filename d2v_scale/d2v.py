"""Data2Vec: the student (encoder + decoder) and the data2vec 2.0 loss, one module for DeepSpeed.

Follows fairseq `examples/data2vec/models/data2vec2.py: Data2VecMultiModel.forward` without its
modality branches: the encoder classes own every modality difference. The teacher is passed in
(it stays outside the DeepSpeed engine) and runs once per sample on the student's local features
or, for images, on the clean image, after the student's forward (fairseq runs it first; the order
changes no number: the teacher draws no random numbers).

Loss (reference 4.1/4.2): per masked token, sum over D of (pred - target)^2 * s with
s = loss_scale or 1/sqrt(D); the module returns the *summed* loss and `sample_size` (masked tokens
on this rank: an int, or a device tensor when padding makes it data-dependent), and the training
step divides by the global masked count. The CLS term is
`cls_loss * sample_size * sum_rows,d (cls_pred - mean_t y)^2 * s`, exactly as fairseq weights it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .masking import MaskInfo
from .models import build_decoder, build_encoder


def init_bert(module: nn.Module) -> None:
    """fairseq `init_bert_params`: N(0, 0.02) Linear/Embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()


def var_stats(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(2*D + 1,) float64 [count, sum, sum of squares] of the rows of x (N, D) that `keep` (N,) bool
    marks (None: all), summable across ranks."""
    x = x.detach().double()
    if keep is None:
        n = torch.full((1,), x.shape[0], dtype=x.dtype, device=x.device)  # filled on the device: no copy
    else:
        n = keep.sum().to(x.dtype).reshape(1)                             # counted on the device
        x = x * keep[:, None].to(x.dtype)                                 # (N, D) rows left out are 0
    return torch.cat([n, x.sum(0), (x * x).sum(0)])


def mean_std(stats: torch.Tensor) -> torch.Tensor:
    """fairseq compute_var: mean over dims of sqrt(unbiased var + 1e-6), from (summed) `var_stats`."""
    n, rest = stats[0], stats[1:]
    s, ss = rest.chunk(2)
    var = (ss - s * s / n) / (n - 1)
    return torch.sqrt(var.clamp_min(0) + 1e-6).mean()


class Data2Vec(nn.Module):
    def __init__(self, cfg, mask_noise_std: float = 0.01):
        """cfg: ModelConfig."""
        super().__init__()
        self.cfg = cfg
        self.mask_noise_std = mask_noise_std
        self.encoder = build_encoder(cfg)
        self.decoder = build_decoder(cfg, self.encoder)
        self.loss_scale = cfg.loss_scale if cfg.loss_scale is not None else 1 / math.sqrt(cfg.embed_dim)
        self.apply(init_bert)
        self.encoder.reset_parameters()
        if self.encoder.decoder_default_init:  # fairseq image/audio reset the decoder projection
            for mod in self.decoder.proj.modules():
                if isinstance(mod, nn.Linear):
                    mod.reset_parameters()
        self.encoder.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward(self, source: torch.Tensor, mask: torch.Tensor | MaskInfo, teacher,
                padding_mask: torch.Tensor | None = None, layer_keep: list[bool] | None = None,
                padded: bool | None = None) -> dict:
        """source: (B, ...) batch; mask: (B*M, T) bool, True = masked, sample-major; teacher(source,
        feats, padding_mask) -> (B, T, D) fp32 targets; padded: whether the batch has padded tokens
        (`encoder.has_padding`, decided on the host; None: found out here, a host wait on a GPU)."""
        info = mask if isinstance(mask, MaskInfo) else MaskInfo.from_mask(mask)
        M = info.mask.shape[0] // source.shape[0]

        # local features once per sample; the teacher may reuse them (audio, text)
        feats, padding_mask = self.encoder.local_features(source, padding_mask, padded)  # (B, T, D)

        # student: visible tokens of M clones, then the decoder over all positions
        pad_m = padding_mask.repeat_interleave(M, 0) if padding_mask is not None else None
        x, _ = self.encoder(feats, info.ids_keep, M, pad_m, layer_keep=layer_keep)  # (B*M, E+T_keep, D)
        pred = self.decoder(self.decoder_input(x, info))                         # (B*M, T, D)

        # teacher targets, once per sample: asked for after the student's forward, so a teacher whose
        # EMA of the last step is still being blended on the host has had that time
        with torch.no_grad():
            y = teacher(source, feats.detach(), padding_mask)                     # (B, T, D) fp32

        # regression on masked tokens (rows sample-major: sample = row // M), in row-major order:
        # exact-count masks, gathered at known sizes; padded frames among them weigh 0 and are
        # counted on the device (no `nonzero`: nothing sized by the data, no host round trip)
        idx = info.masked_positions()                                             # (B*M, T_m)
        D = pred.shape[-1]
        pred_m = torch.gather(pred, 1, idx[..., None].expand(-1, -1, D)).flatten(0, 1).float()  # (N, D)
        idx_y = idx.reshape(source.shape[0], -1)                                  # (B, M*T_m)
        y_m = torch.gather(y, 1, idx_y[..., None].expand(-1, -1, D)).flatten(0, 1)              # (N, D)
        err = (pred_m - y_m) ** 2                                                 # (N, D)
        keep, sample_size = None, idx.numel()
        if pad_m is not None:        # padded audio/text: a different count of real masked tokens per row
            keep = ~torch.gather(pad_m, 1, idx).flatten()                         # (N,) True = a real token
            err = torch.where(keep[:, None], err, 0.0)
            sample_size = keep.sum()                                              # () int64, on the device
        loss_reg = err.sum() * self.loss_scale
        out = {"loss_reg": loss_reg, "sample_size": sample_size,
               "pred_stats": var_stats(pred_m, keep), "target_stats": var_stats(y_m, keep)}

        loss = loss_reg
        E = self.encoder.num_extra_tokens
        if self.cfg.cls_loss > 0 and E > 0:
            if padding_mask is not None:
                keep = (~padding_mask).unsqueeze(-1).float()
                y_mean = (y * keep).sum(1) / keep.sum(1)
            else:
                y_mean = y.mean(1)                                                # (B, D)
            cls_err = (x[:, 0].float() - y_mean.repeat_interleave(M, 0)) ** 2     # (B*M, D)
            out["loss_cls"] = cls_err.sum() * self.loss_scale * self.cfg.cls_loss * sample_size
            loss = loss + out["loss_cls"]
        out["loss"] = loss
        out["pred_var"] = mean_std(out["pred_stats"])
        out["target_var"] = mean_std(out["target_stats"])
        return out

    def decoder_input(self, x: torch.Tensor, info: MaskInfo) -> torch.Tensor:
        """Visible outputs + N(0, mask_noise_std^2) noise at masked slots, back in original order."""
        x = self.decoder.input_dropout(x)[:, self.encoder.num_extra_tokens:]      # (B*M, T_keep, D)
        n_masked = info.ids_restore.shape[1] - x.shape[1]
        noise = x.new_empty(x.shape[0], n_masked, x.shape[2]).normal_(0, self.mask_noise_std)
        x = torch.cat([x, noise], dim=1)                                          # (B*M, T, D) shuffled
        return torch.gather(x, 1, info.ids_restore[..., None].expand(-1, -1, x.shape[2]))
