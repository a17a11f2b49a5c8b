"""One configuration wherever the workflow runs: the workflow's config.yaml, then the user's
files left to right, merged as Snakemake merges them, in the workflow and in validate-config."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import RELEASE_SWITCHES
from workflow_runner import REPO, small_demo_config, snakemake


def validate(*files, cwd, extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "equiav", "validate-config", *extra, *map(str, files)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def job_counts(output: str) -> dict[str, int]:
    return {line.split()[0]: int(line.split()[1]) for line in output.splitlines() if re.fullmatch(r"\w+\s+\d+", line)}


def test_the_workflow_config_is_loaded_under_another_directory(tmp_path):
    """`--directory` elsewhere (as on a cluster's scratch) plus a --configfile that is only a
    change of config.yaml: the demo's keys are there, so the demo's jobs are planned."""
    scratch, elsewhere = tmp_path / "scratch", tmp_path / "elsewhere"
    scratch.mkdir(), elsewhere.mkdir()
    config = small_demo_config(scratch)
    proc = snakemake("-n", "--directory", str(scratch), "--configfile", str(config), cwd=elsewhere)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["demo_data"] == 1 and counts["pretrain"] == 1 and counts["finetune"] == 3 and counts["retrieval"] == 1
    assert (scratch / ".snakemake").is_dir() and not (elsewhere / ".snakemake").exists()


CASES = {
    # valid only on top of config.yaml: `generate: demo` comes from it
    "small": None,
    # dicts are merged key by key: config.yaml's `modalities: [audio, video]` stays
    "no_frames": {"datasets": {"demo": {"features": {"num_frames": 0}}}},
    # lists replace the earlier value (not appended: [audio, video, audio] would be refused)
    "audio_only": {"datasets": {"demo": {"modalities": ["audio"], "features": {"num_frames": 0}}}},
}


@pytest.mark.parametrize("case", CASES)
def test_validate_config_and_the_workflow_agree(tmp_path, case):
    scratch, elsewhere = tmp_path / "scratch", tmp_path / "elsewhere"
    scratch.mkdir(), elsewhere.mkdir()
    files = [small_demo_config(scratch)]
    if CASES[case] is not None:
        files.append(scratch / f"{case}.yaml")
        files[-1].write_text(yaml.safe_dump(CASES[case]))
    checked = validate(*files, cwd=elsewhere)
    run = snakemake("-n", "--directory", str(scratch), "--configfile", *map(str, files), cwd=elsewhere, check=False)
    assert (checked.returncode == 0) == (run.returncode == 0), (checked.stderr, run.stdout + run.stderr)
    if case == "no_frames":
        problem = "config key 'datasets.demo.features.num_frames': 0 frames but `modalities` includes video"
        assert problem in checked.stderr and problem in run.stdout + run.stderr
    elif case == "audio_only":  # merged as a list: the demo's pre-training now reads an audio-only set
        problem = "config key 'pretrain.demo.dataset': data set 'demo' is audio-only"
        assert problem in checked.stderr and problem in run.stdout + run.stderr
    else:
        assert checked.returncode == 0 and checked.stdout.strip() == "valid: run demo", checked.stderr


def test_replace_workflow_config_leaves_config_yaml_out_in_both(tmp_path):
    config = small_demo_config(tmp_path)
    checked = validate(config, cwd=tmp_path, extra=("--replace-workflow-config",))
    run = snakemake("-n", "--replace-workflow-config", "--configfile", str(config), cwd=tmp_path, check=False)
    problem = "give exactly one of `lists` (clip lists) or `generate`"
    assert checked.returncode != 0 and run.returncode != 0
    assert problem in checked.stderr and problem in run.stdout + run.stderr


def test_validate_config_names_a_missing_file(tmp_path):
    checked = validate(tmp_path / "nope.yaml", cwd=REPO)
    assert checked.returncode == 2 and "nope.yaml: No such file or directory" in checked.stderr


def test_the_release_switches_are_pretraining_settings(tmp_path):
    """docs/method.md's options that restore the release: `pretrain.<run>.settings.audio_augment`
    keys, accepted by validate-config and turned into the AudioAugmentConfig that training builds;
    a misspelt one stops the workflow, named."""
    from equiav.config import load_config
    from equiav.settings.pretrain import PretrainSettings

    switches = {name: True for name in RELEASE_SWITCHES}
    given = tmp_path / "release.yaml"
    given.write_text(yaml.safe_dump({"pretrain": {"demo": {"settings": {"audio_augment": switches}}}}))
    checked = validate(small_demo_config(tmp_path), given, cwd=tmp_path)
    assert checked.returncode == 0 and checked.stdout.strip() == "valid: run demo", checked.stderr
    settings = load_config(small_demo_config(tmp_path), given)["pretrain"]["demo"]["settings"]
    config = PretrainSettings.from_dict(settings).audio_augment_config()
    assert all(getattr(config, name) is True for name in RELEASE_SWITCHES)

    given.write_text(yaml.safe_dump({"pretrain": {"demo": {"settings": {"audio_augment": {"release_clamps": True}}}}}))
    checked = validate(small_demo_config(tmp_path), given, cwd=tmp_path)
    assert checked.returncode == 2
    assert "config key 'pretrain.demo.settings'" in checked.stderr and "'release_clamps'" in checked.stderr


def problems_of(tmp_path, change: dict) -> str:
    """validate-config's message for the small demo configuration with ``change`` on top ("" when valid)."""
    given = tmp_path / "change.yaml"
    given.write_text(yaml.safe_dump(change))
    checked = validate(small_demo_config(tmp_path), given, cwd=tmp_path)
    return "" if checked.returncode == 0 else checked.stderr


IMPORT_CASES = {
    "both": (
        {"pretrain": {"demo": {"import": {"type": "scratch"}}}},
        "config key 'pretrain.demo': give `dataset` (pre-train on that data set) or `import`",
    ),
    "neither": (
        {"pretrain": {"x": {"settings": {}}}},
        "config key 'pretrain.x': give `dataset` (pre-train on that data set) or `import`",
    ),
    "settings": (
        {"pretrain": {"x": {"import": {"type": "scratch"}, "settings": {"epochs": 3}}}},
        "config key 'pretrain.x.settings': an imported model is not trained",
    ),
    "no release path": (
        {"pretrain": {"x": {"import": {"type": "release"}}}},
        "config key 'pretrain.x.import': type 'release' needs `path`",
    ),
    "scratch with a file": (
        {"pretrain": {"x": {"import": {"type": "scratch", "path": "w.pth"}}}},
        "type 'scratch' reads no weights: drop `path`",
    ),
    "bad model": (
        {"pretrain": {"x": {"import": {"type": "scratch", "model": {"preset": "huge"}}}}},
        "config key 'pretrain.x.import': model preset 'huge'",
    ),
    "missing file of a used import": (
        {
            "pretrain": {"x": {"import": {"type": "release", "path": "gone.pth"}}},
            "finetune": {"demo_audio": {"pretrained": "x"}},
        },
        "config key 'pretrain.x.import.path': no file 'gone.pth'",
    ),
    "visual on audio only": (
        {
            "datasets": {"a": {"lists": [{"format": "user", "path": "l.csv"}], "modalities": ["audio"],
                               "features": {"num_frames": 0}}},
            "finetune": {"v": {"pretrained": "demo", "dataset": "a", "settings": {"modality": "visual"}}},
        },
        "config key 'finetune.v.settings.modality': 'visual' needs video, but data set 'a' is audio-only",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_pretrain_entries_that_cannot_be_made_are_named(tmp_path, case):
    change, problem = IMPORT_CASES[case]
    assert problem in problems_of(tmp_path, change)


def test_an_unused_import_needs_no_file_and_a_used_one_is_planned(tmp_path):
    """An import no run uses is not made (so its file need not be there yet); one a fine-tuning
    run uses is a job of the plan, and that run waits for it."""
    (tmp_path / "released.pth").write_bytes(b"")
    release = {"type": "release", "path": "released.pth", "model": {"preset": "tiny"}}
    change = {"pretrain": {"spare": {"import": {**release, "path": "later.pth"}}, "released": {"import": release}},
              "finetune": {"demo_audio-released": {"pretrained": "released", "dataset": "demo"}}}  # fmt: skip
    assert problems_of(tmp_path, change) == ""
    given = tmp_path / "change.yaml"
    run = snakemake("-n", "--directory", str(tmp_path), "--configfile", str(small_demo_config(tmp_path)), str(given))
    counts = job_counts(run.stdout + run.stderr)
    assert counts["import_model"] == 1 and counts["finetune"] == 4 and counts["pretrain"] == 1
    assert "results/pretrain/spare" not in run.stdout


def test_the_released_preset_plans_imports_and_no_pre_training(tmp_path):
    """README "Evaluate the authors' checkpoint": the command with a file naming the checkpoint
    plans the two imports and their runs; without it, the missing file is named before any job.
    The MSR-VTT preset's retrieval takes the release too (its header)."""
    (tmp_path / "ckpt.pth").write_bytes(b"")
    paths = tmp_path / "my_paths.yaml"
    paths.write_text(yaml.safe_dump({"pretrain": {"released": {"import": {"path": "ckpt.pth"}}}}))
    presets = [
        str(REPO / "workflow" / "presets" / f"{name}.yaml")
        for name in ("audioset_20k", "vggsound", "esc50", "released")
    ]
    run = snakemake("-n", "--directory", str(tmp_path), "--configfile", *presets, str(paths), cwd=REPO)
    counts = job_counts(run.stdout + run.stderr)
    assert counts["import_model"] == 2 and counts["finetune"] == 8 and counts["retrieval"] == 4
    assert "pretrain" not in counts
    # The preset's offline advice for MAE: a local file, given the same way.
    (tmp_path / "mae.safetensors").write_bytes(b"")
    offline = tmp_path / "offline.yaml"
    offline.write_text(yaml.safe_dump({"pretrain": {"mae": {"import": {"path": "mae.safetensors"}}}}))
    run = snakemake("-n", "--directory", str(tmp_path), "--configfile", *presets, str(paths), str(offline), cwd=REPO)
    assert job_counts(run.stdout + run.stderr)["import_model"] == 2
    missing = snakemake("-n", "--directory", str(tmp_path), "--configfile", *presets, cwd=REPO, check=False)
    assert missing.returncode != 0
    assert (
        "config key 'pretrain.released.import.path': no file 'EquiAV_pretrained.pth'" in missing.stdout + missing.stderr
    )

    msrvtt = tmp_path / "msrvtt.yaml"
    release = {"type": "release", "path": "ckpt.pth"}
    msrvtt.write_text(yaml.safe_dump({"pretrain": {"released": {"import": release}},
                                      "retrieval": {"msrvtt": {"pretrained": "released"}}}))  # fmt: skip
    (tmp_path / "MSRVTT.zip").write_bytes(b"")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n")
    checked = validate(REPO / "workflow/presets/msrvtt.yaml", msrvtt, cwd=tmp_path, extra=())
    assert checked.returncode == 0 and checked.stdout.strip() == "valid: run msrvtt", checked.stderr
