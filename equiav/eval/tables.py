"""Stage 8: the paper's tables, our numbers beside the paper's, from the runs' metric files.

Every cell of a table is tied to one metric of one run through the run names of the presets
(docs/tables.md lists them):

- Table 1: fine-tuning runs ``audioset_20k_<m>``, ``audioset_2m_<m>``, ``vggsound_<m>`` with
  ``<m>`` in audio, visual, audiovisual (workflow/presets/paper.yaml);
- Table 2: ``esc50_audio``, ``spc_v1_audio``;
- Table 3: retrieval runs ``audioset``, ``vggsound``, ``msrvtt``;
- Tables 4 to 8: pre-training / retrieval ``ablation_<variant>`` and fine-tuning
  ``ablation_<variant>_<m>`` (workflow/presets/ablation.yaml);
- a ``demo`` table: ``demo_<m>`` and retrieval ``demo`` (config.yaml), with no paper column.

A run named ``<name>-<tag>`` fills the cells of ``<name>`` too (``esc50_audio-mae``): a table row is
shown once per starting point of its runs (the pre-trained model a metrics file names: trained
here, the authors' release, MAE, scratch), labelled with it, so that one table compares them.
A metric file's run is the name of the folder it is in (``results/finetune/<run>/metrics.json``),
a data set's availability report is ``results/<dataset>/availability.csv``. Metrics are
fractions; the tables show percent (mAP x 100, accuracy %, R@k %) as the paper does. The main
Tables 1 to 3 are always written (with the paper's numbers and empty cells of ours when none of
their runs ran, as in the demo); another table none of whose runs has a metric file is not
written, and the index ``tables.md`` says so. The index also shows the clips obtained of every
data set given, so a data-only run (no metric file at all) gets a tables page too.

    equiav tables --results results --out-dir results/tables
    equiav tables --metrics results/finetune/*/metrics.json results/retrieval/*/metrics.json \
        --availability results/*/availability.csv --out-dir results/tables

Kept whole: each table's layout (rows, the run names that fill them, the paper's numbers beside)
and the code that fills and writes it are one contract: a run renamed in a preset or a row added
must be seen with the reader that looks for it. The paper's numbers are :mod:`paper_numbers`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from equiav.eval import paper_numbers as paper

log = logging.getLogger(__name__)

__all__ = [
    "ABLATION_VARIANTS",
    "MAIN_TABLES",
    "TABLES",
    "Cell",
    "Source",
    "TableResult",
    "TableSpec",
    "build_table",
    "load_availability",
    "load_metrics",
    "planned_tables",
    "table_files",
    "write_tables",
]

Task = Literal["finetune", "retrieval"]
MODALITIES: tuple[tuple[str, str], ...] = (("audio", "A"), ("visual", "V"), ("audiovisual", "A-V"))
OK_STATUS = "ok"
CELL_COLUMNS = ["table", "row", "column", "kind", "task", "run", "start", "paper", "ours", "difference"]
# How a row names its starting point (the `type` of the model's origin, equiav.train.checkpoint).
START_KINDS = {
    "pretrain": "pre-trained here",
    "release": "the authors' released checkpoint",
    "mae": "MAE ImageNet weights, no EquiAV pre-training",
    "scratch": "random initialisation, no pre-training",
}
CLIP_COLUMNS = ["dataset", "split", "what", "run", "clips"]


@dataclass(frozen=True)
class Source:
    """Where a cell's number comes from: one metric of one run's metrics.json.

    field: "value" for a fine-tuning run, "v2a R@1" (direction, recall) for a retrieval run.
    metric: the fine-tuning metric the cell expects ("map" or "accuracy"); a run that reports
        another stops the tables with an error, since its name then maps it to the wrong cell.
    """

    task: Task
    run: str
    dataset: str
    field: str = "value"
    metric: str | None = None


@dataclass(frozen=True)
class RowSpec:
    label: str
    paper: paper.Values
    sources: Mapping[str, Source] = field(default_factory=dict)  # column -> source; absent: not measured


@dataclass(frozen=True)
class TableSpec:
    key: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[RowSpec, ...]
    references: Mapping[str, paper.Values] = field(default_factory=dict)
    note: str = ""

    def sources(self) -> list[Source]:
        return [s for row in self.rows for s in row.sources.values()]

    def runs(self) -> set[tuple[str, str]]:
        """(task, run) of every run the table reads (a run ``<run>-<tag>`` fills the same cells)."""
        return {(s.task, s.run) for s in self.sources()}


def cell_run(run: str) -> str:
    """The run name whose cells a run fills: ``esc50_audio-mae`` fills ``esc50_audio``'s."""
    return run.partition("-")[0]


