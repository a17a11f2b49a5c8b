"""Runs of the workflow that users write without a download: data-only configurations (a preset
alone, a user list of local files), archived data sets from a local copy, and a killed run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from data_sets import esc50_folder, snapshot, speech_commands_folder, tar_folder, user_list, zip_folder
from workflow_runner import REPO, small_demo_config, snakemake, snakemake_command

PRESETS = REPO / "workflow" / "presets"
PROFILE = str(REPO / "workflow" / "profiles" / "default")


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def dirs(work: Path) -> dict:
    return {"results_dir": str(work / "results"), "data_dir": str(work / "data")}


def small_esc50(archive: dict) -> dict:
    """What a user writes after the ESC-50 preset, made small for the test."""
    return {"datasets": {"esc50": {"archive": archive, "shard_size": 10, "features": {"target_frames": 64}}}}


def run(work: Path, *configs: Path, check: bool = True, extra: tuple[str, ...] = ()):
    return snakemake("--profile", PROFILE, "--cores", "2", "--configfile", *map(str, configs), *extra,
                     cwd=work, check=check)  # fmt: skip


def check_data_only_results(work: Path, name: str, clips: int) -> None:
    """The availability report and the tables page, with the clips obtained and empty result cells."""
    results = work / "results"
    table = pd.read_csv(results / name / "availability.csv")
    assert table[(table["split"] == "all") & (table["status"] == "ok")]["clips"].sum() == clips
    index = (results / "tables" / "tables.md").read_text()
    assert "## Clips obtained" in index and f"| {name} |" in index
    assert not (results / "summary.md").exists()  # no run, no summary
    cells = pd.read_csv(results / "tables" / "table2.csv")
    assert cells["ours"].isna().all()  # empty result cells
    assert (results / "report" / "availability" / f"{name}.html").exists()
    assert (results / "report" / "tables" / "table2.html").exists()


@pytest.mark.slow
def test_esc50_preset_with_a_local_archive_file(tmp_path):
    """The preset alone (no training runs) on a local zip: the fetch error's advice, followed."""
    zipped = zip_folder(esc50_folder(tmp_path / "src"), tmp_path / "ESC-50-master.zip")
    esc50 = PRESETS / "esc50.yaml"
    # No network in the test: a URL that cannot be fetched stands in for GitHub's.
    broken = write_config(
        tmp_path / "broken.yaml", {**dirs(tmp_path), **small_esc50({"url": f"file://{tmp_path}/gone.zip"})}
    )
    proc = run(tmp_path, esc50, broken, check=False)
    assert proc.returncode != 0
    log = (tmp_path / "results/esc50/logs/fetch_archive.log").read_text()
    assert "give the local file as `path` in the same config entry" in log

    # The advice: the local file as `path` (the preset's and the failed `url` stay merged in).
    mine = write_config(tmp_path / "mine.yaml", small_esc50({"path": str(zipped)}))
    run(tmp_path, esc50, broken, mine)
    assert (tmp_path / "data/esc50/archive/ESC-50-master/meta/esc50.csv").exists()
    manifest = pd.read_csv(tmp_path / "results/esc50/manifest.csv")
    assert sorted(manifest["split"].unique()) == [f"fold{k}" for k in range(1, 6)] and len(manifest) == 10
    check_data_only_results(tmp_path, "esc50", 10)
    assert "| esc50 | fold1 | 2 | 2 | 100.0 |" in (tmp_path / "results/tables/table2.md").read_text()

    snakemake("--report", str(tmp_path / "report.html"), "--configfile", str(esc50), str(broken), str(mine),
              cwd=tmp_path)  # fmt: skip
    assert (tmp_path / "report.html").stat().st_size > 10_000
    rerun = run(tmp_path, esc50, broken, mine, extra=("-n",))  # unpacked once
    assert "Nothing to be done" in rerun.stdout + rerun.stderr


@pytest.mark.slow
def test_esc50_preset_with_an_unpacked_folder(tmp_path):
    """An unpacked copy is used where it is: nothing copied into data_dir, nothing changed in it."""
    folder = esc50_folder(tmp_path / "ESC-50")
    before = snapshot(folder)
    mine = write_config(tmp_path / "mine.yaml", {**dirs(tmp_path), **small_esc50({"path": str(folder)})})
    run(tmp_path, PRESETS / "esc50.yaml", mine)
    assert not (tmp_path / "data/esc50/archive").exists()
    assert snapshot(folder) == before
    check_data_only_results(tmp_path, "esc50", 10)
    sources = pd.read_csv(tmp_path / "results/esc50/manifest.csv")["source"]
    assert all(s.startswith(str(folder)) for s in sources)


