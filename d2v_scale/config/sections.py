"""The configuration's sections: one dataclass per concern, `Config` holding them all.

Field names keep the fairseq data2vec 2.0 names where the meaning is the same (`clone_batch`,
`average_top_k_layers`, `ema_end_decay`, ...) and timm names otherwise (`embed_dim`, `depth`).
System knobs (ZeRO stage, bf16, micro batch, accumulation, clipping) live in the DeepSpeed JSON;
`"auto"` values there are filled from this config (see `preflight.resolve_ds_config`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .checks import validate


@dataclass
class ImageConfig:
    img_size: int = 224          # input resolution (also the RandomResizedCrop size)
    patch_size: int = 16
    in_chans: int = 3
    # data2vec 1 (model.algorithm=data2vec, BEiT blocks; models/beit.py):
    layer_scale_init_value: float = 0.1   # gamma_1/gamma_2 start value (0 = no layer scale)
    shared_rel_pos_bias: bool = True      # one relative position bias table for all blocks (else one per block)
    abs_pos_emb: bool = False             # learned absolute positions (BEiT option; off in data2vec)
    final_norm: bool = True               # LayerNorm after the last block (fairseq `encoder.norm`)


@dataclass
class AudioConfig:
    feature_encoder_spec: str = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"  # as in fairseq
    conv_pos_width: int = 95     # kernel = max(3, width // depth) (fairseq)
    conv_pos_depth: int = 5
    conv_pos_groups: int = 16
    use_alibi: bool = True       # ALiBi bias with a learned per-head scale
    # data2vec 1 (model.algorithm=data2vec, wav2vec 2.0 encoder; models/wav2vec2.py):
    conv_bias: bool = False      # bias in the CNN feature extractor's convolutions
    feature_grad_mult: float = 1.0   # gradient scale into the CNN (0: the CNN is frozen)


@dataclass
class TextConfig:
    vocab_size: int = 0          # 0: read from the sentencepiece model the shards were made with
    max_positions: int = 512
    pad_idx: int = 1             # fairseq Dictionary layout: bos 0, pad 1, eos 2, unk 3
    dropout: float = 0.1         # embedding dropout
    mask_idx: int = -1           # data2vec 1: id of <mask> (-1: the last id, where fairseq's masked LM task adds it)


@dataclass
class DecoderConfig:
    decoder_dim: int = 768
    decoder_layers: int = 6
    decoder_kernel: int = 3
    decoder_groups: int = 16
    decoder_residual: bool = True
    projection_layers: int = 1
    projection_ratio: float = 2.0
    input_dropout: float = 0.0


@dataclass
class Data2Vec1Config:
    """The data2vec 1 recipe (model.algorithm=data2vec; d2v_scale/d2v1/). The target norms are the
    model's *_norm_target_layer / *_norm_targets, the scale is model.loss_scale."""
    recipe: str = ""             # where the preset's values come from (command or yaml)
    target: str = "ffn"          # ffn: FFN output before the last residual (audio, text) | end: block output (vision)
    loss_beta: float = 0.0       # smooth L1 beta; 0 = squared error
    loss_reduction: str = "sum"  # sum: per token sum over D x loss_scale, / masked tokens (fairseq) | mean: mean
                                 # over tokens and D (data2vec_vision's F.smooth_l1_loss), loss_scale ignored
    head_layers: int = 1         # regression head: 1 = Linear(D, D) | 2 = Linear(D, 2D), GELU, Linear(2D, D)
    masking: str = "span"        # block: BEiT's block-wise | span: wav2vec 2.0 spans | bert: masked-LM spans
    num_mask_patches: int = 120  # block: patches masked per image (BEiT --num_mask_patches)
    min_mask_patches_per_block: int = 16
    max_mask_patches_per_block: int = 0   # 0: num_mask_patches
    min_aspect: float = 0.3      # block aspect ratio in [min_aspect, 1/min_aspect]
    min_masks: int = 1           # span: at least this many spans per row
    require_same_masks: bool = True   # span: every row of a batch masks as many frames (the fewest)
    leave_unmasked_prob: float = 0.0  # bert: of the chosen tokens, kept as they are (no loss: fairseq)
    random_token_prob: float = 0.0    # bert: of the chosen tokens, replaced by a random token (no loss)