def start_of(data: Mapping[str, Any]) -> tuple[str, str] | None:
    """(pre-train run, origin type) of a metrics file; None for a file that names no model."""
    start = data.get("start")
    if isinstance(start, Mapping) and start.get("run"):
        return str(start["run"]), str(start.get("type", "pretrain"))
    if data.get("pretrained"):  # metrics written before starting points were recorded
        return Path(str(data["pretrained"])).parent.name, "pretrain"
    return None


def _row_label(label: str, start: tuple[str, str] | None) -> str:
    if start is None:
        return label
    run, kind = start
    return f"{label} · from {run} ({START_KINDS.get(kind, kind)})"


@dataclass(frozen=True)
class Cell:
    row: str
    column: str
    kind: Literal["ours", "reference"]
    task: str | None
    run: str | None
    paper: float | None
    ours: float | None
    start: str | None = None  # the pre-train run (trained or imported) the number comes from

    @property
    def difference(self) -> float | None:
        if self.paper is None or self.ours is None:
            return None
        return self.ours - self.paper


@dataclass
class TableResult:
    spec: TableSpec
    cells: list[Cell]
    clips: pd.DataFrame  # CLIP_COLUMNS
    missing_runs: list[str]
    missing_availability: list[str]

    def cells_frame(self) -> pd.DataFrame:
        rows = [
            (
                self.spec.key,
                c.row,
                c.column,
                c.kind,
                c.task,
                c.run,
                c.start,
                c.paper,
                _round(c.ours),
                _round(c.difference),
            )
            for c in self.cells
        ]
        return pd.DataFrame(rows, columns=CELL_COLUMNS)


# ---------------------------------------------------------------------------------------------
# The tables and the run names they read
# ---------------------------------------------------------------------------------------------


def _retrieval(run: str, dataset: str, column: str) -> Source:
    direction, recall = column.split()  # "V2A R@1"
    return Source("retrieval", run, dataset, f"{direction.lower()} {recall}")


def _ablation_sources(variant: str) -> dict[str, Source]:
    run = f"ablation_{variant}"
    sources = {c: _retrieval(run, "audioset", c) for c in ("V2A R@1", "A2V R@1")}
    for modality, short in MODALITIES:
        sources[f"{short} mAP"] = Source("finetune", f"{run}_{modality}", "audioset", metric="map")
    return sources


# Ablation variants: (table, paper row label, variant name, pre-training settings changed from
# the baseline). The baseline (the paper's model) is shared by every table's reference row.
ABLATION_VARIANTS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    (
        "table4",
        "invariant intra / clean inter",
        "intra_invariant",
        {"model": {"intra": "invariant", "inter_source": "clean"}},
    ),
    ("table4", "equivariant intra / clean inter", "inter_clean", {"model": {"inter_source": "clean"}}),
    ("table4", "equivariant intra / augmented inter", "inter_augmented", {"model": {"inter_source": "augmented"}}),
    (
        "table4",
        "equivariant intra / equivariant inter",
        "inter_equivariant",
        {"model": {"inter_source": "equivariant"}},
    ),
    ("table4", "equivariant intra / centroid inter", "baseline", {}),
    ("table5", "S = 1", "centroid_1", {"model": {"centroid_samples": 1}}),
    ("table5", "S = 4", "centroid_4", {"model": {"centroid_samples": 4}}),
    ("table5", "S = 8", "centroid_8", {"model": {"centroid_samples": 8}}),
    ("table5", "S = 16", "baseline", {}),
    ("table6", "Linear (EquiMod)", "predictor_linear", {"model": {"predictor": "linear"}}),
    ("table6", "Hypernetwork (SIE)", "predictor_hypernetwork", {"model": {"predictor": "hypernetwork"}}),
    ("table6", "Cross-attention (MHA)", "baseline", {}),
    ("table7", "Two-stage", "strategy_two_stage", {"strategy": "two_stage"}),
    ("table7", "Alternating iterative", "strategy_alternating", {"strategy": "alternating"}),
    ("table7", "Joint", "baseline", {}),
    ("table8", "positive excluded (EquiMod, Eq. A)", "loss_equimod", {"positive_in_denominator": False}),
    ("table8", "positive included (EquiAV, Eq. 9)", "baseline", {}),
)

