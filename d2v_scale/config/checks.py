"""The checks a configuration must pass before any rank starts: value ranges and the combinations a
run would crash on or silently misuse, each refused in one line naming the key and the fix."""
from __future__ import annotations

import math

from ..errors import D2VError

MODALITIES = ("image", "audio", "text")
ALGORITHMS = ("data2vec2", "data2vec")
PLACEMENTS = ("auto", "replicated", "host", "device_bf16_host_ema", "device", "sharded")
_OTHER_PRESET = {"image": "vit_base_patch16", "audio": "audio_base", "text": "text_base"}


class ConfigError(D2VError, ValueError):
    """A configuration problem, reported before any rank starts work."""


def _finite(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    def ok(v) -> bool:
        return (isinstance(v, (int, float)) and math.isfinite(v) and (v > lo if lo_open else v >= lo)
                and (v < hi if hi_open else v <= hi))
    return ok


_POSITIVE, _NON_NEGATIVE = _finite(0, lo_open=True), _finite(0)
_AT_LEAST_1 = _finite(1)
_PROB = _finite(0, 1, hi_open=True)
# (key, predicate, what the value must be): every number a run would otherwise crash or silently misuse
_RANGES = [
    ("optim.lr", _POSITIVE, "a finite number > 0"),
    ("optim.min_lr", _NON_NEGATIVE, "a finite number >= 0"),
    ("optim.eps", _POSITIVE, "a finite number > 0"),
    ("optim.weight_decay", _NON_NEGATIVE, "a finite number >= 0"),
    ("optim.clip_grad", _NON_NEGATIVE, "a finite number >= 0 (0 = off)"),
    ("optim.warmup_steps", _NON_NEGATIVE, "an integer >= 0"),
    ("optim.max_steps", _AT_LEAST_1, "an integer >= 1"),
    ("data.batch_size", _AT_LEAST_1, "an integer >= 1 (samples per rank per micro-step)"),
    ("data.global_batch", _NON_NEGATIVE, "an integer >= 0 (0: batch_size x ranks)"),
    ("data.num_workers", _NON_NEGATIVE, "an integer >= 0"),
    ("data.shuffle_buffer", _NON_NEGATIVE, "an integer >= 0"),
    ("data.epoch_samples", _AT_LEAST_1, "an integer >= 1"),
    ("data.sample_rate", _AT_LEAST_1, "an integer >= 1"),
    ("data.min_sample_size", _AT_LEAST_1, "an integer >= 1"),
    ("data.tokens_per_sample", _finite(2), "an integer >= 2"),
    ("data.max_image_pixels", _AT_LEAST_1, "an integer >= 1 (width x height of the largest image decoded)"),
    ("mask.clone_batch", _AT_LEAST_1, "an integer >= 1"),
    ("mask.mask_length", _AT_LEAST_1, "an integer >= 1"),
    ("mask.mask_noise_std", _NON_NEGATIVE, "a finite number >= 0"),
    ("teacher.ema_decay", _finite(0, 1, lo_open=True), "in (0, 1]"),
    ("teacher.ema_end_decay", _finite(0, 1, lo_open=True), "in (0, 1]"),
    ("teacher.ema_anneal_end_step", _NON_NEGATIVE, "an integer >= 0"),
    ("teacher.window_gb", _NON_NEGATIVE, "a finite number >= 0 (0: a teacher pass per micro-step)"),
    ("model.embed_dim", _AT_LEAST_1, "an integer >= 1"),
    ("model.depth", _AT_LEAST_1, "an integer >= 1"),
    ("model.prenet_depth", _NON_NEGATIVE, "an integer >= 0"),
    ("model.num_heads", _AT_LEAST_1, "an integer >= 1"),
    ("model.mlp_ratio", _POSITIVE, "a finite number > 0"),
    ("model.encoder_dropout", _PROB, "in [0, 1)"),
    ("model.attention_dropout", _PROB, "in [0, 1)"),
    ("model.activation_dropout", _PROB, "in [0, 1)"),
    ("model.post_mlp_drop", _PROB, "in [0, 1)"),
    ("model.dropout_input", _PROB, "in [0, 1)"),
    ("model.prenet_dropout", _PROB, "in [0, 1)"),
    ("model.layerdrop", _PROB, "in [0, 1)"),
    ("model.prenet_layerdrop", _PROB, "in [0, 1)"),
    ("model.decoder.decoder_dim", _AT_LEAST_1, "an integer >= 1"),
    ("model.decoder.decoder_layers", _NON_NEGATIVE, "an integer >= 0"),
    ("model.decoder.decoder_kernel", _AT_LEAST_1, "an integer >= 1"),
    ("model.decoder.decoder_groups", _AT_LEAST_1, "an integer >= 1"),
    ("run.log_every", _AT_LEAST_1, "an integer >= 1"),
    ("run.save_every", _AT_LEAST_1, "an integer >= 1"),
    ("run.keep_last", _NON_NEGATIVE, "an integer >= 0 (0 keeps every checkpoint)"),
    ("run.stop_after", _NON_NEGATIVE, "an integer >= 0"),
    ("run.peak_tflops", _NON_NEGATIVE, "a finite number >= 0"),
    ("run.stop_timeout_s", _POSITIVE, "a finite number of seconds > 0"),
    ("data.stall_timeout_s", _POSITIVE, "a finite number of seconds > 0"),
    ("eval.every", _NON_NEGATIVE, "an integer >= 0 (0 = off)"),
    ("eval.k", _AT_LEAST_1, "an integer >= 1"),
    ("eval.temperature", _POSITIVE, "a finite number > 0"),
    ("eval.batch_size", _AT_LEAST_1, "an integer >= 1"),
    ("eval.num_workers", _NON_NEGATIVE, "an integer >= 0"),
    ("finetune.num_classes", _NON_NEGATIVE, "an integer >= 0 (0: from the shards' index)"),
    ("finetune.layer_decay", _finite(0, 1, lo_open=True), "in (0, 1] (1 = off)"),
    ("finetune.drop_path", _PROB, "in [0, 1)"),
    ("finetune.mixup", _NON_NEGATIVE, "a finite number >= 0 (0 = off)"),
    ("finetune.cutmix", _NON_NEGATIVE, "a finite number >= 0 (0 = off)"),
    ("finetune.mixup_prob", _finite(0, 1), "in [0, 1]"),
    ("finetune.mixup_switch_prob", _finite(0, 1), "in [0, 1]"),
    ("finetune.label_smoothing", _PROB, "in [0, 1)"),
    ("finetune.reprob", _finite(0, 1), "in [0, 1]"),
    ("finetune.recount", _AT_LEAST_1, "an integer >= 1"),
    ("finetune.crop_pct", _finite(0, 1, lo_open=True), "in (0, 1]"),
    ("finetune.eval_every", _NON_NEGATIVE, "an integer >= 0 (0: once per loader epoch)"),
    ("finetune.mask_prob", _finite(0, 1), "in [0, 1]"),
    ("finetune.mask_length", _AT_LEAST_1, "an integer >= 1"),
    ("finetune.mask_channel_prob", _finite(0, 1), "in [0, 1]"),
    ("finetune.mask_channel_length", _AT_LEAST_1, "an integer >= 1"),
    ("finetune.freeze_finetune_updates", _NON_NEGATIVE, "an integer >= 0"),
    ("finetune.final_dropout", _PROB, "in [0, 1)"),
    ("finetune.encoder_dropout", _PROB, "in [0, 1)"),
    ("finetune.attention_dropout", _PROB, "in [0, 1)"),
    ("finetune.layerdrop", _PROB, "in [0, 1)"),
    ("finetune.activation_dropout", _PROB, "in [0, 1)"),
    ("lm.beam", _AT_LEAST_1, "an integer >= 1"),
    ("finetune.pooler_dropout", _PROB, "in [0, 1)"),
]


def validate(cfg) -> None:
    """cfg: Config. Raises ConfigError naming the key, the value and what it must be."""
    m = cfg.model
    if m.modality not in MODALITIES:
        raise ConfigError(f"model.modality={m.modality!r}: choose one of {', '.join(MODALITIES)}")
    if getattr(m, m.modality) is None:
        raise ConfigError(f"model.{m.modality} is not set for modality {m.modality!r}")
    for other in MODALITIES:
        if other != m.modality and getattr(m, other) is not None:
            raise ConfigError(f"--model.{other}.* is set but this config builds the {m.modality} encoder, "
                              f"which never reads the {other} section: drop those flags, or pick a {other} "
                              f"preset (e.g. --preset {_OTHER_PRESET[other]})")
    for key, ok, want in _RANGES:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part) if value is not None else None
        if value is not None and not ok(value):
            raise ConfigError(f"--{key}={value!r}: must be {want}")
    if m.algorithm not in ALGORITHMS:
        raise ConfigError(f"model.algorithm={m.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    if m.algorithm == "data2vec" and m.prenet_depth:
        raise ConfigError(f"model.prenet_depth={m.prenet_depth}: data2vec 1 encoders have no prenet; set it to 0")
    if m.algorithm == "data2vec" and m.modality == "audio" and m.audio.use_alibi:
        raise ConfigError("model.audio.use_alibi=true: the data2vec 1 (wav2vec 2.0) encoder has no ALiBi; set it false")
    if m.embed_dim % m.num_heads:
        raise ConfigError(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    if m.modality == "image" and m.image.img_size % m.image.patch_size:
        raise ConfigError(f"model.image.patch_size={m.image.patch_size} does not divide model.image.img_size="
                          f"{m.image.img_size}: pick sizes with img_size % patch_size == 0")
    if not 1 <= m.average_top_k_layers <= m.depth:
        raise ConfigError(f"model.average_top_k_layers={m.average_top_k_layers} must be in [1, model.depth={m.depth}]")
    if cfg.teacher.placement not in PLACEMENTS:
        raise ConfigError(f"teacher.placement={cfg.teacher.placement!r}: one of {', '.join(PLACEMENTS)}")
    if cfg.teacher.overlap_ema not in ("auto", "true", "false"):
        raise ConfigError(f"teacher.overlap_ema={cfg.teacher.overlap_ema!r}: auto, true or false")
    if cfg.data.sampling not in ("split", "resample"):
        raise ConfigError(f"data.sampling={cfg.data.sampling!r}: split or resample")
    if cfg.optim.schedule not in ("cosine", "tri_stage", "polynomial"):
        raise ConfigError(f"--optim.schedule={cfg.optim.schedule!r}: cosine, tri_stage or polynomial")
    if cfg.optim.schedule == "tri_stage" and abs(sum(cfg.optim.phase_ratio) - 1) > 1e-6:
        raise ConfigError(f"--optim.phase_ratio={cfg.optim.phase_ratio}: the warmup, hold and decay fractions "
                          "must add up to 1 (fairseq's tri_stage)")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"--optim.min_lr={cfg.optim.min_lr} is above --optim.lr={cfg.optim.lr}: the cosine "
                          "schedule decays from lr to min_lr")
    lo, hi = cfg.data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"--data.crop_scale={cfg.data.crop_scale}: need 0 < min <= max <= 1")
    if cfg.data.max_sample_size < cfg.data.min_sample_size:
        raise ConfigError(f"--data.max_sample_size={cfg.data.max_sample_size} is below --data.min_sample_size="
                          f"{cfg.data.min_sample_size}")
    _validate_eval(cfg)
    _validate_finetune(cfg)

