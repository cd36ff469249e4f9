"""The ZeRO-3-partitioned, CPU-offloaded EMA teacher and the scale features (issue "Scale").

Real DeepSpeed engines on CPU ranks (gloo); tests/probes/ema_probe.py trains on fixed global batches
and masks so that runs at different world sizes and teacher placements are comparable.
"""
import json
import re

import pytest
import torch

from helpers import BIN, ROOT, TRAIN_ARGS, losses, run_d2v, run_group

PROBE = ROOT / "tests" / "probes" / "ema_probe.py"


def probe(tmp_path, nproc, placement, ds_config, overlap="auto"):
    from d2v_scale.dist import free_port
    prefix = tmp_path / f"probe_{nproc}_{placement}"
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", str(nproc), "--no_local_rank", "--master_port",
           str(free_port()), str(PROBE), str(prefix), placement, str(ds_config), overlap]
    res = run_group(cmd, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads(prefix.with_suffix(".json").read_text()), torch.load(str(prefix) + ".teacher.pt", weights_only=True)


@pytest.fixture(scope="module")
def no_persistence(tmp_path_factory):
    """ZeRO-3 with every parameter partitioned (the debug model is small enough to be all 'persistent')."""
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_all_partitioned.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.timeout(1200)
def test_sharded_teacher_is_exact_local_and_matches_references(tmp_path, no_persistence):
    # 2 ranks, ZeRO-3 with optimizer + parameter offload, sharded CPU teacher
    sharded, t2 = probe(tmp_path, 2, "sharded", ROOT / "ds_configs" / "zero3_offload.json")
    assert sharded["exact"] and sharded["maxdiff"] == 0.0    # gathered teacher == closed-form EMA of fp32 masters
    assert sharded["ema_collectives"] == 0 and sharded["ema_collective_bytes"] == 0
    assert sharded["teacher_device"] == "cpu"
    # the same training with fairseq's layout: a full teacher per rank reading the ZeRO-3 student by all-gathers
    replicated, tr = probe(tmp_path, 2, "replicated", no_persistence)
    assert replicated["ema_collectives"] > 0                 # the counter sees gathers when there are any
    assert replicated["losses"] == pytest.approx(sharded["losses"], rel=1e-6)
    # a 1-rank reference run of the same seed and global batches, its EMA blended beside the next step
    single, t1 = probe(tmp_path, 1, "sharded", ROOT / "ds_configs" / "zero3.json", overlap="true")
    assert single["exact"] and single["maxdiff"] == 0.0
    assert single["losses"] == pytest.approx(sharded["losses"], rel=1e-6)
    flat = lambda t: torch.cat([t[n].flatten() for n in sorted(t)])          # noqa: E731
    assert float((flat(t2) - flat(t1)).norm() / flat(t1).norm()) < 1e-6    # float summation order only
    assert float((flat(tr) - flat(t2)).norm() / flat(t2).norm()) < 1e-6


@pytest.mark.timeout(900)
def test_world_size_change_needs_a_conversion_then_resumes(image_shards, tmp_path):
    args = ["train", "--data", str(image_shards), "--ds_config", "ds_configs/zero3.json", "--out", str(tmp_path / "r"),
            "--optim.max_steps=6", "--run.save_every=2", "--data.sampling=resample", *TRAIN_ARGS]
    run_d2v(args + ["--run.stop_after=4"], nproc=2)
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000004"
    assert sorted(f.name for f in ckpt.glob("teacher_rank*.pt")) == ["teacher_rank0.pt", "teacher_rank1.pt"]
    res = run_d2v(args + ["--resume", "auto"], check=False)
    assert res.returncode != 0 and "written by 2 ranks and this run has 1" in res.stdout and "d2v reshard" in res.stdout
    out = run_d2v(["reshard", str(tmp_path / "r")]).stdout
    assert "step_00000004_universal" in out
    res = run_d2v(args + ["--resume", "auto"]).stdout
    assert "resumed from" in res and "step_00000004_universal at step 4" in res
    seq = losses(tmp_path / "r")
    assert len(seq) == 6 and all(abs(l - seq[3]) < 0.2 * seq[3] for l in seq[4:])
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step_00000006"
    # the teacher went from 2 slices to 1 and back out as one consolidated export
    run_d2v(["export", str(tmp_path / "r"), str(tmp_path / "enc.safetensors"), "--teacher"])


@pytest.mark.timeout(600)
def test_plan_measure_matches_allocated_bytes(no_persistence):
    res = run_d2v(["plan", "--preset", "vit_base_patch16_debug", "--measure", "--ds_config", str(no_persistence)],
                  nproc=2).stdout
    rows = re.findall(r"^  (student params|fp32 grads|fp32 master|Adam moments|teacher|teacher fp32)\s+([\d,]+)\s+([\d,]+)$",
                      res, re.M)
    assert len(rows) == 6, res[-2000:]
    for name, measured, planned in rows:
        assert measured == planned, name
    assert int(dict((n, m) for n, m, _ in rows)["teacher"].replace(",", "")) > 0
    ema = re.search(r"EMA update \(device teacher\): measured ([\d.]+) ms, planned ([\d.]+) ms", res)
    assert ema and float(ema.group(1)) > 0 and float(ema.group(2)) > 0


def plan_rows(out: str) -> dict[str, dict[str, float]]:
    """The teacher table of `d2v plan`: placement -> PCIe / host / GPU-GPU GB and the auto mark."""
    rows = re.findall(r"^    (replicated|device|device_bf16_host_ema|host)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s.*?(<- auto)?$",
                      out, re.M)
    return {r[0]: {"pcie": float(r[1]), "host": float(r[2]), "gather": float(r[3]), "auto": bool(r[4])} for r in rows}


def test_plan_vit_huge_cluster():
    out = run_d2v(["plan", "--preset", "vit_huge_patch14", "--nodes", "8", "--gpus_per_node", "8", "--zero", "3",
                   "--offload_teacher", "--micro_batch", "8", "--grad_checkpointing"]).stdout
    totals = re.findall(r"GPU  total\s+([\d.]+) GiB", out)
    assert len(totals) == 2 and float(totals[0]) < float(totals[1]) / 2   # ours vs fairseq-style per GPU
    rows = plan_rows(out)
    assert set(rows) == {"replicated", "device", "device_bf16_host_ema", "host"}, out[-3000:]
    assert rows["replicated"]["pcie"] == rows["device"]["pcie"] == 0 and rows["host"]["pcie"] > 0
    assert "DeepSpeed" in out and "samples/s" in out and "global 512" in out
    assert "host teacher fp32 slice" in out


def test_plan_vit_huge_one_gpu_16_micro_steps_moves_at_most_5_1_gb_over_pcie():
    """The issue's figure: ViT-H on one GPU at micro batch 32 and the preset's global 512 (16 micro-steps)
    moved 26.5 GB per optimizer step over PCIe with the host teacher gathered at every micro-step."""
    args = ["plan", "--preset", "vit_huge_patch14", "--nodes", "1", "--gpus_per_node", "1", "--zero", "3",
            "--micro_batch", "32", "--grad_checkpointing", "--placement", "auto"]
    out = run_d2v(args).stdout
    assert "accumulation 16" in out and "1 teacher pass per step, 16 micro-batches each" in out
    rows, t = plan_rows(out), 630.4e6
    assert rows["device_bf16_host_ema"]["pcie"] <= 5.1                     # the fp32 slice down and back
    assert rows["device_bf16_host_ema"]["pcie"] == pytest.approx(8 * t / 1e9, rel=2e-3)
    assert rows["host"]["pcie"] == pytest.approx((10 + 2) * t / 1e9, rel=2e-3)     # one pass, not 16
    assert rows["device"]["pcie"] == 0 and rows["device"]["auto"]           # everything fits an 80 GiB GPU
    small = plan_rows(run_d2v(args + ["--gpu_gb", "24"]).stdout)
    assert small["device_bf16_host_ema"]["auto"]                           # 24 GiB: only the weights fit


def test_plan_and_auto_count_the_data2vec_1_teacher():
    """`d2v plan` counts the data2vec 1 model and its teacher (without the modules it reads from the
    student: speech pos_conv, text embeddings), a teacher pass per micro-step and data2vec 1's
    activations (no decoder); `auto` places it like data2vec 2.0's and every placement is accepted."""
    from d2v_scale.config import with_vocab
    from d2v_scale.d2v1.model import Data2Vec1
    from d2v_scale.dist import Dist
    from d2v_scale.engine import teacher_placement
    from d2v_scale.presets import get_preset
    from d2v_scale.teacher import ReplicatedTeacher
    from d2v_scale.tools.plan import plan
    one = Dist(0, 1, 0, torch.device("cpu"))
    for name in ("d2v1_vit_base_patch16_debug", "d2v1_audio_base_debug", "d2v1_text_base_debug"):
        cfg = with_vocab(get_preset(name))
        cfg.data.global_batch = 8                                        # 2 micro-steps of 2 on 2 ranks
        model = Data2Vec1(cfg.model)
        teacher = ReplicatedTeacher(model.encoder, cfg.model)
        t = sum(p.numel() for p in teacher.module.parameters())
        p = plan(cfg, 1, 2, 3, 2, placement="auto")
        assert p["teacher_params"] == t and p["student_params"] == sum(q.numel() for q in model.parameters()), name
        assert p["window"] == 1 and p["placements"]["host"]["passes"] == p["gas"] == 2, name
        assert "decoder" not in p["activations"] and "regression head" in p["activations"], name   # every token, a head
        cfg.teacher.placement = "auto"                                   # one rank, everything fits: no PCIe
        assert teacher_placement(cfg, {"train_micro_batch_size_per_gpu": 2}, one, model) == "device", name
        for placement in ("host", "device_bf16_host_ema", "device", "replicated"):
            cfg.teacher.placement = placement
            assert teacher_placement(cfg, {}, one) == placement, name
    assert t < sum(p.numel() for p in model.encoder.parameters())        # text: the embeddings stay the student's


def test_data2vec_1_teacher_features_use_the_students_copied_modules():
    """What the kNN monitor reads (`reading()` + extract_features with the student as `local`): a data2vec
    1 speech or text teacher, replicated or partitioned, runs the student's pos_conv / embeddings and its
    own EMA blocks, bit for bit the student encoder with the teacher's weights loaded."""
    import copy
    from d2v_scale.config import with_vocab
    from d2v_scale.d2v1.model import Data2Vec1
    from d2v_scale.data import synthetic_batch
    from d2v_scale.dist import Dist
    from d2v_scale.presets import get_preset
    from d2v_scale.teacher import ReplicatedTeacher, ShardedTeacher
    one = Dist(0, 1, 0, torch.device("cpu"))
    for name in ("d2v1_audio_base_debug", "d2v1_text_base_debug"):
        cfg = with_vocab(get_preset(name))
        torch.manual_seed(0)
        model = Data2Vec1(cfg.model).eval()
        teachers = [ReplicatedTeacher(model.encoder, cfg.model), ShardedTeacher(model, cfg, one, "host")]
        with torch.no_grad():
            for p in model.encoder.parameters():                         # the student moves, the EMA follows half way
                p.add_(torch.randn_like(p), alpha=0.01)
        for t in teachers:
            t.update(model.encoder, 0.5)
        hybrid = copy.deepcopy(model.encoder)                            # student's copied modules, teacher's EMA weights
        missing, unexpected = hybrid.load_state_dict(teachers[0].state_dict(), strict=False)
        assert not unexpected and missing and all(k.split(".")[0] in hybrid.local_modules for k in missing), name
        x = synthetic_batch(cfg)["source"]
        with torch.no_grad():
            expected = hybrid.extract_features(x)[0]
            for t in teachers:
                with t.reading() as enc:
                    assert torch.equal(enc.extract_features(x, None, model.encoder)[0], expected), (name, type(t))
                assert all(getattr(enc, n) is None for n in enc.local_modules), name   # nothing kept


def test_teacher_traffic_counts_one_gather_per_pass_and_the_streamed_blend():
    from d2v_scale.teacher.placement import teacher_traffic
    numels, world, passes = [1_000_001, 7], 4, 3
    part = 250_001 + 2                                                    # ZeRO-3's padded chunks
    host = teacher_traffic(numels, world, passes, True, "host", 3, master_on_host=False)
    assert host["pcie"] == passes * part * 2 + part * (4 + 4 + 2)         # slices up per pass; t down/up, low up
    assert host["gather"] == passes * (world - 1) * part * 2 and host["host"] == 0
    mixed = teacher_traffic(numels, world, passes, True, "device_bf16_host_ema", 3, master_on_host=False)
    assert mixed["pcie"] == part * 8 and mixed["gather"] == host["gather"]
    device = teacher_traffic(numels, world, passes, True, "device", 3, master_on_host=False)
    assert device["pcie"] == 0 and device["gpu"] == part * 26
    offloaded = teacher_traffic(numels, world, passes, True, "host", 3, master_on_host=True)
    assert offloaded["host"] == part * 26 and offloaded["pcie"] == passes * part * 2
    replicated = teacher_traffic(numels, world, passes, True, "replicated", 2, master_on_host=False)
    assert replicated["pcie"] == replicated["gather"] == 0 and replicated["gpu"] == sum(numels) * 26
    assert teacher_traffic(numels, world, passes, True, "replicated", 3, False)["gather"] == (world - 1) * part * 4


@pytest.mark.timeout(600)
def test_bench_ema_shard_local_beats_gathered():
    out = run_d2v(["bench", "ema", "--preset", "vit_base_patch16_debug", "--reps", "3"], nproc=2).stdout
    local = re.search(r"shard-local\s+([\d.]+)\s+(\d+)\s+([\d.]+)", out)
    gathered = re.search(r"gathered\s+([\d.]+)\s+(\d+)\s+([\d.]+)", out)
    assert local and gathered, out[-2000:]
    assert local.group(2) == "0" and float(local.group(3)) == 0.0
    assert int(gathered.group(2)) > 0 and float(gathered.group(3)) > 0
    runs = int(re.search(r"in (\d+) contiguous runs", out).group(1))
    assert 1 <= runs <= 4                                   # the masters' flat groups, not one per tensor
    assert re.search(r"per tensor\s+[\d.]+\s+0\s+0\.0", out) and "runs / per tensor" in out


def test_activation_checkpointing_same_math_fewer_saved_tensors():
    from d2v_scale.d2v import Data2Vec
    from d2v_scale.masking import sample_mask
    from d2v_scale.presets import get_preset
    from d2v_scale.teacher import ReplicatedTeacher
    cfg = get_preset("vit_base_patch16_debug")
    torch.manual_seed(0)
    model = Data2Vec(cfg.model, 0.0)
    teacher = ReplicatedTeacher(model.encoder, cfg.model)
    x = torch.randn(4, 3, 32, 32)
    mask = sample_mask(cfg.mask, 16, (8, 8), torch.Generator().manual_seed(0))
    results = {}
    for ckpt in (False, True):
        model.zero_grad()
        model.encoder.set_grad_checkpointing(ckpt)
        calls = []
        hook = model.encoder.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = model(x, mask, teacher)
        out["loss"].backward()
        hook.remove()
        results[ckpt] = (float(out["loss"].detach()), [p.grad.clone() for p in model.parameters()], len(calls), sum(saved))
    assert results[True][0] == results[False][0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[True][1], results[False][1]))
    assert results[True][2] == 2 * results[False][2]           # the block ran again in backward (recompute)
    assert results[True][3] < results[False][3] / 2           # far fewer activations kept


