"""envs/*.yaml (for `--sdm conda`) agree with pyproject.toml, the environment the suite runs in."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
# Not needed inside the jobs: the workflow runner itself.
RUNNER = {"snakemake", "snakemake-executor-plugin-slurm"}
# Needed only by the data rules (downloads and decoding media).
DOWNLOAD_TOOLS = {"yt-dlp", "deno", "yt-dlp-ejs", "imageio-ffmpeg"}
# What the training env's rules import: `python -m equiav <command>` of train.smk, evaluate.smk
# and report.smk's pictures.
TRAIN_COMMANDS = ("pretrain", "finetune", "retrieval", "report")


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~ \[]", requirement, maxsplit=1)[0].lower()


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_name(d): d for d in deps}


def _env_pins(env: str) -> dict[str, str]:
    spec = yaml.safe_load((REPO / "envs" / f"{env}.yaml").read_text())
    pip = [entry["pip"] for entry in spec["dependencies"] if isinstance(entry, dict) and "pip" in entry]
    assert len(pip) == 1, f"envs/{env}.yaml must have one pip section"
    return {_name(d): d for d in pip[0]}


@pytest.mark.parametrize(("env", "left_out"), [("data", RUNNER), ("train", RUNNER | DOWNLOAD_TOOLS)])
def test_envs_pin_what_pyproject_pins(env, left_out):
    wanted = {name: pin for name, pin in _pyproject_pins().items() if name not in left_out}
    assert _env_pins(env) == wanted


def test_every_rule_names_an_env_that_exists():
    rules = (REPO / "workflow" / "rules").glob("*.smk")
    named = {m for path in rules for m in re.findall(r'conda:\s*\n\s*"([^"]+)"', path.read_text())}
    assert named == {"../../envs/data.yaml", "../../envs/train.yaml"}


def test_training_commands_run_without_the_download_tools():
    """The train env leaves the download tools out: its commands must not import them."""
    blocked = sorted({"yt_dlp", "yt_dlp_ejs", "deno", "imageio_ffmpeg", "ffmpeg"})
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not in envs/train.yaml")
sys.meta_path.insert(0, Block())
from equiav.cli import main
for command in {TRAIN_COMMANDS!r}:
    try:
        main([command, "--help"])
    except SystemExit as stop:
        assert stop.code == 0, command
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
