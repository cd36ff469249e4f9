"""The `d2v` command (fire). Argument plumbing only; the work lives in the modules it names.

  d2v train --preset vit_base_patch16_debug --data 'DIR/shard-{000000..000009}.tar' \\
            --ds_config ds_configs/zero3.json --out runs/x [--mask.clone_batch=8 --ds.zero_optimization.stage=2]
  d2v check ...          same arguments: validate config, ds_config, data and run directory, start nothing
  d2v finetune --task image_classification --init WEIGHTS_OR_RUN --train SHARDS --val SHARDS \\
            --ds_config ds_configs/zero2.json --out runs/ft [--preset vit_base_patch16_ft --finetune.layer_decay=0.75]
  d2v finetune --task audio_ctc --init WEIGHTS_OR_RUN --train SHARDS --val SHARDS --out runs/asr   (transcribed shards)
  d2v transcribe --init runs/asr/best.safetensors --audio FILES|FOLDER|SHARDS [--lm.lexicon LEX --lm.kenlm LM.bin]
  d2v probe --init WEIGHTS_OR_RUN --train SHARDS --val SHARDS [--how knn|linear|both] [--teacher | --random_init]
  d2v show_config --preset NAME [--key=value ...]
  d2v export RUN_DIR OUT.safetensors [--teacher] [--overwrite]
  d2v export WEIGHTS_OR_RUN OUT_DIR --format hf [--teacher --overwrite]   (a transformers Data2Vec*Model folder)
  d2v import-fairseq CKPT OUT.safetensors [--overwrite]
  d2v import-hf HF_FOLDER OUT.safetensors [--overwrite --algorithm data2vec2]   (Data2Vec*Model, RobertaModel)
  d2v reshard RUN_DIR    convert the newest checkpoint for resuming at another world size
  d2v plan --preset vit_huge_patch14 --nodes 8 --gpus_per_node 8 --zero 3 --offload_teacher --micro_batch 16
  d2v bench step|data|ema ...
  d2v demo [--modality image]
"""
from __future__ import annotations

import json
import os
import sys

import fire

from . import helptext
from .checkpoint import make_universal
from .config import Config, ConfigError, apply_overrides
from .dsconfig import bf16_accumulation_warning
from .errors import D2VError, argument_with_url_credentials, one_line, url_credentials_refusal
from .evaluate import probe as run_probe
from .export import export_run
from .hf import export_hf, import_hf as run_import_hf
from .imports import import_checkpoint as run_import_fairseq
from .finetune import finetune as run_finetune
from .preflight import finetune_preflight, preflight
from .presets import FINETUNE_PRESETS, build_config, finetune_preset_for
from .pretrained import read_config
from .tools import bench as benches
from .tools.bench_step import bench_step
from .tools import plan as planner
from .tools.demo import run_demo
from .run_end import TrainingError
from .train import train as run_train
from .transcribe import transcribe as run_transcribe


def _no_positional(command: str, words: tuple) -> None:
    if words:
        raise ConfigError(f"d2v {command}: unexpected argument {words[0]!r}: every option is a --flag "
                          f"(e.g. --resume auto, --out DIR); `d2v {command} --help` lists them")


def train(*words, preset: str | None = None, data: str | None = None, ds_config: str | None = None,
          out: str | None = None, resume: str | None = None, from_json: str | None = None,
          local_rank: int = -1, **overrides) -> None:
    """Pretrain a data2vec 2.0 student (image, speech or text) on WebDataset shards under DeepSpeed.

      --preset NAME          vit_base_patch16, audio_base, text_base, ... (`*_debug`: tiny CPU twins)
      --data SHARDS          index.json, a folder, a brace pattern or s3:// URLs of `d2v-shard` output
      --ds_config FILE       DeepSpeed JSON (ds_configs/zero2.json, zero3.json, ...)
      --out DIR              run directory: config.json, checkpoints/, tb/, metrics.jsonl, summary.json
      --resume auto|TAG      continue from the newest (or the named) checkpoint in --out
      --from_json FILE       a run's config.json instead of --preset
      --section.key=VALUE    any config key, e.g. --optim.lr=5e-4 --mask.clone_batch=8
      --ds.KEY=VALUE         any ds_config key, e.g. --ds.zero_optimization.stage=2

    Under the launcher: deepspeed --num_gpus 8 --no_local_rank --module d2v_scale.cli train ...
    (`local_rank` is accepted for it; LOCAL_RANK is read from the environment).
    `d2v check` with the same arguments validates them all and starts nothing."""
    _no_positional("train", words)
    cfg, ds_overrides = build_config(preset, from_json, data=data, ds_config=ds_config, out=out,
                                     resume=resume, **overrides)
    run_train(cfg, ds_overrides)


