"""Several hosts for real on one machine: the deepspeed launcher's default path (pdsh over passwordless
ssh) through launcher/run_hostfile.sh, to two sshd listening on 127.0.0.2 and 127.0.0.3 (keys, config
and an authorized key in a temporary folder; ~/.ssh untouched). The second "host" runs in its own
mount namespace where one folder (`local/`) is its own, as a host's local disk is. Needs root,
Debian's openssh-server and pdsh (`make test` installs them as root); skipped otherwise.
Also: the rendezvous bound and the checkpoint's every-file check, without ssh."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import BIN, ROOT, child_env
from test_launchers import ARGS as LAUNCHER_ARGS, by_step, wait_for_steps

ARGS = [*LAUNCHER_ARGS, "--run.peak_tflops=1"]           # no GEMM peak measurement at start: MFU is not the point here

HOSTS = ("127.0.0.2", "127.0.0.3")


@pytest.fixture(scope="module")
def reference(zero3_reference):
    """Two ranks on one host (the deepspeed launcher, no ssh): the losses every multi-node run must match
    (the launch test_launchers.py compares with too)."""
    return by_step(zero3_reference)


def _stop(proc: subprocess.Popen, wait: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two ssh "hosts"; yields (folder, environment for run_hostfile.sh). Everything started is
    stopped by pid afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the ssh hosts need root (sshd on loopback addresses, a mount namespace)")
    if not shutil.which("pdsh") or not os.path.exists("/usr/sbin/sshd") or not shutil.which("unshare"):
        pytest.fail("needs Debian's openssh-server and pdsh: `make test` installs them as root")
    from d2v_scale.dist import free_port
    w = tmp_path_factory.mktemp("hosts")
    for d in ("bin", "local", "local_b", "runs"):
        (w / d).mkdir()
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(w / key), "-C", "d2v-test"],
                       check=True, timeout=60)
    shutil.copy(w / "id.pub", w / "authorized_keys")
    port = free_port()
    made_run_sshd = not os.path.isdir("/run/sshd")          # sshd's privilege-separation folder
    if made_run_sshd:
        os.makedirs("/run/sshd", mode=0o755)
    daemons = []
    try:
        for i, addr in enumerate(HOSTS):
            conf = w / f"sshd_{i}.config"
            conf.write_text(f"Port {port}\nListenAddress {addr}\nHostKey {w / 'host_key'}\n"
                            f"AuthorizedKeysFile {w / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                            "StrictModes no\nMaxStartups 50:30:100\n")
            sshd = f"exec /usr/sbin/sshd -D -f {conf} -E {w / f'sshd_{i}.log'}"
            if i == 1:   # its own mount namespace: local/ is this host's own disk
                sshd = f"mount --bind {w / 'local_b'} {w / 'local'} && {sshd}"
            daemons.append(subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", sshd]))
        (w / "ssh_config").write_text(
            f"Host {' '.join(HOSTS)}\n  User root\n  IdentityFile {w / 'id'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {w / 'known_hosts'}\n  StrictHostKeyChecking accept-new\n  BatchMode yes\n"
            "  LogLevel ERROR\n")
        ssh = w / "bin" / "ssh"          # the port comes from SSH_PORT (run_hostfile.sh -> deepspeed -> pdsh)
        ssh.write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {w / 'ssh_config'} \"$@\"\n")
        ssh.chmod(0o755)
        env = child_env(PATH=f"{w / 'bin'}:{os.environ['PATH']}", SSH_PORT=str(port))
        deadline = time.time() + 30
        for addr in HOSTS:
            while subprocess.run(["ssh", "-p", str(port), addr, "true"], env=env, capture_output=True,
                                 timeout=30).returncode != 0:
                assert time.time() < deadline, (w / "sshd_0.log").read_text() + (w / "sshd_1.log").read_text()
                time.sleep(0.3)
        (w / "hostfile").write_text("".join(f"{h} slots=1\n" for h in HOSTS))
        # DeepSpeed stops a pdsh job with `pkill -f "<python> -u -m deepspeed.launcher.launc"` on every
        # host: a path to the interpreter that no other deepspeed job here uses keeps that to this test
        python = BIN / f"python{sys.version_info.major}.{sys.version_info.minor}"
        env.update(HOSTFILE=str(w / "hostfile"), BIN=str(BIN), PYTHON=str(python), PRESET="vit_base_patch16_debug",
                   DS_CONFIG="ds_configs/zero3.json", GLOO_SOCKET_IFNAME="lo")
        yield w, env
    finally:
        for d in daemons:
            _stop(d)
        if made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)


def ranks_of(port: int) -> dict[int, "psutil.Process"]:
    """The trainer processes of the job on MASTER_PORT `port`, by rank (they run under sshd, not under
    the launcher that started the job)."""
    import psutil
    found = {}
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if (env.get("MASTER_PORT") == str(port) and "d2v_scale.cli" in p.cmdline()
                    and "deepspeed.launcher.launch" in p.parent().cmdline()):   # not its data-loader workers
                found[int(env["RANK"])] = p
        except (psutil.Error, AttributeError, KeyError, ValueError):
            pass
    return found


def launch(env, data, out, log, *extra):
    from d2v_scale.dist import free_port
    port = free_port()
    proc = subprocess.Popen([str(ROOT / "launcher/run_hostfile.sh"), *ARGS, *extra], cwd=ROOT,
                            env=dict(env, DATA=str(data), OUT=str(out), MASTER_PORT=str(port)),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def end_all(proc, port) -> None:
    """Whatever is left of a job (a failed assertion): the launcher's group, then its ranks by pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for p in ranks_of(port).values():
        p.kill()


