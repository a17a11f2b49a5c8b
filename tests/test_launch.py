"""equiav launch (equiav/launch.py): the command a training job runs, from SLURM's environment."""

from __future__ import annotations

import pytest

from equiav.launch import RENDEZVOUS_PORTS, launch_command, rendezvous_port

COMMAND = ["pretrain", "--settings", "{}", "--out", "model.pt"]


def hosts(nodelist: str) -> list[str]:
    assert nodelist == "gpu[07-08]"
    return ["gpu07", "gpu08"]


def test_one_gpu_or_none_runs_in_the_job_itself():
    for gpus in (0, 1):
        assert launch_command(COMMAND, gpus=gpus, nodes=1, env={}, python="py") == ["py", "-m", "equiav", *COMMAND]


def test_several_gpus_of_one_node_use_standalone_torchrun():
    argv = launch_command(COMMAND, gpus=4, nodes=1, env={"SLURM_JOB_ID": "7"}, python="py")
    assert argv == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "equiav", *COMMAND]


def test_several_nodes_start_one_torchrun_per_node_meeting_on_the_first_host():
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2"}
    argv = launch_command(COMMAND, gpus=8, nodes=2, env=env, hostnames=hosts, python="py")
    srun, torchrun = argv[: argv.index("py")], argv[argv.index("py") :]
    assert srun[0] == "srun" and {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--overlap"} <= set(srun)
    port = rendezvous_port("123456")
    assert port in RENDEZVOUS_PORTS and port == 20000 + 123456 % 10000
    assert torchrun == [
        "py", "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=gpu07:{port}", "--rdzv_id=123456", "-m", "equiav", *COMMAND,
    ]  # fmt: skip
    # Another job gets another rendezvous (port and id), so concurrent jobs never meet.
    other = launch_command(COMMAND, gpus=8, nodes=2, env={**env, "SLURM_JOB_ID": "123457"}, hostnames=hosts)
    assert f"--rdzv_endpoint=gpu07:{port + 1}" in other and "--rdzv_id=123457" in other


def test_multi_node_outside_slurm_or_with_the_wrong_allocation_is_refused():
    with pytest.raises(RuntimeError, match="SLURM_JOB_ID, SLURM_JOB_NODELIST is not set"):
        launch_command(COMMAND, gpus=8, nodes=2, env={})
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "1"}
    with pytest.raises(RuntimeError, match="asks for 2 nodes but SLURM job 9 has 1"):
        launch_command(COMMAND, gpus=8, nodes=2, env=env, hostnames=hosts)
    with pytest.raises(ValueError, match="no command"):
        launch_command([], gpus=0, nodes=1, env={})
