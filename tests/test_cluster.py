"""The workflow on a real SLURM cluster, through workflow/profiles/slurm.

tests/cluster/slurm_up.sh starts a SLURM on this machine (as root; it installs the Debian
packages it lacks): a CPU node and two GPU nodes with fake GPUs. The small demo DAG of
workflow_runner runs through the profile, pre-training on a fake GPU (so on the CPU), together
with a longer pre-training run, `long`, which is cancelled with scancel after its first
checkpoint; then the workflow runs again.
Checked: every rule job ran as an sbatch job that sacct reports COMPLETED, the results equal the
local run's (conftest.demo_run) bit for bit, and `long` resumed from its checkpoint and learnt
what an uninterrupted run learns.

Then `wide` pre-trains on both nodes of the `gpu` partition (each a slurmd in a network namespace
of its own), is signalled, cancelled and resumed, and must learn what one node with two processes
learns, leaving no process behind after SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from workflow_runner import REPO, small_demo_config, snakemake, snakemake_command

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CLUSTER = REPO / "tests" / "cluster"
FINETUNE_RUNS = ("demo_audio", "demo_visual", "demo_audiovisual")
GPU_RULES = {"pretrain", "finetune", "retrieval"}  # the profile sends them to the `gpu` partition
RULES = {"demo_data", "manifest", "download", "features", "availability", "norm_stats"} | GPU_RULES
LOCAL_RULES = {"check_splits"}  # run where Snakemake runs (localrule), never as SLURM jobs
RUN_TIMEOUT_S = 900


def _started(stdout: str | bytes | None) -> list[str]:
    """The daemons slurm_up.sh says it started (a partial output included)."""
    text = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout or ""
    return re.findall(r"^slurm_up: started (\S+)", text, re.M)


def _stop(daemons: list[str]) -> subprocess.CompletedProcess | None:
    if not daemons:
        return None
    return subprocess.run(
        ["bash", str(CLUSTER / "slurm_down.sh"), *daemons], capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node SLURM; stops, at the end, only the daemons started here (also when
    the start-up fails half-way)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: tests/cluster/slurm_up.sh installs Debian packages and starts SLURM's daemons")
    up = ["bash", str(CLUSTER / "slurm_up.sh")]
    try:
        proc = subprocess.run(up, capture_output=True, text=True, timeout=1200, check=False)
    except subprocess.TimeoutExpired as timeout:
        _stop(_started(timeout.stdout))
        pytest.fail(f"tests/cluster/slurm_up.sh did not finish in 20 minutes:\n{timeout.stdout}\n{timeout.stderr}")
    started = _started(proc.stdout)
    if proc.returncode != 0:
        _stop(started)
        if proc.returncode == 3:
            pytest.skip(f"SLURM's Debian packages cannot be installed here: {proc.stderr.strip()}")
        pytest.fail(f"tests/cluster/slurm_up.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    yield
    down = _stop(started)
    assert down is None or down.returncode == 0, (
        f"slurm_down.sh {' '.join(started)} failed:\n{down.stdout}\n{down.stderr}"
    )


@dataclass
class SlurmRun:
    work: Path
    output: str  # Snakemake's own output, both runs
    jobs: list[dict[str, str]]  # sacct, one row per job or array task of both runs
    cancelled_job: str  # the job of the `long` pre-training run, cancelled with scancel
    checkpoints_at_cancel: list[str]
    reference: Path  # `long` pre-trained locally without interruption
    local: Path  # conftest.demo_run: the same DAG run locally


def _sacct(run_ids: list[str], since: str) -> list[dict[str, str]]:
    fields = ["JobID", "Comment", "Partition", "Account", "AllocTRES", "State", "ExitCode"]
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "--name", ",".join(run_ids), "-S", since, "-o", ",".join(fields)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines()]


def _state(job: str) -> str:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def _rule_of(comment: str) -> str:
    """The rule named in the plugin's job comment: rule_<rule>[_wildcards_<values>]."""
    name = comment.removeprefix("rule_").split("_wildcards_")[0]
    assert comment.startswith("rule_") and name in RULES, f"unexpected job comment {comment!r}"
    return name


