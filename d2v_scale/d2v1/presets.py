"""The published data2vec 1 recipes (model.algorithm=data2vec), each value with its source.

Vision: data2vec_vision `beit/README.md` pretraining commands (`run_cyclical.py` defaults for what
they leave out). Speech and text: fairseq `examples/data2vec/config/audio/pretraining/
base_librispeech.yaml`, `text/pretraining/base.yaml` on the `Data2VecAudioConfig` /
`Data2VecTextConfig` / wav2vec 2.0 / RoBERTa defaults. `model.d2v1.recipe` names the source, so
`d2v show_config` shows it with the values. Every preset has a `*_debug` twin (64 dims, 3 blocks,
top 2, same recipe) for tests and CPU runs.
"""
from __future__ import annotations

import dataclasses

from ..config import (AudioConfig, Config, Data2Vec1Config, DataConfig, ImageConfig, MaskConfig, ModelConfig,
                      OptimConfig, RunConfig, TeacherConfig, TextConfig)

IMAGENET = 1_281_167
NO_COLLAPSE_GUARD = dict(min_target_var=0.0, min_pred_var=0.0)   # data2vec_vision has no variance guard


def d2v1_vit_base_patch16() -> Config:
    steps = IMAGENET // 2048                                      # 625 steps per epoch (BEiT: len // batch)
    return Config(
        model=ModelConfig(
            modality="image", algorithm="data2vec", embed_dim=768, depth=12, prenet_depth=0, num_heads=12,
            mlp_ratio=4.0, norm_eps=1e-6,                        # beit_base_patch16_224
            attention_dropout=0.05,                              # --attn_drop_rate 0.05
            end_drop_path_rate=0.25,                             # --drop_path 0.25 (linear over blocks)
            average_top_k_layers=6,                              # --target_layers [6,...,11]
            instance_norm_target_layer=False,
            layer_norm_target_layer=True,                        # target_layer_norm_last (default on)
            layer_norm_targets=True,                             # --post_target_layer_norm
            cls_loss=0.0,
            image=ImageConfig(img_size=224, patch_size=16,
                              layer_scale_init_value=1e-4,       # --layer_scale_init_value 1e-4
                              shared_rel_pos_bias=True, abs_pos_emb=False),   # run_cyclical defaults
            d2v1=Data2Vec1Config(
                recipe="data2vec_vision beit/README.md: ViT-B run_cyclical.py command (800 epochs)",
                target="end",                                    # --layer_results end
                loss_beta=2.0, loss_reduction="mean",            # --l1_beta=2.0, F.smooth_l1_loss mean
                masking="block", num_mask_patches=120,           # --num_mask_patches 120
                min_mask_patches_per_block=16, max_mask_patches_per_block=196)),
        mask=MaskConfig(mask_prob=0.6, clone_batch=1),           # ~120/196 (FLOP count only)
        teacher=TeacherConfig(ema_decay=0.999, ema_end_decay=0.9998,   # --ema_decay_init 0.999 --ema_decay 0.9998
                              ema_anneal_end_step=0),            # --ema_start_at 0: 0.9998 from the first step
        optim=OptimConfig(lr=2e-3, betas=(0.9, 0.999), eps=1e-8,  # --lr 2e-3, AdamW defaults, --opt_eps 1e-8
                          weight_decay=0.05,                     # --weight_decay 0.05 (not on 1-D, bias, cls)
                          warmup_steps=10 * steps, max_steps=800 * steps,   # --warmup_epochs 10 --epochs 800
                          min_lr=1e-5, clip_grad=3.0),           # --min_lr default, --clip_grad 3.0
        data=DataConfig(batch_size=128, global_batch=2048,       # --batch_size 128 x --world_size 16
                        crop_scale=(0.08, 1.0)),                 # BEiT RandomResizedCrop default scale
        run=RunConfig(**NO_COLLAPSE_GUARD))


