"""How long Snakemake takes to plan the paper presets' DAGs from full-size lists.

For each preset: the manifest checkpoint is run (parsing the lists and cutting the shards),
then `snakemake -n` is timed: that is the DAG a researcher waits for before any job starts.
Real lists are used where given (AudioSet balanced/eval and class list, VGGSound's list);
the rest are synthesised at their official sizes in the real formats.

    .venv/bin/python benchmarks/dag_build.py --audioset-dir ../shared/data/audioset
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from equiav.data import synthetic

REPO = Path(__file__).resolve().parents[1]
SIZES = {"balanced_train": 22_160, "eval": 20_371, "unbalanced_train": 2_041_789, "vggsound": 199_176}


def snakemake(*args: str) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout + proc.stderr


def audioset_lists(work: Path, real: Path | None) -> tuple[dict[str, str], str, dict[str, str]]:
    """Paths of the three AudioSet lists and the class list, and where each came from."""
    classes = real / "class_labels_indices.csv" if real else REPO / "tests/data/lists/audioset_class_labels_indices.csv"
    mids = pd.read_csv(classes)["mid"].tolist()
    paths, origin, first = {}, {}, 0
    for split, filename in (("balanced_train", "balanced_train_segments.csv"), ("eval", "eval_segments.csv"),
                            ("unbalanced_train", "unbalanced_train_segments.csv")):  # fmt: skip
        if real and (real / filename).exists():
            paths[split], origin[split] = str(real / filename), "real"
        else:
            path = work / filename
            path.write_text(synthetic.audioset_segments(SIZES[split], mids, first=first + 10_000_000))
            paths[split], origin[split] = str(path), "synthesised"
        first += SIZES[split]
    return paths, str(classes), origin


def preset_config(name: str, work: Path, lists: dict[str, str], classes: str | None) -> Path:
    preset = yaml.safe_load((REPO / "workflow/presets" / f"{name}.yaml").read_text())
    dataset = preset["datasets"][preset["run"][0]]
    for entry in dataset["lists"]:
        entry.pop("url", None)
        entry["path"] = lists[entry.get("split", "vggsound")]
    if classes:
        dataset["classes"] = {"format": "audioset", "path": classes}
    preset["results_dir"], preset["data_dir"] = str(work / name / "results"), str(work / name / "data")
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def measure(name: str, config: Path, origin: dict[str, str]) -> dict:
    manifest_s, _ = snakemake("--cores", "2", "--configfile", str(config), "--until", "manifest")
    dag_s, out = snakemake("-n", "--quiet", "rules", "--configfile", str(config))
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+(\d+)$", out, re.M) if m[1] != "total"}
    return {"preset": name, "lists": origin, "manifest_s": round(manifest_s, 1), "dry_run_s": round(dag_s, 1),
            "jobs": jobs, "total_jobs": sum(jobs.values())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audioset-dir", type=Path, help="folder with the official AudioSet CSVs")
    parser.add_argument("--vggsound-csv", type=Path, help="the official vggsound.csv")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/out/dag_build.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        audioset, classes, origin = audioset_lists(work, args.audioset_dir)
        results = [
            measure(
                "audioset_20k",
                preset_config("audioset_20k", work, audioset, classes),
                {k: v for k, v in origin.items() if k != "unbalanced_train"},
            ),  # fmt: skip
            measure("audioset_2m", preset_config("audioset_2m", work, audioset, classes), origin),
        ]
        if args.vggsound_csv:
            vggsound, vgg_origin = str(args.vggsound_csv), "real"
        else:
            labels = pd.read_csv(REPO / "tests/data/lists/vggsound_stat.csv", header=None)[0].tolist()
            vggsound, vgg_origin = str(work / "vggsound.csv"), "synthesised"
            Path(vggsound).write_text(synthetic.vggsound_list(SIZES["vggsound"], labels))
        results.append(
            measure("vggsound", preset_config("vggsound", work, {"vggsound": vggsound}, None), {"vggsound": vgg_origin})
        )
    print(f"{'preset':<14} {'manifest s':>10} {'dry-run s':>10} {'jobs':>7}  lists")
    for r in results:
        lists = ", ".join(f"{k} {v}" for k, v in r["lists"].items())
        print(f"{r['preset']:<14} {r['manifest_s']:>10} {r['dry_run_s']:>10} {r['total_jobs']:>7}  {lists}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
