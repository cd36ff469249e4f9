"""`d2v demo [--modality image|audio|text]`: a real, small data2vec 2.0 pretraining, no download, no GPU.

1. make a dataset on the machine (demo_data.py): drawn scenes, espeak-ng speech, or prose,
2. shard it with `d2v-shard` straight into a local S3 object store (SeaweedFS, when its `weed`
   binary is installed, as `make venv` does; `--s3 false` keeps the shards on disk),
3. pretrain the modality's debug preset through the `deepspeed` launcher on CPU (2 ranks, ZeRO-3,
   gloo), streaming the shards from the object store; for images with the kNN monitor on a held-out
   set of labelled scenes (`eval/knn_top1_*` in TensorBoard),
4. images: probe what the encoder learned (`d2v probe`: kNN and a linear probe, trained on the labelled
   scenes and scored on held-out ones, against the same encoder at its random init; the class of a
   scene is the kind of its shapes, which no shape covers),
5. print where the TensorBoard logs and checkpoints are and how to go on on a GPU box.
Run it again to continue from the newest checkpoint.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from data_prep import cli as shard

from ..data.s3 import S3Error, head
from ..dist import free_port
from ..evaluate import probe
from . import demo_data
from .objectstore import SeaweedFS, weed_binary

RECIPES = {  # modality -> (preset, default steps, extra train flags)
    "image": ("vit_base_patch16_debug", 1000, ["--data.batch_size=16", "--optim.warmup_steps=50"]),
    "audio": ("audio_base_debug", 600, ["--data.batch_size=4", "--optim.warmup_steps=50"]),
    "text": ("text_base_debug", 800, ["--data.batch_size=8", "--optim.warmup_steps=50",
                                      "--data.tokens_per_sample=64"]),
}


def _make_shards(modality: str, work: Path, shards: str, samples: int) -> None:
    if modality == "image":
        for name, n, seed, dst in (("images", samples, 0, shards), ("images_val", samples // 4, 1, shards + "-val")):
            images = work / name
            if not images.exists():
                print(f"[demo] drawing {n} scenes into {images}", flush=True)
                demo_data.make_images(images, n, seed=seed)
            shard.image(str(images), dst + "/shard-%06d.tar", maxcount=max(1, samples // 16), workers=2,
                        overwrite=True)                 # the demo's own folder: an interrupted sharding is redone
        return
    corpus = work / "corpus"
    if not corpus.exists():
        print(f"[demo] collecting prose already on this machine into {corpus}", flush=True)
        demo_data.make_corpus(corpus)
    if modality == "audio":
        speech = work / "speech"
        if not speech.exists():
            how = "espeak-ng" if demo_data.espeak() else "a synthetic voice (espeak-ng is not installed)"
            print(f"[demo] speaking {samples} sentences with {how} into {speech}", flush=True)
            demo_data.make_speech(speech, samples, corpus)
        shard.audio(str(speech), shards + "/shard-%06d.tar", max_seconds=3.0, min_seconds=1.0,
                    maxcount=max(1, samples // 8), workers=2, overwrite=True)
        return
    spm = work / "spm" / "demo"
    if not Path(str(spm) + ".model").exists():
        shard.spm_train(str(corpus), str(spm), vocab_size=2000)
    shard.text(str(corpus), shards + "/shard-%06d.tar", spm=str(spm) + ".model", tokens_per_sample=64,
               maxcount=500, workers=2, overwrite=True)


def _index_exists(url: str) -> bool:
    if url.startswith("s3://"):
        try:
            head(url)
            return True
        except S3Error:
            return False
    return Path(url).exists()


def run_demo(modality: str = "image", steps: int | None = None, ranks: int = 2, samples: int | None = None,
             workdir: str = "demo_data", out: str = "runs/demo", ds_config: str = "ds_configs/zero3.json",
             s3: str | bool = "auto", **overrides) -> None:
    if modality not in RECIPES:
        raise SystemExit(f"d2v demo: --modality is one of {', '.join(RECIPES)}")
    preset, default_steps, flags = RECIPES[modality]
    samples = samples or {"image": 2000, "audio": 300, "text": 0}[modality]
    work = Path(workdir)
    use_s3 = s3 is True or str(s3).lower() == "true" or (str(s3).lower() == "auto" and weed_binary() is not None)
    store, env = None, dict(os.environ, OMP_NUM_THREADS="1")
    try:
        if use_s3:
            store = SeaweedFS(work / "seaweedfs", buckets=("d2v-demo",)).start()
            os.environ.update(store.env())
            env.update(store.env())
            print(f"[demo] local S3 object store (SeaweedFS) at {store.endpoint}, bucket d2v-demo", flush=True)
            shards = f"s3://d2v-demo/{modality}"
        else:
            shards = str(work / "shards" / modality)
        val = shards + "-val/index.json" if modality == "image" else None
        if not _index_exists(shards + "/index.json") or (val and not _index_exists(val)):
            print(f"[demo] sharding into {shards}", flush=True)
            _make_shards(modality, work, shards, samples)
        steps = steps or default_steps
        monitor = [f"--eval.data={val}", f"--eval.every={max(10, steps // 5 // 10 * 10)}"] if val else []
        _train(preset, modality, shards + "/index.json", steps, ranks, out, ds_config, env,
               flags + monitor + [f"--{k}={v}" for k, v in overrides.items()])
        if val:
            _probe(Path(out) / modality, shards + "/index.json", val)
        _next_steps(modality, Path(out) / modality, shards + "/index.json", val)
    finally:
        if store is not None:
            store.stop()


def _train(preset: str, modality: str, data: str, steps: int, ranks: int, out: str, ds_config: str, env: dict,
           flags: list[str]) -> None:
    out_dir = Path(out) / modality
    args = ["train", "--preset", preset, "--data", data, "--ds_config", ds_config, "--out", str(out_dir),
            "--resume", "auto", f"--optim.max_steps={steps}", "--data.num_workers=1", "--run.log_every=10",
            "--run.save_every=100", *flags]
    bindir = Path(sys.executable).parent
    cmd = ([str(bindir / "deepspeed"), "--num_accelerators", str(ranks), "--no_local_rank",
            "--master_port", str(free_port()), "--module", "d2v_scale.cli"] + args) if ranks > 1 \
        else [sys.executable, "-m", "d2v_scale.cli"] + args
    print(f"[demo] {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"d2v demo: training failed (exit {rc})")


def _probe(run_dir: Path, train: str, val: str) -> dict:
    """kNN and linear probes of the pretrained student and of the same encoder at its random init, trained on
    the labelled scenes and scored on the held-out ones; returns {"pretrained"|"random_init": {metric: %}}."""
    print(f"[demo] d2v probe --init {run_dir} --train {train} --val {val} [--random_init]", flush=True)
    got = {name: probe(str(run_dir), train, val, how="both", num_workers=1, random_init=name == "random_init")["mean"]
           for name in ("pretrained", "random_init")}
    chance = 100 / len(demo_data.SHAPES)
    for metric, what in (("knn_top1", "kNN top-1 (k=20, mean-pooled)"),
                         ("linear_top1", "linear probe top-1 (mean-pooled)")):
        print(f"[demo] {what} on the held-out scenes: pretrained {got['pretrained'][metric]:.1f}%, "
              f"random init {got['random_init'][metric]:.1f}%, chance {chance:.0f}%", flush=True)
    return got


def _next_steps(modality: str, out_dir: Path, train: str, val: str | None) -> None:
    bindir = Path(sys.executable).parent
    big = {"image": "vit_base_patch16", "audio": "audio_base", "text": "text_base"}[modality]
    evaluate = f"""
  probe:        {bindir / 'd2v'} probe --init {out_dir} --train {train} --val {val}
  fine-tune:    {bindir / 'd2v'} finetune --task image_classification --init {out_dir} --train {train} \\
                  --val {val} --ds_config ds_configs/zero2.json --out {out_dir.parent / 'finetune'}""" if val else ""
    print(f"""
[demo] done.
  TensorBoard:  {bindir / 'tensorboard'} --logdir {out_dir / 'tb'}
  checkpoints:  {out_dir / 'checkpoints'}  (run the demo again to continue from the newest)
  export:       {bindir / 'd2v'} export {out_dir} {out_dir / 'encoder.safetensors'}{evaluate}
  on a GPU box: deepspeed --num_gpus 8 --no_local_rank --module d2v_scale.cli train --preset {big} \\
                  --data 's3://bucket/{modality}/train-{{000000..001023}}.tar' --ds_config ds_configs/zero2.json --out runs/{big}
""")
