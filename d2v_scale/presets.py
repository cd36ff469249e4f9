"""Named configurations with the published data2vec 2.0 values.

Sources: fairseq `examples/data2vec/config/v2/*.yaml` (commit 3d262bb) on top of the
`Data2VecMultiConfig` defaults. Global batch sizes are what the schedules imply (375,300 updates =
150 ImageNet epochs at 512 images); the yaml `distributed_world_size` values are overridden at
launch by fairseq's slurm configs. Every preset has a `*_debug` twin (tiny, same recipe) for tests,
the demo and CPU smoke runs.
"""
from __future__ import annotations

import dataclasses
import difflib

from .config import (AudioConfig, Config, ConfigError, DataConfig, DecoderConfig, FinetuneConfig, ImageConfig,
                     MaskConfig, ModelConfig, OptimConfig, RunConfig, TeacherConfig, TextConfig,
                     apply_overrides, from_json)
from .d2v1.presets import PRESETS as D2V1_PRESETS
from .errors import has_url_credentials, url_credentials_refusal

NO_COLLAPSE_GUARD = dict(min_target_var=0.0, min_pred_var=0.0)   # all vision yamls set both to 0


def vit_base_patch16() -> Config:  # base_images_only_task.yaml
    return Config(
        model=ModelConfig(modality="image", embed_dim=768, depth=10, prenet_depth=2, num_heads=12,
                          norm_eps=1e-6, average_top_k_layers=10, layer_norm_targets=True, cls_loss=0.01,
                          decoder=DecoderConfig(decoder_dim=768, decoder_layers=6, decoder_kernel=3,
                                                decoder_groups=16),
                          image=ImageConfig(img_size=224, patch_size=16)),
        mask=MaskConfig(mask_prob=0.8, mask_prob_adjust=0.07, mask_length=3, inverse_mask=True,
                        clone_batch=16, mask_noise_std=0.01),
        teacher=TeacherConfig(ema_decay=0.9998, ema_end_decay=0.99999, ema_anneal_end_step=100_000),
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, warmup_steps=50_040,
                          max_steps=375_300, clip_grad=4.0),
        data=DataConfig(batch_size=16, global_batch=512, crop_scale=(0.2, 1.0)),  # 32 GPUs x 16
        run=RunConfig(**NO_COLLAPSE_GUARD))


def vit_large_patch16() -> Config:  # large_images_only_task.yaml
    c = vit_base_patch16()
    c.model = dataclasses.replace(
        c.model, embed_dim=1024, depth=24, prenet_depth=0, num_heads=16, average_top_k_layers=18,
        decoder=DecoderConfig(decoder_dim=1024, decoder_layers=3, decoder_kernel=5, decoder_groups=16))
    c.mask = dataclasses.replace(c.mask, mask_prob=0.75, mask_prob_adjust=0.1)
    c.teacher.ema_anneal_end_step = 150_000
    c.optim.lr = 4e-4
    c.data.batch_size = 8  # 64 GPUs x 8 = 512
    return c


def vit_huge_patch14() -> Config:  # huge_images14_only_task.yaml
    c = vit_large_patch16()
    c.model = dataclasses.replace(
        c.model, embed_dim=1280, depth=32, num_heads=16, average_top_k_layers=24,
        image=ImageConfig(img_size=224, patch_size=14))
    c.teacher = TeacherConfig(ema_decay=0.9998, ema_end_decay=1.0, ema_anneal_end_step=300_000)  # frozen after
    c.optim.max_steps = 500_000
    # 500k updates: 100 epochs at 256 or 200 at 512 (unverified which); 512 matches B and L.
    return c