def d2v1_vit_large_patch16() -> Config:
    c = d2v1_vit_base_patch16()
    steps = IMAGENET // 4096                                      # 312
    c.model = dataclasses.replace(
        c.model, embed_dim=1024, depth=24, num_heads=16,          # beit_large_patch16_224
        attention_dropout=0.15, end_drop_path_rate=0.2,           # --attn_drop_rate 0.15 --drop_path 0.2
        average_top_k_layers=6,                                   # --target_layers [18,...,23]
        image=dataclasses.replace(c.model.image, layer_scale_init_value=1e-5),   # --layer_scale_init_value 1e-5
        d2v1=dataclasses.replace(c.model.d2v1, recipe="data2vec_vision beit/README.md: ViT-L run_cyclical.py "
                                 "command (first 800 epochs)"))
    c.teacher = TeacherConfig(ema_decay=0.9998, ema_end_decay=0.9998, ema_anneal_end_step=0)   # --ema_decay 0.9998
    c.optim = dataclasses.replace(c.optim, lr=1e-3, warmup_steps=80 * steps, max_steps=800 * steps)  # --lr 1e-3,
    c.data = dataclasses.replace(c.data, batch_size=64, global_batch=4096)   # --warmup_epochs 80; 64 x 64 ranks
    return c


def d2v1_audio_base() -> Config:
    return Config(
        model=ModelConfig(
            modality="audio", algorithm="data2vec", embed_dim=768, depth=12, prenet_depth=0, num_heads=12,
            mlp_ratio=4.0, norm_eps=1e-5,                         # wav2vec 2.0 base
            encoder_dropout=0.1, attention_dropout=0.1,           # Wav2Vec2Config dropout, attention_dropout
            activation_dropout=0.0, dropout_input=0.0,            # yaml dropout_input 0
            layerdrop=0.05,                                       # yaml encoder_layerdrop 0.05
            average_top_k_layers=8,                               # yaml average_top_k_layers 8
            instance_norm_target_layer=True, layer_norm_target_layer=False,   # yaml instance_norm_target_layer
            layer_norm_targets=False, loss_scale=None,            # yaml loss_scale null: 1/sqrt(D)
            cls_loss=0.0,
            audio=AudioConfig(conv_pos_width=95, conv_pos_depth=5, conv_pos_groups=16,   # yaml conv_pos 95,
                              use_alibi=False, conv_bias=False, feature_grad_mult=1.0),  # pos_conv_depth 5
            d2v1=Data2Vec1Config(
                recipe="fairseq examples/data2vec/config/audio/pretraining/base_librispeech.yaml",
                target="ffn", loss_beta=0.0,                      # yaml loss_beta 0: squared error
                masking="span", min_masks=1, require_same_masks=True)),   # data2vec_audio apply_mask
        mask=MaskConfig(mask_prob=0.65, mask_length=10, clone_batch=1),  # yaml mask_prob 0.65, mask_length 10
        teacher=TeacherConfig(ema_decay=0.999, ema_end_decay=0.9999,     # yaml ema_decay, ema_end_decay
                              ema_anneal_end_step=30_000),               # yaml ema_anneal_end_step
        optim=OptimConfig(lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,   # yaml optimizer, lr
                          decay_all=True,                        # fairseq adam decays every parameter
                          schedule="tri_stage", phase_ratio=(0.03, 0.9, 0.07),       # yaml lr_scheduler
                          init_lr_scale=0.01, final_lr_scale=0.01,                   # tri_stage defaults
                          warmup_steps=12_000, max_steps=400_000, clip_grad=0.0),    # max_update; no clip_norm
        # max_tokens 3.8M samples per GPU x 16 GPUs: ~11 utterances of <= 20 s per GPU
        data=DataConfig(batch_size=11, global_batch=176, min_sample_size=32_000, max_sample_size=320_000),
        run=RunConfig())


def d2v1_audio_large() -> Config:
    """No data2vec 1 large speech yaml was published: the released large checkpoint's encoder (24 blocks,
    1024 dims, 16 heads, FFN 4096, as its transformers config) with base_librispeech.yaml's recipe."""
    c = d2v1_audio_base()
    c.model = dataclasses.replace(
        c.model, embed_dim=1024, depth=24, num_heads=16,
        d2v1=dataclasses.replace(c.model.d2v1, recipe="released data2vec_audio large encoder size + "
                                 "base_librispeech.yaml recipe (no large yaml was published)"))
    return c