def _wait_until(condition, what: str, timeout: float = RUN_TIMEOUT_S, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f} s waiting for {what}"
        time.sleep(every)
    return result


def _cancel_long_pretraining(first: subprocess.Popen, checkpoints: Path, log: Path) -> tuple[str, list[str]]:
    """Once `long` has a checkpoint on disk, scancel its job; when every other job is done,
    stop the run as a user would with Ctrl-C: plugin 2.8.0 never notices a cancelled job (sacct
    says "CANCELLED by <uid>", which it takes for a running job), so the run would wait forever."""

    def running(what: str) -> None:
        text = log.read_text()
        failed = first.poll() is not None or "Error in rule" in text
        assert not failed, f"the first run failed before {what}:\n{text[-5000:]}"

    def checkpoints_on_disk():
        running("`long` wrote a checkpoint")
        return sorted(p.name for p in checkpoints.glob("checkpoint-*.pt"))  # temporary files start with "."

    seen = _wait_until(checkpoints_on_disk, f"a checkpoint in {checkpoints}")
    queue = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True, check=True).stdout
    ids = [line.split("|")[0] for line in queue.splitlines() if line.endswith("|rule_pretrain_wildcards_long")]
    assert len(ids) == 1, f"expected the job of `long` in the queue, squeue says:\n{queue}"
    subprocess.run(["scancel", ids[0]], check=True)
    _wait_until(lambda: _state(ids[0]).startswith("CANCELLED"), f"sacct to report job {ids[0]} cancelled", 60, 0.5)

    def all_but_long_done() -> bool:
        running("its other jobs finished")
        progress = re.findall(r"(\d+) of (\d+) steps", log.read_text())
        return bool(progress) and int(progress[-1][0]) >= int(progress[-1][1]) - 1

    _wait_until(all_but_long_done, "the first run's other jobs", every=0.5)
    first.send_signal(signal.SIGINT)
    first.wait(120)
    return ids[0], seen


