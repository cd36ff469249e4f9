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
  d2v export RUN_DIR OUT.safetensors [--teacher]
  d2v import-fairseq CKPT OUT.safetensors
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

from .checkpoint import make_universal
from .config import Config, ConfigError, apply_overrides
from .errors import D2VError, one_line
from .evaluate import probe as run_probe
from .export import export_run
from .fairseq import import_fairseq as run_import_fairseq
from .finetune import finetune as run_finetune
from .preflight import finetune_preflight, preflight
from .presets import FINETUNE_PRESETS, build_config, finetune_preset_for
from .pretrained import read_config
from .tools import bench as benches
from .tools.bench_step import bench_step
from .tools import plan as planner
from .tools.demo import run_demo
from .train import TrainingError
from .train import train as run_train
from .transcribe import transcribe as run_transcribe


def _no_positional(command: str, words: tuple) -> None:
    if words:
        raise ConfigError(f"d2v {command}: unexpected argument {words[0]!r}: every option is a --flag "
                          f"(e.g. --resume auto, --out DIR); `d2v {command} --help` lists them")


def train(*words, preset: str | None = None, data: str | None = None, ds_config: str | None = None,
          out: str | None = None, resume: str | None = None, from_json: str | None = None,
          local_rank: int = -1, **overrides) -> None:
    """Pretrain. `local_rank` is accepted for the deepspeed launcher; LOCAL_RANK is read from the env."""
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
    """Fine-tune a pretrained encoder (the recipe is picked from --init's size unless --preset names one)."""
    _no_positional("finetune", words)
    preset = preset or (None if from_json else _finetune_preset(init))
    cfg, ds_overrides = build_config(preset, from_json, task=task, init=init, train=train, val=val,
                                     ds_config=ds_config, out=out, resume=resume, **overrides)
    run_finetune(cfg, ds_overrides)


def probe(*words, init: str | None = None, train: str | None = None, val: str | None = None, how: str = "both",
          teacher: bool = False, tag: str | None = None, k: int = 20, temperature: float = 0.07,
          batch_size: int = 64, num_workers: int = 2, epochs: int = 90, random_init: bool = False,
          local_rank: int = -1) -> None:
    """kNN and linear probes of a frozen encoder on labelled shards (top-1/top-5 on --val);
    `--random_init`: the same encoder as its pretraining started (the baseline)."""
    _no_positional("probe", words)
    if not init:
        raise ConfigError("d2v probe needs --init WEIGHTS_OR_RUN_DIR")
    run_probe(init, train, val, how=how, teacher=teacher, tag=tag, k=k, temperature=temperature,
              batch_size=batch_size, num_workers=num_workers, epochs=epochs, random_init=random_init)


def transcribe(*files, init: str | None = None, audio=None, decoder: str = "auto", batch_size: int = 8,
               tag: str | None = None, local_rank: int = -1, **overrides) -> None:
    """Transcripts of audio files, folders or shards by a fine-tuned CTC model (greedy, or beam search
    with --lm.lexicon [--lm.kenlm --lm.weight --lm.word_score])."""
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
    run_transcribe(init, sources, lm, decoder, batch_size, tag)


def check(*words, preset: str | None = None, data: str | None = None, ds_config: str | None = None,
          out: str | None = None, resume: str | None = None, from_json: str | None = None,
          task: str | None = None, init: str | None = None, train: str | None = None, val: str | None = None,
          world: int = 0, local_rank: int = -1, **overrides) -> None:
    """Validate everything `train` (or, with --task, `finetune`) would use (config, ds_config, shards, run
    directory, the checkpoint to resume from) in this process; start nothing, write nothing."""
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
    start = f"resume from {plan.resume.path}" if plan.resume else "start from step 0"
    for tag, problem in plan.resume.broken if plan.resume else []:
        print(f"note: checkpoint {tag} is unusable ({problem}); the run passes over it")
    if plan.changed:
        print("note: resuming with changed settings: " + "; ".join(plan.changed))
    print(f"ok: {cfg.preset or 'config'} | {len(plan.shards.urls)} shards | world {world} | micro batch "
          f"{ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']} | {start}")


def show_config(preset: str | None = None, from_json: str | None = None, **overrides) -> None:
    """Print the resolved config as JSON (every key `train` accepts)."""
    cfg, _ = build_config(preset, from_json, **overrides)
    print(json.dumps(cfg.to_dict(), indent=2))


def export(run_dir: str, out: str, teacher: bool = False, tag: str | None = None) -> None:
    """Consolidated fp32 student encoder (and, with --teacher, the EMA teacher) as safetensors."""
    print(json.dumps(export_run(run_dir, out, teacher=teacher, tag=tag), indent=1))


def reshard(run_dir: str, tag: str | None = None) -> None:
    """Make a run's newest checkpoint loadable at another world size (DeepSpeed universal checkpoint)."""
    out = make_universal(run_dir, tag)
    print(f"wrote {out}; `--resume auto` now resumes from it at any number of ranks")


def import_fairseq(ckpt: str, out: str) -> None:
    """A fairseq data2vec 2.0 checkpoint -> a d2v_scale weights file (for --run.init_from)."""
    print(json.dumps(run_import_fairseq(ckpt, out), indent=1))


def bench(kind: str = "step", local_rank: int = -1, **kwargs) -> None:
    """Benchmarks that print ratios measured side by side in one run: step | data | ema."""
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
    """Memory and step-time plan for a cluster run (`--measure`: compare with this machine's real engines).
    `--placement`: the teacher's (auto: the cheapest in traffic that fits `--gpu_gb`; default host with
    --offload_teacher, else replicated); the teacher table lists every placement."""
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


def demo(**kwargs) -> None:
    """The README's first command: make a small dataset, shard it, pretrain on it."""
    run_demo(**kwargs)


COMMANDS = {"train": train, "finetune": finetune, "probe": probe, "check": check, "show_config": show_config,
            "export": export,
            "import-fairseq": import_fairseq, "import_fairseq": import_fairseq, "bench": bench, "demo": demo,
            "reshard": reshard, "plan": plan, "transcribe": transcribe}


def main(argv: list[str] | None = None) -> None:
    """Errors a user can act on end in one line (problem and fix); OSErrors name the path."""
    try:
        fire.Fire(COMMANDS, command=argv if argv is not None else sys.argv[1:], name="d2v")
    except D2VError as e:
        what = "training stopped" if isinstance(e, TrainingError) else "error"
        sys.exit(f"d2v: {what}: {one_line(e)}")
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        sys.exit(f"d2v: error: cannot use{where}: {e.strerror or one_line(e)}; check the path and its permissions")


if __name__ == "__main__":
    main()