def d2v1_text_base() -> Config:
    return Config(
        model=ModelConfig(
            modality="text", algorithm="data2vec", embed_dim=768, depth=12, prenet_depth=0, num_heads=12,
            mlp_ratio=4.0, norm_eps=1e-5,                         # yaml transformer.encoder (RoBERTa base)
            encoder_dropout=0.1, attention_dropout=0.1,           # yaml transformer.dropout, attention_dropout
            average_top_k_layers=10,                              # yaml average_top_k_layers 10
            instance_norm_target_layer=False, layer_norm_target_layer=True,   # yaml layer_norm_target_layer
            layer_norm_targets=False, loss_scale=1.0,             # yaml loss_scale 1
            cls_loss=0.0,
            text=TextConfig(max_positions=512, dropout=0.1),      # yaml max_source_positions 512, dropout 0.1
            d2v1=Data2Vec1Config(
                recipe="fairseq examples/data2vec/config/text/pretraining/base.yaml",
                target="ffn", loss_beta=4.0,                      # yaml loss_beta 4
                head_layers=2,                                    # yaml head_layers 2
                masking="bert", leave_unmasked_prob=0.0,          # yaml task.leave_unmasked_prob 0
                random_token_prob=0.0)),                          # yaml task.random_token_prob 0
        mask=MaskConfig(mask_prob=0.35, mask_length=4, clone_batch=1),   # yaml task mask_prob, mask_multiple_length
        teacher=TeacherConfig(ema_decay=0.999, ema_end_decay=0.9999,     # yaml ema_decay, ema_end_decay
                              ema_anneal_end_step=300_000),              # yaml ema_anneal_end_step
        optim=OptimConfig(lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,   # yaml optimizer, lr
                          decay_all=True, warmup_steps=10_000, max_steps=1_000_000,   # yaml cosine, max_update
                          clip_grad=5.0),                                             # yaml clip_norm 5
        data=DataConfig(batch_size=16, global_batch=256,         # max_tokens 8192 = 16 x 512 per GPU, 16 GPUs
                        tokens_per_sample=512),                  # task.tokens_per_sample 512
        run=RunConfig())


def _debug(fn, **sub):
    """CPU-sized twin: 64 dims, 4 heads, 3 blocks, top 2 targets; masking, targets, loss, EMA shape
    and optimizer as the recipe; a short schedule."""
    def make() -> Config:
        c = fn()
        m = c.model
        c.model = dataclasses.replace(m, embed_dim=64, num_heads=4, depth=3, average_top_k_layers=2, **sub)
        if c.teacher.ema_anneal_end_step == 0:                # vision: one decay from the first step
            c.teacher = TeacherConfig(ema_decay=0.998, ema_end_decay=0.998, ema_anneal_end_step=0)
        else:
            c.teacher = TeacherConfig(ema_decay=0.998, ema_end_decay=0.9999, ema_anneal_end_step=1000)
        c.optim = dataclasses.replace(c.optim, lr=1e-3, warmup_steps=20, max_steps=1000)
        c.data = dataclasses.replace(c.data, batch_size=8, global_batch=0, epoch_samples=2000)
        c.run = dataclasses.replace(c.run, log_every=5, save_every=100)
        return c
    return make


def _image_debug(fn):
    def make() -> Config:
        c = _debug(fn, image=ImageConfig(img_size=32, patch_size=4, layer_scale_init_value=0.1))()   # 8 x 8 patches
        c.model.d2v1 = dataclasses.replace(c.model.d2v1, num_mask_patches=39,        # 120/196 of 64
                                           min_mask_patches_per_block=4, max_mask_patches_per_block=64)
        return c
    return make


def _audio_debug(fn):
    def make() -> Config:
        c = _debug(fn, audio=AudioConfig(feature_encoder_spec="[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2",
                                         conv_pos_width=14, conv_pos_depth=2, conv_pos_groups=16, use_alibi=False))()
        c.data = dataclasses.replace(c.data, batch_size=4, min_sample_size=16_000, max_sample_size=48_000)
        return c
    return make


def _text_debug(fn):
    def make() -> Config:
        c = _debug(fn, text=TextConfig(max_positions=128, dropout=0.1))()
        c.data.tokens_per_sample = 64
        return c
    return make


PRESETS = {
    "d2v1_vit_base_patch16": d2v1_vit_base_patch16,
    "d2v1_vit_large_patch16": d2v1_vit_large_patch16,
    "d2v1_audio_base": d2v1_audio_base,
    "d2v1_audio_large": d2v1_audio_large,
    "d2v1_text_base": d2v1_text_base,
    "d2v1_vit_base_patch16_debug": _image_debug(d2v1_vit_base_patch16),
    "d2v1_vit_large_patch16_debug": _image_debug(d2v1_vit_large_patch16),
    "d2v1_audio_base_debug": _audio_debug(d2v1_audio_base),
    "d2v1_audio_large_debug": _audio_debug(d2v1_audio_large),
    "d2v1_text_base_debug": _text_debug(d2v1_text_base),
}