def _pretrain_locally(settings: dict, demo: Path, out: Path, *, threads: int = 2, processes: int = 1) -> None:
    """Pre-training with ``settings`` on the data of the run in ``demo``, here, with ``threads``
    per process (those of a 2-CPU job by default) and ``processes`` (torchrun, one node)."""
    variables = {var: str(threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    proc = subprocess.run(
        [sys.executable, "-m", "equiav", "launch", "--gpus", str(processes), "--",
         "pretrain", "--settings", json.dumps(settings),
         "--usable", str(demo / "results" / "demo" / "usable.csv"),
         "--norm-stats", str(demo / "results" / "demo" / "norm_stats.json"),
         "--out", str(out / "model.pt"), "--work-dir", str(out / "work")],
        env={**os.environ, **variables}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"local pre-training failed:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory, request) -> SlurmRun:
    """The small demo DAG through the SLURM profile, with one more pre-training run, `long`,
    cancelled mid-way; then the workflow again. Meanwhile, on the same machine, the local run
    (demo_run) and `long` pre-trained locally without interruption."""
    work = tmp_path_factory.mktemp("slurm")
    small = yaml.safe_load(small_demo_config(work).read_text())["pretrain"]["demo"]["settings"]
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())["pretrain"]["demo"]["settings"]
    # `long`: the demo's settings, 36 steps with a checkpoint every 4, so that there is time to
    # cancel it after its first checkpoint. Both runs on one GPU: a fake one, so on the CPU.
    long_settings = {**shipped, **small, "epochs": 12, "checkpoint_every": 4}
    config = small_demo_config(
        work,
        pretrain={
            "demo": {"settings": small, "resources": {"gpus": 1}},
            "long": {"dataset": "demo", "settings": long_settings, "resources": {"gpus": 1}},
        },
    )
    results = work / "results"
    targets = [
        results / "demo" / "availability.csv",
        *(results / "finetune" / run / "metrics.json" for run in FINETUNE_RUNS),
        results / "retrieval" / "demo" / "metrics.json",
        results / "pretrain" / "long" / "model.pt",
    ]
    args = [
        "--profile", str(REPO / "workflow" / "profiles" / "slurm"),
        "--configfile", str(config),
        # The local run has --cores 2: the same threads per job give the same numbers.
        "--max-threads", "2",
        # The demo's 3 shards are within the profile's `downloads` bound: arrays work (docs/cluster.md).
        "--slurm-array-jobs", "download",
        "--slurm-logdir", str(work / "slurm-logs"),
        "--slurm-keep-successful-logs",
        # Check jobs from a second after each completion on (the plugin's default waits 40 s).
        "--slurm-init-seconds-before-status-checks", "1",
        *map(str, targets),
    ]  # fmt: skip
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 60))

    # The first run in the background, with SIGINT at its default (a test run in the
    # background may inherit it ignored).
    cmd, env = snakemake_command(*args)
    first_log = work / "first-run.log"
    with first_log.open("w") as out:
        first = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # no other thread runs yet
        )  # fmt: skip
    cancel: dict = {}

    def cancel_long() -> None:
        try:
            checkpoints = work / "data" / "pretrain" / "long" / "checkpoints"
            cancel["result"] = _cancel_long_pretraining(first, checkpoints, first_log)
        except BaseException as e:
            cancel["error"] = e

    watcher = threading.Thread(target=cancel_long, daemon=True)
    watcher.start()
    try:
        demo = request.getfixturevalue("demo_run")
        _pretrain_locally(long_settings, demo, work / "reference")
        watcher.join(RUN_TIMEOUT_S)
    finally:
        if first.poll() is None:  # something failed: the run and its jobs must not outlive the test
            first.kill()
            first.wait()
            for run_id in re.findall(r"SLURM run ID: (\S+)", first_log.read_text()):
                subprocess.run(["scancel", f"--name={run_id}"], check=False)  # the plugin names jobs by run
    if "error" in cancel:
        raise cancel["error"]
    assert "result" in cancel, (
        f"the first run did not get to cancelling `long` and stopping in {RUN_TIMEOUT_S} s:\n{first_log.read_text()[-3000:]}"
    )
    cancelled, seen = cancel["result"]

    # The workflow again: it submits `long` again, which resumes.
    second = snakemake(*args, timeout=RUN_TIMEOUT_S)
    output = first_log.read_text() + second.stdout + second.stderr
    run_ids = re.findall(r"SLURM run ID: (\S+)", output)
    assert len(run_ids) == 2, f"expected two SLURM run IDs in Snakemake's output:\n{output[-3000:]}"
    return SlurmRun(work, output, _sacct(run_ids, since), cancelled, seen, work / "reference", demo)


def test_every_rule_job_ran_as_a_completed_sbatch_job(slurm_run):
    finished = Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", slurm_run.output))
    shards = len(list((slurm_run.work / "data" / "demo" / "shards").glob("*.csv")))
    assert finished == {
        "demo_data": 1, "manifest": 1, "download": shards, "features": shards, "availability": 1,
        "norm_stats": 1, "pretrain": 2, "finetune": len(FINETUNE_RUNS), "retrieval": 1,
        "check_splits": 2 + len(FINETUNE_RUNS) + 1,  # one per training and retrieval run
    }  # fmt: skip

    completed = [job for job in slurm_run.jobs if job["State"] == "COMPLETED"]
    others = [job for job in slurm_run.jobs if job["State"] != "COMPLETED"]
    sbatch_jobs = Counter({rule: n for rule, n in finished.items() if rule not in LOCAL_RULES})
    assert Counter(_rule_of(job["Comment"]) for job in completed) == sbatch_jobs, slurm_run.jobs
    # The one job that did not complete is the one cancelled ("CANCELLED by <uid>").
    not_completed = [(job["JobID"], job["State"].split()[0]) for job in others]
    assert not_completed == [(slurm_run.cancelled_job, "CANCELLED")], others

    downloads = [job["JobID"] for job in completed if _rule_of(job["Comment"]) == "download"]
    assert all(re.fullmatch(r"\d+_\d+", jobid) for jobid in downloads), f"download shards not an array: {downloads}"
    assert len({jobid.split("_")[0] for jobid in downloads}) == 1, downloads
    for job in completed:
        rule = _rule_of(job["Comment"])
        assert job["Account"] == "equiav", job
        assert job["Partition"] == ("gpu" if rule in GPU_RULES else "main"), job
        assert ("gres/gpu=1" in job["AllocTRES"].split(",")) == (rule == "pretrain"), job


