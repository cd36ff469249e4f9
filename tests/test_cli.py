"""The command-line surface: import-fairseq, export round trip, check, show_config, bench, demo, launcher."""
import json
import re
import subprocess

import pytest
import torch

from helpers import BIN, ROOT, child_env, d2v_here, losses, run_d2v, run_group


def test_import_fairseq_round_trip(tmp_path):
    """`d2v import-fairseq` on a fairseq-layout checkpoint -> weights file -> same losses as fairseq."""
    g = torch.load(ROOT / "tests/assets/image_tiny.pt", weights_only=True)
    ckpt = {"model": {**g["student_state_dict"], "_ema": g["teacher_state_dict"]},
            "cfg": {"model": json.loads(g["config"])}, "args": None,
            "extra_state": {"metrics": {}, "val_loss": None}, "optimizer_history": []}
    torch.save(ckpt, tmp_path / "checkpoint_last.pt")
    res = d2v_here(["import-fairseq", str(tmp_path / "checkpoint_last.pt"), str(tmp_path / "w.safetensors")])
    out = res.stdout
    assert res.returncode == 0, out
    assert json.loads(out[out.index("{"):])["modality"] == "image"

    from d2v_scale.config import from_dict
    from d2v_scale.d2v import Data2Vec
    from d2v_scale.export import read_weights
    from d2v_scale.masking import MaskInfo
    from d2v_scale.teacher import ReplicatedTeacher
    student_sd, teacher_sd, cfg = read_weights(tmp_path / "w.safetensors")
    cfg = from_dict(cfg)
    model = Data2Vec(cfg.model, cfg.mask.mask_noise_std)
    model.load_state_dict(student_sd)
    teacher = ReplicatedTeacher(model.encoder, cfg.model)
    teacher.load_state_dict(teacher_sd)
    mi = g["mask_info"]
    res = model(g["inputs"], MaskInfo(mi["mask"].bool(), mi["ids_keep"], mi["ids_restore"]), teacher)
    assert float(res["loss"].detach()) == pytest.approx(float(g["forward"]["loss"]), rel=1e-5)


def test_import_refuses_pickled_objects(tmp_path):
    """A config object torch.load(weights_only=True) refuses (here a pathlib path; omegaconf in legacy
    fairseq files) -> the fix. (An argparse.Namespace `args`, as every data2vec_vision checkpoint
    holds, is read: its values are still weights-only types.)"""
    import pathlib
    torch.save({"model": {}, "cfg": {"model": {}}, "args": pathlib.PosixPath("/checkpoint")}, tmp_path / "bad.pt")
    res = d2v_here(["import-fairseq", str(tmp_path / "bad.pt"), str(tmp_path / "w.safetensors")])
    assert res.returncode != 0 and "weights_only=True" in res.stdout


def test_show_config_and_check(image_shards, capsys):
    """In this process (the commands' exits as subprocesses are checked throughout the suite)."""
    from d2v_scale import cli
    cli.main(["show_config", "--preset", "vit_huge_patch14", "--mask.clone_batch=8"])
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["mask"]["clone_batch"] == 8 and cfg["model"]["image"]["patch_size"] == 14
    cli.main(["check", "--preset", "vit_base_patch16_debug", "--data", str(image_shards), "--ds_config",
              "ds_configs/zero3.json", "--world", "2", "--data.num_workers=2"])
    ok = capsys.readouterr().out
    assert ok.startswith("ok:") and "8 shards | world 2" in ok
    with pytest.raises(SystemExit) as bad:
        cli.main(["check", "--preset", "vit_base_patch16_debug", "--data", str(image_shards), "--ds_config",
                  "ds_configs/zero3.json", "--world", "4", "--data.num_workers=4"])
    assert str(bad.value).startswith("d2v: error:") and "cannot be split over 4 ranks x 4 workers" in str(bad.value)


@pytest.mark.timeout(300)
def test_bench_step_compares_with_timm_and_breaks_the_step_down():
    """One process: the d2v2 step (activation checkpointing on) and a timm ViT of the same shape, their
    efficiency ratio in model FLOPs (the recompute counted as executed, not as work), the EMA-off run
    beside, memory, and the synchronised phase breakdown; no efficiency printed above 100%."""
    out = run_d2v(["bench", "step", "--preset", "vit_base_patch16_debug", "--steps", "2", "--warmup", "1",
                   "--compare", "timm", "--breakdown", "--model.grad_checkpointing=true"]).stdout
    assert "peer: timm VisionTransformer(embed_dim=64, depth=3, heads=4, patch=4)" in out
    ratio = float(out.split("efficiency d2v2 / peer (model FLOPs)")[1].split()[0])
    assert 0 < ratio < 10
    agree = float(out.split("flops.py model FLOPs / executed")[1].split()[0])
    assert 0.7 < agree < 0.95                           # executed = model + the blocks' forward again
    model = float(out.split("model GFLOP per step")[1].split()[0])
    executed = float(out.split("executed GFLOP per step")[1].split()[0])
    assert executed > model * 1.05
    assert "EMA off, same run" in out and "pinned host" in out
    assert all(float(c[:-1]) <= 100 for c in re.findall(r"\b\d+\.\d%", out.split("breakdown")[0]))
    for phase in ("teacher targets", "student forward", "backward", "optimizer step", "EMA update", "masks"):
        assert phase in out.split("breakdown")[1]
    assert "top host ops" in out and "aten::mm" in out