def audio_base() -> Config:  # base_audio_only_task.yaml
    return Config(
        model=ModelConfig(modality="audio", embed_dim=768, depth=12, prenet_depth=0, num_heads=12,
                          norm_eps=1e-5, encoder_dropout=0.1, attention_dropout=0.1, post_mlp_drop=0.1,
                          prenet_dropout=0.1, layerdrop=0.05, prenet_layerdrop=0.05,
                          average_top_k_layers=8, layer_norm_targets=False, cls_loss=0.0,
                          decoder=DecoderConfig(decoder_dim=384, decoder_layers=4, decoder_kernel=7,
                                                decoder_groups=16, input_dropout=0.1),
                          audio=AudioConfig()),
        mask=MaskConfig(mask_prob=0.5, mask_prob_adjust=0.05, mask_length=5, inverse_mask=False,
                        clone_batch=8, mask_noise_std=0.01),
        teacher=TeacherConfig(ema_decay=0.999, ema_end_decay=0.99999, ema_anneal_end_step=75_000),
        optim=OptimConfig(lr=7.5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, warmup_steps=8_000,
                          max_steps=400_000, clip_grad=0.0),
        # max_tokens 1,000,000 samples per GPU x 8 GPUs: ~3 utterances of <=20 s per GPU
        data=DataConfig(batch_size=3, global_batch=24, min_sample_size=32_000, max_sample_size=320_000),
        run=RunConfig())


def audio_large() -> Config:  # large_audio_only_task.yaml
    c = audio_base()
    c.model = dataclasses.replace(
        c.model, embed_dim=1024, depth=16, prenet_depth=8, num_heads=16, average_top_k_layers=16,
        layerdrop=0.0, prenet_layerdrop=0.0,
        decoder=dataclasses.replace(c.model.decoder, decoder_dim=768))
    c.mask = dataclasses.replace(c.mask, mask_prob=0.55, mask_prob_adjust=0.1, clone_batch=12)
    c.teacher = TeacherConfig(ema_decay=0.9997, ema_end_decay=1.0, ema_anneal_end_step=300_000)
    c.optim = dataclasses.replace(c.optim, lr=4e-4, warmup_steps=10_000, max_steps=600_000, clip_grad=1.0)
    c.data = dataclasses.replace(c.data, batch_size=1, global_batch=48)  # max_tokens 320k (20 s) x 48 GPUs
    return c


def text_base() -> Config:  # base_text_only_task.yaml
    return Config(
        model=ModelConfig(modality="text", embed_dim=768, depth=12, prenet_depth=0, num_heads=12,
                          norm_eps=1e-5, encoder_dropout=0.1, attention_dropout=0.1, post_mlp_drop=0.1,
                          average_top_k_layers=12, layer_norm_targets=False, loss_scale=1.0, cls_loss=0.0,
                          decoder=DecoderConfig(decoder_dim=768, decoder_layers=5, decoder_kernel=9,
                                                decoder_groups=1, decoder_residual=False,
                                                projection_layers=2, projection_ratio=2.0, input_dropout=0.1),
                          text=TextConfig(max_positions=512, dropout=0.1)),
        mask=MaskConfig(mask_prob=0.48, mask_prob_adjust=0.0, mask_length=1, inverse_mask=False,
                        clone_batch=8, mask_noise_std=0.01),
        teacher=TeacherConfig(ema_decay=0.9999, ema_end_decay=0.99999, ema_anneal_end_step=100_000),
        optim=OptimConfig(lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, warmup_steps=4_000,
                          max_steps=1_000_000, clip_grad=1.0),
        data=DataConfig(batch_size=4, global_batch=64, tokens_per_sample=512),  # 4 x 16 GPUs
        run=RunConfig())


# -- fine-tuning: fairseq examples/data2vec/config/vision/finetuning/mae_imagenet_*clean.yaml ---------------
# Values the yamls leave out are MaeImageClassificationConfig's defaults (models/mae_image_classification.py)
# and the augmentation of data/mae_finetuning_image_dataset.py. The encoder comes from --init; the
# `model` section of these presets only names the size the recipe was published for.
IMAGENET_STEPS_PER_EPOCH = 2_502   # 1,281,167 images / 512: max_update 250,200 = 100 epochs