def _normalised(path: Path, work: Path) -> str:
    return path.read_text().replace(str(work), "<work>")


def _same_weights(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two weight files (bit for bit)."""
    wa, wb = (torch.load(path, weights_only=True)["model"] for path in (a, b))
    assert wa.keys() == wb.keys()
    return [name for name in wa if not torch.equal(wa[name], wb[name])]


def test_results_equal_the_local_run(slurm_run):
    # demo_run comes through slurm_run, which makes it while the cluster works (and not at all
    # when the cluster cannot be had: a session fixture asked for here would run first).
    demo_run = slurm_run.local
    local, cluster = demo_run / "results", slurm_run.work / "results"
    for table in ("status.csv", "availability.csv", "usable.csv"):
        cluster_table = _normalised(cluster / "demo" / table, slurm_run.work)
        assert cluster_table == _normalised(local / "demo" / table, demo_run), table
    for metrics in (
        Path("demo/norm_stats.json"),
        *(Path("finetune") / run / "metrics.json" for run in FINETUNE_RUNS),
        Path("retrieval/demo/metrics.json"),
    ):
        cluster_values = json.loads(_normalised(cluster / metrics, slurm_run.work))
        assert cluster_values == json.loads(_normalised(local / metrics, demo_run)), metrics
    different = _same_weights(cluster / "pretrain/demo/model.pt", local / "pretrain/demo/model.pt")
    assert not different, f"pre-trained weights differ from the local run's: {different[:5]}"


def test_cancelled_pretraining_resumed_from_its_checkpoint(slurm_run):
    work_dir = slurm_run.work / "data" / "pretrain" / "long"
    log = (slurm_run.work / "results" / "pretrain" / "long" / "pretrain.log").read_text()
    resumed = re.search(r"resuming from (\S+/checkpoint-(\d+)\.pt) at step (\d+)/(\d+)", log)
    assert resumed, f"the resubmitted pre-training did not resume:\n{log}"
    first_checkpoint = int(re.search(r"\d+", slurm_run.checkpoints_at_cancel[0]).group())
    assert int(resumed.group(3)) >= first_checkpoint >= 1
    assert Path(resumed.group(1)).parent == work_dir / "checkpoints"
    assert json.loads((work_dir / "config.json").read_text())["resumed_from"] == resumed.group(1)
    model = slurm_run.work / "results" / "pretrain" / "long" / "model.pt"
    weights = torch.load(model, weights_only=True)
    assert weights["steps"] == weights["total_steps"] == int(resumed.group(4))
    # Interrupted and resumed on the cluster, it learnt what an uninterrupted run learns.
    different = _same_weights(model, slurm_run.reference / "model.pt")
    assert not different, f"resumed weights differ from an uninterrupted run's: {different[:5]}"

    # sacct: the cancelled job, then the one the second run submitted, which completed.
    jobs = [(job["JobID"], job["State"].split()[0]) for job in slurm_run.jobs if job["Comment"].endswith("_long")]
    assert jobs[0] == (slurm_run.cancelled_job, "CANCELLED") and [state for _, state in jobs[1:]] == ["COMPLETED"], jobs


# ---- one run on two nodes --------------------------------------------------------------------

TWO_NODES = ("equiav-n1", "equiav-n2")  # the gpu partition (tests/cluster/common.sh)
WIDE_JOB = "rule_pretrain_wildcards_wide"  # the plugin's comment of the two-node run's job


@dataclass
class TwoNodeRun:
    work: Path
    jobs: list[dict[str, str]]  # sacct of every job of the run, with its steps
    termed: str  # the job signalled with SIGTERM, as before a walltime
    left_after_term: list[str]  # processes of that job still there once it had ended
    cancelled: str  # the job cancelled with scancel
    reference: Path  # one node, two processes, uninterrupted


def _wide_job() -> str:
    queue = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True, check=True).stdout
    running = [line.split("|")[0] for line in queue.splitlines() if line.endswith(f"|{WIDE_JOB}|RUNNING")]
    return running[0] if running else ""


def _processes_of(job: str) -> list[str]:
    """The processes on this machine (so on every node) whose environment names SLURM job ``job``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={job}".encode() in environ:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name}: {command[:200]}")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return found