@pytest.mark.timeout(600)
def test_compiled_blocks_train_like_eager(image_shards, tmp_path):
    args = ["train", "--data", str(image_shards), "--ds_config", "ds_configs/zero2.json", "--optim.max_steps=3",
            *TRAIN_ARGS]
    run_d2v(args + ["--out", str(tmp_path / "eager")])
    run_d2v(args + ["--out", str(tmp_path / "compiled"), "--run.compile=true"], timeout=500)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


PLACEMENT_PROBE = ROOT / "tests" / "probes" / "placement_probe.py"


@pytest.mark.timeout(1200)
def test_every_placement_is_the_replicated_teacher_to_the_last_bit(tmp_path):
    """2 ranks, ZeRO-3, fp32, 2 micro-steps per optimizer step, one teacher pass per window: every
    placement gives the replicated teacher's losses and teacher bit for bit, across a resume from
    another placement's checkpoint and at another world size; readers between steps see the blended
    teacher; the bytes each partitioned teacher moves are the plan's. The same for data2vec 1, every
    modality, in the same launch (check_d2v1_placements)."""
    from d2v_scale.dist import free_port
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--no_local_rank", "--master_port", str(free_port()),
           str(PLACEMENT_PROBE), str(tmp_path), str(ROOT / "ds_configs" / "zero3.json")]
    res = run_group(cmd, timeout=1100)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    teachers = torch.load(tmp_path / "teachers.pt", weights_only=True)
    assert summary.pop("init_from_teacher_is_the_loaded_student") is True
    ref, ref_t = summary["replicated"]["losses"], teachers["replicated"]
    assert len(ref) == 8 and len(set(ref)) == 8
    for name, run in summary.items():
        assert run["losses"] == ref[-len(run["losses"]):], name          # floats equal, not close
        t = teachers[name]
        assert all(torch.equal(t["final"][n], ref_t["final"][n]) for n in ref_t["final"]), name
        assert all(torch.equal(a, b) for a, b in zip(t["readers"], ref_t["readers"][-len(t["readers"]):])), name
        if run["placement"] != "replicated":                              # a window pass + the EMA + a reader's pass
            assert all({k: float(v) for k, v in step.items()} == {k: run["planned"][k] for k in ("pcie", "gather")}
                       for step in run["traffic"]), (name, run["traffic"], run["planned"])
    assert summary["host"]["traffic"][0]["pcie"] > summary["device_bf16_host_ema"]["traffic"][0]["pcie"] > 0
    assert summary["device"]["traffic"][0]["pcie"] == 0
    # the same checkpoints read at world 1 by every placement: one teacher, the same targets
    from d2v_scale import checkpoint
    from d2v_scale.d2v import Data2Vec
    from d2v_scale.dist import Dist
    from d2v_scale.presets import get_preset
    from d2v_scale.teacher import ReplicatedTeacher, ShardedTeacher
    cfg = get_preset("vit_base_patch16_debug")
    model = Data2Vec(cfg.model)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    one = Dist(0, 1, 0, torch.device("cpu"))
    for src in ("host", "replicated"):                                    # slices of 2 ranks; teacher.pt
        tag = tmp_path / src / "checkpoints" / "step_00000002"
        full = checkpoint.read_teacher_state(tag)
        replicated = ReplicatedTeacher(model.encoder, cfg.model)
        checkpoint.load_teacher(replicated, tag, 0)
        y = replicated(x, None)
        for placement in ("host", "device_bf16_host_ema", "device"):
            t = ShardedTeacher(model, cfg, one, placement)
            checkpoint.load_teacher(t, tag, 0)
            state = t.full_state()
            assert all(torch.equal(state[n], full[n]) for n in full), (src, placement)
            assert torch.equal(t(x, None), y), (src, placement)
    check_d2v1_placements(tmp_path)


