"""equiav launch (equiav/launch.py): the command a training job runs, from SLURM's environment."""

from __future__ import annotations

import pytest

from equiav.launch import (
    RENDEZVOUS_PORTS,
    allocation_environment,
    interface_of,
    launch_command,
    node_command,
    rendezvous_port,
)

COMMAND = ["pretrain", "--settings", "{}", "--out", "model.pt"]


JOB = "JobId=123456 JobName=x UserId=root(0) ReqNodeList=(null) ExcNodeList=(null) NodeList=gpu[07-08] BatchHost=gpu07 NumNodes=2 NumCPUs=16"


def scontrol(*args: str) -> str:
    """scontrol's answers for job 123456 on nodes gpu07 and gpu08 (NodeAddr 10.1.0.7 and .8)."""
    if args[:2] == ("show", "hostnames"):
        assert args[2] == "gpu[07-08]"
        return "gpu07\ngpu08\n"
    if args[:3] == ("show", "node", "-o"):
        return f"NodeName={args[3]} Arch=x86_64 NodeAddr=10.1.0.{args[3][-1]} NodeHostName={args[3]} Version=22.05\n"
    assert args[:3] == ("show", "job", "-o"), args
    return JOB.replace("123456", args[3]) + "\n"


def test_one_gpu_or_none_runs_in_the_job_itself():
    for gpus in (0, 1):
        assert launch_command(COMMAND, gpus=gpus, nodes=1, env={}, python="py") == ["py", "-m", "equiav", *COMMAND]


def test_several_gpus_of_one_node_use_standalone_torchrun():
    argv = launch_command(COMMAND, gpus=4, nodes=1, env={"SLURM_JOB_ID": "7"}, python="py")
    assert argv == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "equiav", *COMMAND]


def test_several_nodes_start_one_node_launcher_per_node_meeting_at_the_first_nodes_address():
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2"}
    argv = launch_command(COMMAND, gpus=8, nodes=2, env=env, query=scontrol, python="py")
    srun, node = argv[: argv.index("py")], argv[argv.index("py") :]
    assert srun[0] == "srun" and {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--overlap"} <= set(srun)
    port = rendezvous_port("123456")
    assert port in RENDEZVOUS_PORTS and port == 20000 + 123456 % 10000
    assert node == [
        "py", "-m", "equiav", "launch", "--gpus=8", "--nodes=2", f"--rendezvous=10.1.0.7:{port}",
        "--rendezvous-id=123456", "--", *COMMAND,
    ]  # fmt: skip
    # Another job gets another rendezvous (port and id), so concurrent jobs never meet.
    other = launch_command(COMMAND, gpus=8, nodes=2, env={**env, "SLURM_JOB_ID": "123457"}, query=scontrol)
    assert f"--rendezvous=10.1.0.7:{port + 1}" in other and "--rendezvous-id=123457" in other


def test_the_allocation_comes_from_scontrol_not_the_job_steps_variables():
    # Inside Snakemake's one-node job step, SLURM's variables describe the step, not the job.
    step = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu07", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1"}
    argv = launch_command(COMMAND, gpus=1, nodes=2, env=step, query=scontrol, python="py")
    assert f"--rendezvous=10.1.0.7:{rendezvous_port('123456')}" in argv
    with pytest.raises(RuntimeError, match="asks for 3 nodes but SLURM job 123456 has 2"):
        launch_command(COMMAND, gpus=1, nodes=3, env={"SLURM_JOB_ID": "123456"}, query=scontrol)


def route(address: str, local: str, rendezvous_host: str = "10.1.0.7"):
    def towards(host: str, port: int) -> tuple[str, str]:
        assert (host, port) == (rendezvous_host, 20123)
        return address, local

    return towards


def test_each_node_starts_torchrun_on_the_interface_towards_the_rendezvous():
    interfaces = {"10.1.0.7": "ib0", "10.1.0.8": "ib0"}.__getitem__
    common = dict(gpus=4, nodes=2, rendezvous="10.1.0.7:20123", rendezvous_id="123", interface=interfaces, python="py")
    first, first_env = node_command(COMMAND, env={}, route=route("10.1.0.7", "10.1.0.7"), **common)
    second, second_env = node_command(COMMAND, env={}, route=route("10.1.0.7", "10.1.0.8"), **common)
    assert first == [
        "py", "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.1.0.7:20123", "--rdzv_id=123", "--rdzv_conf=is_host=1", "--local_addr=10.1.0.7",
        "-m", "equiav", *COMMAND,
    ]  # fmt: skip
    # Only the node holding the rendezvous address hosts its store.
    assert "--rdzv_conf=is_host=0" in second and "--local_addr=10.1.0.8" in second
    assert first_env == second_env == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib0"}
    # An interface the user chose is kept.
    _, chosen = node_command(COMMAND, env={"NCCL_SOCKET_IFNAME": "eth1"}, route=route("10.1.0.7", "10.1.0.8"), **common)
    assert chosen == {"GLOO_SOCKET_IFNAME": "ib0"}


def test_a_rendezvous_address_other_nodes_cannot_reach_is_refused():
    common = dict(gpus=1, nodes=2, rendezvous_id="1", env={}, interface=lambda a: "lo")
    # A NodeAddr that is a host name resolving to loopback on its own node, as /etc/hosts often has it.
    with pytest.raises(RuntimeError, match=r"'gpu07' is the loopback address 127\.0\.1\.1 .*NodeAddr in slurm\.conf"):
        node_command(COMMAND, rendezvous="gpu07:20123", route=route("127.0.1.1", "127.0.0.1", "gpu07"), **common)
    with pytest.raises(ValueError, match="ADDRESS:PORT"):
        node_command(COMMAND, rendezvous="gpu07", **common)


def test_the_interface_of_an_address_is_found_on_this_machine():
    assert interface_of("127.0.0.1") == "lo"
    with pytest.raises(RuntimeError, match="no network interface of this node holds the address 192.0.2.1"):
        interface_of("192.0.2.1")  # TEST-NET-1: never assigned


def test_multi_node_outside_slurm_or_with_the_wrong_allocation_is_refused():
    with pytest.raises(RuntimeError, match="SLURM_JOB_ID is not set"):
        launch_command(COMMAND, gpus=8, nodes=2, env={})
    with pytest.raises(RuntimeError, match="asks for 3 nodes but SLURM job 123456 has 2"):
        launch_command(COMMAND, gpus=8, nodes=3, env={"SLURM_JOB_ID": "123456"}, query=scontrol)
    with pytest.raises(ValueError, match="no command"):
        launch_command([], gpus=0, nodes=1, env={})


def test_the_multi_node_srun_sees_the_job_not_the_step_it_runs_in():
    step = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu07", "SLURM_STEP_ID": "0",
            "SRUN_CPUS_PER_TASK": "8", "SBATCH_GRES": "gpu:1", "SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/bin"}  # fmt: skip
    assert allocation_environment(step) == {"SLURM_JOB_ID": "7", "SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/bin"}