def wait_gone(procs, timeout) -> float:
    import psutil
    t0 = time.time()
    _, alive = psutil.wait_procs(list(procs), timeout=timeout)
    assert not alive, f"still running {timeout:.0f} s later: {alive}"
    return time.time() - t0


@pytest.mark.timeout(900)
def test_pdsh_two_hosts_stop_through_the_launcher_checkpoints_and_resumes(hosts, image_shards, reference, tmp_path):
    """Train on two ssh hosts; SIGTERM to the launcher the user started -> both hosts' ranks write one
    checkpoint (their consoles, pdsh's ssh channels, are gone by then) -> the same command resumes with
    the losses of two ranks on one host; kill -9 of the remote rank -> the whole job ends."""
    from d2v_scale.checkpoint import validate
    w, env = hosts
    out = w / "runs" / tmp_path.name
    proc, port = launch(env, image_shards, out, tmp_path / "a.log")
    try:
        wait_for_steps(out, 8)
        ranks = ranks_of(port)
        assert sorted(ranks) == [0, 1]
        for r, p in ranks.items():            # each rank came in through its own host's sshd
            e = p.environ()
            assert e["SSH_CONNECTION"].split()[2] == HOSTS[r] and e["GLOO_SOCKET_IFNAME"] == "lo"
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)      # run_hostfile.sh exec'd the deepspeed launcher
        proc.wait(60)
        t_launcher = time.time() - t0
        t_ranks = wait_gone(ranks.values(), 120) + t_launcher
    finally:
        end_all(proc, port)
    log = (tmp_path / "a.log").read_text()
    rank_logs = "".join(f.read_text() for f in sorted((out / "logs").glob("rank*.log")))
    assert "stopped by a signal at step" in rank_logs, log[-3000:] + rank_logs[-3000:]
    stopped = int(rank_logs.split("stopped by a signal at step ")[1].split(";")[0])
    ckpt = out / "checkpoints" / f"step_{stopped:08d}"
    assert (out / "checkpoints" / "latest").read_text() == ckpt.name and validate(ckpt) is None
    assert json.loads((ckpt / "meta.json").read_text())["world"] == 2
    assert "GLOO_SOCKET_IFNAME=lo" in (out / "deepspeed_env").read_text().splitlines()
    print(f"\nSIGTERM -> launcher gone {t_launcher:.1f} s, both ranks checkpointed (step {stopped}) and "
          f"gone {t_ranks:.1f} s")

    # the same command again: resumes; kill -9 of the rank on the second host ends the whole job
    proc, port = launch(env, image_shards, out, tmp_path / "b.log")
    try:
        wait_for_steps(out, stopped + 6)
        victim = ranks_of(port)[1]
        victim.kill()
        t0 = time.time()
        proc.wait(120)
        t_kill = time.time() - t0
        wait_gone(ranks_of(port).values(), 60)
    finally:
        end_all(proc, port)
    log = (tmp_path / "b.log").read_text()
    assert proc.returncode != 0 and f"resumed from {ckpt}" in log, log[-3000:]
    assert "exits with return code = -9" in log and "lost contact with another rank" in log, log[-3000:]
    got = by_step(out)
    assert len(got) >= stopped + 6 and got == {s: reference[s] for s in got}      # bit for bit
    print(f"kill -9 of the remote rank -> job ended {t_kill:.1f} s later")