def check_d2v1_placements(out):
    """data2vec 1 in the same launch (placement_probe.main_d2v1): every placement of every modality gives
    the replicated teacher's losses and teacher bit for bit, a pass per micro-step moves what the plan
    says, resumes across placements repeat the run, and the step-1 checkpoints hold one teacher: the
    same slice files for every partitioned placement, read back at world 1 into every teacher."""
    from d2v_scale import checkpoint
    from d2v_scale.config import with_vocab
    from d2v_scale.d2v1.model import Data2Vec1
    from d2v_scale.data import synthetic_batch
    from d2v_scale.dist import Dist
    from d2v_scale.presets import get_preset
    from d2v_scale.teacher import ReplicatedTeacher, ShardedTeacher
    summary = json.loads((out / "d2v1_summary.json").read_text())
    teachers = torch.load(out / "d2v1_teachers.pt", weights_only=True)
    one = Dist(0, 1, 0, torch.device("cpu"))
    presets = {"image": "d2v1_vit_base_patch16_debug", "audio": "d2v1_audio_base_debug", "text": "d2v1_text_base_debug"}
    for modality, preset in presets.items():
        ref, ref_t = summary[f"{modality}/replicated"]["losses"], teachers[f"{modality}/replicated"]
        assert len(ref) == 4 and len(set(ref)) == 4, modality
        runs = {k: v for k, v in summary.items() if k.startswith(modality + "/")}
        assert len(runs) == 5, sorted(runs)
        for name, run in runs.items():
            assert run["losses"] == ref[-len(run["losses"]):], name          # floats equal, not close
            t = teachers[name]
            assert set(t) == set(ref_t) and all(torch.equal(t[n], ref_t[n]) for n in ref_t), name
            if run["placement"] != "replicated":                          # 2 passes (one per micro-step) + the EMA
                assert all({k: float(v) for k, v in step.items()} == {k: run["planned"][k] for k in ("pcie", "gather")}
                           for step in run["traffic"]), (name, run["traffic"], run["planned"])
        tags = {p: out / "d2v1" / modality / p / "checkpoints" / "step_00000001"
                for p in ("replicated", "host", "device_bf16_host_ema", "device")}
        for r in range(2):                                                # one rank's file, three placements
            files = [torch.load(tags[p] / f"teacher_rank{r}.pt", weights_only=True)
                     for p in ("host", "device_bf16_host_ema", "device")]
            first = files[0]["slices"]
            assert all(f["slices"].keys() == first.keys() and f["shapes"] == files[0]["shapes"] and
                       all(torch.equal(f["slices"][n], first[n]) for n in first) for f in files), (modality, r)
        full = checkpoint.read_teacher_state(tags["replicated"])
        joined = checkpoint.read_teacher_state(tags["host"])
        assert full.keys() == joined.keys() and all(torch.equal(full[n], joined[n]) for n in full), modality
        cfg = with_vocab(get_preset(preset))
        torch.manual_seed(0)
        model = Data2Vec1(cfg.model).eval()
        batch = synthetic_batch(cfg)
        src, pad = batch["source"], batch.get("padding_mask")
        with torch.no_grad():
            feats, pad = model.encoder.local_features(src, pad)
            replicated = ReplicatedTeacher(model.encoder, cfg.model)
            checkpoint.load_teacher(replicated, tags["host"], 0)                  # 2 ranks' slices joined
            y = model.teacher_layers(replicated, src, feats, pad)
            for src_tag, placement in (("replicated", "host"), ("host", "device_bf16_host_ema"), ("device", "device")):
                t = ShardedTeacher(model, cfg, one, placement)
                checkpoint.load_teacher(t, tags[src_tag], 0)
                assert all(torch.equal(a, b) for a, b in zip(model.teacher_layers(t, src, feats, pad), y)), \
                    (modality, src_tag, placement)


