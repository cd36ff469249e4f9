"""End-to-end training through the real DeepSpeed engine on CPU (gloo), 1 and 2 ranks."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2v_scale.checkpoint import weights_only_loads
from helpers import BIN, TRAIN_ARGS, ZERO2_ARGS, losses, rewound, run_d2v, run_group, shm_segments


def train_args(data, out, ds="zero3", steps=8, *extra):
    return ["train", "--data", str(data), "--ds_config", f"ds_configs/{ds}.json", "--out", str(out),
            f"--optim.max_steps={steps}", "--run.save_every=4", *TRAIN_ARGS, *extra]


@pytest.mark.timeout(600)
def test_two_rank_zero3_run_resume_and_export(image_shards, tmp_path):
    """2 ranks, ZeRO-3: falling loss, TensorBoard scalars, checkpoints; stopping at step 4 and resuming
    gives the same loss sequence as an uninterrupted run; the export loads into the encoder."""
    full, split = tmp_path / "full", tmp_path / "split"
    shm_before = shm_segments()
    out = run_d2v(train_args(image_shards, full), nproc=2).stdout
    assert shm_segments() == shm_before        # DeepSpeed's CPU all-reduce segments do not outlive the run
    assert "world 2" in out and "ZeRO-3" in out
    rewound(full, split, 4)
    resumed = run_d2v(train_args(image_shards, split, "zero3", 8, "--resume", "auto"), nproc=2).stdout
    assert "resumed from" in resumed and "step_00000004" in resumed
    assert losses(full) == losses(split)                          # bitwise: fp32, same seeds, same data
    assert len(losses(full)) == 8 and losses(full)[-1] < losses(full)[0]

    # the run directory: resolved configs, TensorBoard, checkpoints with the teacher and data position
    assert json.loads((full / "config.json").read_text())["mask"]["clone_batch"] == 4
    assert json.loads((full / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(full / "tb"))
    ev.Reload()
    for tag in ("train/loss", "train/loss_cls", "train/lr", "train/ema_decay", "train/pred_var",
                "train/target_var", "perf/samples_per_s", "perf/mfu"):
        assert len(ev.Scalars(tag)) == 8, tag
    ckpt = full / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000008"
    names = {p.name for p in (ckpt / "step_00000008").iterdir()}
    assert {"data_rank0.json", "data_rank1.json", "meta.json", "teacher_rank0.pt", "teacher_rank1.pt"} <= names
    assert json.loads((ckpt / "step_00000008" / "data_rank1.json").read_text())["batches"] == 8

    run_d2v(["export", str(full), str(tmp_path / "enc.safetensors"), "--teacher"])
    state = load_file(tmp_path / "enc.safetensors")
    from d2v_scale.models.image import ImageEncoder
    from d2v_scale.presets import get_preset
    enc = ImageEncoder(get_preset("vit_base_patch16_debug").model)
    enc.load_state_dict(state, strict=True)
    assert set(load_file(tmp_path / "enc.teacher.safetensors")) == set(state)


@pytest.mark.timeout(300)
def test_one_rank_resume_equals_uninterrupted(image_shards, zero2_run, tmp_path):
    """The suite's 4-step ZeRO-2 run, rewound to its step-2 checkpoint and resumed: the same losses."""
    split = rewound(zero2_run, tmp_path / "split", 2)
    run_d2v(["train", "--data", str(image_shards), "--out", str(split), "--optim.max_steps=4", *ZERO2_ARGS,
             "--resume", "auto"])
    assert losses(zero2_run) == losses(split) and len(losses(split)) == 4


@pytest.mark.timeout(300)
def test_zero_stages_agree(image_shards, zero2_run, tmp_path):
    """ZeRO-0/1/2/3 change where state lives, not the math: same losses on 1 rank (fp32); ZeRO-2 is the
    suite's shared run (the same arguments, a checkpoint every 2 steps)."""
    runs = {"zero2": losses(zero2_run)}
    for stage in ("zero0", "zero1", "zero3"):
        run_d2v(train_args(image_shards, tmp_path / stage, stage, 4))
        runs[stage] = losses(tmp_path / stage)
    for stage, seq in runs.items():
        assert seq == pytest.approx(runs["zero0"], rel=1e-5), stage


