"""Stage 8: the paper's tables from synthetic metric files, and the ablation preset's plan."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from equiav.cli import main as equiav_main
from equiav.eval import paper_numbers, tables

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "workflow" / "presets"


def finetune_metrics(
    results: Path, run: str, value: float, metric: str = "map", train: int = 100, evaluated: int = 40
) -> None:
    path = results / "finetune" / run / "metrics.json"
    path.parent.mkdir(parents=True)
    settings = {"train_splits": ["balanced_train"], "eval_splits": ["eval"], "folds": []}
    data = {"task": "finetune", "modality": "audio", "metric": metric, "value": value, "chance": 0.01,
            "train_clips": train, "eval_clips": evaluated, "settings": settings}  # fmt: skip
    path.write_text(json.dumps(data))


def retrieval_metrics(results: Path, run: str, r1: float, clips: int = 50) -> None:
    path = results / "retrieval" / run / "metrics.json"
    path.parent.mkdir(parents=True)
    recalls = {"R@1": r1, "R@5": 0.5, "R@10": 0.6}
    data = {"task": "retrieval", "split": "eval", "clips": clips, "v2a": recalls, "a2v": {**recalls, "R@1": r1 / 2},
            "chance_r1": 1 / clips, "chance_r5": 5 / clips, "chance_r10": 10 / clips}  # fmt: skip
    path.write_text(json.dumps(data))


def availability(results: Path, dataset: str) -> None:
    (results / dataset).mkdir(parents=True, exist_ok=True)
    (results / dataset / "availability.csv").write_text(
        "split,status,clips,share\n"
        "balanced_train,ok,90,0.9\nbalanced_train,unavailable,10,0.1\n"
        "eval,ok,45,0.9\neval,no-audio,5,0.1\n"
        "all,ok,135,0.9\nall,unavailable,10,0.0667\nall,no-audio,5,0.0333\n"
    )


def cell(frame: pd.DataFrame, row: str, column: str) -> pd.Series:
    match = frame[(frame["row"] == row) & (frame["column"] == column)]
    assert len(match) == 1, (row, column)
    return match.iloc[0]


def test_table1_values_differences_percent_and_clips(tmp_path):
    results = tmp_path / "results"
    finetune_metrics(results, "audioset_20k_audio", 0.40123)
    finetune_metrics(results, "vggsound_audiovisual", 0.70, metric="accuracy")
    availability(results, "audioset")
    out = tmp_path / "tables"
    assert equiav_main(["tables", "--results", str(results), "--out-dir", str(out)]) == 0

    frame = pd.read_csv(out / "table1.csv")
    a = cell(frame, "EquiAV", "AudioSet-20K A")
    assert a["run"] == "audioset_20k_audio" and a["paper"] == 42.4
    assert a["ours"] == pytest.approx(40.12) and a["difference"] == pytest.approx(40.123 - 42.4, abs=0.01)
    assert cell(frame, "EquiAV", "VGGSound A-V")["ours"] == pytest.approx(70.0)
    assert cell(frame, "EquiAV", "VGGSound A-V")["difference"] == pytest.approx(70.0 - 67.1)
    assert pd.isna(cell(frame, "EquiAV", "AudioSet-2M A")["ours"])  # no run: empty, not zero
    reference = cell(frame, "MAViL (Huang et al., 2023)", "AudioSet-20K A")
    assert reference["kind"] == "reference" and reference["paper"] == 41.8 and pd.isna(reference["ours"])
    assert pd.isna(cell(frame, "GBlend (Wang et al., 2020)", "VGGSound A")["paper"])  # "-" in the paper

    clips = pd.read_csv(out / "table1_clips.csv")
    got = clips[(clips["dataset"] == "audioset") & (clips["split"] == "balanced_train")].set_index("what")["clips"]
    assert got["listed"] == 100 and got["obtained"] == 90
    used = clips[clips["run"] == "audioset_20k_audio"].set_index("what")["clips"]
    assert used["train"] == 100 and used["eval"] == 40
    # vggsound has no availability report: said in the Markdown, not an error
    md = (out / "table1.md").read_text()
    assert "42.4 / 40.1 (-2.3)" in md and "No availability report for data set `vggsound`" in md
    assert "| audioset | balanced_train | 100 | 90 | 90.0 |" in md


def test_retrieval_table_and_skipped_tables(tmp_path):
    results = tmp_path / "results"
    retrieval_metrics(results, "audioset", 0.31)
    out = tmp_path / "tables"
    assert equiav_main(["tables", "--metrics", str(results / "retrieval/audioset/metrics.json"),
                        "--availability", "--out-dir", str(out)]) == 0  # fmt: skip
    frame = pd.read_csv(out / "table3.csv")
    assert cell(frame, "AudioSet / EquiAV", "V2A R@1")["ours"] == pytest.approx(31.0)
    assert cell(frame, "AudioSet / EquiAV", "A2V R@1")["ours"] == pytest.approx(15.5)
    assert cell(frame, "AudioSet / EquiAV", "A2V R@1")["difference"] == pytest.approx(15.5 - 29.6)
    assert pd.isna(cell(frame, "VGGSound / EquiAV", "V2A R@1")["ours"])
    assert cell(frame, "MSR-VTT / CAV-MAE", "A2V R@1")["paper"] == 7.6
    # The main tables are always written; another table only when one of its runs ran.
    written = {p.name for p in out.iterdir()}
    assert written == {"tables.md"} | {f"{key}{end}" for key in tables.MAIN_TABLES
                                       for end in (".csv", "_clips.csv", ".md")}  # fmt: skip
    table1 = pd.read_csv(out / "table1.csv")
    assert table1["ours"].isna().all() and table1["paper"].notna().any()
    assert "Runs without a metrics file" in (out / "table1.md").read_text()
    index = (out / "tables.md").read_text()
    assert "Table 4" in index and "skipped" in index
    assert "[Table 3: zero-shot audio-visual retrieval](table3.md)" in index

    # a later call without the run empties the cells it no longer fills
    finetune_metrics(results, "esc50_audio", 0.9, metric="accuracy")
    assert equiav_main(["tables", "--results", str(results), "--metrics", str(results / "finetune/esc50_audio/metrics.json"),
                        "--out-dir", str(out)]) == 0  # fmt: skip
    assert pd.read_csv(out / "table3.csv")["ours"].isna().all()
    assert cell(pd.read_csv(out / "table2.csv"), "EquiAV", "ESC-50")["difference"] == pytest.approx(90.0 - 96.0)


def test_demo_table_has_an_empty_paper_column(tmp_path):
    results = tmp_path / "results"
    finetune_metrics(results, "demo_audio", 0.75, metric="accuracy")
    retrieval_metrics(results, "demo", 0.25)
    out = tmp_path / "tables"
    assert equiav_main(["tables", "--results", str(results), "--out-dir", str(out)]) == 0
    frame = pd.read_csv(out / "demo.csv")
    assert frame["paper"].isna().all()
    assert cell(frame, "EquiAV (tiny, demo)", "A accuracy")["ours"] == pytest.approx(75.0)
    assert pd.isna(cell(frame, "EquiAV (tiny, demo)", "A accuracy")["difference"])


def test_errors_name_the_problem(tmp_path, capsys):
    results = tmp_path / "results"
    finetune_metrics(results, "audioset_20k_audio", 0.4, metric="accuracy")  # the cell is mAP
    assert equiav_main(["tables", "--results", str(results), "--out-dir", str(tmp_path / "t")]) == 2
    assert "audioset_20k_audio" in capsys.readouterr().err
    bad = tmp_path / "bad" / "x" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"task": "pretrain"}))
    with pytest.raises(ValueError, match="unknown task"):
        tables.load_metrics([bad])


def test_ablation_tables_read_the_ablation_runs(tmp_path):
    results = tmp_path / "results"
    finetune_metrics(results, "ablation_baseline_audiovisual", 0.45)
    retrieval_metrics(results, "ablation_centroid_4", 0.28)
    out = tmp_path / "tables"
    written = tables.write_tables(tables.load_metrics(sorted(results.glob("*/*/metrics.json"))), {}, out)
    assert {k for k, r in written.items() if r is not None} == {"table4", "table5", "table6", "table7", "table8",
                                                                *tables.MAIN_TABLES}  # fmt: skip
    t5 = pd.read_csv(out / "table5.csv")
    assert cell(t5, "S = 4", "V2A R@1")["ours"] == pytest.approx(28.0)
    assert cell(t5, "S = 16", "A-V mAP")["ours"] == pytest.approx(45.0)
    assert cell(t5, "S = 16", "A-V mAP")["difference"] == pytest.approx(45.0 - 46.6)
    t8 = pd.read_csv(out / "table8.csv")
    assert t8["paper"].isna().all()  # not in the paper text: empty, never invented
    t6 = pd.read_csv(out / "table6.csv")
    assert cell(t6, "Linear (EquiMod)", "Similarity A")["paper"] == 0.85
    assert pd.isna(cell(t6, "Linear (EquiMod)", "Similarity A")["run"])  # not measured


def test_paper_numbers_match_the_spec():
    """method.md section 9 against the EquiAV rows."""
    assert paper_numbers.PAPER_EQUIAV["table1"]["EquiAV"] == (42.4, 25.7, 46.6, 49.1, 30.1, 54.6, 61.0, 50.7, 67.1)
    assert paper_numbers.PAPER_EQUIAV["table2"]["EquiAV"] == (96.0, 97.8)
    assert paper_numbers.PAPER_EQUIAV["table3"]["VGGSound / EquiAV"] == (28.5, 51.5, 61.7, 28.4, 51.8, 62.3)


def ablation_runs() -> set[str]:
    return {variant for _, _, variant, _ in tables.ABLATION_VARIANTS}


def test_ablation_preset_plans_every_run_tables_4_to_8_need(tmp_path):
    """13 variants (the baseline shared): 13 pre-trainings, fine-tunings and retrievals, no more."""
    assert len(ablation_runs()) == 13
    snakefile = REPO / "Snakefile"
    if "tables.smk" not in snakefile.read_text():  # until the Snakefile includes the rule
        snakefile = tmp_path / "Snakefile"
        snakefile.write_text(f'include: "{REPO / "Snakefile"}"\ninclude: "{REPO / "workflow/rules/tables.smk"}"\n')
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "-n", "-p",
        "--configfile", str(PRESETS / "audioset_20k.yaml"), str(PRESETS / "ablation.yaml"),
        "--config", f"results_dir={tmp_path}/results", f"data_dir={tmp_path}/data",
        "--", "all", f"{tmp_path}/results/tables/tables.md",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if re.fullmatch(r"\w+\s+\d+", line)}
    assert counts["pretrain"] == 13 and counts["finetune"] == 13 and counts["retrieval"] == 13
    assert counts["tables"] == 1
    planned = set(re.findall(r"results/pretrain/(\w+)/model\.pt", out))
    assert planned == {f"ablation_{v}" for v in ablation_runs()}
    needed = {run for key in ("table4", "table5", "table6", "table7", "table8")
              for task, run in next(t for t in tables.TABLES if t.key == key).runs()
              if run.endswith("_audiovisual") or task == "retrieval"}  # fmt: skip
    assert set(re.findall(r"results/(?:finetune|retrieval)/(\w+)/metrics\.json", out)) == needed
    for key in ("table1", "table4", "table8"):
        assert f"results/tables/{key}.md" in out
    assert "results/tables/demo.md" not in out


def test_a_data_only_run_writes_the_tables_with_its_clips(tmp_path):
    """No metrics file at all (the `tables` rule then passes an empty --metrics): the main tables
    with the paper's numbers and empty cells, and the clips obtained of every data set."""
    results = tmp_path / "results"
    availability(results, "audioset")
    availability(results, "mine")  # a user's data set, which no table reads
    out = tmp_path / "tables"
    files = [str(results / name / "availability.csv") for name in ("audioset", "mine")]
    assert equiav_main(["tables", "--metrics", "--availability", *files, "--out-dir", str(out)]) == 0
    index = (out / "tables.md").read_text()
    assert "| audioset | balanced_train | 100 | 90 | 90.0 |" in index and "| mine | eval | 50 | 45 | 90.0 |" in index
    cells = pd.read_csv(out / "table1.csv")
    assert cells["ours"].isna().all() and cells["paper"].notna().any()
    assert "| audioset | eval | 50 | 45 | 90.0 |" in (out / "table1.md").read_text()
    assert not (out / "demo.md").exists()