def _finetune_preset(init: str | None) -> str:
    """The recipe for the --init encoder's size (fairseq's vision fine-tuning yamls)."""
    if not init:
        raise ConfigError("d2v finetune needs --init WEIGHTS (a weights file, run directory or fairseq checkpoint)")
    preset = finetune_preset_for(read_config(init))
    if preset is None:
        raise ConfigError(f"no fine-tuning recipe is known for --init {init}: pass --preset (one of "
                          f"{', '.join(sorted(set(FINETUNE_PRESETS.values())))})")
    return preset


def finetune(*words, preset: str | None = None, task: str | None = None, init: str | None = None,
             train: str | None = None, val: str | None = None, ds_config: str | None = None, out: str | None = None,
             resume: str | None = None, from_json: str | None = None, local_rank: int = -1, **overrides) -> None:
    """Fine-tune a pretrained encoder: image classification, speech recognition (CTC), text classification.

      --task NAME            image_classification | audio_ctc | text_classification
      --init WEIGHTS_OR_RUN  a pretraining run directory, an exported .safetensors or a fairseq checkpoint
      --train SHARDS         labelled (or transcribed) training shards
      --val SHARDS           labelled validation shards (same class names as --train)
      --ds_config FILE       DeepSpeed JSON (ds_configs/zero2.json)
      --out DIR              run directory (best.safetensors, checkpoints/, tb/)
      --preset NAME          the recipe; picked from --init's size when left out
      --resume auto|TAG      continue from a checkpoint in --out
      --section.key=VALUE    any config key, e.g. --finetune.layer_decay=0.75 --optim.lr=5e-4

    `d2v check --task ...` with the same arguments validates them all and starts nothing."""
    _no_positional("finetune", words)
    preset = preset or (None if from_json else _finetune_preset(init))
    cfg, ds_overrides = build_config(preset, from_json, task=task, init=init, train=train, val=val,
                                     ds_config=ds_config, out=out, resume=resume, **overrides)
    run_finetune(cfg, ds_overrides)


def probe(*words, init: str | None = None, train: str | None = None, val: str | None = None, how: str = "both",
          teacher: bool = False, tag: str | None = None, k: int = 20, temperature: float = 0.07,
          batch_size: int = 64, num_workers: int = 2, epochs: int = 90, random_init: bool = False,
          local_rank: int = -1) -> None:
    """kNN and linear probes of a frozen encoder on labelled shards (top-1/top-5 on --val).

      --init WEIGHTS_OR_RUN  a run directory or weights file
      --train SHARDS         labelled shards the probes learn from
      --val SHARDS           labelled shards they are scored on (same class names)
      --how knn|linear|both  which probes (default both)
      --random_init          the same encoder as its pretraining started (the baseline)
      --teacher              probe the EMA teacher instead of the student
      --k 20 --temperature 0.07 --epochs 90   kNN neighbours and vote temperature, linear probe epochs"""
    _no_positional("probe", words)
    if not init:
        raise ConfigError("d2v probe needs --init WEIGHTS_OR_RUN_DIR")
    run_probe(init, train, val, how=how, teacher=teacher, tag=tag, k=k, temperature=temperature,
              batch_size=batch_size, num_workers=num_workers, epochs=epochs, random_init=random_init)


