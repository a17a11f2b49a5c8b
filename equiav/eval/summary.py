"""One table of every fine-tuning and retrieval metric of a run, each beside its chance level."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from equiav.eval.tables import start_of


def summary_rows(metric_files: list[str | Path]) -> pd.DataFrame:
    """Rows: run, start (the pre-train run it starts from), task, what, value, chance, value / chance
    (fine-tuning metric; retrieval R@1/5/10)."""
    rows = []
    for path in metric_files:
        path = Path(path)
        metrics = json.loads(path.read_text())
        run = path.parent.name
        start = (start_of(metrics) or ("",))[0]
        if metrics["task"] == "finetune":
            what = f"{metrics['modality']} {metrics['metric']}"
            rows.append((run, start, "finetune", what, metrics["value"], metrics["chance"]))
        elif metrics["task"] == "retrieval":
            for direction in ("v2a", "a2v"):
                for k in (1, 5, 10):
                    value = metrics[direction][f"R@{k}"]
                    rows.append((run, start, "retrieval", f"{direction} R@{k}", value, metrics[f"chance_r{k}"]))
        else:
            raise ValueError(f"{path}: unknown task {metrics['task']!r} (expected finetune or retrieval)")
    table = pd.DataFrame(rows, columns=["run", "start", "task", "what", "value", "chance"])
    table["x_chance"] = (table["value"] / table["chance"]).round(2)
    return table


def summary_markdown(table: pd.DataFrame) -> str:
    lines = [
        "# Results",
        "",
        "Each metric beside the score of a random guess (`chance`) and their ratio.",
        "",
        "| run | start | task | metric | value | chance | x chance |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples(index=False):
        lines.append(
            f"| {row.run} | {row.start} | {row.task} | {row.what} | {row.value:.3f} | {row.chance:.3f} | {row.x_chance} |"
        )
    return "\n".join(lines) + "\n"
