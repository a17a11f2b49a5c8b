"""Running the workflow from tests: one Snakemake call and the small demo configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def snakemake_command(*args: str, env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment of ``snakemake <args>`` on the project's Snakefile,
    with this venv first on PATH."""
    env = {**os.environ, **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args], env


def snakemake(
    *args: str, cwd: Path = REPO, check: bool = True, env: dict | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run ``snakemake <args>`` (snakemake_command) and wait for it, at most ``timeout`` seconds."""
    cmd, env = snakemake_command(*args, env=env)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def small_demo_config(work: Path, **extra: object) -> Path:
    """A config file for the demo DAG, smaller than the shipped one, writing under ``work``.

    Enough steps to exercise every stage, not to learn (the shipped demo does that). ``extra``
    keys are merged on top (one level deep).
    """
    config: dict = {
        "results_dir": str(work / "results"),
        "data_dir": str(work / "data"),
        "demo": {"classes": 3, "train_per_class": 4, "test_per_class": 2},
        "datasets": {"demo": {"shard_size": 8}},
        "pretrain": {"demo": {"settings": {"epochs": 2, "batch_size": 4, "warmup_epochs": 1}}},
        "finetune": {
            run: {"settings": {"epochs": 1, "batch_size": 4}}
            for run in ("demo_audio", "demo_visual", "demo_audiovisual")
        },
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = work / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
