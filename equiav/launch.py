"""Start a training command on the job's GPUs and nodes (``equiav launch``; docs/cluster.md).

    python -m equiav launch --gpus 8 --nodes 2 -- pretrain --settings ... --out ...

* one GPU or none, one node: the command runs in this process;
* several GPUs on one node: ``torchrun --standalone`` with one process per GPU;
* several nodes: ``srun`` starts ``equiav launch --rendezvous ADDRESS:PORT`` once on every node of
  the job's SLURM allocation, which starts that node's ``torchrun``. They meet at a c10d
  rendezvous on the first node's address as SLURM knows it (its ``NodeAddr``, which the other
  nodes reach by definition), on a port and with an id derived from the job id, so that
  concurrent jobs never meet each other.

The allocation is read with ``scontrol`` from the job id: SLURM's other variables describe the
job step the launcher runs in (Snakemake's job-step executor starts each job as a one-node
step), not the allocation. On each node the
launcher picks the network interface whose address routes to the rendezvous address and hands
it to gloo and NCCL (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``, unless set) and to torchrun
(``--local-addr``): a host name that resolves to a loopback address, as Debian's installer writes
it into /etc/hosts, would otherwise make each node wait for peers on its own loopback.

Each launcher replaces itself with what it starts, so that SLURM's signals (preemption,
walltime) reach srun, torchrun and the training processes, which save a checkpoint and stop.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import logging
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from equiav.options import verbosity_flags

__all__ = [
    "RENDEZVOUS_PORTS",
    "add_arguments",
    "allocation_environment",
    "interface_of",
    "launch_command",
    "node_command",
    "rendezvous_port",
    "run",
    "scontrol",
]

log = logging.getLogger(__name__)

# Rendezvous ports: job id modulo the range, above the common service ports and below the
# ephemeral range of Linux (32768+).
RENDEZVOUS_PORTS = range(20000, 30000)
# The variables that choose the interface of gloo's and NCCL's sockets.
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def rendezvous_port(job_id: str) -> int:
    return RENDEZVOUS_PORTS.start + int(job_id) % len(RENDEZVOUS_PORTS)


def scontrol(*args: str) -> str:
    """The output of ``scontrol ARGS`` (a RuntimeError saying why where it fails)."""
    if shutil.which("scontrol") is None:
        raise RuntimeError("scontrol is not on PATH: multi-node launches must run inside a SLURM job")
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`scontrol {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _field(record: str, name: str, what: str) -> str:
    """The value of ``name=`` in one line of ``scontrol show ... -o`` output."""
    match = re.search(rf"(?:^|\s){name}=(\S+)", record)
    if not match or match.group(1) == "(null)":
        raise RuntimeError(f"scontrol reports no {name} for {what}:\n{record.strip()}")
    return match.group(1)


def _allocation(job_id: str, query: Callable[..., str]) -> tuple[str, int]:
    """The job's node list and node count, from scontrol: inside a job step (Snakemake runs
    each job in one) SLURM's variables describe the step, which may span fewer nodes."""
    job = query("show", "job", "-o", job_id)
    return _field(job, "NodeList", f"job {job_id}"), int(_field(job, "NumNodes", f"job {job_id}"))


def launch_command(
    command: Sequence[str],
    *,
    gpus: int,
    nodes: int,
    env: Mapping[str, str],
    query: Callable[..., str] = scontrol,
    python: str = sys.executable,
) -> list[str]:
    """The argv that runs ``equiav <command>`` on ``nodes`` nodes with ``gpus`` GPUs each
    (``query``: runs scontrol, for the allocation of a multi-node job)."""
    if gpus < 0 or nodes < 1:
        raise ValueError(f"gpus must be >= 0 and nodes >= 1, got gpus={gpus}, nodes={nodes}")
    if not command:
        raise ValueError("no command to launch: give it after `--`, e.g. `-- pretrain --settings ...`")
    per_node = max(gpus, 1)
    if nodes == 1:
        if per_node == 1:
            return [python, "-m", "equiav", *command]
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={per_node}",
                "-m", "equiav", *command]  # fmt: skip

    if not env.get("SLURM_JOB_ID"):
        raise RuntimeError(
            f"a {nodes}-node run needs SLURM's allocation, but SLURM_JOB_ID is not set: run it through the "
            "SLURM profile (--profile workflow/profiles/slurm), or start torchrun on each node yourself"
        )
    job_id = env["SLURM_JOB_ID"]
    nodelist, allocated = _allocation(job_id, query)
    if allocated != nodes:
        raise RuntimeError(
            f"the run asks for {nodes} nodes but SLURM job {job_id} has {allocated}; "
            "set the job's node count (the rule's `nodes` resource) to the run's `resources.nodes`"
        )
    first = query("show", "hostnames", nodelist).split()[0]
    address = _field(query("show", "node", "-o", first), "NodeAddr", f"node {first}")
    return [
        "srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
        # A step inside the job's step (Snakemake runs each job in one) shares its resources.
        "--overlap", "--kill-on-bad-exit=1",
        python, "-m", "equiav", "launch", f"--gpus={gpus}", f"--nodes={nodes}",
        f"--rendezvous={address}:{rendezvous_port(job_id)}", f"--rendezvous-id={job_id}", "--", *command,
    ]  # fmt: skip


