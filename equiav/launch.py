"""Start a training command on the job's GPUs and nodes (``equiav launch``; docs/cluster.md).

    python -m equiav launch --gpus 8 --nodes 2 -- pretrain --settings ... --out ...

* one GPU or none, one node: the command runs in this process;
* several GPUs on one node: ``torchrun --standalone`` with one process per GPU;
* several nodes: one ``torchrun`` per node started by ``srun`` inside the job's SLURM allocation
  (one task per node), meeting at a c10d rendezvous on the allocation's first host, on a port
  and with an id derived from the job id, so that concurrent jobs never meet each other.

The command is built at run time from SLURM's environment (``SLURM_JOB_ID``,
``SLURM_JOB_NODELIST``, ``SLURM_JOB_NUM_NODES``), which only exists inside the job; the
launcher then replaces itself with it, so that SLURM's signals (preemption, walltime) reach
srun, torchrun and the training processes, which save a checkpoint and stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from equiav.options import verbosity_flags

__all__ = ["RENDEZVOUS_PORTS", "add_arguments", "launch_command", "rendezvous_port", "run", "slurm_hostnames"]

log = logging.getLogger(__name__)

# Rendezvous ports: job id modulo the range, above the common service ports and below the
# ephemeral range of Linux (32768+).
RENDEZVOUS_PORTS = range(20000, 30000)


def rendezvous_port(job_id: str) -> int:
    return RENDEZVOUS_PORTS.start + int(job_id) % len(RENDEZVOUS_PORTS)


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list ("gpu[01-03],big7") into host names with ``scontrol``."""
    if shutil.which("scontrol") is None:
        raise RuntimeError("scontrol is not on PATH: multi-node launches must run inside a SLURM job")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def launch_command(
    command: Sequence[str],
    *,
    gpus: int,
    nodes: int,
    env: Mapping[str, str],
    hostnames: Callable[[str], list[str]] = slurm_hostnames,
    python: str = sys.executable,
) -> list[str]:
    """The argv that runs ``equiav <command>`` on ``nodes`` nodes with ``gpus`` GPUs each."""
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

    missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST") if not env.get(k)]
    if missing:
        raise RuntimeError(
            f"a {nodes}-node run needs SLURM's allocation, but {', '.join(missing)} is not set: run it through the "
            "SLURM profile (--profile workflow/profiles/slurm), or start torchrun on each node yourself"
        )
    allocated = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 0)
    if allocated != nodes:
        raise RuntimeError(
            f"the run asks for {nodes} nodes but SLURM job {env['SLURM_JOB_ID']} has {allocated}; "
            "set the job's node count (the rule's `nodes` resource) to the run's `resources.nodes`"
        )
    job_id = env["SLURM_JOB_ID"]
    first_host = hostnames(env["SLURM_JOB_NODELIST"])[0]
    return [
        "srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
        # A step inside the job's step (Snakemake runs each job in one) shares its resources.
        "--overlap", "--kill-on-bad-exit=1",
        python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={per_node}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={first_host}:{rendezvous_port(job_id)}", f"--rdzv_id={job_id}",
        "-m", "equiav", *command,
    ]  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node (0: the CPU, one process)")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the SLURM allocation")
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
    try:
        argv_out = launch_command(command, gpus=args.gpus, nodes=args.nodes, env=os.environ)
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"equiav launch: {err}") from None
    if argv_out[:3] == [sys.executable, "-m", "equiav"]:
        from equiav.cli import main as equiav_main

        return equiav_main(command)
    log.info("launching %s", shlex.join(argv_out))
    sys.stderr.flush()
    os.execvp(argv_out[0], argv_out)
    return 0  # not reached