@dataclass
class ModelConfig:
    modality: str = "image"      # image | audio | text
    algorithm: str = "data2vec2"  # data2vec2 | data2vec (1: BEiT / wav2vec 2.0 / RoBERTa encoders, masked tokens kept)
    embed_dim: int = 768
    depth: int = 10              # shared blocks (targets come from these)
    prenet_depth: int = 2        # modality-specific blocks before the shared ones
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    encoder_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    post_mlp_drop: float = 0.0
    dropout_input: float = 0.0   # before the shared blocks
    prenet_dropout: float = 0.0  # after the embedding LayerNorm
    start_drop_path_rate: float = 0.0
    end_drop_path_rate: float = 0.0
    prenet_drop_path_rate: float = 0.0
    layerdrop: float = 0.0
    prenet_layerdrop: float = 0.0
    average_top_k_layers: int = 10
    instance_norm_target_layer: bool = True
    layer_norm_target_layer: bool = False
    layer_norm_targets: bool = True
    instance_norm_targets: bool = False
    loss_scale: float | None = None   # None: 1/sqrt(embed_dim)
    cls_loss: float = 0.01
    grad_checkpointing: bool = False  # activation checkpointing per block
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image: ImageConfig | None = None
    audio: AudioConfig | None = None
    text: TextConfig | None = None
    d2v1: Data2Vec1Config = field(default_factory=Data2Vec1Config)   # model.algorithm=data2vec only


@dataclass
class MaskConfig:
    mask_prob: float = 0.8       # masked fraction (also with inverse_mask)
    mask_prob_adjust: float = 0.07
    mask_length: int = 3         # block side; 1 = uniform token dropping (text)
    inverse_mask: bool = True    # blocks mark the visible tokens (images)
    clone_batch: int = 16        # M independent masks per sample; the teacher runs once per sample
    mask_noise_std: float = 0.01  # std of the decoder's noise "mask tokens"



@dataclass
class TeacherConfig:
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100_000
    placement: str = "auto"      # replicated: a full copy per rank | partitioned like ZeRO-3: host (weights and
                                 # fp32 EMA on the host; "sharded" says the same) | device_bf16_host_ema (weights on
                                 # the device, fp32 EMA on the host) | device (all on the device) | auto: the
                                 # cheapest in traffic that fits the device, by the memory `d2v plan` computes
    window_gb: float = 4.0       # one teacher pass per optimizer step for images: every micro-batch's targets
                                 # block by block, chunked to this many GB of targets + block inputs (0: a pass
                                 # per micro-step)
    overlap_ema: str = "auto"    # sharded: blend beside the next step's work (auto: with a GPU) | true | false


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    decay_all: bool = False      # True: decay 1-D params/biases/CLS too (fairseq as released, see README)
    warmup_steps: int = 50_040
    max_steps: int = 375_300     # optimizer steps of the whole schedule (fairseq max_update)
    min_lr: float = 0.0
    clip_grad: float = 4.0       # 0 = off; fills ds_config "gradient_clipping": "auto"
    schedule: str = "cosine"     # cosine: warmup + cosine | tri_stage: fairseq's (warmup, hold, exponential decay)
                                 # | polynomial: warmup + straight line to min_lr (fairseq polynomial_decay, power 1)
    phase_ratio: tuple[float, float, float] = (0.1, 0.4, 0.5)   # tri_stage: fractions of max_steps
    init_lr_scale: float = 0.01  # tri_stage: lr at step 0, x lr
    final_lr_scale: float = 0.05  # tri_stage: lr at the end of the decay, x lr