def test_partitioned_teachers_count_what_the_plan_says_and_start_from_the_rounded_init():
    """World 1, bf16 (the GPU's dtype) and fp32, no DeepSpeed: a window pass over 3 micro-batches gathers
    each block once; the EMA moves the plan's bytes; every placement starts from the init rounded to the
    compute dtype as the replicated teacher does, and gives its targets and its EMA bit for bit."""
    from d2v_scale.d2v import Data2Vec
    from d2v_scale.dist import Dist
    from d2v_scale.presets import get_preset
    from d2v_scale.teacher import ReplicatedTeacher, ShardedTeacher
    from d2v_scale.teacher.placement import teacher_traffic
    cfg = get_preset("vit_base_patch16_debug")
    torch.manual_seed(0)
    model = Data2Vec(cfg.model)
    one = Dist(0, 1, 0, torch.device("cpu"))
    xs = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    for dtype in (torch.bfloat16, torch.float32):
        lp = torch.finfo(dtype).bits // 8
        for placement in ("host", "device_bf16_host_ema", "device"):
            ref = ReplicatedTeacher(model.encoder, cfg.model, dtype=dtype)
            t = ShardedTeacher(model, cfg, one, placement, dtype=dtype)
            numels = [p.numel() for p in ref.module.parameters()]
            start = t.full_state()
            assert all(torch.equal(start[n], v) for n, v in ref.state_dict().items()), (dtype, placement)
            ys = t.window([(x, None, None) for x in xs])
            assert all(torch.equal(a, ref(x, None)) for a, x in zip(ys, xs)), (dtype, placement)
            one_pass = teacher_traffic(numels, 1, 1, dtype == torch.bfloat16, placement, 2, False)["pcie"] - \
                teacher_traffic(numels, 1, 0, dtype == torch.bfloat16, placement, 2, False)["pcie"]
            assert t.traffic.reset() == {"pcie": one_pass, "gather": 0}, (dtype, placement)
            assert one_pass == (sum(numels) * lp if placement == "host" else 0)
            t.update(model.encoder, 0.9)
            ref.update(model.encoder, 0.9)
            planned = teacher_traffic(numels, 1, 0, dtype == torch.bfloat16, placement, 2, False)
            assert t.traffic.reset() == {"pcie": planned["pcie"], "gather": 0}, (dtype, placement)
            state = t.full_state()
            assert all(torch.equal(state[n], v) for n, v in ref.state_dict().items()), (dtype, placement)


