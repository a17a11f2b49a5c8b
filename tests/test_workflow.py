"""The workflow itself: lint, the demo DAG end to end, presets' DAGs on full-size lists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch
import yaml
from workflow_runner import REPO, snakemake

from equiav.data import status as st
from equiav.data import synthetic

PRESETS = REPO / "workflow" / "presets"
LISTS = Path(__file__).parent / "data" / "lists"


def test_lint_is_clean():
    proc = snakemake("--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_bad_config_stops_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  demo:\n    shard_size: 0\n    download: {wokers: 2}\n")
    proc = snakemake("-n", "--configfile", str(bad), "--directory", str(REPO), check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "datasets.demo.shard_size" in output and "minimum of 1" in output
    assert "'wokers'" in output and "workers" in output  # the unknown key and the allowed ones


def test_demo_every_clip_has_one_status_and_the_report_agrees(demo_run):
    results = demo_run / "results" / "demo"
    manifest = pd.read_csv(results / "manifest.csv")
    assert len(manifest) == 3 * 6 + 2  # + the two deliberately broken clips
    status = pd.read_csv(results / "status.csv")
    assert sorted(status["clip_id"]) == sorted(manifest["clip_id"])  # each clip exactly once
    by_id = status.set_index("clip_id")["status"]
    assert by_id["broken-missing-file"] == st.UNAVAILABLE
    assert by_id["broken-no-audio"] == st.NO_AUDIO
    assert (by_id.drop(["broken-missing-file", "broken-no-audio"]) == st.OK).all()

    shard_rows = pd.concat(pd.read_csv(p) for p in sorted((results / "download").glob("*.csv")))
    assert len(shard_rows) == len(manifest) and shard_rows["clip_id"].is_unique
    assert len(list((results / "download").glob("*.csv"))) == 3  # 20 clips in shards of 8

    table = pd.read_csv(results / "availability.csv")
    per_split = table[table["split"] != "all"]
    expected = status.groupby(["split", "status"]).size()
    assert per_split.set_index(["split", "status"])["clips"].sort_index().equals(expected.sort_index())
    assert table[table["split"] == "all"]["clips"].sum() == len(status)
    report = (results / "availability.md").read_text()
    assert "| train |" in report and "no-audio" in report

    obtained = (results / "obtained" / "test.txt").read_text().split()
    assert sorted(obtained) == sorted(status.query("split == 'test' and status == 'ok'")["clip_id"])


def test_demo_features_hold_exactly_the_usable_clips(demo_run):
    results = demo_run / "results" / "demo"
    usable = pd.read_csv(results / "usable.csv")
    stored = []
    for path in sorted(set(usable["h5"])):
        with h5py.File(path) as f:
            stored += [c.decode() if isinstance(c, bytes) else c for c in f["clip_id"][:]]
            assert f["fbank"].shape[1:] == (304, 128) and f["fbank"].dtype == "float16"
            assert f["frames"].shape[1] == 10
            assert (f["fbank_frames"][:] > 250).all()  # 3 s segments: ~298 real frames, never an empty input
    assert sorted(stored) == sorted(usable["clip_id"])

    stats = json.loads((results / "norm_stats.json").read_text())
    assert stats["use"] == "measured" and stats["mean"] == stats["measured"]["mean"]
    assert stats["paper"] == {"mean": -4.346, "std": 4.332}
    assert stats["measured"]["clips"] == (usable["split"] == "train").sum()


def test_demo_trains_and_evaluates(demo_run):
    results = demo_run / "results"
    weights = torch.load(results / "pretrain/demo/model.pt", weights_only=True)
    assert weights["model_config"]["audio_frames"] == 304
    for modality in ("audio", "visual", "audiovisual"):
        metrics = json.loads((results / f"finetune/demo_{modality}/metrics.json").read_text())
        assert metrics["modality"] == modality and metrics["metric"] == "accuracy"
        assert 0 <= metrics["value"] <= 1 and metrics["chance"] == pytest.approx(1 / 3)
        assert metrics["eval_clips"] == 6
    retrieval = json.loads((results / "retrieval/demo/metrics.json").read_text())
    ids = (results / "retrieval/demo/ids.txt").read_text().split()
    assert retrieval["clips"] == len(ids) == 6
    assert set(retrieval["v2a"]) >= {"R@1", "R@5", "R@10", "median_rank"}
    summary = pd.read_csv(results / "summary.csv")
    assert len(summary) == 3 + 6  # three fine-tuning accuracies, R@1/5/10 both ways
    assert (summary["start"] == "demo").all()  # every run starts from the demo pre-training
    rows = [line for line in (results / "summary.md").read_text().splitlines() if line.startswith("| demo")]
    assert len(rows) == 9 and all(line.split(" | ")[1] == "demo" for line in rows)


# Each rule's log and the INFO line that names the stage's result (paths relative to results/).
STAGE_RESULTS = {
    "*/logs/demo_data.log": r"equiav\.data\.demo: demo: \d+ clips",
    "*/logs/manifest.log": r"equiav\.cli: wrote the manifest to .+ and \d+ shard list",
    "*/logs/download/*.log": r"equiav\.cli: wrote the status rows of .+ to .+\.csv",
    "*/logs/features/*.log": r"equiav\.cli: wrote \d+ status row\(s\) to ",
    "*/logs/availability.log": r"equiav\.cli: demo: \d+ of \d+ listed clips usable",
    "*/logs/norm_stats.log": r"equiav\.cli: fbank mean -?[\d.]+, std [\d.]+ \(measured",
    "logs/summary.log": r"equiav\.cli: 9 metric\(s\) of 4 file\(s\)",
    "logs/tables.log": r"equiav\.eval\.tables: wrote .+tables\.md and \d+ table\(s\)",
    "logs/report/*.log": r"equiav\.eval\.report: report [\w-]+: wrote .+\.(html|png)",
    "*/*/check_splits.log": r"equiav\.cli: (pretrain|finetune|retrieval)\.\w+ reads \w+ \(\d+ clips\)",
    "pretrain/*/pretrain.log": r"equiav\.train\.pretrain: wrote .+model\.pt after \d+ steps",
    "finetune/*/finetune.log": r"equiav\.train\.finetune: accuracy = [\d.]+ \(chance 0\.3333\) -> .+metrics\.json",
    "retrieval/*/retrieval.log": r"equiav\.eval\.retrieval: 6 clips: V2A R@1/5/10 [\d.]+/[\d.]+/[\d.]+, A2V",
}


def test_demo_every_rule_log_names_its_result(demo_run):
    """Every command logs through `equiav`'s one logging set-up: no rule's log is empty."""
    results = demo_run / "results"
    logs = sorted({*results.glob("**/logs/**/*.log"), *(p for d in ("finetune", "retrieval", "pretrain")
                                                        for p in results.glob(f"{d}/*/*.log"))})  # fmt: skip
    assert len(logs) > 10
    problems = []
    for path in logs:
        name = path.relative_to(results)
        text = path.read_text()
        patterns = [rx for pattern, rx in STAGE_RESULTS.items() if name.match(pattern)]
        if not patterns:
            problems.append(f"{name}: a log this test does not know; add its result line to STAGE_RESULTS")
        elif not text.strip():
            problems.append(f"{name}: empty")
        elif not re.search(r"^\S+ \S+ INFO " + patterns[0], text, re.MULTILINE):
            problems.append(f"{name}: no INFO line matching {patterns[0]!r}:\n{text[-1500:]}")
    assert not problems, "\n".join(problems)
    epochs = (results / "finetune/demo_audio/finetune.log").read_text()
    assert re.search(r"INFO equiav\.train\.finetune: run epoch 1: accuracy ", epochs)


def test_demo_rerun_has_nothing_to_do(demo_run):
    override = demo_run / "small.yaml"
    proc = snakemake("-n", "--configfile", str(override))
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_audioset_2m_preset_builds_its_dag_from_full_size_lists(tmp_path):
    """The 2M preset on a synthesised list of the real size: about a thousand shards, one job each."""
    lists = tmp_path / "lists"
    lists.mkdir()
    classes = LISTS / "audioset_class_labels_indices.csv"
    mids = pd.read_csv(classes)["mid"].tolist()
    (lists / "balanced.csv").write_text(synthetic.audioset_segments(22_160, mids))
    (lists / "eval.csv").write_text(synthetic.audioset_segments(20_371, mids, first=22_160))
    (lists / "unbalanced.csv").write_text(synthetic.audioset_segments(2_041_789, mids, first=50_000))
    preset = yaml.safe_load((PRESETS / "audioset_2m.yaml").read_text())
    for entry, name in zip(preset["datasets"]["audioset"]["lists"], ("balanced", "eval", "unbalanced")):
        entry.pop("url")
        entry["path"] = str(lists / f"{name}.csv")
    preset["datasets"]["audioset"]["classes"] = {"format": "audioset", "path": str(classes)}
    preset["results_dir"], preset["data_dir"] = str(tmp_path / "results"), str(tmp_path / "data")
    config = tmp_path / "audioset_2m.yaml"
    config.write_text(yaml.safe_dump(preset))

    snakemake("--cores", "2", "--configfile", str(config), "--until", "manifest")
    shards = len(list((tmp_path / "data" / "audioset" / "shards").glob("*.csv")))
    total = 22_160 + 20_371 + 2_041_789
    assert shards == -(-total // 2000)
    proc = snakemake("-n", "--quiet", "rules", "--configfile", str(config))
    out = proc.stdout + proc.stderr
    jobs = {
        line.split()[0]: int(line.split()[1])
        for line in out.splitlines()
        if line.split()[:1] in (["download"], ["features"])
    }
    assert jobs == {"download": shards, "features": shards}


def test_paper_preset_plans_every_run(tmp_path):
    """Pre-training on GPUs, 9 fine-tuning runs + ESC-50 + SPC-v1, and the two retrieval runs."""
    presets = [PRESETS / f"{name}.yaml" for name in ("audioset_2m", "vggsound", "esc50", "spc_v1", "paper")]
    proc = snakemake(
        "-n", "-p", "--configfile", *map(str, presets),
        "--config", f"results_dir={tmp_path}/results", f"data_dir={tmp_path}/data",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if re.fullmatch(r"\w+\s+\d+", line)}
    assert counts["pretrain"] == 1 and counts["finetune"] == 11 and counts["retrieval"] == 2
    pretrain_job = out[out.index("rule pretrain:") :].split("\n\n")[0]
    assert "gpu=8" in pretrain_job
    assert "python -m equiav launch --gpus 8 --nodes 1 -- pretrain" in out
