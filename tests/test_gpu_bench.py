"""launcher/gpu_bench.sh and its driver (d2v_scale/tools/gpu_bench.py) on CPU: the wheel folder's
recipe covers what the launcher needs, a failing or hanging configuration does not stop the others,
the table comes out with the goals first, and the script runs real configurations end to end in its
tiny mode (the debug presets, the same code paths as on a GPU)."""
import json
import subprocess
import sys

import pytest

from d2v_scale.tools.gpu_bench import Run, run_all
from helpers import ROOT, child_env, run_group


def test_make_gpu_wheels_fetches_every_dependency_the_launcher_imports():
    """Dry run (the real one needs PyPI, ~2 min): one `pip download` of binary wheels for the GPU
    machine's Python per package the launcher checks for, and DeepSpeed built without ops."""
    out = subprocess.run(["make", "-n", "gpu-wheels", "WHEELS=/tmp/w", "STAMP=/dev/null"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    script = (ROOT / "launcher" / "gpu_bench.sh").read_text()
    imported = script.split('-c "import ')[1].split('"')[0].replace(" ", "").split(",")
    wheel_of = {"pydantic": "pydantic", "boto3": "boto3", "deepspeed": "deepspeed"}
    for module in imported:
        name = wheel_of.get(module, module)
        assert f"{name}==" in out, f"make gpu-wheels does not fetch {name}"
    assert "--only-binary=:all: --python-version 3.12" in out and "DS_BUILD_OPS=0" in out
    assert ".whl/" in (ROOT / ".gitignore").read_text().split()


def test_a_failing_configuration_does_not_stop_the_others(tmp_path, capsys):
    py = sys.executable
    ok = tmp_path / "zero2_mb_timm.json"
    runs = [Run("zero3_sharded", [py, "-c", "import sys; print('engine failed'); sys.exit(3)"], 60),
            Run("zero2_gas4", [py, "-c", "import time; time.sleep(60)"], 21),
            Run("zero2_mb_timm", [py, "-c", f"import json; json.dump({{'step_s': 2.0, 'efficiency_ratio': 0.9, "
                                            f"'device_peak_gb': 1.5, 'pinned_host_gb': 0.25}}, open({str(ok)!r}, 'w'))"], 60),
            Run("zero3_replicated", [py, "-c", f"import json; json.dump({{'step_s': 2.5}}, "
                                               f"open({str(tmp_path / 'zero3_replicated.json')!r}, 'w'))"], 60)]
    rows = run_all(runs, 300, tmp_path)
    status = {c.name: c.status for c in runs}
    assert status["zero3_sharded"].startswith("failed (exit 3)") and "engine failed" in status["zero3_sharded"]
    assert status["zero2_gas4"].startswith("timed out") and status["zero2_mb_timm"] == "ok"
    table = {r[0]: r for r in rows}
    assert [r[0] for r in rows][0].startswith("P1")                          # the goals first
    assert table["P1 d2v2 / timm efficiency (model FLOPs)"][1:] == ("0.900", ">= 0.85", "PASS")
    assert table["P3 ZeRO-3 replicated teacher / ZeRO-2"][1:] == ("1.250", "<= 1.15", "FAIL")
    assert table["P2 ZeRO-3 host teacher / ZeRO-2, 1 micro-step"][1] == "not measured"
    assert table["memory zero2_mb_timm: device peak / pinned host GB"][1] == "1.5 / 0.2"
    assert "== GPU check ==" in capsys.readouterr().out
    assert json.loads((tmp_path / "table.json").read_text())[0][0].startswith("P1")


@pytest.mark.timeout(1500)
def test_gpu_bench_sh_runs_end_to_end_in_its_tiny_mode(tmp_path):
    """The script as a GPU machine runs it (dependencies present, so nothing to install), the debug
    presets on CPU: the ZeRO-2 step beside the timm peer (P1) and the micro-step under the host-sync
    check, each in its own process, then the table with the rows not asked for as not measured."""
    env = child_env(TINY="1", PYTHON=sys.executable, BUDGET_S="1200", DS_ACCELERATOR="cpu",
                    ONLY="zero2_mb_timm,sync_step")
    res = run_group([str(ROOT / "launcher" / "gpu_bench.sh"), str(tmp_path)], timeout=1400, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "== GPU check ==" in res.stdout
    table = {r[0]: r for r in json.loads((tmp_path / "table.json").read_text())}
    assert table["P1 d2v2 / timm efficiency (model FLOPs)"][1] != "not measured"
    assert table["one micro-step without host sync"][1] == "yes"
    assert table["P3 ZeRO-3 replicated teacher / ZeRO-2"][1] == "not measured"    # not asked for
    assert "memory zero2_mb_timm: device peak / pinned host GB" in table
    assert json.loads((tmp_path / "zero2_mb_timm.json").read_text())["ema_exposed"] is not None