_ABLATION_TITLES = {
    "table4": "Table 4: intra-modal invariance vs equivariance, and the inter-modal embedding",
    "table5": "Table 5: number of equivariant representations S for the centroid",
    "table6": "Table 6: transformation predictor architecture",
    "table7": "Table 7: training strategy",
    "table8": "Table 8: intra-modal equivariant loss",
}
_ABLATION_NOTE = (
    "Zero-shot retrieval R@1 on the AudioSet eval subset, fine-tuning mAP on AudioSet-20K; every row "
    "is its own pre-training (`ablation_<variant>`)."
)
_TABLE_NOTES = {
    "table4": " The inter-modal column's symbols are lost from the paper text: the rows are mapped as "
    "labelled (clean, augmented, single equivariant, centroid), see docs/tables.md.",
    "table6": " The similarity columns (cosine similarity of predicted and augmented embeddings, 0-1) "
    "are not measured by this project.",
    "table8": " The paper text this project has lost Table 8's values: the paper column is empty.",
}


def _paper_tables() -> tuple[TableSpec, ...]:
    t1_sources: dict[str, Source] = {}
    for recipe, dataset, label, metric in (
        ("audioset_20k", "audioset", "AudioSet-20K", "map"),
        ("audioset_2m", "audioset", "AudioSet-2M", "map"),
        ("vggsound", "vggsound", "VGGSound", "accuracy"),
    ):
        for modality, short in MODALITIES:
            t1_sources[f"{label} {short}"] = Source("finetune", f"{recipe}_{modality}", dataset, metric=metric)
    tables = [
        TableSpec(
            "table1",
            "Table 1: audio-visual event classification, fine-tuning",
            paper.COLUMNS["table1"],
            (RowSpec("EquiAV", paper.PAPER_EQUIAV["table1"]["EquiAV"], t1_sources),),
            paper.REFERENCE["table1"],
            "AudioSet: mAP; VGGSound: top-1 accuracy; A, V, A-V: audio, visual, audio-visual fine-tuning.",
        ),
        TableSpec(
            "table2",
            "Table 2: single-modal benchmarks, audio-branch fine-tuning",
            paper.COLUMNS["table2"],
            (
                RowSpec(
                    "EquiAV",
                    paper.PAPER_EQUIAV["table2"]["EquiAV"],
                    {
                        "ESC-50": Source("finetune", "esc50_audio", "esc50", metric="accuracy"),
                        "SPC-v1": Source("finetune", "spc_v1_audio", "spc_v1", metric="accuracy"),
                    },
                ),
            ),
            {},
            "Top-1 accuracy (ESC-50: mean of the 5 folds). The paper's reference rows of this table are "
            "not in the text this project reproduces from.",
        ),
    ]
    t3_rows = []
    for label, run in (("MSR-VTT", "msrvtt"), ("AudioSet", "audioset"), ("VGGSound", "vggsound")):
        sources = {c: _retrieval(run, run, c) for c in paper.COLUMNS["table3"]}
        t3_rows.append(RowSpec(f"{label} / EquiAV", paper.PAPER_EQUIAV["table3"][f"{label} / EquiAV"], sources))
    tables.append(
        TableSpec(
            "table3",
            "Table 3: zero-shot audio-visual retrieval",
            paper.COLUMNS["table3"],
            tuple(t3_rows),
            paper.REFERENCE["table3"],
            "Recall at 1, 5, 10 (%), video-to-audio and audio-to-video, on the subsets the retrieval runs "
            "draw (the paper: CAV-MAE's lists, 5 clips per class).",
        )
    )
    for key, title in _ABLATION_TITLES.items():
        columns = paper.COLUMNS[key]
        rows = tuple(
            RowSpec(label, paper.PAPER_EQUIAV[key][label], _ablation_sources(variant))
            for table, label, variant, _ in ABLATION_VARIANTS
            if table == key
        )
        tables.append(TableSpec(key, title, columns, rows, {}, _ABLATION_NOTE + _TABLE_NOTES.get(key, "")))
    demo_columns = tuple(f"{short} accuracy" for _, short in MODALITIES) + paper.COLUMNS["table3"]
    demo_sources = {
        f"{short} accuracy": Source("finetune", f"demo_{modality}", "demo", metric="accuracy")
        for modality, short in MODALITIES
    }
    demo_sources.update({c: _retrieval("demo", "demo", c) for c in paper.COLUMNS["table3"]})
    tables.append(
        TableSpec(
            "demo",
            "Demo: the generated data set (no paper numbers)",
            demo_columns,
            (RowSpec("EquiAV (tiny, demo)", (None,) * len(demo_columns), demo_sources),),
            {},
            "The demo's tiny model on the generated clips (config.yaml): the same cells as the paper's "
            "tables, with an empty paper column.",
        )
    )
    return tuple(tables)