@pytest.mark.timeout(300)
def test_a_run_directory_one_host_does_not_see_is_refused(hosts, image_shards, tmp_path):
    """OUT on the first host's local disk (the second host has its own local/): every rank stops at
    start with one line naming the rank that does not see it; no checkpoint is written anywhere."""
    w, env = hosts
    out = w / "local" / tmp_path.name
    proc, port = launch(dict(env, D2V_VISIBLE_WITHIN_S="2"), image_shards, out, tmp_path / "log")
    try:
        proc.wait(240)
    finally:
        end_all(proc, port)
    log = (tmp_path / "log").read_text()
    assert proc.returncode != 0
    assert f"the run directory {out} is not shared: rank 1 on" in log and "put --out (OUT) on storage" in log, log[-3000:]
    assert not (out / "checkpoints").exists() and not (w / "local_b" / tmp_path.name / "checkpoints").exists()


def test_run_hostfile_wants_an_explicit_shared_out(tmp_path):
    (tmp_path / "hostfile").write_text("a slots=1\nb slots=1\n")
    res = subprocess.run([str(ROOT / "launcher/run_hostfile.sh")], env=child_env(HOSTFILE=str(tmp_path / "hostfile"),
                         DATA=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "set OUT to the run directory, on storage every host mounts" in res.stderr


@pytest.mark.timeout(120)
def test_a_rendezvous_that_never_completes_ends_with_the_address_and_the_fix(tmp_path):
    """Rank 0 of 2 alone (its peer on another host cannot reach it): within D2V_RENDEZVOUS_TIMEOUT_S it
    exits with one line naming the address it offered and GLOO_SOCKET_IFNAME."""
    from d2v_scale.dist import free_port
    env = child_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()), D2V_RENDEZVOUS_TIMEOUT_S="5")
    env.pop("GLOO_SOCKET_IFNAME", None)
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", "from d2v_scale import dist; dist.init()"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=100)
    assert res.returncode == 1 and time.time() - t0 < 60
    line = [x for x in res.stderr.splitlines() if x.startswith("d2v: error:")]
    assert len(line) == 1 and "rank 0 of 2" in line[0] and "did not form within 5 s" in line[0]
    assert "GLOO_SOCKET_IFNAME unset" in line[0] and "set GLOO_SOCKET_IFNAME to the interface" in line[0]
    assert "MASTER_ADDR=127.0.0.1" in line[0]


_UNSEEN = """
import sys, torch
from pathlib import Path
from d2v_scale.shared_dir import unseen_file
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
for name, folder in (("OWN", f"host{rank}"), ("SAME", "shared")):     # each rank its own disk / one disk
    tmp = Path(sys.argv[1]) / folder / "step_00000004.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / f"data_rank{rank}.json").write_text("{}")
    torch.distributed.barrier()
    print(name, unseen_file(tmp, rank, within_s=1), flush=True)
"""


