"""The workflow on a real SLURM cluster, through workflow/profiles/slurm.

tests/cluster/slurm_up.sh starts a one-node SLURM on this machine (as root; it installs the
Debian packages it lacks) with two fake GPUs. The small demo DAG of workflow_runner runs through
the profile, pre-training on a fake GPU (so on the CPU), together with a longer pre-training run,
`long`, which is cancelled with scancel after its first checkpoint; then the workflow runs again.
Checked: every rule job ran as an sbatch job that sacct reports COMPLETED, the results equal the
local run's (conftest.demo_run) bit for bit, and `long` resumed from its checkpoint and learnt
what an uninterrupted run learns.
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

import pytest
import torch
import yaml
from workflow_runner import REPO, small_demo_config, snakemake, snakemake_command

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CLUSTER = REPO / "tests" / "cluster"
FINETUNE_RUNS = ("demo_audio", "demo_visual", "demo_audiovisual")
GPU_RULES = {"pretrain", "finetune", "retrieval"}  # the profile sends them to the `gpu` partition
RULES = {"demo_data", "manifest", "download", "features", "availability", "norm_stats"} | GPU_RULES
RUN_TIMEOUT_S = 900


def _started(stdout: str | bytes | None) -> list[str]:
    """The daemons slurm_up.sh says it started (a partial output included)."""
    text = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout or ""
    return re.findall(r"^slurm_up: started (\w+)", text, re.M)


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


def _pretrain_locally(settings: dict, demo: Path, out: Path) -> None:
    """Pre-training with ``settings`` on the local run's data, with the threads a 2-CPU job has."""
    threads = {var: "2" for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    proc = subprocess.run(
        [sys.executable, "-m", "equiav", "pretrain", "--settings", json.dumps(settings),
         "--usable", str(demo / "results" / "demo" / "usable.csv"),
         "--norm-stats", str(demo / "results" / "demo" / "norm_stats.json"),
         "--out", str(out / "model.pt"), "--work-dir", str(out / "work")],
        env={**os.environ, **threads}, capture_output=True, text=True, check=False,
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
    }  # fmt: skip

    completed = [job for job in slurm_run.jobs if job["State"] == "COMPLETED"]
    others = [job for job in slurm_run.jobs if job["State"] != "COMPLETED"]
    assert Counter(_rule_of(job["Comment"]) for job in completed) == finished, slurm_run.jobs
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