# What of SLURM's environment a step over the whole allocation keeps: the job's identity. The
# rest describes the step this launcher runs in, and srun would take it for the allocation.
_JOB_VARIABLES = {"SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CLUSTER_NAME", "SLURM_CONF"}


def allocation_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the variables of the enclosing job step (SLURM_*, SRUN_*, SBATCH_*),
    for the srun of a multi-node launch: with them it sees a one-node allocation."""
    return {k: v for k, v in env.items() if k in _JOB_VARIABLES or not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}


def interface_of(address: str) -> str:
    """The name of the network interface that holds the IPv4 ``address`` (Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), 0x8915, request)  # SIOCGIFADDR
            except OSError:  # an interface without an IPv4 address
                continue
            if socket.inet_ntoa(reply[20:24]) == address:
                return name
    raise RuntimeError(f"no network interface of this node holds the address {address}")


def _route_towards(host: str, port: int) -> tuple[str, str]:
    """The rendezvous host's IPv4 address and this node's address on the route to it."""
    try:
        address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as err:
        raise RuntimeError(f"the rendezvous host {host!r} does not resolve on {socket.gethostname()}: {err}") from err
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, port))  # UDP: chooses the route and source address, sends nothing
        return address, probe.getsockname()[0]


def node_command(
    command: Sequence[str],
    *,
    gpus: int,
    nodes: int,
    rendezvous: str,
    rendezvous_id: str,
    env: Mapping[str, str],
    route: Callable[[str, int], tuple[str, str]] = _route_towards,
    interface: Callable[[str], str] = interface_of,
    python: str = sys.executable,
) -> tuple[list[str], dict[str, str]]:
    """This node's torchrun of a multi-node run, and the variables to set for it."""
    host, _, port = rendezvous.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--rendezvous takes ADDRESS:PORT, got {rendezvous!r}")
    address, local = route(host, int(port))
    if ipaddress.ip_address(address).is_loopback:
        raise RuntimeError(
            f"the rendezvous host {host!r} is the loopback address {address} on {socket.gethostname()}, which "
            "the other nodes cannot reach; give SLURM the first node's routable address (NodeAddr in "
            "slurm.conf, or a host name that DNS resolves to it)"
        )
    name = interface(local)
    variables = {var: name for var in INTERFACE_VARIABLES if not env.get(var)}
    kept = [f"{var}={env[var]} as set" for var in INTERFACE_VARIABLES if var not in variables]
    log.info("node %s: torchrun meets at %s:%s from %s on %s (%s)", socket.gethostname(), address, port, local,
             name, ", ".join([*(f"{k}={v}" for k, v in variables.items()), *kept]))  # fmt: skip
    argv = [
        python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={max(gpus, 1)}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={address}:{port}", f"--rdzv_id={rendezvous_id}",
        # The node that holds the address hosts the rendezvous store; no guessing from host names.
        f"--rdzv_conf=is_host={int(local == address)}", f"--local_addr={local}",
        "-m", "equiav", *command,
    ]  # fmt: skip
    return argv, variables


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node (0: the CPU, one process)")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the SLURM allocation")
    p.add_argument(
        "--rendezvous",
        metavar="ADDRESS:PORT",
        help="start this node's torchrun of a multi-node run (what srun runs on each node)",
    )
    p.add_argument("--rendezvous-id", help="with --rendezvous: the run's rendezvous id (the job id)")
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the equiav command and its options, after `--`",
    )


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        # The launched command logs as this one does: `equiav -v launch ...` gives a verbose run.
        command = [*verbosity_flags(getattr(args, "verbosity", 0)), *command]
    variables: dict[str, str] = {}
    try:
        if args.rendezvous is not None:
            if not command or args.rendezvous_id is None:
                raise ValueError("--rendezvous needs --rendezvous-id and a command after `--`")
            argv_out, variables = node_command(
                command, gpus=args.gpus, nodes=args.nodes, rendezvous=args.rendezvous,
                rendezvous_id=args.rendezvous_id, env=os.environ,
            )  # fmt: skip
        else:
            argv_out = launch_command(command, gpus=args.gpus, nodes=args.nodes, env=os.environ)
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"equiav launch: {err}") from None
    if argv_out[:3] == [sys.executable, "-m", "equiav"]:
        from equiav.cli import main as equiav_main

        return equiav_main(command)
    log.info("launching %s", shlex.join(argv_out))
    sys.stderr.flush()
    env = allocation_environment(os.environ) if argv_out[0] == "srun" else {**os.environ, **variables}
    os.execvpe(argv_out[0], argv_out, env)
    return 0  # not reached