def started(results: Path, task: str, run: str, start: str, kind: str) -> None:
    """Add the starting point a metrics file of the workflow names."""
    path = results / task / run / "metrics.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "start": {"run": start, "type": kind}}))


def test_a_row_per_starting_point_in_the_order_of_the_kinds(tmp_path):
    results = tmp_path / "results"
    for run, start, kind, value in (
        ("audioset_20k_audio-mae", "mae", "mae", 0.20),
        ("audioset_20k_audio", "equiav", "pretrain", 0.41),
        ("audioset_20k_visual-released", "released", "release", 0.25),
        ("audioset_20k_audio-released", "released", "release", 0.40),
    ):
        finetune_metrics(results, run, value)
        started(results, "finetune", run, start, kind)
    retrieval_metrics(results, "vggsound-released", 0.1)
    started(results, "retrieval", "vggsound-released", "released", "release")
    out = tmp_path / "tables"
    assert equiav_main(["tables", "--results", str(results), "--out-dir", str(out)]) == 0
    frame = pd.read_csv(out / "table1.csv")
    ours = frame[frame["kind"] == "ours"]
    assert list(dict.fromkeys(ours["start"])) == ["equiav", "released", "mae"]
    released = "EquiAV · from released (the authors' released checkpoint)"
    assert cell(frame, released, "AudioSet-20K A")["ours"] == pytest.approx(40.0)
    assert cell(frame, released, "AudioSet-20K V")["run"] == "audioset_20k_visual-released"
    assert pd.isna(cell(frame, released, "AudioSet-20K A-V")["ours"])
    assert cell(frame, "EquiAV · from mae (MAE ImageNet weights, no EquiAV pre-training)", "AudioSet-20K A")[
        "difference"
    ] == pytest.approx(20.0 - 42.4)
    assert cell(frame, "EquiAV · from equiav (pre-trained here)", "AudioSet-20K A")["ours"] == pytest.approx(41.0)
    # Table 3: a row with a run shows its start; rows without any run keep their plain label, once.
    t3 = pd.read_csv(out / "table3.csv")
    labels = list(dict.fromkeys(t3[t3["kind"] == "ours"]["row"]))
    assert labels == ["MSR-VTT / EquiAV", "AudioSet / EquiAV", f"VGGSound / {released}"]
    assert cell(t3, f"VGGSound / {released}", "V2A R@1")["ours"] == pytest.approx(10.0)
    assert "table1" in tables.planned_tables(["audioset_20k_audio-mae"], [])


def test_two_runs_of_one_cell_from_one_model_are_refused(tmp_path, capsys):
    results = tmp_path / "results"
    for run in ("esc50_audio-a", "esc50_audio-b"):
        finetune_metrics(results, run, 0.9, metric="accuracy")
        started(results, "finetune", run, "released", "release")
    assert equiav_main(["tables", "--results", str(results), "--out-dir", str(tmp_path / "t")]) == 2
    assert "finetune runs 'esc50_audio-a' and 'esc50_audio-b' both fill 'EquiAV' / 'ESC-50'" in capsys.readouterr().err