TABLES: tuple[TableSpec, ...] = _paper_tables()
_BY_KEY = {t.key: t for t in TABLES}
# Written by every run, filled or not: the paper's results a reader compares against first.
MAIN_TABLES = ("table1", "table2", "table3")


def planned_tables(finetune_runs: Iterable[str], retrieval_runs: Iterable[str]) -> list[str]:
    """Keys of the tables written for these runs: the main tables and every table one of them fills."""
    present = {("finetune", cell_run(r)) for r in finetune_runs} | {("retrieval", cell_run(r)) for r in retrieval_runs}
    return [t.key for t in TABLES if t.key in MAIN_TABLES or t.runs() & present]


def table_files(out_dir: str | Path, key: str) -> list[Path]:
    """The files a written table consists of: cells CSV, clip counts CSV, Markdown."""
    out = Path(out_dir)
    return [out / f"{key}.csv", out / f"{key}_clips.csv", out / f"{key}.md"]


# ---------------------------------------------------------------------------------------------
# Reading the inputs
# ---------------------------------------------------------------------------------------------


def load_metrics(paths: Iterable[str | Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """(task, run) -> the metrics.json content; the run is the name of the file's folder."""
    metrics: dict[tuple[str, str], dict[str, Any]] = {}
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the metrics file: {e}") from e
        task = data.get("task")
        if task not in ("finetune", "retrieval"):
            raise ValueError(f"{path}: unknown task {task!r} (expected finetune or retrieval)")
        key = (task, path.parent.name)
        if key in metrics:
            raise ValueError(f"{path}: a second metrics file of {task} run {key[1]!r}")
        metrics[key] = data
    return metrics


def load_availability(paths: Iterable[str | Path]) -> dict[str, pd.DataFrame]:
    """Data set (the file's folder name) -> per split: listed, obtained (status ok) clips."""
    reports: dict[str, pd.DataFrame] = {}
    for path in map(Path, paths):
        table = pd.read_csv(path)
        missing = {"split", "status", "clips"} - set(table.columns)
        if missing:
            raise ValueError(f"{path}: not an availability report (no column {', '.join(sorted(missing))})")
        table = table[table["split"] != "all"]
        listed = table.groupby("split")["clips"].sum()
        obtained = table[table["status"] == OK_STATUS].groupby("split")["clips"].sum()
        reports[path.parent.name] = pd.DataFrame(
            {"listed": listed, "obtained": obtained.reindex(listed.index, fill_value=0)}
        ).astype(int)
    return reports


def _value(source: Source, data: Mapping[str, Any]) -> float:
    """The run's metric in percent."""
    if source.task == "finetune":
        if source.metric is not None and data.get("metric") != source.metric:
            raise ValueError(
                f"fine-tuning run {source.run!r} reports {data.get('metric')!r}, but its table cell expects "
                f"{source.metric!r}: the run name maps it to a cell of another metric (docs/tables.md)"
            )
        keys: tuple[str, ...] = ("value",)
    else:
        keys = tuple(source.field.split())  # ("v2a", "R@1")
    value: Any = data
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            raise ValueError(f"the metrics file of {source.task} run {source.run!r} has no {'/'.join(keys)!r}")
        value = value[key]
    return 100.0 * float(value)


def _fills(source: Source, task: str, run: str) -> bool:
    """Whether the metrics file of (task, run) fills the cell that ``source`` describes."""
    return task == source.task and cell_run(run) == source.run


def _filling(spec: TableSpec, metrics: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[tuple[str, str], Source]:
    """(task, run) of every metrics file that fills a cell of the table -> the cell's source."""
    return {(task, run): source for source in spec.sources() for task, run in metrics if _fills(source, task, run)}


def _clip_rows(spec: TableSpec, metrics: Mapping[tuple[str, str], Mapping[str, Any]],
               availability: Mapping[str, pd.DataFrame]) -> tuple[pd.DataFrame, list[str]]:  # fmt: skip
    rows: list[tuple[str, str, str, str, int]] = []
    datasets: dict[str, None] = {}
    used: dict[tuple[str, str], str] = {}
    for key, s in _filling(spec, metrics).items():
        datasets.setdefault(s.dataset)
        used.setdefault(key, s.dataset)
    missing = [d for d in datasets if d not in availability]
    # A data set obtained without a run yet (a data-only run) still shows its counts.
    for s in spec.sources():
        if s.dataset in availability:
            datasets.setdefault(s.dataset)
    for name in datasets:
        if name in availability:
            for split, counts in availability[name].iterrows():
                rows.append((name, str(split), "listed", "", int(counts["listed"])))
                rows.append((name, str(split), "obtained", "", int(counts["obtained"])))
    for (task, run), name in used.items():
        data = metrics[(task, run)]
        if task == "finetune":
            settings = data.get("settings", {})
            train = "+".join(settings.get("train_splits", ["train"]))
            evaluated = "+".join(settings.get("eval_splits", ["eval"]))
            if settings.get("folds"):
                train = evaluated = f"{train} ({len(settings['folds'])} folds)"
            rows.append((name, train, "train", run, int(data["train_clips"])))
            rows.append((name, evaluated, "eval", run, int(data["eval_clips"])))
        else:
            split = data.get("split") or "ids"
            rows.append((name, str(split), "retrieval", run, int(data["clips"])))
    return pd.DataFrame(rows, columns=CLIP_COLUMNS), missing


def _rows_by_start(row: RowSpec, metrics: Mapping[tuple[str, str], Mapping[str, Any]]
                   ) -> dict[tuple[str, str] | None, dict[str, str]]:  # fmt: skip
    """The row's runs grouped by starting point: start -> column -> the run that fills it."""
    by_start: dict[tuple[str, str] | None, dict[str, str]] = {}
    for column, source in row.sources.items():
        for task, run in sorted(key for key in metrics if _fills(source, *key)):
            start = start_of(metrics[(task, run)])
            earlier = by_start.setdefault(start, {}).get(column)
            if earlier is not None:
                raise ValueError(
                    f"{task} runs {earlier!r} and {run!r} both fill {row.label!r} / {column!r} from the same "
                    f"starting point {start[0] if start else '(none named)'!r}: drop one, or start it elsewhere"
                )
            by_start[start][column] = run
    return dict(sorted(by_start.items(), key=lambda item: _start_order(item[0])))


def _start_order(start: tuple[str, str] | None) -> tuple[int, str]:
    """Rows in the order of START_KINDS (trained here first), then by pre-train run."""
    if start is None:
        return -1, ""
    run, kind = start
    kinds = list(START_KINDS)
    return (kinds.index(kind) if kind in kinds else len(kinds)), run


def build_table(spec: TableSpec, metrics: Mapping[tuple[str, str], Mapping[str, Any]],
                availability: Mapping[str, pd.DataFrame]) -> TableResult | None:  # fmt: skip
    """The table's cells and clip counts, or None when none of its runs has a metric file
    (never for the main tables). A row is shown once per starting point of the runs filling it
    (once, with empty cells, when none has run)."""
    present = {(task, cell_run(run)) for task, run in metrics}
    if not spec.runs() & present and spec.key not in MAIN_TABLES:
        return None
    cells: list[Cell] = []
    for row in spec.rows:
        for start, runs in (_rows_by_start(row, metrics) or {None: {}}).items():
            label = _row_label(row.label, start)
            for column, paper_value in zip(spec.columns, row.paper):
                source = row.sources.get(column)
                run = runs.get(column, source.run if source else None)
                ours = None
                if source is not None and column in runs:
                    ours = _value(replace(source, run=run), metrics[(source.task, run)])
                task = source.task if source else None
                cells.append(Cell(label, column, "ours", task, run, paper_value, ours, start[0] if start else None))
    for label, values in spec.references.items():
        for column, paper_value in zip(spec.columns, values):
            cells.append(Cell(label, column, "reference", None, None, paper_value, None))
    clips, missing_availability = _clip_rows(spec, metrics, availability)
    missing_runs = sorted(f"{task} {run}" for task, run in spec.runs() - present)
    return TableResult(spec, cells, clips, missing_runs, missing_availability)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if abs(value) < 1.0 and value != 0 else f"{value:.1f}"


def _cell_text(cell: Cell) -> str:
    if cell.kind == "reference":
        return _number(cell.paper)
    if cell.task is None:
        return f"{_number(cell.paper)} / n.m."
    text = f"{_number(cell.paper)} / {_number(cell.ours)}"
    if cell.difference is not None:
        text += f" ({cell.difference:+.1f})"
    return text


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def table_markdown(result: TableResult) -> str:
    spec = result.spec
    by_row: dict[tuple[str, str], list[str]] = {}
    for cell in result.cells:
        by_row.setdefault((cell.kind, cell.row), []).append(_cell_text(cell))
    label = {"ours": "{}", "reference": "{} (reference)"}
    lines = [f"# {spec.title}", "", spec.note, ""]
    lines.append(
        "Each cell: the paper's number / ours (ours − paper), in percent; `–`: not given or no run; "
        "`n.m.`: not measured by this project. Reference rows: the methods the paper compares against."
    )
    lines += [""] + _markdown_table(
        ["row", *spec.columns], ([label[kind].format(row), *texts] for (kind, row), texts in by_row.items())
    )
    if result.missing_runs:
        lines += ["", "Runs without a metrics file (their cells are empty): " + ", ".join(result.missing_runs) + "."]
    lines += ["", "## Clips", ""]
    clips = result.clips
    got = clips[clips["what"].isin(["listed", "obtained"])]
    if not got.empty:
        wide = got.pivot_table(index=["dataset", "split"], columns="what", values="clips", aggfunc="sum")
        rows = [
            (
                d,
                s,
                str(int(r["listed"])),
                str(int(r["obtained"])),
                f"{100 * r['obtained'] / r['listed']:.1f}" if r["listed"] else "–",
            )  # fmt: skip
            for (d, s), r in wide.iterrows()
        ]
        lines += ["Obtained (features extracted) of the clips listed, per split:", ""]
        lines += _markdown_table(["data set", "split", "listed", "obtained", "obtained %"], rows) + [""]
    for name in result.missing_availability:
        lines += [f"No availability report for data set `{name}` was given.", ""]
    used = clips[~clips["what"].isin(["listed", "obtained"])]
    if not used.empty:
        lines += ["Used by each run:", ""]
        lines += _markdown_table(
            ["run", "data set", "split", "role", "clips"],
            ((r.run, r.dataset, r.split, r.what, str(r.clips)) for r in used.itertuples(index=False)),
        )
    return "\n".join(lines) + "\n"


def write_tables(metrics: Mapping[tuple[str, str], Mapping[str, Any]], availability: Mapping[str, pd.DataFrame],
                 out_dir: str | Path) -> dict[str, TableResult | None]:  # fmt: skip
    """Write every table with at least one run, and the index tables.md; returns key -> result
    (None: skipped). A skipped table's files left from an earlier call are removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, TableResult | None] = {}
    for spec in TABLES:
        result = build_table(spec, metrics, availability)
        results[spec.key] = result
        csv, clips_csv, md = table_files(out, spec.key)
        if result is None:
            for stale in (csv, clips_csv, md):
                stale.unlink(missing_ok=True)
            continue
        result.cells_frame().to_csv(csv, index=False)
        result.clips.to_csv(clips_csv, index=False)
        md.write_text(table_markdown(result))
    (out / "tables.md").write_text(index_markdown(results, availability))
    return results


def index_markdown(results: Mapping[str, TableResult | None],
                   availability: Mapping[str, pd.DataFrame] | None = None) -> str:  # fmt: skip
    """The index of the tables, and the clips obtained of every data set given (also those no
    table reads, and when no run has a metrics file yet: a data-only run)."""
    lines = ["# Tables", "", "The paper's tables with our numbers beside them (docs/tables.md).", ""]
    for key, result in results.items():
        spec = _BY_KEY[key]
        if result is None:
            runs = sorted(f"{task} {run}" for task, run in spec.runs())
            shown = ", ".join(runs[:3]) + (", ..." if len(runs) > 3 else "")
            lines.append(f"- {spec.title}: skipped, none of its {len(runs)} runs has a metrics file ({shown}).")
        else:
            measured = sum(1 for c in result.cells if c.ours is not None)
            lines.append(
                f"- [{spec.title}]({key}.md) ([cells]({key}.csv), [clips]({key}_clips.csv)): "
                f"{measured} cells measured, {len(result.missing_runs)} runs missing."
            )
    if availability:
        rows = [
            (
                name,
                str(split),
                str(int(r["listed"])),
                str(int(r["obtained"])),
                f"{100 * r['obtained'] / r['listed']:.1f}" if r["listed"] else "–",
            )  # fmt: skip
            for name, table in availability.items()
            for split, r in table.iterrows()
        ]
        lines += ["", "## Clips obtained", "", "Per data set and split (features extracted of the clips listed):", ""]
        lines += _markdown_table(["data set", "split", "listed", "obtained", "obtained %"], rows)
    return "\n".join(lines) + "\n"


def _discover(results_dir: Path) -> tuple[list[Path], list[Path]]:
    metrics = sorted(results_dir.glob("finetune/*/metrics.json")) + sorted(results_dir.glob("retrieval/*/metrics.json"))
    availability = sorted(results_dir.glob("*/availability.csv"))
    return metrics, availability


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``equiav tables``."""
    p.add_argument("--results", type=Path, help="results folder to find metrics and availability files in")
    # Zero files is a data-only run: the tables then hold the paper's numbers and the clip counts.
    p.add_argument("--metrics", nargs="*", type=Path, help="metrics.json files (default: found under --results)")
    p.add_argument("--availability", nargs="*", type=Path,
                   help="availability.csv files (default: found under --results)")  # fmt: skip
    p.add_argument("--out-dir", type=Path, required=True, help="where the tables go (results/tables)")


def run(args: argparse.Namespace) -> int:
    """The body of ``equiav tables``: 0 when written, 2 when a metrics file does not fit its table."""
    if args.results is None and args.metrics is None:
        print("equiav tables: give --results (a results folder) or --metrics (metrics.json files)", file=sys.stderr)
        return 2
    found_metrics, found_availability = _discover(args.results) if args.results else ([], [])
    metric_files = args.metrics if args.metrics is not None else found_metrics
    availability_files = args.availability if args.availability is not None else found_availability
    log.info("tables of %d metrics file(s) and %d availability report(s)", len(metric_files), len(availability_files))
    try:
        results = write_tables(load_metrics(metric_files), load_availability(availability_files), args.out_dir)
    except (ValueError, KeyError) as e:
        print(f"equiav tables: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    for key, result in results.items():
        if result is not None:
            measured = sum(1 for c in result.cells if c.ours is not None)
            files = ", ".join(path.name for path in table_files(out, key))
            log.info("%s: %d cells measured, %d runs missing -> %s", key, measured, len(result.missing_runs), files)
    written = [k for k, r in results.items() if r is not None]
    log.info("wrote %s and %d table(s) to %s: %s", out / "tables.md", len(written), out,
             ", ".join(written) or "none (no run of any table has metrics)")  # fmt: skip
    return 0
