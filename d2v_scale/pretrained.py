"""`load_encoder(path)`: a pretrained encoder for downstream use, from any weights d2v_scale reads:
a weights file (`d2v export`, `d2v import-fairseq`, `d2v finetune`), a run directory (any ZeRO stage,
via checkpoint.py), a fairseq data2vec 2.0 checkpoint or a data2vec 1 one (fairseq data2vec_audio /
data2vec_text, data2vec_vision: d2v1/checkpoints.py); student or EMA teacher. The forward is
fairseq's `extract_features(mask=False)`, as its fine-tuning models use (`mae_image_classification.py`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CKPT_DIR, CheckpointError, consolidated_state, pick_tag, read_teacher_state
from .config import Config, ConfigError, from_dict
from .student import build_model
from .d2v1.checkpoints import family, from_checkpoint
from .errors import one_line
from .export import WeightsError, read_weights, read_weights_config
from .fairseq import from_fairseq, load_fairseq_checkpoint
from .models import Encoder, build_encoder, finetune_drop_path, pool_tokens


@dataclass
class EncoderWeights:
    encoder: dict[str, torch.Tensor]                 # models/ names (`blocks.0.attn.qkv.weight`, ...)
    cfg: Config                                      # the config the weights were trained with
    head: dict[str, torch.Tensor] = field(default_factory=dict)   # `fc_norm.*`, `head.*` of a classifier
    source: str = ""                                 # what was read, for messages


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _config(cfg_dict: dict, path) -> Config:
    if not cfg_dict or "model" not in cfg_dict:
        raise WeightsError(f"{path} carries no model config; write it with `d2v export` from a run directory "
                           "(its config.json travels in the file)")
    try:
        cfg = from_dict(cfg_dict)
    except (ConfigError, TypeError, ValueError) as e:
        raise WeightsError(f"{path}: its config cannot be read ({one_line(e)[:200]})") from None
    for other in {"image", "audio", "text"} - {cfg.model.modality}:
        setattr(cfg.model, other, None)          # another modality's section (once accepted, never read)
    return cfg


def _from_run(run_dir: Path, teacher: bool, tag: str | None) -> EncoderWeights:
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} has checkpoints but no config.json; it is not a d2v_scale run directory")
    cfg = _config(json.loads(cfg_path.read_text()), cfg_path)
    state, tag = consolidated_state(run_dir, tag)
    student = _strip(state, "encoder.")
    head = {k: v for k, v in state.items() if k.startswith(("fc_norm.", "head."))}
    if teacher:
        if head:
            raise CheckpointError(f"{run_dir} is a fine-tuning run: it has no EMA teacher; load it without teacher=True")
        student.update(read_teacher_state(run_dir / CKPT_DIR / pick_tag(run_dir / CKPT_DIR, tag)))
    return EncoderWeights(student, cfg, head, f"{run_dir} ({tag})")


def _from_fairseq(path: Path, teacher: bool) -> EncoderWeights:
    ckpt = load_fairseq_checkpoint(path)
    name = family(ckpt)
    if name is not None:                                 # data2vec 1: fairseq audio / text, data2vec_vision
        cfg, student, ema = from_checkpoint(ckpt, name)
        if teacher and ema is None:
            raise WeightsError(f"{path} has no EMA teacher; load the student (teacher=False)")
        return EncoderWeights({**student.encoder.state_dict(), **(ema if teacher else {})}, cfg, {}, str(path))
    if teacher and "_ema" not in (ckpt.get("model") or {}):
        raise WeightsError(f"{path} has no '_ema' teacher; load the student (teacher=False)")
    model = from_fairseq(ckpt, strict=teacher)
    state = {k: v for k, v in model.student.encoder.state_dict().items()}
    if teacher:
        state.update(model.teacher.state_dict())
    return EncoderWeights(state, model.cfg, {}, str(path))


def _from_file(path: Path, teacher: bool) -> EncoderWeights:
    student, teacher_state, cfg_dict = read_weights(path)
    cfg = _config(cfg_dict, path)
    state = _strip(student, "encoder.")
    head = {k: v for k, v in student.items() if k.startswith(("fc_norm.", "head."))}
    if teacher:
        sibling = path.with_suffix(".teacher.safetensors")
        if not teacher_state and sibling.is_file():         # `d2v export --teacher` writes it beside
            teacher_state = _strip(read_weights(sibling)[0], "encoder.")
        if not teacher_state:
            raise WeightsError(f"{path} holds no teacher (export it with `d2v export RUN_DIR OUT --teacher`, "
                               f"which writes {sibling.name} beside it)")
        state.update(teacher_state)
    return EncoderWeights(state, cfg, head, str(path))


def read_encoder(path: str | Path, teacher: bool = False, tag: str | None = None) -> EncoderWeights:
    """The encoder weights and config of any source `load_encoder` takes (all read weights-only)."""
    path = Path(path)
    if path.is_dir():
        if not (path / CKPT_DIR).is_dir():
            raise CheckpointError(f"{path} is a directory without {CKPT_DIR}/: give a run directory, a weights "
                                  "file (.safetensors) or a fairseq checkpoint (.pt)")
        return _from_run(path, teacher, tag)
    if not path.is_file():
        raise WeightsError(f"{path} not found: give a run directory, a weights file (d2v export, d2v "
                           "import-fairseq, d2v finetune) or a data2vec checkpoint (fairseq 2.0 or 1, data2vec_vision)")
    with open(path, "rb") as f:
        magic = f.read(8)
    if path.suffix in (".pt", ".pth") or magic[:2] == b"PK":   # torch's zip format: a reference checkpoint
        return _from_fairseq(path, teacher)
    return _from_file(path, teacher)


def random_weights(path: str | Path) -> EncoderWeights:
    """The encoder the pretraining of `path`'s config starts from (seed run.seed, as `build_engine`
    draws it): the baseline a probe of the pretrained weights is measured against."""
    cfg = _config(read_config(path), path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg)
    return EncoderWeights(model.encoder.state_dict(), cfg, {}, f"random init of {path}")


def finetune_encoder(weights: EncoderWeights, drop_path: float, seed: int) -> Encoder:
    """The --init encoder for fine-tuning (weights.cfg.model), with fairseq's fine-tuning drop-path
    ramp; the global RNG seeded first, so a task's new head is the same on every rank."""
    torch.manual_seed(seed)
    m = weights.cfg.model
    encoder = build_encoder(m)
    missing, unexpected = encoder.load_state_dict(weights.encoder, strict=False)
    if missing or unexpected:
        raise ConfigError(f"--init {weights.source}: the weights do not fit their encoder (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    encoder.set_drop_path(finetune_drop_path(m.depth, m.prenet_depth, drop_path))
    return encoder


def read_config(path: str | Path) -> dict:
    """The config dict of the weights at `path`, reading as little as it can (a run's config.json, a
    file's metadata; a fairseq checkpoint is read whole)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.is_file() and path.suffix == ".safetensors":
        return read_weights_config(path)
    return read_encoder(path).cfg.to_dict()


class PretrainedEncoder(nn.Module):
    """A frozen-or-trainable encoder on full inputs: `forward_features` -> (B, extra+T, D) tokens
    (images: CLS first), `pool(tokens, how)` -> (B, D), `encode` = both, padding handled."""

    def __init__(self, weights: EncoderWeights):
        super().__init__()
        self.cfg = weights.cfg
        self.source = weights.source
        self.encoder = build_encoder(weights.cfg.model)
        missing, unexpected = self.encoder.load_state_dict(weights.encoder, strict=False)
        if missing or unexpected:
            raise WeightsError(f"{weights.source}: the weights do not fit the encoder their config describes "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.head_state = weights.head

    @property
    def modality(self) -> str:
        return self.cfg.model.modality

    @property
    def embed_dim(self) -> int:
        return self.cfg.model.embed_dim

    @property
    def num_extra_tokens(self) -> int:
        return self.encoder.num_extra_tokens

    def forward_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """source: images (B, 3, H, W), waveforms (B, S) or token ids (B, T) -> (B, extra+T, D)."""
        return self.encoder.extract_features(source, padding_mask)[0]

    forward = forward_features

    def pool(self, tokens: torch.Tensor, how: str = "mean", padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, extra+T, D) -> (B, D): mean of the input tokens (token `padding_mask` (B, T) left out) or CLS."""
        return pool_tokens(tokens, how, self.num_extra_tokens, padding_mask)

    def encode(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None, how: str = "mean") -> torch.Tensor:
        """Pooled features (B, D); padded audio frames and text pads are left out of the mean."""
        x, pad = self.encoder.extract_features(source, padding_mask)
        return pool_tokens(x, how, self.num_extra_tokens, pad)


def load_encoder(path: str | Path, teacher: bool = False, tag: str | None = None,
                 device: str | torch.device = "cpu") -> PretrainedEncoder:
    """A weights file, run directory or fairseq checkpoint -> PretrainedEncoder in eval mode, fp32."""
    return PretrainedEncoder(read_encoder(path, teacher, tag)).to(device).eval()
