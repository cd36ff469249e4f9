"""The ranks' first meeting, bounded: a process group that does not form ends every rank with one line
naming the address this rank offered its peers and the variable that picks another.

gloo offers its peers the address the host name resolves to, unless GLOO_SOCKET_IFNAME names an
interface; on many hosts the name resolves to a loopback address (127.0.1.1 on stock Debian), which
no other host can reach: the rank that tries fails ("connectFullMesh ... Connection refused") and the
one it waits for hangs until the process-group timeout. NCCL picks an interface by itself
(NCCL_SOCKET_IFNAME and NCCL_IB_HCA choose). Rendezvous = init_process_group plus one barrier (NCCL
connects on its first collective), within D2V_RENDEZVOUS_TIMEOUT_S (300 s by default).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading

from .errors import D2VError, one_line

DEFAULT_TIMEOUT_S = 300.0


class RendezvousError(D2VError, RuntimeError):
    """The ranks could not form a process group; names this rank's address and the variable to set."""


def _interface_address(name: str) -> str:
    try:
        import psutil
        for a in psutil.net_if_addrs().get(name, []):
            if a.family == socket.AF_INET:
                return a.address
    except ImportError:
        pass
    return "no IPv4 address"


def offered_address(nccl: bool) -> tuple[str, str]:
    """(address, where it comes from) of what this rank offers its peers."""
    var = "NCCL_SOCKET_IFNAME" if nccl else "GLOO_SOCKET_IFNAME"
    if os.environ.get(var):
        first = os.environ[var].split(",")[0].lstrip("^=")
        return _interface_address(first), f"{var}={os.environ[var]}"
    if nccl:
        return "chosen by NCCL", "NCCL_SOCKET_IFNAME unset"
    host = socket.gethostname()
    try:
        addr = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)[0][4][0]
    except OSError:
        addr = "unresolvable"
    return addr, f"the host name {host} resolves to it; GLOO_SOCKET_IFNAME unset"


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def explain(rank: int, what: str, nccl: bool) -> str:
    env = os.environ
    addr, source = offered_address(nccl)
    var = "NCCL_SOCKET_IFNAME" if nccl else "GLOO_SOCKET_IFNAME"
    ib = "; and NCCL_IB_HCA on InfiniBand" if nccl else ""
    fix = (f"set {var} to the interface the hosts reach each other on (e.g. eth0, ib0{ib}) on every host "
           "(launcher/run_hostfile.sh forwards it)")
    hosts_apart = env.get("LOCAL_SIZE", "") != env.get("WORLD_SIZE") or int(env.get("SLURM_NNODES", "1")) > 1
    if _loopback(addr) and hosts_apart:
        fix = f"{addr} is a loopback address other hosts cannot reach: " + fix
    return (f"rank {rank} of {env.get('WORLD_SIZE', '?')} on {socket.gethostname()}: {what}; it offered its peers "
            f"{addr} ({source}) and met at MASTER_ADDR={env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}. "
            f"{fix}; check that every host reaches MASTER_ADDR:MASTER_PORT and the others' ports (firewall), that "
            f"every rank started, and raise D2V_RENDEZVOUS_TIMEOUT_S when start-up is slow")


def meet(init, rank: int, nccl: bool) -> None:
    """init() (init_process_group) and a first barrier within the timeout; one line and exit otherwise."""
    import torch
    timeout = float(os.environ.get("D2V_RENDEZVOUS_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    done = threading.Event()

    def expire():
        if not done.is_set():
            print(f"d2v: error: {explain(rank, f'the process group did not form within {timeout:.0f} s', nccl)}",
                  file=sys.stderr, flush=True)
            os._exit(1)                     # the C++ wait it is stuck in cannot be interrupted

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        init()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
    except RuntimeError as e:
        raise RendezvousError(explain(rank, f"the process group failed ({one_line(e)[:240]})", nccl)) from None
    finally:
        done.set()
        timer.cancel()