def _validate_eval(cfg) -> None:
    e = cfg.eval
    if e.pool not in ("mean", "cls"):
        raise ConfigError(f"--eval.pool={e.pool!r}: mean or cls")
    if e.pool == "cls" and cfg.model.modality != "image":
        raise ConfigError(f"--eval.pool=cls: the {cfg.model.modality} encoder has no CLS token; use mean")
    if e.data and not e.every:
        raise ConfigError("--eval.data needs --eval.every=STEPS: how many optimizer steps apart the kNN monitor runs")
    if e.every and not e.data:
        raise ConfigError("--eval.every needs --eval.data=SHARDS: labelled shards (d2v-shard image on class "
                          "folders writes them) for the kNN monitor")
    if e.every and e.every % cfg.run.log_every:
        raise ConfigError(f"--eval.every={e.every} is not a multiple of --run.log_every={cfg.run.log_every}: the "
                          "monitor's values go into that step's log row; pick a multiple")

def _validate_finetune(cfg) -> None:
    f = cfg.finetune
    if f.pool not in ("mean", "cls"):
        raise ConfigError(f"--finetune.pool={f.pool!r}: mean or cls")
    lo, hi = f.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"--finetune.crop_scale={f.crop_scale}: need 0 < min <= max <= 1")
    if f.layer_decay_rule not in ("fairseq", "beit"):
        raise ConfigError(f"--finetune.layer_decay_rule={f.layer_decay_rule!r}: fairseq or beit")
    if f.task and (f.mixup > 0 or f.cutmix > 0) and cfg.data.batch_size % 2:
        raise ConfigError(f"--data.batch_size={cfg.data.batch_size}: mixup/cutmix mix each batch with its "
                          "flip and need an even batch; pick an even size or set --finetune.mixup=0 --finetune.cutmix=0")