def vit_base_patch16_ft() -> Config:  # mae_imagenet_clean.yaml
    c = vit_base_patch16()
    c.optim = OptimConfig(lr=1e-3, betas=(0.9, 0.95), eps=1e-8,     # lr_float 0.001, adam_betas [0.9,0.95]
                          weight_decay=0.05, warmup_steps=16_000,    # weight_decay 0.05, warmup_updates 16000
                          max_steps=250_200, min_lr=1e-6,            # max_update 250200, min_lr 1e-6
                          clip_grad=0.0)                             # no clip_norm in the yaml
    c.data = DataConfig(batch_size=32, global_batch=512,             # batch_size 32 x distributed_world_size 16
                        epoch_samples=80_073)                        # ImageNet-1k's 1,281,167 over those 16 ranks
    c.finetune = FinetuneConfig(
        task="image_classification",
        mixup=0.7, mixup_prob=0.9,                                   # yaml model.mixup 0.7, mixup_prob 0.9
        cutmix=1.0, mixup_switch_prob=0.5, label_smoothing=0.1,      # config defaults
        layer_decay=0.65, drop_path=0.1, pool="mean",                # config defaults (prediction_mode MEAN_POOLING)
        crop_scale=(0.08, 1.0),                                      # timm create_transform default
        auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1,   # dataset defaults
        crop_pct=224 / 256,                                          # build_transform eval: resize 256, crop 224
        eval_every=IMAGENET_STEPS_PER_EPOCH)                         # checkpoint.save_interval 1 (epoch)
    c.run = RunConfig(save_every=IMAGENET_STEPS_PER_EPOCH, keep_last=1,   # keep_interval_updates 1 (+ best)
                      log_every=200)                                 # log_interval 200
    return c


def vit_large_patch16_ft() -> Config:  # mae_imagenet_large_clean.yaml
    c = vit_base_patch16_ft()
    c.model = vit_large_patch16().model
    c.optim = dataclasses.replace(c.optim, lr=5e-4, max_steps=125_200,   # lr_float 0.0005, max_update 125200
                                  min_lr=1e-7, clip_grad=4.0)            # min_lr 1e-7, clip_norm 4
    c.finetune = dataclasses.replace(c.finetune, layer_decay=0.75, drop_path=0.2)   # layer_decay 0.75, drop_path_rate 0.2
    return c


def vit_huge_patch14_ft() -> Config:  # mae_imagenet_huge_clean.yaml
    c = vit_large_patch16_ft()
    c.model = vit_huge_patch14().model
    c.optim.min_lr = 1e-20                                           # min_lr 1e-20
    return c


# -- speech recognition (--task audio_ctc): fairseq examples/wav2vec/config/finetuning/*.yaml, the recipe
# data2vec's speech models were fine-tuned with (Wav2Vec2AsrConfig defaults where a yaml says nothing).
# Utterances are never cropped: max_sample_size takes LibriSpeech's longest (35 s).
def audio_base_ctc() -> Config:  # base_100h.yaml
    c = audio_base()
    c.optim = OptimConfig(lr=3e-5, betas=(0.9, 0.98), eps=1e-8,   # lr [0.00003], adam_betas (0.9,0.98), adam_eps 1e-08
                          weight_decay=0.0, clip_grad=0.0,           # adam's defaults: no weight decay, no clip_norm
                          max_steps=80_000, warmup_steps=0,          # max_update 80000
                          schedule="tri_stage", phase_ratio=(0.1, 0.4, 0.5),   # tri_stage, phase_ratio [0.1, 0.4, 0.5]
                          init_lr_scale=0.01, final_lr_scale=0.05)   # init_lr_scale default, final_lr_scale 0.05
    # max_tokens 3,200,000 samples (~16 LibriSpeech utterances of ~12.5 s) x 2 GPUs x update_freq 4
    c.data = DataConfig(batch_size=16, global_batch=128, min_sample_size=16_000, max_sample_size=560_000,
                        epoch_samples=14_270,                        # train-clean-100's 28,539 utterances over 2 ranks
                        normalize=True)                              # as the data2vec encoder was pretrained
    c.finetune = FinetuneConfig(
        task="audio_ctc", mixup=0.0, cutmix=0.0, layer_decay=1.0, drop_path=0.0,
        mask_prob=0.65, mask_length=10,                              # mask_prob 0.65, mask_length default 10
        mask_channel_prob=0.5, mask_channel_length=64,               # mask_channel_prob 0.5, mask_channel_length 64
        freeze_finetune_updates=0, freeze_feature_encoder=True,      # freeze_finetune_updates 0, feature_grad_mult 0.0
        layerdrop=0.1, activation_dropout=0.1,                       # layerdrop 0.1, activation_dropout 0.1
        final_dropout=0.0, encoder_dropout=0.0, attention_dropout=0.0,   # config defaults
        eval_every=0)                                                # validated every epoch, best by wer
    c.run = RunConfig(log_every=200, save_every=1_000, keep_last=1)  # log_interval 200, no_epoch_checkpoints
    return c