def transcribe(*files, init: str | None = None, audio=None, decoder: str = "auto", batch_size: int = 8,
               tag: str | None = None, local_rank: int = -1, **overrides) -> None:
    """Transcripts of audio files, folders or shards by a fine-tuned CTC model.

      --init FINETUNED       best.safetensors or the run directory of `d2v finetune --task audio_ctc`
      --audio FILES          audio files, folders or shards (comma-separated, or as positional words)
      --decoder auto|greedy|beam   greedy, or beam search when --lm.lexicon is given (auto)
      --lm.lexicon LEX       word lexicon for the beam search; --lm.kenlm LM.bin, --lm.weight,
                             --lm.word_score, --lm.beam tune it
      --batch_size 8         files decoded together

    A file that cannot be read as audio is named and skipped; the others are transcribed."""
    if not init:
        raise ConfigError("d2v transcribe needs --init FINETUNED (best.safetensors or run directory of "
                          "`d2v finetune --task audio_ctc`)")
    other = [k for k in overrides if not k.startswith("lm.")]
    if other:
        raise ConfigError(f"d2v transcribe: unknown option --{other[0]}; it takes --init, --audio, --decoder, "
                          "--batch_size, --tag and --lm.* (lexicon, kenlm, weight, word_score, beam)")
    lm = apply_overrides(Config(), overrides).lm
    given = [audio] if isinstance(audio, str) else list(audio or [])
    sources = [s for item in [*given, *files] for s in str(item).split(",") if s]
    result = run_transcribe(init, sources, lm, decoder, batch_size, tag)
    if result["skipped"]:
        raise ConfigError(f"{len(result['skipped'])} input(s) skipped (named above: missing or not audio); "
                          f"{result['utterances']} utterances transcribed")


def check(*words, preset: str | None = None, data: str | None = None, ds_config: str | None = None,
          out: str | None = None, resume: str | None = None, from_json: str | None = None,
          task: str | None = None, init: str | None = None, train: str | None = None, val: str | None = None,
          world: int = 0, local_rank: int = -1, **overrides) -> None:
    """Validate everything `train` (or, with --task, `finetune`) would use; start nothing, write nothing.

    Takes the arguments of `d2v train` (or of `d2v finetune` with --task) and checks the config,
    the ds_config, the shards, the run directory and the checkpoint to resume from, in this process:

      --preset NAME / --from_json FILE   the config, as for train
      --data SHARDS          pretraining shards (train)
      --task NAME --init W --train SHARDS --val SHARDS   the fine-tuning arguments instead
      --ds_config FILE       DeepSpeed JSON
      --out DIR --resume auto            the run directory and the checkpoint a resume would use
      --world N              the number of ranks to check the batch for (default $WORLD_SIZE or 1)
      --section.key=VALUE    any config key"""
    _no_positional("check", words)
    if task and not preset and not from_json:
        preset = _finetune_preset(init)
    cfg, ds_overrides = build_config(preset, from_json, data=data, ds_config=ds_config, out=out, resume=resume,
                                     task=task, init=init, train=train, val=val, **overrides)
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.finetune.task:
        ft = finetune_preflight(cfg, ds_overrides, world)
        for note in ft.notes:
            print(f"note: {note}")
        start = f"resume from {ft.resume.path}" if ft.resume else "start from step 0"
        print(f"ok: {cfg.preset or 'config'} | {cfg.finetune.task} | {ft.task.describe()} | {len(ft.shards.urls)} "
              f"train shards, {ft.val.samples} val samples | world {world} | micro batch "
              f"{ft.ds['train_micro_batch_size_per_gpu']} x accumulation {ft.ds['gradient_accumulation_steps']} | {start}")
        return
    plan = preflight(cfg, ds_overrides, world)
    ds = plan.ds
    warning = bf16_accumulation_warning(cfg, world, ds_overrides)
    if warning:
        print(f"warning: {warning}")
    start = f"resume from {plan.resume.path}" if plan.resume else "start from step 0"
    for tag, problem in plan.resume.broken if plan.resume else []:
        print(f"note: checkpoint {tag} is unusable ({problem}); the run passes over it")
    if plan.changed:
        print("note: resuming with changed settings: " + "; ".join(plan.changed))
    print(f"ok: {cfg.preset or 'config'} | {len(plan.shards.urls)} shards | world {world} | micro batch "
          f"{ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']} | {start}")


def show_config(preset: str | None = None, from_json: str | None = None, **overrides) -> None:
    """Print the resolved config as JSON: every key `train` and `finetune` accept, with its value.

      --preset NAME          the preset to start from (d2v show_config --preset vit_base_patch16)
      --from_json FILE       or a run's config.json
      --section.key=VALUE    overrides, applied as train would apply them"""
    cfg, _ = build_config(preset, from_json, **overrides)
    print(json.dumps(cfg.to_dict(), indent=2))