@pytest.mark.slow
def test_spc_v1_preset_with_a_local_tarball(tmp_path):
    tarball = tar_folder(speech_commands_folder(tmp_path / "src"), tmp_path / "speech_commands_v0.01.tar.gz")
    mine = write_config(tmp_path / "mine.yaml", {
        **dirs(tmp_path),
        "datasets": {"spc_v1": {"archive": {"path": str(tarball)}, "shard_size": 10, "features": {"target_frames": 32}}},
    })  # fmt: skip
    run(tmp_path, PRESETS / "spc_v1.yaml", mine)
    manifest = pd.read_csv(tmp_path / "results/spc_v1/manifest.csv")
    assert manifest.groupby("split").size().to_dict() == {"test": 2, "train": 2, "validation": 2}
    check_data_only_results(tmp_path, "spc_v1", 6)


@pytest.mark.slow
def test_user_list_without_runs(tmp_path):
    """A user's own list of local files, audio only, with no pre-training, fine-tuning or retrieval."""
    listed = user_list(tmp_path / "mine")
    mine = write_config(tmp_path / "mine.yaml", {
        **dirs(tmp_path),
        "run": ["mine"],
        "datasets": {"mine": {
            "lists": [{"format": "user", "path": str(listed)}], "modalities": ["audio"], "shard_size": 4,
            "features": {"target_frames": 64, "num_frames": 0},
        }},
    })  # fmt: skip
    run(tmp_path, mine)
    check_data_only_results(tmp_path, "mine", 6)
    snakemake("--report", str(tmp_path / "report.html"), "--configfile", str(mine), cwd=tmp_path)
    assert (tmp_path / "report.html").stat().st_size > 10_000


@pytest.mark.slow
def test_a_killed_run_is_unlocked_with_the_advice_it_prints(tmp_path):
    """SIGKILL leaves Snakemake's locks behind: the rerun says what to do, and doing it works."""
    config = small_demo_config(tmp_path)
    target = str(tmp_path / "results/demo/availability.md")
    args = (target, "--profile", PROFILE, "--cores", "2", "--configfile", str(config))
    cmd, env = snakemake_command(*args)
    # Its own session, so that the jobs it started are killed with it (as a node's OOM killer
    # or a cluster's scancel of the login session would).
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "results/demo/download").glob("*.csv")):  # mid-run: after the first shard
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the jobs it runs
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    failed = snakemake(*args, cwd=tmp_path, check=False)
    assert failed.returncode != 0
    assert "LockException" in failed.stderr
    assert "run the same command once with --unlock added, then again as it was" in failed.stderr

    unlocked = snakemake(*args, "--unlock", cwd=tmp_path)
    assert "Note:" not in unlocked.stderr
    done = snakemake(*args, cwd=tmp_path)
    assert "Note:" not in done.stderr
    assert (tmp_path / "results/demo/availability.md").exists()
    assert len(pd.read_csv(tmp_path / "results/demo/status.csv")) == 20


def test_a_list_url_and_a_relative_audio_dir_with_an_archive_folder(tmp_path):
    """What the manifest's errors advise for an archived data set: a list's `url` instead of its
    `path` (fetched, and waited for), and an `audio_dir` taken inside the archive like `path`."""
    folder = esc50_folder(tmp_path / "ESC-50")
    flat = tmp_path / "esc50.csv"
    flat.write_text((folder / "ESC-50-master/meta/esc50.csv").read_text())
    mine = write_config(tmp_path / "mine.yaml", {
        **dirs(tmp_path), **small_esc50({"path": str(folder)}),
    })  # fmt: skip
    mine_config = yaml.safe_load(mine.read_text())
    mine_config["datasets"]["esc50"]["lists"] = [
        {"format": "esc50", "url": f"file://{flat}", "audio_dir": "ESC-50-master/audio"}
    ]
    write_config(mine, mine_config)
    proc = snakemake("-n", "-p", "--configfile", str(PRESETS / "esc50.yaml"), str(mine), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert re.search(r"^fetch_list\s+1$", out, re.M) and re.search(r"^manifest\s+1$", out, re.M)
    manifest_job = out[out.index("checkpoint manifest:") :].split("\n\n")[0]
    assert f"{tmp_path}/data/esc50/lists/0-esc50.csv" in manifest_job  # waits for the fetched list
    assert f'"audio_dir": "{folder}/ESC-50-master/audio"' in out
