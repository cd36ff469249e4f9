"""The step read on a GPU's terms, proven on CPU: gradients accumulate in fp32 wherever bf16 is on
(DeepSpeed's own buffers, bf16 forced on CPU ranks), `d2v check` warns about a ds_config that would
sum them in bf16; compiled regions leave DeepSpeed's hooks outside the graphs; the step makes no
device-to-host round trip; the benchmark's peak is an upper bound and its ratio counts model FLOPs."""
import json
import sys

import pytest

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