def export(run_dir: str, out: str, teacher: bool = False, tag: str | None = None, format: str = "safetensors",
           overwrite: bool = False) -> None:
    """Write a run's encoder as one fp32 safetensors file (consolidated from any ZeRO stage), or with
    `--format hf` as a transformers folder.

      RUN_DIR                the run directory of `d2v train` or `d2v finetune` (with --format hf also a
                             weights file or a fairseq checkpoint)
      OUT                    the .safetensors file to write (never a file inside a run's checkpoints/),
                             or with --format hf the folder
      --teacher              also the EMA teacher
      --tag TAG              a checkpoint other than the newest
      --format safetensors|hf   hf: a folder `AutoModel.from_pretrained` loads
      --overwrite            replace an existing OUT"""
    if format == "hf":
        print(json.dumps(export_hf(run_dir, out, teacher=teacher, tag=tag, overwrite=overwrite), indent=1))
        return
    if format != "safetensors":
        raise ConfigError(f"d2v export --format {format!r}: safetensors (the default) or hf")
    print(json.dumps(export_run(run_dir, out, teacher=teacher, tag=tag, overwrite=overwrite), indent=1))


def reshard(run_dir: str, tag: str | None = None) -> None:
    """Make a run's newest checkpoint resumable at another world size (DeepSpeed universal checkpoint).

      RUN_DIR                the run directory
      --tag TAG              a checkpoint other than the newest"""
    out = make_universal(run_dir, tag)
    print(f"wrote {out}; `--resume auto` now resumes from it at any number of ranks")


def import_fairseq(ckpt: str, out: str, overwrite: bool = False) -> None:
    """Convert a data2vec 2.0 or data2vec 1 reference checkpoint into a weights file (for --init or --run.init_from).

      CKPT                   fairseq data2vec_multi / data2vec_audio / data2vec_text checkpoint_best.pt,
                             or data2vec_vision run_cyclical.py checkpoint-799.pth (read weights-only)
      OUT                    the .safetensors file to write
      --overwrite            replace an existing OUT"""
    print(json.dumps(run_import_fairseq(ckpt, out, overwrite), indent=1))


def import_hf(folder: str, out: str, overwrite: bool = False, algorithm: str = "data2vec") -> None:
    """Convert a transformers Data2VecVision/Audio/TextModel (or RobertaModel) folder into a weights file.

      HF_FOLDER              a folder written by save_pretrained (never downloaded)
      OUT                    the .safetensors file to write
      --algorithm data2vec|data2vec2   the data2vec 1 encoder, or the data2vec 2.0 text / audio encoder
      --overwrite            replace an existing OUT"""
    print(json.dumps(run_import_hf(folder, out, overwrite=overwrite, algorithm=algorithm), indent=1))


def bench(kind: str = "step", local_rank: int = -1, **kwargs) -> None:
    """Benchmarks that print ratios measured side by side in one run: step | data | ema.

      --kind step            train steps/s of a preset against a timm peer (--preset, --steps, --ds_config)
      --kind data            decode + augment samples/s from disk and from S3 (--data SHARDS)
      --kind ema             shard-local EMA against a gathered one (--preset, --reps)"""
    kinds = {"step": bench_step, "data": benches.bench_data, "ema": benches.bench_ema}
    fn = kinds.get(kind)
    if fn is None:
        raise ConfigError(f"unknown benchmark {kind!r}: {', '.join(kinds)}")
    fn(**kwargs)


def plan(preset: str, nodes: int = 1, gpus_per_node: int = 8, zero: int = 3, micro_batch: int | None = None,
         offload_teacher: bool = True, offload_optimizer: bool = False, grad_checkpointing: bool = False,
         mfu: float = 0.4, peak_tflops: float = 989.0, measure: bool = False,
         ds_config: str = "ds_configs/zero3.json", local_rank: int = -1, placement: str = "", gpu_gb: float = 80.0,
         **overrides) -> None:
    """Memory and step-time plan of a cluster run, before renting the cluster.

      --preset NAME          the model (vit_huge_patch14, ...)
      --nodes 1 --gpus_per_node 8   the cluster
      --zero 3               ZeRO stage
      --micro_batch N        samples per GPU (default: the preset's)
      --offload_teacher --offload_optimizer --grad_checkpointing   memory savers
      --placement NAME       the teacher's (auto: the cheapest in traffic that fits --gpu_gb; default host
                             with --offload_teacher, else replicated); the teacher table lists every placement
      --mfu 0.4 --peak_tflops 989   the step-time estimate's assumptions
      --measure              compare the plan with this machine's real engines"""
    cfg, ds_over = build_config(preset, None, ds_config=ds_config, **overrides)
    micro = micro_batch or cfg.data.batch_size
    if not measure:
        args = dict(nodes=nodes, gpus_per_node=gpus_per_node, zero=zero, micro_batch=micro,
                    offload_teacher=offload_teacher, offload_optimizer=offload_optimizer,
                    checkpointing=grad_checkpointing, mfu=mfu, peak_tflops=peak_tflops, placement=placement,
                    gpu_gb=gpu_gb)
        planner.print_plan(planner.plan(cfg, **args), cfg, args)
        return
    planner.measure_and_compare(cfg, ds_over, micro)


