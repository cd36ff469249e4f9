"""The step read on a GPU's terms, proven on CPU: gradients accumulate in fp32 wherever bf16 is on
(DeepSpeed's own buffers, bf16 forced on CPU ranks), `d2v check` warns about a ds_config that would
sum them in bf16; compiled regions leave DeepSpeed's hooks outside the graphs; the step makes no
device-to-host round trip; the benchmark's peak is an upper bound and its ratio counts model FLOPs."""
import functools
import json
import sys

import pytest
import torch

from d2v_scale.config import ConfigError
from d2v_scale.dsconfig import FP32_NAMES, bf16_accumulation_warning, resolve_ds_config, validate_ds_config
from d2v_scale.presets import get_preset
from helpers import ROOT, child_env, run_group

SHIPPED = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_ds_configs_accumulate_bf16_gradients_in_fp32(name):
    """Judged as on a bf16 GPU at 16 micro-steps: every shipped config with bf16 and ZeRO >= 1 sums in
    fp32 (DeepSpeed validates it); ZeRO-0 with bf16 cannot (DeepSpeed refuses the mix), and says so."""
    cfg = get_preset("vit_huge_patch14")                    # 32 per GPU, global 512: 16 micro-steps on one GPU
    cfg.run.ds_config = f"ds_configs/{name}"
    ds = resolve_ds_config(cfg, world=1, cuda=True)
    validate_ds_config(ds, name)
    warning = bf16_accumulation_warning(cfg, 1)
    if not ds["bf16"]["enabled"]:                            # torch_autocast: fp32 weights and gradients
        assert warning is None
    elif ds["zero_optimization"]["stage"] == 0:
        assert "ZeRO-0" in warning and "zero1.json" in warning
    else:
        assert str(ds["data_types"]["grad_accum_dtype"]) in FP32_NAMES and warning is None


def test_check_warns_about_a_ds_config_that_accumulates_in_bf16(tmp_path, image_shards, capsys):
    from d2v_scale.cli import check
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    del ds["data_types"]
    (tmp_path / "mine.json").write_text(json.dumps(ds))
    args = dict(preset="vit_base_patch16_debug", data=str(image_shards), ds_config=str(tmp_path / "mine.json"),
                out=str(tmp_path / "run"), world=1, **{"data.batch_size": 4, "data.global_batch": 16})
    check(**args)
    out = capsys.readouterr().out
    assert "warning:" in out and "4 micro-steps sums gradients in bf16" in out and "grad_accum_dtype" in out
    check(**{**args, "ds_config": "ds_configs/zero2.json"})                      # the shipped one: quiet
    assert "warning" not in capsys.readouterr().out
    ds["data_types"] = {"grad_accum_dtype": "fp32"}
    ds["zero_optimization"]["stage"] = 0
    (tmp_path / "zero0.json").write_text(json.dumps(ds))
    cfg = get_preset("vit_base_patch16_debug")
    cfg.run.ds_config = str(tmp_path / "zero0.json")
    with pytest.raises(ConfigError, match="needs ZeRO stage >= 1"):           # DeepSpeed would refuse it later
        resolve_ds_config(cfg, world=1, cuda=True)