@pytest.mark.timeout(600)
def test_demo_runs_end_to_end(tmp_path):
    """README command 1, shortened: draws scenes, shards them into a local SeaweedFS, trains 2 CPU ranks
    with ZeRO-3 streaming from it (with the kNN monitor on held-out scenes), probes the encoder against
    its random init, and stops the object store again."""
    res = run_group([BIN / "d2v", "demo", "--steps", "30", "--samples", "256",
                     "--workdir", tmp_path / "data", "--out", tmp_path / "runs"], timeout=540)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "image"
    seq = losses(run)
    assert seq[-1] < seq[0]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000030"
    assert "TensorBoard:" in res.stdout and "on a GPU box" in res.stdout and "fine-tune:" in res.stdout
    assert "kNN top-1 (k=20, mean-pooled) on the held-out scenes: pretrained" in res.stdout and "random init" in res.stdout
    assert "linear probe top-1 (mean-pooled) on the held-out scenes: pretrained" in res.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/knn_top1_teacher" in r] == [10, 20, 30]
    assert "local S3 object store (SeaweedFS)" in res.stdout and "--data s3://d2v-demo/image/index.json" in res.stdout
    assert subprocess.run(["pgrep", "-f", f"weed mini -dir={tmp_path}"], capture_output=True).returncode == 1


@pytest.mark.timeout(300)
def test_run_local_launcher_checks_then_trains(image_shards, tmp_path):
    env = child_env(DATA=str(image_shards), OUT=str(tmp_path / "run"), NPROC="2", BIN=str(BIN),
               MASTER_PORT=str(__import__("d2v_scale.dist", fromlist=["x"]).free_port()))
    res = run_group([ROOT / "launcher/run_local.sh", "--optim.max_steps=3", "--data.num_workers=1",
                     "--data.batch_size=4", "--run.log_every=1"], timeout=280, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.startswith("ok:") and len(losses(tmp_path / "run")) == 3


@pytest.mark.parametrize("prog", ["d2v", "d2v-shard"])
def test_every_command_has_help_and_help_runs_nothing(prog, capsys):
    """`CMD --help` / `-h` / `help CMD`: what it does, its main flags one line each (each a real flag),
    every flag of its signature, and for commands taking config keys where to see them all; the
    overview lists each command once (no import_fairseq beside import-fairseq)."""
    import inspect
    import re

    from d2v_scale import cli
    from data_prep import cli as shard_cli
    mod = cli if prog == "d2v" else shard_cli
    mod.main(["--help"])
    overview = capsys.readouterr().out
    listed = [line.split()[0] for line in overview.split("commands:\n")[1].splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted({mod.ALIASES.get(k, k) for k in mod.COMMANDS}), listed
    assert "import_fairseq" not in overview and "import_hf" not in overview and "spm_train" not in overview
    mod.main([])
    assert capsys.readouterr().out == overview
    for name, fn in mod.COMMANDS.items():
        params = inspect.signature(fn).parameters
        takes_keys = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for argv in ([name, "--help"], [name, "-h"], ["help", name]):
            mod.main(argv)
            out = capsys.readouterr().out
            assert out.startswith(f"usage: {prog} {mod.ALIASES.get(name, name)}"), (argv, out[:200])
            what = out.split("\n")[2]
            assert len(what) > 30 and not what.startswith("-"), (argv, what)
            flag_lines = re.findall(r"^  (--[\w.]+)", out, re.M)
            assert flag_lines or name == "import_fairseq" or name == "import-fairseq", (argv, out)
            for flag in flag_lines:
                assert flag[2:] in params or (takes_keys and "." in flag) or name == "bench", (argv, flag)
            for p in params.values():
                if p.default is not p.empty and p.name != "local_rank":
                    assert f"--{p.name}" in out, (argv, p.name)
            if prog == "d2v" and takes_keys:
                assert "d2v show_config" in out, argv
    with pytest.raises(SystemExit) as e:
        mod.main(["trian"])
    assert "unknown command 'trian'" in str(e.value) and f"`{prog} --help`" in str(e.value)