def demo(modality: str = "image", steps: int | None = None, ranks: int = 2, samples: int | None = None,
         workdir: str = "demo_data", out: str = "runs/demo", ds_config: str = "ds_configs/zero3.json",
         s3: str | bool = "auto", **overrides) -> None:
    """A real small pretraining on this machine: make a dataset, shard it into a local S3, pretrain, probe.

      --modality image|audio|text   which student (default image)
      --steps N              training steps (image 1000, audio 600, text 800)
      --ranks 2              CPU ranks of the deepspeed launch
      --samples N            dataset size (image 2000)
      --workdir demo_data --out runs/demo   where the data and the run go
      --s3 auto|true|false   shard into a local SeaweedFS (auto: when installed) or keep shards on disk
      --section.key=VALUE    any training config key"""
    run_demo(modality, steps, ranks, samples, workdir, out, ds_config, s3, **overrides)


COMMANDS = {"train": train, "finetune": finetune, "probe": probe, "check": check, "show_config": show_config,
            "export": export,
            "import-fairseq": import_fairseq, "import_fairseq": import_fairseq, "import-hf": import_hf,
            "import_hf": import_hf, "bench": bench, "demo": demo,
            "reshard": reshard, "plan": plan, "transcribe": transcribe}


WHAT = "data2vec 2.0 self-supervised pretraining (images, speech, text) and fine-tuning under DeepSpeed."
ALIASES = {"import_fairseq": "import-fairseq", "import_hf": "import-hf"}       # accepted, listed once
KEYS_NOTE = ("every config key is a flag too (--section.key=VALUE): `d2v show_config --preset NAME` prints them "
             "all with their values")


def _help(argv: list[str]) -> str | None:
    """The help to print for argv (`d2v`, `d2v --help`, `d2v help CMD`, `d2v CMD --help`), or None: run it."""
    if not argv or argv[0] in helptext.HELP_FLAGS or argv[0] == "help":
        if len(argv) > 1 and argv[0] == "help" and argv[1] in COMMANDS:
            return _command_help(argv[1])
        return helptext.overview("d2v", WHAT, COMMANDS, ALIASES)
    if argv[0] not in COMMANDS:
        raise ConfigError(f"unknown command {argv[0]!r}: one of "
                          f"{', '.join(k for k in COMMANDS if k not in ALIASES)} (`d2v --help` says what each does)")
    if helptext.wants_help(argv):
        return _command_help(argv[0])
    return None


def _command_help(name: str) -> str:
    note = ("--lm.KEY=VALUE: the keys of the `lm` section (`d2v show_config --preset audio_base_ctc` shows them)"
            if name == "transcribe" else KEYS_NOTE)
    return helptext.command_help("d2v", ALIASES.get(name, name), COMMANDS[name], note)


def main(argv: list[str] | None = None) -> None:
    """Errors a user can act on end in one line (problem and fix); OSErrors name the path."""
    argv = list(argv if argv is not None else sys.argv[1:])
    try:
        secret = argument_with_url_credentials(argv)
        if secret:
            raise ConfigError(url_credentials_refusal(secret))
        text = _help(argv)
        if text is not None:
            print(text, end="")
            return
        fire.Fire(COMMANDS, command=argv, name="d2v")
    except D2VError as e:
        what = "training stopped" if isinstance(e, TrainingError) else "error"
        sys.exit(f"d2v: {what}: {one_line(e)}")
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        sys.exit(f"d2v: error: cannot use{where}: {e.strerror or one_line(e)}; check the path and its permissions")


if __name__ == "__main__":
    main()