@pytest.mark.timeout(300)
def test_gradient_accumulation_steps_the_ema_once_per_update(image_shards, tmp_path):
    """global batch = 2 x micro batch: 4 optimizer steps consume 8 micro-batches and do 4 EMA steps."""
    run_d2v(train_args(image_shards, tmp_path / "acc", "zero2", 4, "--data.global_batch=8"))
    ckpt = tmp_path / "acc" / "checkpoints" / "step_00000004"
    with weights_only_loads():
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    assert state["ema_updates"] == 4 and state["global_steps"] == 4
    assert json.loads((ckpt / "data_rank0.json").read_text())["samples_seen"] == 8 * 4
    assert json.loads((tmp_path / "acc" / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize("args,msg", [
    (["--mask.clone_bach=8"], "unknown config key --mask.clone_bach; did you mean --mask.clone_batch"),
    (["--mask.mask_prob=0.999"], "leaves 0 visible"),
    (["--model.image.patch_size=5"], "must be divisible|does not divide|img_size"),
])
def test_bad_input_fails_fast_with_the_fix(image_shards, tmp_path, args, msg):
    """`d2v train` in this process: the refusal is its exit line, before anything starts or is written."""
    import re

    from d2v_scale import cli
    with pytest.raises(SystemExit) as e:                 # not a traceback: any other exception fails here
        cli.main(train_args(image_shards, tmp_path / "x", "zero2", 2, *args))
    assert str(e.value).startswith("d2v: error:") and re.search(msg, str(e.value)), str(e.value)
    assert not (tmp_path / "x").exists()


def test_collapse_guard_stops_with_the_reason(image_shards, tmp_path):
    """fairseq's min_pred_var / min_target_var: here an impossible floor trips it at the first check."""
    res = run_d2v(train_args(image_shards, tmp_path / "c", "zero2", 6, "--run.min_pred_var=100",
                             "--run.collapse_guard_after=2"), check=False, timeout=120)
    assert res.returncode != 0
    assert "training stopped: pred_var" in res.stdout and "< run.min_pred_var 100" in res.stdout
    assert "at step 3" in res.stdout and "Lower --optim.lr" in res.stdout


def test_missing_data_path_fails_before_training(tmp_path):
    from d2v_scale import cli
    with pytest.raises(SystemExit) as e:                 # in this process, as above
        cli.main(train_args(tmp_path / "nope-{000000..000003}.tar", tmp_path / "x"))
    assert "4 of 4 shards do not exist" in str(e.value)
    assert not (tmp_path / "x").exists()


def test_an_op_build_lock_left_by_a_killed_process_does_not_hang_later_runs(tmp_path):
    """torch marks each build and load of a DeepSpeed op with a `lock` file; a process killed meanwhile
    (Ctrl-C during the first run's build) leaves it, and every later run waited on it forever."""
    import subprocess
    import sys
    from helpers import ROOT, child_env
    env = child_env()
    root = Path(env.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")
    (root / "deepspeed_shm_comm").mkdir(parents=True, exist_ok=True)
    (root / "deepspeed_shm_comm" / "lock").touch()            # what the killed process left
    code = "from d2v_scale import dist; dist.select_accelerator(); dist.build_op('ShareMemCommBuilder'); print('loaded')"
    res = subprocess.run([str(BIN / "python"), "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0 and "loaded" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert "left by a process killed while it built or loaded the op" in res.stderr
    assert not (root / "deepspeed_shm_comm" / "lock").exists()


@pytest.mark.timeout(300)
def test_small_dev_shm_falls_back_to_gloo(image_shards, tmp_path):
    """A container's default 64 MB /dev/shm cannot hold DeepSpeed's CPU all-reduce workspaces (69 MB per
    rank): the run says so and trains through gloo's all-reduce instead of crashing or hanging."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root to mount a small /dev/shm in a private mount namespace")
    from d2v_scale.dist import free_port
    cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$@"', "sh",
           BIN / "deepspeed", "--num_accelerators", "2", "--no_local_rank", "--master_port", free_port(),
           "--module", "d2v_scale.cli", *train_args(image_shards, tmp_path / "run", "zero2", 3)]
    res = run_group(cmd, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "/dev/shm has 64 MiB free" in res.stderr and "--shm-size" in res.stderr
    assert len(losses(tmp_path / "run")) == 3