@pytest.mark.timeout(120)
def test_a_checkpoint_is_final_only_when_rank_0_sees_every_ranks_files(tmp_path):
    """Two gloo ranks whose checkpoint folders are not the same folder: every rank hears which file rank 0
    misses (checkpoint.save raises then, leaving the .tmp); in one folder, nothing is missing."""
    from d2v_scale.dist import free_port
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _UNSEEN, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=child_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (0, 1)]
    outs = [p.communicate(timeout=100)[0] for p in procs]
    said = [dict(line.split(" ", 1) for line in o.splitlines() if line.startswith(("OWN ", "SAME "))) for o in outs]
    assert said[0] == said[1], outs
    assert said[0]["SAME"] == "None", outs
    own = said[0]["OWN"]
    assert "rank 0 on" in own and "data_rank1.json as rank 1" in own and "here: missing" in own, own


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory):
    """A real two-node Slurm cluster on this machine (NODES=2 launcher/slurm/local_cluster.sh: two slurmd,
    d2v-n1 on 127.0.0.2 and d2v-n2 on 127.0.0.3); stopped by pid afterwards."""
    if not shutil.which("slurmctld") or os.geteuid() != 0:
        pytest.skip("the Slurm cluster needs Debian's slurm-wlm and munge and root")
    state = tmp_path_factory.mktemp("slurm2")
    script = ROOT / "launcher" / "slurm" / "local_cluster.sh"
    subprocess.run([str(script), "start", str(state)], check=True, capture_output=True, timeout=120,
                   env=dict(os.environ, NODES="2"))
    try:
        yield child_env(SLURM_CONF=str(state / "slurm.conf"))
    finally:
        subprocess.run([str(script), "stop", str(state)], capture_output=True, timeout=120)


@pytest.mark.timeout(900)
def test_sbatch_on_two_nodes_scancel_checkpoints_both_and_resubmit_resumes(slurm2, image_shards, reference, tmp_path):
    """pretrain.sbatch's multi-node form (one task per node, srun across two slurmd): world 2 across the
    nodes, scancel -> both nodes' ranks write one checkpoint -> resubmitted, the losses of one host."""
    from test_launchers import job_state, wait_state
    out = tmp_path / "run"

    def submit():
        env = dict(slurm2, DATA=str(image_shards), PRESET="vit_base_patch16_debug", DS_CONFIG="ds_configs/zero3.json",
                   OUT=str(out), BIN=str(BIN))
        res = subprocess.run(["sbatch", "--parsable", "-N", "2", "--ntasks-per-node=1", "--cpus-per-task=1", "-o",
                              str(out) + ".log", str(ROOT / "launcher/slurm/pretrain.sbatch"), *ARGS],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().split(";")[0]

    job = submit()
    wait_for_steps(out, 8)
    info = job_state(slurm2, job)
    assert info["NumNodes"] == "2" and info["NodeList"] == "d2v-n[1-2]", info
    subprocess.run(["scancel", job], env=slurm2, check=True, timeout=30)         # SIGTERM to both nodes' tasks
    wait_state(slurm2, job, {"CANCELLED", "COMPLETED", "FAILED"})
    log = (tmp_path / "run.log").read_text()
    assert "2 tasks on d2v-n[1-2], master 127.0.0.2:" in log and "world 2 x micro" in log, log[-3000:]
    stopped = int(log.split("stopped by a signal at step ")[1].split(";")[0])
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    job2 = submit()
    wait_state(slurm2, job2, {"COMPLETED"}, timeout=600)
    assert by_step(out) == reference


def test_ctrl_c_and_the_launchers_relayed_sigterm_are_one_stop(tmp_path):
    """Ctrl-C reaches a rank from the terminal (SIGINT) and from its launcher (SIGTERM) a moment later:
    one stop (checkpoint and exit 143), not "a second signal" that exits without a checkpoint; after the
    loop Ctrl-C is KeyboardInterrupt again."""
    from d2v_scale.preempt import TERMINATE, StopSignals, stopped
    before = signal.getsignal(signal.SIGINT)
    signals = StopSignals(0, timeout_s=60)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.flags[TERMINATE] == 1.0
        assert stopped(signals.flags, 7, "step_00000007", is_main=False).code == 143
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is before