def test_window_passes_are_chunked_inside_each_accumulation_window():
    """with_targets (the training loop's teacher passes): 5 micro-steps per optimizer step and room for 2
    micro-batches per pass -> passes of 2, 2 and 1 in each window, never one across a step boundary;
    every micro-batch gets the targets of a pass of its own, bit for bit."""
    from d2v_scale.d2v import Data2Vec
    from d2v_scale.dist import Dist
    from d2v_scale.memory import window_bytes, window_size
    from d2v_scale.presets import get_preset
    from d2v_scale.teacher import ReplicatedTeacher, ShardedTeacher
    from d2v_scale.train import with_targets
    cfg = get_preset("vit_base_patch16_debug")
    cfg.teacher.window_gb = 2.5 * window_bytes(cfg, 2, 1, 4) / 1e9
    assert window_size(cfg, 2, 5, 4) == 2
    d2v1 = get_preset("d2v1_vit_base_patch16_debug")            # its teacher runs inside its own forward
    d2v1.teacher.window_gb = cfg.teacher.window_gb
    assert window_size(d2v1, 2, 5, 4) == 1
    torch.manual_seed(0)
    model = Data2Vec(cfg.model)
    one = Dist(0, 1, 0, torch.device("cpu"))
    teacher, ref = ShardedTeacher(model, cfg, one, "host"), ReplicatedTeacher(model.encoder, cfg.model)
    loader = [{"source": torch.randn(2, 3, 32, 32)} for _ in range(10)]
    expected = [ref(b["source"], None) for b in loader]
    per_pass = sum(a.numel() for a in teacher.low) * 4                   # this rank's slice sent up once
    got, passes = [], []
    for batch, y in with_targets(loader, teacher, 2, 5, one, torch.float32):
        passes.append(teacher.traffic.reset()["pcie"] // per_pass)
        got.append(y)
    assert passes == [1, 0, 1, 0, 1] * 2                                  # a pass at micro-steps 0, 2 and 4
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert [y is None for _, y in with_targets(loader[:3], teacher, 1, 5, one, torch.float32)] == [True] * 3