def _steps(job: str) -> list[dict[str, str]]:
    fields = ["JobID", "State", "NodeList", "NNodes", "NTasks"]
    out = subprocess.run(["sacct", "-n", "-P", "-j", job, "-o", ",".join(fields)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines()]


def _checkpoint_steps(checkpoints: Path) -> list[int]:
    return sorted(int(re.search(r"\d+", p.name).group()) for p in checkpoints.glob("checkpoint-*.pt"))


@pytest.fixture(scope="module")
def two_node_run(slurm_run) -> TwoNodeRun:
    """A pre-training run on both gpu nodes through the SLURM profile, on the data of slurm_run:
    SIGTERM to its job after the first checkpoint (Snakemake retries it, and it resumes), scancel
    of the retry after its first checkpoint, then the same workflow command again. Then, on this
    machine, the same run on one node with two processes, uninterrupted."""
    work = slurm_run.work
    small = yaml.safe_load((work / "small.yaml").read_text())
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())["pretrain"]["demo"]["settings"]
    settings = {**shipped, **small["pretrain"]["demo"]["settings"], "epochs": 12, "checkpoint_every": 4, "log_every": 1}
    config = work / "wide.yaml"
    wide = {"dataset": "demo", "settings": settings, "resources": {"gpus": 1, "nodes": 2}}
    config.write_text(yaml.safe_dump({**small, "pretrain": {"wide": wide}}))
    args = [
        "--profile", str(REPO / "workflow" / "profiles" / "slurm"), "--configfile", str(config),
        "--max-threads", "2", "--slurm-logdir", str(work / "slurm-logs"),
        "--slurm-init-seconds-before-status-checks", "1",
        str(work / "results" / "pretrain" / "wide" / "model.pt"),
    ]  # fmt: skip
    # One thread per process, as torchrun gives each of the reference's two processes.
    threads = {var: "1" for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    checkpoints = work / "data" / "pretrain" / "wide" / "checkpoints"
    cmd, env = snakemake_command(*args, env=threads)
    log = work / "wide-first-run.log"
    with log.open("w") as out:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:

        def running(what: str) -> None:
            assert first.poll() is None, f"the run ended before {what}:\n{log.read_text()[-5000:]}"

        def first_checkpoint_of(job_after: str):
            running("a checkpoint of the two-node job")
            job = _wide_job()
            return job if job and job != job_after and _checkpoint_steps(checkpoints) else None

        # SIGTERM to the job's steps on both nodes, as SLURM sends it before the walltime
        # (the profile's --signal=TERM@300): training saves a checkpoint and exits, and
        # Snakemake submits the job again (the profile's retries).
        termed = _wait_until(lambda: first_checkpoint_of(""), "the two-node job's first checkpoint")
        subprocess.run(["scancel", "--signal=TERM", termed], check=True)
        _wait_until(lambda: _state(termed) and not _state(termed).startswith(("RUNNING", "PENDING", "COMPLETING")),
                    f"job {termed} to end after SIGTERM", 120, 0.5)  # fmt: skip
        # What still runs 10 s after the job ended was left behind (killed processes take a moment to go).
        deadline = time.monotonic() + 10
        while (left := _processes_of(termed)) and time.monotonic() < deadline:
            time.sleep(0.5)
        at_term = max(_checkpoint_steps(checkpoints))

        # The retry resumes; once it has a checkpoint of its own, it is cancelled as a user would.
        def retry_checkpoint():
            job = first_checkpoint_of(termed)
            return job if job and max(_checkpoint_steps(checkpoints)) > at_term else None

        cancelled = _wait_until(retry_checkpoint, "a checkpoint of the resumed two-node job")
        subprocess.run(["scancel", cancelled], check=True)
        _wait_until(lambda: _state(cancelled).startswith("CANCELLED"), f"job {cancelled} cancelled", 120, 0.5)
        first.send_signal(signal.SIGINT)  # the plugin never notices a cancelled job (above)
        first.wait(120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
            for run_id in re.findall(r"SLURM run ID: (\S+)", log.read_text()):
                subprocess.run(["scancel", f"--name={run_id}"], check=False)

    # The same command again: the run resumes from the cancelled job's checkpoint and ends.
    second = snakemake(*args, env=threads, timeout=RUN_TIMEOUT_S)
    output = log.read_text() + second.stdout + second.stderr
    run_ids = re.findall(r"SLURM run ID: (\S+)", output)
    jobs = _sacct(run_ids, "now-1hours")
    reference = work / "wide-reference"
    _pretrain_locally(settings, work, reference, threads=1, processes=2)
    wide_jobs = [job for job in jobs if job["Comment"] == WIDE_JOB]
    return TwoNodeRun(work, wide_jobs, termed, left, cancelled, reference)


def _losses(work_dir: Path):
    import pandas as pd

    return pd.read_csv(work_dir / "metrics.csv").set_index("step")[["loss", "inter", "intra_audio", "intra_visual"]]


def test_two_node_run_learns_what_one_node_with_two_processes_learns(two_node_run):
    # sacct: the run's jobs (signalled, cancelled, completed) each had both nodes...
    jobs = two_node_run.jobs
    states = [(job["JobID"], job["State"].split()[0]) for job in jobs]
    assert [state for _, state in states] == ["FAILED", "CANCELLED", "COMPLETED"], states
    assert states[0][0] == two_node_run.termed and states[1][0] == two_node_run.cancelled
    # One GPU on each node (--gres counts per node).
    assert all("gres/gpu=2" in job["AllocTRES"].split(",") for job in jobs), jobs
    for job, _ in states:
        steps = _steps(job)
        assert steps[0]["NodeList"] == "equiav-n[1-2]" and steps[0]["NNodes"] == "2", steps
        # ... and in each, one step ran a task on each node: the two torchruns.
        assert any(s["NodeList"] == "equiav-n[1-2]" and s["NTasks"] == "2" for s in steps[1:]), steps
    log = (two_node_run.work / "results" / "pretrain" / "wide" / "pretrain.log").read_text()
    for node, address in zip(TWO_NODES, ("10.254.207.2", "10.254.207.3")):
        pattern = rf"node {node}: torchrun meets at 10\.254\.207\.2:\d+ from {re.escape(address)} on eth0 \(GLOO_SOCKET_IFNAME=eth0"
        assert re.search(pattern, log), f"no rendezvous line of {node} in:\n{log[-3000:]}"
    work_dir = two_node_run.work / "data" / "pretrain" / "wide"
    assert json.loads((work_dir / "config.json").read_text())["world_size"] == 2
    wide, reference = _losses(work_dir), _losses(two_node_run.reference / "work")
    assert list(wide.index) == list(reference.index) and len(wide.columns) > 0
    difference = (wide - reference).abs().max().max()
    assert np.allclose(wide, reference, rtol=1e-5, atol=1e-6), (
        f"losses differ by up to {difference}:\n{wide - reference}"
    )


def test_two_node_run_resumed_after_scancel_ends_as_an_uninterrupted_run(two_node_run):
    log = (two_node_run.work / "results" / "pretrain" / "wide" / "pretrain.log").read_text()
    resumed = re.search(r"resuming from \S+/checkpoint-(\d+)\.pt at step (\d+)/(\d+)", log)
    assert resumed, f"the two-node run did not resume after scancel:\n{log[-3000:]}"
    model = two_node_run.work / "results" / "pretrain" / "wide" / "model.pt"
    weights = torch.load(model, weights_only=True)
    reference = torch.load(two_node_run.reference / "model.pt", weights_only=True)
    assert weights["steps"] == weights["total_steps"] == reference["steps"] == int(resumed.group(3))
    far = {name: (weights["model"][name] - tensor).abs().max().item() for name, tensor in reference["model"].items()
           if not torch.allclose(weights["model"][name], tensor, rtol=1e-4, atol=1e-5)}  # fmt: skip
    assert not far, f"weights differ from the uninterrupted one-node run's: {sorted(far.items())[:5]}"


def test_no_process_of_a_two_node_job_outlives_sigterm(two_node_run):
    assert two_node_run.left_after_term == [], "\n".join(two_node_run.left_after_term)