@dataclass
class DataConfig:
    path: str = ""               # shards: brace pattern, directory, index JSON, s3:// or https://
    batch_size: int = 16         # micro batch per rank (ds "train_micro_batch_size_per_gpu": "auto")
    global_batch: int = 0        # 0: batch_size * world (no accumulation); else sets accumulation
    num_workers: int = 2
    shuffle_buffer: int = 1000
    epoch_samples: int = 10_000  # samples per rank per epoch (same on every rank: no uneven tails)
    sampling: str = "split"      # split: shards split by rank/worker | resample: drawn with replacement
    allow_pipe: bool = False     # permit webdataset `pipe:` URLs (they run shell commands)
    stall_timeout_s: float = 600.0  # no batch for this long (object store down): stop, naming it
    crop_scale: tuple[float, float] = (0.2, 1.0)   # image RandomResizedCrop scale
    max_image_pixels: int = 64_000_000   # images above width x height are skipped undecoded (decompression bombs)
    sample_rate: int = 16_000
    min_sample_size: int = 32_000   # audio crop bounds in samples (2 s .. 20 s)
    max_sample_size: int = 320_000
    normalize: bool = True       # audio: per-utterance waveform layer norm
    pad_audio: bool = False      # audio: pad to the longest with a padding mask instead of cropping
    tokens_per_sample: int = 512  # text block length


@dataclass
class RunConfig:
    out: str = "runs/d2v"
    ds_config: str = "ds_configs/zero2.json"
    seed: int = 1
    resume: str = ""             # "" | auto | path to a checkpoint dir
    init_from: str = ""          # weights file (d2v import-fairseq / d2v export) to start from
    stop_after: int = 0          # stop this run at this optimizer step (the schedule keeps max_steps)
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    min_target_var: float = 0.1  # collapse guard (fairseq); 0 disables
    min_pred_var: float = 0.01
    collapse_guard_after: int = 5000
    compile: bool = False
    peak_tflops: float = 0.0     # per-rank peak for perf/mfu; 0: measured GEMM peak
    progress: bool = True
    stop_timeout_s: float = 120.0  # after SIGTERM/SIGUSR1: exit without a checkpoint if no step ends in this time


@dataclass
class EvalConfig:
    """The kNN monitor during pretraining (dinov2 `eval/knn.py` defaults)."""
    data: str = ""               # labelled shards (the memory bank); "" = no monitor
    val: str = ""                # labelled query shards; "" = leave-one-out over eval.data
    every: int = 0               # optimizer steps between runs, a multiple of run.log_every; 0 = off
    k: int = 20                  # neighbours (dinov2 nb_knn 20)
    temperature: float = 0.07    # softmax temperature of the neighbours' votes (dinov2 0.07)
    pool: str = "mean"           # mean of the input tokens (data2vec/MAE) | cls
    batch_size: int = 64         # per rank, forward only
    num_workers: int = 1         # decoding processes per rank