def audio_large_ctc() -> Config:  # vox_100h.yaml
    c = audio_base_ctc()
    c.model = audio_large().model
    # max_tokens 1,280,000 samples (~6 utterances) x 4 GPUs x update_freq 5
    c.data = dataclasses.replace(c.data, batch_size=6, global_batch=120, epoch_samples=7_135)
    c.finetune = dataclasses.replace(c.finetune, mask_prob=0.5,      # mask_prob 0.5
                                     freeze_finetune_updates=10_000)  # freeze_finetune_updates 10000
    return c


def _ctc_debug(fn, pretrain_debug):
    """A CPU-sized schedule for a speech fine-tuning preset (same recipe, short); the debug twin's model."""
    def make() -> Config:
        c = fn()
        c.model = pretrain_debug().model
        c.optim = dataclasses.replace(c.optim, lr=5e-4, max_steps=300)
        c.data = dataclasses.replace(c.data, batch_size=4, global_batch=0, epoch_samples=2000, min_sample_size=8_000,
                                     max_sample_size=320_000)
        c.finetune = dataclasses.replace(c.finetune, mask_channel_length=8,   # 64 of 64 channels would be all
                                         freeze_finetune_updates=min(c.finetune.freeze_finetune_updates, 20))
        c.run = dataclasses.replace(c.run, log_every=5, save_every=100, keep_last=2)
        return c
    return make


# -- fine-tuning text: fairseq examples/data2vec/config/v2/text_finetuning/<task>.yaml ----------------------
# Every yaml: optimizer adam, adam_betas (0.9,0.98), adam_eps 1e-06, weight_decay 0.1; lr_scheduler
# polynomial_decay (power 1, end lr 0); clip_norm 0.0; distributed_world_size 1 (batch_size is the global
# batch); model data2vec_text_classification with its defaults (pooler_dropout 0.0, tanh); max_positions 512;
# max_epoch 10. Per task (lr, max_update, warmup_updates, batch_size) as the yamls set them, and the GLUE
# training rows (one loader epoch, so validation runs once per epoch as fairseq's does).
GLUE_RECIPES = {
    "cola": (2e-5, 5_336, 320, 16, 8_551),          # cola.yaml (best_checkpoint_metric mcc)
    "sst2": (2e-5, 20_935, 1_256, 32, 67_349),      # sst_2.yaml (accuracy)
    "mrpc": (2e-5, 2_296, 137, 16, 3_668),          # mrpc.yaml (acc_and_f1)
    "qqp": (2e-5, 113_272, 28_318, 32, 363_846),    # qqp.yaml (acc_and_f1)
    "stsb": (4e-5, 3_598, 214, 16, 5_749),          # sts_b.yaml (pearson_and_spearman; regression_target)
    "mnli": (2e-5, 123_873, 7_432, 32, 392_702),    # mnli.yaml (accuracy; valid, valid1 = matched, mismatched)
    "qnli": (2e-5, 33_112, 1_986, 32, 104_743),     # qnli.yaml (accuracy)
    "rte": (2e-5, 2_036, 122, 16, 2_490),           # rte.yaml (accuracy)
}