@pytest.mark.timeout(600)
def test_bf16_engines_sum_micro_step_gradients_in_fp32():
    """The real engines with bf16 on (CPU ranks run bf16), one process: DeepSpeed accumulates in fp32,
    in the buffers each stage keeps (ZeRO-1: BF16_Optimizer's flat fp32 gradients of the whole model;
    ZeRO-2: the fp32 partition; ZeRO-3: the fp32 partition buffer), and the optimizer step applies."""
    names = ["zero1.json", "zero2.json", "zero3.json"]
    res = run_group([sys.executable, str(ROOT / "tests" / "probes" / "accum_probe.py"),
                     *[f"ds_configs/{n}" for n in names]], timeout=500, env=child_env(DS_ACCELERATOR="cpu"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["optimizer"] for r in rows] == ["BF16_Optimizer", "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"]
    for got in rows:
        assert got["model_dtype"] == "torch.bfloat16" and got["accum_dtype"] == "torch.float32"
        assert got["buffers"] == ["torch.float32"] and got["numel"] >= got["params"] and got["steps"] == 1


def _spied_blocks(model, teacher) -> list:
    """Forward pre- and post-hooks on every block, as DeepSpeed's ZeRO-3 registers them (gather, release),
    each recording whether it runs inside dynamo."""
    seen = []
    for blk in [*model.encoder.blocks, *teacher.encoder.blocks]:
        blk.register_forward_pre_hook(lambda mod, args: seen.append(torch.compiler.is_compiling()))
        blk.register_forward_hook(lambda mod, args, out: seen.append(torch.compiler.is_compiling()))
    return seen


def test_compiled_regions_leave_the_hooks_outside_the_graphs(monkeypatch):
    """--run.compile compiles each block's forward, not its __call__ (Module.compile traces the hooks:
    they record True there); under ZeRO-3 the decoder, whose children DeepSpeed hooks, stays eager, and
    a ds_config without the blocks as leaf modules is refused with the reason."""
    from d2v_scale.config import with_vocab
    from d2v_scale.d2v import Data2Vec
    from d2v_scale.data import synthetic_batch
    from d2v_scale.engine import compile_regions
    from d2v_scale.masking import step_masks
    from d2v_scale.teacher import ReplicatedTeacher
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # dynamo, no codegen
    cfg = with_vocab(get_preset("vit_base_patch16_debug"))
    cfg.data.batch_size = 2
    cfg.run.ds_config = "ds_configs/zero3.json"
    ds = resolve_ds_config(cfg, world=1, cuda=False)
    torch.manual_seed(0)
    model = Data2Vec(cfg.model, cfg.mask.mask_noise_std)
    teacher = ReplicatedTeacher(model.encoder, cfg.model)
    seen = _spied_blocks(model, teacher)
    compile_regions(model, teacher, ds)
    assert "forward" not in vars(model.decoder)                     # ZeRO-3: the decoder stays eager
    x = synthetic_batch(cfg)["source"]
    info = step_masks(cfg, 2 * cfg.mask.clone_batch, model.encoder.token_shape(x), 0, 0, 0)
    for _ in range(2):
        model(x, info, teacher)["loss"].backward()
    calls = 2 * 2 * 2 * len(model.encoder.blocks)                   # 2 steps x (student + teacher) x (pre + post)
    assert len(seen) == calls and not any(seen)                     # every hook ran, in eager
    leafless = json.loads(json.dumps(ds))
    del leafless["zero_optimization"]["leaf_module"]
    with pytest.raises(ConfigError, match="needs the blocks as DeepSpeed leaf modules"):
        compile_regions(model, teacher, leafless)
    cfg.run.ds_config = "ds_configs/zero2.json"
    compile_regions(model, teacher, resolve_ds_config(cfg, world=1, cuda=False))
    assert "forward" in vars(model.decoder)                         # below ZeRO-3 the decoder is a region too


def test_host_sync_check_sees_what_waits_on_a_gpu():
    """The detector itself: each kind of wait is caught on CPU, host tensors handed in are free to read,
    and what does not wait (device fills, non-blocking copies, gathers at known sizes) passes."""
    from d2v_scale.tools.host_sync import HostSyncCheck, HostSyncError
    host = torch.ones(3)
    waits = [lambda t: t.sum().item(), lambda t: bool(t.any()), lambda t: t.nonzero(), lambda t: t[t > 0],
             lambda t: t.tolist(), lambda t: t.new_tensor([1.0]), lambda t: host.to("cpu"),
             lambda t: torch.tensor([1.0], device="cpu"), lambda t: t.cpu(), lambda t: t.repeat_interleave(t.long())]
    for i, wait in enumerate(waits):
        with pytest.raises(HostSyncError), HostSyncCheck("cpu", host=[host]):
            wait(torch.rand(4) + 1)
    with HostSyncCheck("cpu", host=[host]):
        t = torch.rand(4)
        torch.full((1,), 3.0, device=t.device)
        host.to("cpu", non_blocking=True)
        host.tolist()
        torch.gather(t, 0, torch.tensor([0, 2]))
        t.repeat_interleave(2)


SYNC_CASES = ["vit_base_patch16_debug", "audio_base_debug", "audio_base_debug:padded", "text_base_debug:padded",
              "d2v1_vit_base_patch16_debug", "d2v1_audio_base_debug:padded", "d2v1_text_base_debug:padded"]


@pytest.mark.timeout(600)
def test_the_step_makes_no_host_wait():
    """Two micro-steps (one at the accumulation boundary) of the real step through the ZeRO-2 engine,
    one rank, under HostSyncCheck, for data2vec 2.0 (image, audio, audio padded, text padded) and
    data2vec 1 (image, audio padded, text padded): the student's forward, the loss, the teacher's
    targets, the step's own code and the metrics' accumulation read nothing back from the device and
    copy nothing to it blocking. Before: the sample count's new_tensor, the metrics' loss count; the
    text encoders' `bool(pad.any())`, padded audio's frame-length check and `nonzero`, the targets'
    padding check; data2vec 1's `x[masked]`, `y[masked]` and `int(masked.sum())`. Whether a batch pads
    is read from the loader's host tensors. DeepSpeed's own waits in its backward and optimizer step
    are listed apart."""
    res = run_group([sys.executable, str(ROOT / "tests" / "probes" / "sync_probe.py"), "ds_configs/zero2.json",
                     *SYNC_CASES], timeout=550, env=child_env(DS_ACCELERATOR="cpu"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["preset"] for r in rows] == SYNC_CASES
    for row in rows:
        assert row["step"] == [], row
        assert row["global_steps"] == 2


def test_padding_is_decided_on_the_host_as_the_model_finds_it():
    """`has_padding` on the loader's host tensors says what the encoders would find on the device:
    audio by the CNN's frame-length rule (a few padded samples that lose no frame pad nothing), text
    by its `<pad>` ids; with the answer passed down, no frame or token padding mask is asked for."""
    from d2v_scale.config import with_vocab
    from d2v_scale.models import build_encoder
    from d2v_scale.tools.host_sync import HostSyncCheck
    torch.manual_seed(0)
    for preset in ["audio_base_debug", "d2v1_audio_base_debug"]:
        cfg = get_preset(preset)
        enc = build_encoder(cfg.model)
        S = 16000
        source = torch.randn(2, S)
        for short in [0, 1, 2, 319, 320, 321, 8000]:             # the CNN's total stride is 320 samples
            pad = torch.zeros(2, S, dtype=torch.bool)
            pad[1, S - short:] = True
            found = enc.local_features(source, pad)[1]             # padded=None: read back from the device
            assert enc.has_padding(source, pad) == (found is not None), short
            with HostSyncCheck("cpu", host=[source, pad]):
                padded = enc.has_padding(source, pad)
                mine = enc.local_features(source, pad, padded)[1]
            assert (mine is None) == (found is None) and (found is None or torch.equal(mine, found)), short
    for preset in ["text_base_debug", "d2v1_text_base_debug"]:
        cfg = with_vocab(get_preset(preset))
        enc = build_encoder(cfg.model)
        ids = torch.randint(4, cfg.model.text.vocab_size, (2, 16))
        for tail in [0, 3]:
            ids[1, 16 - tail:] = cfg.model.text.pad_idx
            with HostSyncCheck("cpu", host=[ids]):
                padded = enc.has_padding(ids)
                pad = enc.local_features(ids, None, padded)[1]
            assert padded == (tail > 0) and (pad is None) == (tail == 0)
            assert pad is None or pad.sum() == tail


def test_the_peak_is_the_best_size_and_an_efficiency_above_one_is_never_a_number(monkeypatch):
    """The GEMM peak is the best rate of its sizes (each rate a lower bound of it); an efficiency
    above 1 prints as a peak under-measured (the 128% and 152% printed before)."""
    from d2v_scale.metrics import PEAK_SIZES, _gemm_rate, efficiency_text, measure_peak_flops
    assert len(PEAK_SIZES["cpu"]) >= 3 and max(PEAK_SIZES["cuda"]) > 8192
    assert efficiency_text(0.706) == "70.6%"
    for v in (1.28, 1.52):
        assert "under-measured" in efficiency_text(v) and f"{v:.1%}" not in efficiency_text(v)
    seen = []
    real = _gemm_rate

    def spy(n, *a):
        seen.append((n, real(n, *a)))
        return seen[-1][1]
    import d2v_scale.metrics as metrics
    monkeypatch.setattr(metrics, "_gemm_rate", spy)                 # records each size's real rate
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, seconds=0.3)
    assert [n for n, _ in seen] == list(PEAK_SIZES["cpu"]) and peak == max(r for _, r in seen)