@dataclass
class FinetuneConfig:
    """Fine-tuning a pretrained encoder (`d2v finetune`); defaults are fairseq's
    MaeImageClassificationConfig (examples/data2vec/models/mae_image_classification.py)."""
    task: str = ""               # a name of tasks.TASKS ("" = a pretraining config)
    init: str = ""               # weights file, run directory or fairseq checkpoint (d2v_scale.load_encoder)
    init_teacher: bool = False   # start from the EMA teacher instead of the student
    val: str = ""                # labelled validation shards: top-1/top-5 every eval_every steps
    num_classes: int = 0         # 0: the class count the shards' index records
    pool: str = "mean"           # mean of the patch tokens (fairseq MEAN_POOLING) | cls (CLS_TOKEN)
    layer_decay: float = 0.65    # lr x decay^(n - i) for block i of n; 1 = off
    layer_decay_rule: str = "fairseq"   # fairseq: blocks only | beit: patch embedding and CLS at decay^(n+1) too
    drop_path: float = 0.1       # stochastic depth, linear ramp over the blocks (fairseq's split)
    mixup: float = 0.8           # timm Mixup mixup_alpha (0 with cutmix 0: no mixing)
    cutmix: float = 1.0          # cutmix_alpha
    mixup_prob: float = 1.0      # probability of mixing a batch
    mixup_switch_prob: float = 0.5   # probability of cutmix instead of mixup
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (timm's default)
    auto_augment: str = "rand-m9-mstd0.5-inc1"   # timm auto-augment policy ("none" = off)
    reprob: float = 0.25         # random erasing probability (timm re_prob)
    remode: str = "pixel"        # random erasing fill (timm re_mode)
    recount: int = 1             # random erasing count (timm re_count)
    crop_pct: float = 0.875      # evaluation: resize to img_size / crop_pct, centre crop (224/256)
    eval_every: int = 0          # optimizer steps between validations; 0 = once per loader epoch
    # audio_ctc: wav2vec 2.0 CTC fine-tuning (fairseq Wav2Vec2AsrConfig, wav2vec2_asr.py; the presets
    # take the values of examples/wav2vec/config/finetuning/*.yaml)
    mask_prob: float = 0.65      # time spans of the local features replaced by a learned mask embedding
    mask_length: int = 10        # frames per time span
    mask_channel_prob: float = 0.5    # channel spans zeroed
    mask_channel_length: int = 64
    freeze_finetune_updates: int = 0  # updates with the whole encoder frozen (only the head trains)
    freeze_feature_encoder: bool = True   # feature_grad_mult 0.0: the CNN never trains
    final_dropout: float = 0.0   # before the CTC head
    encoder_dropout: float = 0.0  # the encoder's dropout, prenet and post-MLP dropout during fine-tuning (fairseq `dropout`)
    attention_dropout: float = 0.0  # attention dropout during fine-tuning
    layerdrop: float = 0.1       # encoder layerdrop during fine-tuning (replaces the pretraining value)
    activation_dropout: float = 0.1   # dropout inside the MLPs during fine-tuning
    # text_classification (fairseq data2vec_text_classification.py / sentence_prediction; tasks/text.py)
    pooler_dropout: float = 0.0  # dropout of the RoBERTa classification head (Data2VecTextClassificationConfig)
    metric: str = ""             # picks the best checkpoint: accuracy, mcc, f1, acc_and_f1, pearson, spearman,
                                 # pearson_and_spearman ("" = the GLUE task's, recorded by d2v-shard glue)


@dataclass
class LMConfig:
    """`--lm.*`: beam search over CTC outputs (flashlight's lexicon decoder through torchaudio's ctc_decoder)."""
    kenlm: str = ""              # KenLM language model, binary or ARPA ("" = none; needs a lexicon)
    lexicon: str = ""            # word<TAB>l e t t e r s | per line ("" = lexicon-free: letters, `|` between words)
    weight: float = 2.0          # LM weight (flashlight lm_weight; fairseq's LibriSpeech 4-gram decoding: 2)
    word_score: float = -1.0     # per-word insertion score (flashlight word_score; fairseq's: -1)
    beam: int = 50               # beam size (fairseq --beam)
    beam_threshold: float = 25.0
    at_validation: bool = False  # also beam-decode every validation (val/wer_beam); greedy val/wer always


@dataclass
class Config:
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lm: LMConfig = field(default_factory=LMConfig)

    def validate(self) -> "Config":
        """Every check a run's settings must pass before anything starts (checks.py)."""
        validate(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# The text vocabulary comes from the shards' index (`d2v-shard text` records it). Where there are no
# shards (benchmarks on synthetic ids, the planner) a text model gets the size of the GPT-2 BPE
# dictionary that fairseq's data2vec text runs use.
SYNTHETIC_VOCAB = 50265


def with_vocab(cfg: "Config") -> "Config":
    """`cfg` with model.text.vocab_size set for a run without shards (unchanged when already set)."""
    if cfg.model.text is not None and not cfg.model.text.vocab_size:
        cfg.model.text.vocab_size = SYNTHETIC_VOCAB
    return cfg