def _glue(task: str):
    def make() -> Config:
        lr, steps, warmup, batch, rows = GLUE_RECIPES[task]
        c = text_base()
        c.optim = OptimConfig(lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, warmup_steps=warmup,
                              max_steps=steps, min_lr=0.0, clip_grad=0.0, schedule="polynomial")
        c.data = DataConfig(batch_size=batch, global_batch=batch, num_workers=1, epoch_samples=rows)
        c.finetune = FinetuneConfig(task="text_classification", layer_decay=1.0, drop_path=0.0,   # neither in the
                                    mixup=0.0, cutmix=0.0, label_smoothing=0.0,                    # text recipe
                                    pooler_dropout=0.0, eval_every=0)
        c.run = RunConfig(save_every=max(1, rows // batch), keep_last=1, log_every=200)   # log_interval 200
        return c
    return make


def _debug(c: Config, **model) -> Config:
    """Shrink a preset to a CPU-sized twin: same recipe (masking, targets, EMA shape), tiny dims."""
    m = c.model
    c.model = dataclasses.replace(
        m, embed_dim=64, num_heads=4, depth=2, prenet_depth=min(m.prenet_depth, 1), average_top_k_layers=2,
        decoder=dataclasses.replace(m.decoder, decoder_dim=32 if m.decoder.decoder_groups > 1 else 64,
                                    decoder_layers=2, decoder_groups=min(m.decoder.decoder_groups, 4)),
        **model)
    c.mask.clone_batch = 4
    c.teacher = dataclasses.replace(c.teacher, ema_decay=0.998, ema_end_decay=0.9999, ema_anneal_end_step=1000)
    c.optim = dataclasses.replace(c.optim, lr=1e-3, warmup_steps=20, max_steps=1000)
    c.data = dataclasses.replace(c.data, batch_size=8, global_batch=0, epoch_samples=2000)
    c.run = dataclasses.replace(c.run, log_every=5, save_every=100)
    return c


def _image_debug(fn, patch: int):
    def make() -> Config:
        return _debug(fn(), image=ImageConfig(img_size=8 * patch, patch_size=patch))  # 8 x 8 patches
    return make


def _audio_debug(fn):
    def make() -> Config:
        c = _debug(fn(), audio=AudioConfig(
            feature_encoder_spec="[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2",
            conv_pos_width=14, conv_pos_depth=2, conv_pos_groups=16))
        c.data = dataclasses.replace(c.data, batch_size=4, min_sample_size=16_000, max_sample_size=48_000)
        return c
    return make


def _ft_debug(fn, pretrain_debug):
    """A CPU-sized schedule for a fine-tuning preset (same recipe, short); model of the debug twin."""
    def make() -> Config:
        c = fn()
        c.model = pretrain_debug().model
        c.optim = dataclasses.replace(c.optim, warmup_steps=20, max_steps=300)
        c.data = dataclasses.replace(c.data, batch_size=16, global_batch=0, epoch_samples=2000)
        c.finetune.eval_every = 0                                     # once per loader epoch
        c.run = dataclasses.replace(c.run, log_every=5, save_every=100, keep_last=2)
        return c
    return make


def _text_debug(fn):
    def make() -> Config:
        c = _debug(fn(), text=TextConfig(max_positions=128, dropout=0.1))
        c.data.tokens_per_sample = 64
        return c
    return make


PRESETS = {
    "vit_base_patch16": vit_base_patch16,
    "vit_large_patch16": vit_large_patch16,
    "vit_huge_patch14": vit_huge_patch14,
    "audio_base": audio_base,
    "audio_large": audio_large,
    "text_base": text_base,
    "vit_base_patch16_debug": _image_debug(vit_base_patch16, 4),
    "vit_large_patch16_debug": _image_debug(vit_large_patch16, 4),
    "vit_huge_patch14_debug": _image_debug(vit_huge_patch14, 4),
    "audio_base_debug": _audio_debug(audio_base),
    "audio_large_debug": _audio_debug(audio_large),
    "text_base_debug": _text_debug(text_base),
    "vit_base_patch16_ft": vit_base_patch16_ft,
    "vit_large_patch16_ft": vit_large_patch16_ft,
    "vit_huge_patch14_ft": vit_huge_patch14_ft,
    "vit_base_patch16_ft_debug": _ft_debug(vit_base_patch16_ft, _image_debug(vit_base_patch16, 4)),
    "vit_large_patch16_ft_debug": _ft_debug(vit_large_patch16_ft, _image_debug(vit_large_patch16, 4)),
    "vit_huge_patch14_ft_debug": _ft_debug(vit_huge_patch14_ft, _image_debug(vit_huge_patch14, 4)),
    **{f"text_base_glue_{task}": _glue(task) for task in GLUE_RECIPES},
    "text_base_glue": _glue("rte"),                                   # the recipe --init text_base picks: RTE's
    "text_base_glue_debug": _ft_debug(_glue("rte"), _text_debug(text_base)),
}

# the fine-tuning recipe for the encoder a pretraining preset builds (d2v finetune picks it from --init)
FINETUNE_PRESETS = {"vit_base_patch16": "vit_base_patch16_ft", "vit_large_patch16": "vit_large_patch16_ft",
                    "vit_huge_patch14": "vit_huge_patch14_ft", "vit_base_patch16_debug": "vit_base_patch16_ft_debug",
                    "vit_large_patch16_debug": "vit_large_patch16_ft_debug",
                    "vit_huge_patch14_debug": "vit_huge_patch14_ft_debug",
                    "text_base": "text_base_glue", "text_base_debug": "text_base_glue_debug",
                    # the per-task GLUE recipes: fine-tuning presets as well (pass one with --preset)
                    **{f"text_base_glue_{task}": f"text_base_glue_{task}" for task in GLUE_RECIPES}}
FINETUNE_BY_WIDTH = {768: "vit_base_patch16_ft", 1024: "vit_large_patch16_ft",   # imported fairseq weights
                     1280: "vit_huge_patch14_ft"}                               # carry no preset name

PRESETS.update({"audio_base_ctc": audio_base_ctc, "audio_large_ctc": audio_large_ctc,
                "audio_base_ctc_debug": _ctc_debug(audio_base_ctc, _audio_debug(audio_base)),
                "audio_large_ctc_debug": _ctc_debug(audio_large_ctc, _audio_debug(audio_large))})
FINETUNE_PRESETS.update({"audio_base": "audio_base_ctc", "audio_large": "audio_large_ctc",
                         "audio_base_debug": "audio_base_ctc_debug", "audio_large_debug": "audio_large_ctc_debug"})
PRESETS.update(D2V1_PRESETS)   # data2vec 1 (d2v1/presets.py)
FINETUNE_BY_MODALITY_WIDTH = {"audio": {768: "audio_base_ctc", 1024: "audio_large_ctc"}}   # widths of other modalities


def finetune_preset_for(weights_cfg: dict) -> str | None:
    """The fine-tuning preset for the encoder a config dict describes: by the pretraining preset it
    was made with, else by its width (imported fairseq weights); None when neither is known."""
    preset = weights_cfg.get("preset") or ""
    if preset in FINETUNE_PRESETS.values():          # a fine-tuned classifier: the same recipe again
        return preset
    model = weights_cfg.get("model", {})
    if model.get("modality") == "text":              # text weights of any width: the GLUE recipe
        return FINETUNE_PRESETS.get(preset) or "text_base_glue"
    by_width = FINETUNE_BY_MODALITY_WIDTH.get(model.get("modality"), FINETUNE_BY_WIDTH)
    return FINETUNE_PRESETS.get(preset) or by_width.get(model.get("embed_dim"))


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        raise ConfigError(f"unknown preset {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                          + f" (presets: {', '.join(PRESETS)})")
    cfg = PRESETS[name]()
    cfg.preset = name
    return cfg


# `--data`, `--out`, ... on the command line are these config keys
SHORTCUTS = {"data": "data.path", "out": "run.out", "resume": "run.resume", "ds_config": "run.ds_config",
             "train": "data.path", "val": "finetune.val", "init": "finetune.init", "task": "finetune.task"}


def build_config(preset: str | None = None, from_json_path: str | None = None, **overrides) -> tuple[Config, dict]:
    """Config from a preset or a run's config.json, then `--section.key=value` overrides (and the
    SHORTCUTS); `ds.*` keys are returned apart, for the DeepSpeed JSON. Returns (cfg, ds_overrides)."""
    if not preset and not from_json_path:
        raise ConfigError(f"pass --preset (one of {', '.join(PRESETS)}) or --from_json RUN_DIR/config.json")
    cfg = from_json(from_json_path) if from_json_path else get_preset(preset)
    if preset and from_json_path:
        cfg.preset = preset
    ds_overrides = {k[3:]: v for k, v in overrides.items() if k.startswith("ds.")}
    rest = {SHORTCUTS.get(k, k): v for k, v in overrides.items() if not k.startswith("ds.") and v is not None}
    apply_overrides(cfg, rest)
    for key, value in _strings(cfg.to_dict()):
        if has_url_credentials(value):
            raise ConfigError(url_credentials_refusal(f"--{key}"))
    return cfg.validate(), ds_overrides


def _strings(tree: dict, prefix: str = ""):
    """(dotted key, value) of every string in a config dict, lists included."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _strings(v, f"{prefix}{k}.")
        for item in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(item, str):
                yield f"{prefix}{k}", item
