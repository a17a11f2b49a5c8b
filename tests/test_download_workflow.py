"""Downloads through the workflow, as a user meets them: transient clips kept by a plain rerun
and fetched by the documented retry command (README, docs/data.md); a workflow killed with
SIGKILL mid-download and run again fetches no finished clip a second time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from conftest import make_clip
from media_server import MediaServer
from workflow_runner import REPO, snakemake, snakemake_command

pytestmark = pytest.mark.slow


def _user_data_set(work, server, rows: list[tuple[str, str]], **download) -> list[str]:
    """A data set `clips` of loopback URLs in a user list, no training; the snakemake options."""
    work.mkdir(exist_ok=True)
    pd.DataFrame(
        [
            {
                "clip_id": cid,
                "source": f"{server.url}/{path}",
                "start": 0.5,
                "end": 3.5,
                "labels": "x",
                "split": "train",
            }
            for cid, path in rows
        ]
    ).to_csv(work / "clips.csv", index=False)
    config = {
        "run": ["clips"],
        "datasets": {
            "clips": {
                "lists": [{"format": "user", "path": "clips.csv"}],
                "shard_size": 2,
                "download": {"retries": 0, "backoff_seconds": 0, **download},
                "features": {"target_frames": 304, "num_frames": 3, "frame_size": 32},
                "norm": {"use": "measured", "splits": ["train"]},
            }
        },
    }
    (work / "clips.yaml").write_text(yaml.safe_dump(config))
    return ["--profile", str(REPO / "workflow/profiles/default"), "--cores", "2", "--configfile", "clips.yaml"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    for name in ("a", "b", "c", "d"):
        make_clip(root / f"{name}.mp4", 4.0)
    return root


def test_transient_clips_are_retried_by_the_documented_command(served, tmp_path):
    work = tmp_path / "work"
    with MediaServer(served) as server:
        # Shard 00000: a, b (b answers 429 once); shard 00001: c, d.
        rows = [("a", "a.mp4"), ("b", "flaky1/b.mp4"), ("c", "c.mp4"), ("d", "d.mp4")]
        profile = _user_data_set(work, server, rows)  # no target: rule all, a data-only run
        first = snakemake(*profile, cwd=work)
        status = pd.read_csv(work / "results/clips/status.csv").set_index("clip_id")
        assert status.loc["b", "status"] == "rate-limited" and not status.loc["b", "final"]
        assert "transient" in (work / "results/clips/availability.md").read_text()
        assert "1 clip(s) in 1 download shard(s) failed for a passing reason" in first.stderr
        assert "--forcerun $(python -m equiav transient results)" in first.stderr
        hits = {cid: server.hits(f"/{path}") for cid, path in rows}

        # A plain rerun has nothing to do: transient clips wait for the retry command.
        rerun = snakemake(*profile, cwd=work)
        assert "Nothing to be done" in rerun.stdout + rerun.stderr

        listed = subprocess.run(
            [sys.executable, "-m", "equiav", "transient", "results"],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        )
        assert listed.stdout.split() == ["results/clips/download/00000.csv"]
        assert "1 transient clip(s) in 1 shard(s)" in listed.stderr
        retried = snakemake(*profile, "--forcerun", *listed.stdout.split(), cwd=work)
        jobs = retried.stdout + retried.stderr
        assert "rule download:" in jobs and "00001" not in jobs.split("rule features:")[0]  # only shard 00000
        after = {cid: server.hits(f"/{path}") for cid, path in rows}

    assert after["b"] > hits["b"]
    assert {cid: after[cid] for cid in "acd"} == {cid: hits[cid] for cid in "acd"}  # nothing final fetched again
    status = pd.read_csv(work / "results/clips/status.csv").set_index("clip_id")
    assert status["status"].tolist() == ["ok"] * 4
    assert "transient" not in (work / "results/clips/availability.md").read_text()
    assert "failed for a passing reason" not in retried.stderr
    # Nothing left to retry: the command prints nothing, and `--forcerun` with nothing forces nothing.
    listed = subprocess.run(
        [sys.executable, "-m", "equiav", "transient", "results"], cwd=work, capture_output=True, text=True
    )
    assert listed.returncode == 0 and listed.stdout == ""
    rerun = snakemake(*profile, "--forcerun", cwd=work)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr


def test_a_killed_workflow_fetches_no_finished_clip_again(served, tmp_path):
    """SIGKILL the whole workflow (Snakemake and its jobs) mid-download, then the README's way
    back: `--unlock`, and the same command again."""
    work = tmp_path / "work"
    with MediaServer(served, delay=0.6) as server:
        rows = [(name, f"slow/{name}.mp4") for name in "abcd"]
        profile = _user_data_set(work, server, rows, workers=1)
        targets = ["results/clips/status.csv"]
        cmd, env = snakemake_command(*targets, *profile, "--cores", "1")
        job = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        journals = [work / f"data/clips/media/{shard}/journal.csv" for shard in ("00000", "00001")]
        deadline = time.time() + 180
        while time.time() < deadline and not any(j.exists() and len(j.read_text().splitlines()) >= 2 for j in journals):
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        finished = {line.split(",")[0] for j in journals if j.exists() for line in j.read_text().splitlines()[1:]}
        assert 1 <= len(finished) < 4
        hits = {name: server.hits(f"/slow/{name}.mp4") for name in "abcd"}

        snakemake(*targets, *profile, "--unlock", cwd=work)
        snakemake(*targets, *profile, cwd=work)
        after = {name: server.hits(f"/slow/{name}.mp4") for name in "abcd"}
    assert {n: after[n] for n in finished} == {n: hits[n] for n in finished}  # 0 finished clips fetched again
    assert all(after[n] > hits[n] for n in set("abcd") - finished)
    assert pd.read_csv(work / "results/clips/status.csv")["status"].tolist() == ["ok"] * 4
