"""Stage 1: a data set's lists -> one manifest, its class table, its problems, and its shards.

With `sources` configured, the shards also say which sources hold each clip (their
catalogues, equiav.data.sources) and are cut so that the clips of one archive go together.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from equiav.data import lists as L
from equiav.data.sources import describe_plan, parse_sources, plan_sources, read_catalog

log = logging.getLogger(__name__)


def read_classes(classes: dict) -> pd.DataFrame | None:
    """The class table named by a data set's `classes` config (None: derive from the lists)."""
    fmt = classes.get("format", "from_lists")
    if fmt == "audioset":
        return L.read_audioset_classes(classes["path"])
    if fmt == "vggsound_stat":
        return L.read_vggsound_classes(classes["path"])
    return None


def parse_list(entry: dict, classes: pd.DataFrame | None) -> tuple[L.ParsedList, pd.DataFrame | None]:
    """Parse one `lists` entry (its `path` already resolved); return it and any class table it defines."""
    fmt, path, split = entry["format"], entry["path"], entry.get("split")
    if not os.path.exists(path):
        raise L.ListError(
            f"list file {path} ({fmt}) does not exist; fix the list's `path` (a relative one is taken inside "
            "the data set's archive when it has one, else in the working directory), or give the list's "
            "`url` instead of its `path` to fetch it"
        )
    if fmt == "audioset":
        return L.read_audioset_segments(path, split, classes), None
    if fmt == "vggsound":
        return L.read_vggsound_list(path, classes), None
    if fmt == "vggsound_test":
        return L.read_vggsound_test_list(path, split or "test", classes), None
    if fmt == "esc50":
        audio_dir = entry.get("audio_dir") or _esc50_audio_dir(Path(path))
        return L.read_esc50(path, audio_dir)
    if fmt == "speechcommands":
        return L.read_speech_commands(path)
    if fmt == "msrvtt":
        return L.read_msrvtt(path, split), None
    if fmt == "user":
        return L.read_user_list(path, split), None
    raise ValueError(f"unknown list format {fmt!r}")


def _esc50_audio_dir(csv_path: Path) -> Path:
    """ESC-50 keeps audio/ beside meta/; a flat copy keeps it beside the CSV."""
    for candidate in (csv_path.parent / "audio", csv_path.parent.parent / "audio"):
        if candidate.is_dir():
            return candidate
    raise L.ListError(
        f"no audio/ folder beside or above {csv_path}; set the list's `audio_dir` to the folder of the audio "
        "files (a relative one is taken like the list's `path`)"
    )


def build_manifest(dataset: dict, out_dir: str | Path, shards_dir: str | Path) -> pd.DataFrame:
    """Write manifest.csv, classes.csv and list_problems.csv into ``out_dir`` and one CSV per shard."""
    out_dir, shards_dir = Path(out_dir), Path(shards_dir)
    classes = read_classes(dataset.get("classes", {}))
    parts = []
    for entry in dataset["lists"]:
        parsed, own_classes = parse_list(entry, classes)
        L.check_bad_fraction(parsed, entry["path"], dataset.get("max_bad_fraction", 0.01))
        log.info(
            "%s: %d rows read, %d kept, %d problems",
            entry["path"],
            parsed.rows_read,
            len(parsed.manifest),
            len(parsed.problems),
        )
        if own_classes is not None:
            if classes is not None and not own_classes.equals(classes):
                raise L.ListError(f"{entry['path']} defines classes that differ from those of the other lists")
            classes = own_classes
        parts.append(parsed)
    combined = L.combine_lists(parts, on_duplicate=dataset.get("on_duplicate", "error"))
    manifest = combined.manifest.reset_index(drop=True)
    if manifest.empty:
        # Not "see list_problems.csv": Snakemake deletes the outputs of a failed job.
        shown = "".join(f"\n  {p.file}:{p.line}: {p.problem}" for p in combined.problems[:10])
        more = len(combined.problems) - 10
        raise L.ListError(
            "the lists hold no usable clip; check each list's `path` and `format`. Rejected rows:"
            + shown
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    if classes is None:
        classes = L.classes_from_labels(label for labels in manifest["labels"] for label in labels.split(";"))

    out_dir.mkdir(parents=True, exist_ok=True)
    L.write_problems(combined.problems, out_dir / "list_problems.csv")
    classes.to_csv(out_dir / "classes.csv", index=False)
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    write_shards(with_sources(manifest, dataset), shards_dir, dataset["shard_size"])
    summary = manifest.groupby("split").size().to_dict()
    log.info(
        "manifest: %d clips (%s), %d classes, %d problems", len(manifest), summary, len(classes), len(combined.problems)
    )
    return manifest


def with_sources(manifest: pd.DataFrame, dataset: dict) -> pd.DataFrame:
    """The manifest in shard order with each clip's candidate sources (column ``candidates``),
    and what the plan means logged: clips per source, the YouTube share's wall time."""
    sources = parse_sources("", dataset, check_files=False)
    catalogs = {s.name: read_catalog(s.catalog) for s in sources if s.catalogued}
    for name, catalog in catalogs.items():
        for row in catalog[catalog["damage"] != ""].itertuples():
            log.warning(
                "source %s: %s is damaged after %s (%s): the clips it holds beyond that point are not known to it",
                name, row.container, row.member or "its start", row.damage,
            )  # fmt: skip
    plan = plan_sources(manifest, sources, catalogs)
    for line in describe_plan(plan, sources, dataset.get("download", {}).get("youtube_per_hour")):
        log.info("sources: %s", line)
    return manifest.assign(candidates=plan.candidates).iloc[plan.order].reset_index(drop=True)


def write_shards(manifest: pd.DataFrame, shards_dir: Path, shard_size: int) -> list[str]:
    """Cut the manifest into consecutive shards of ``shard_size`` clips: shards_dir/00000.csv, ..."""
    shards_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for number, first in enumerate(range(0, len(manifest), shard_size)):
        name = f"{number:05d}"
        manifest.iloc[first : first + shard_size].to_csv(shards_dir / f"{name}.csv", index=False)
        names.append(name)
    return names


def check_run_splits(manifest_path: str | Path, splits: dict[str, list[str]], run: str) -> pd.DataFrame:
    """The clips of the manifest in each split the run reads (columns setting, split, clips); a
    ValueError naming every split without a clip, the setting to fix and the splits there are.

    ``splits``: setting name -> split names (equiav.config.run_splits); ``run``: the run's config
    key (``finetune.esc50_audio``), for the message.
    """
    counts = pd.read_csv(manifest_path, usecols=["split"], dtype=str, keep_default_na=False)["split"].value_counts()
    rows = [(setting, split, int(counts.get(split, 0))) for setting, names in splits.items() for split in names]
    table = pd.DataFrame(rows, columns=["setting", "split", "clips"])
    empty = table[table["clips"] == 0]
    if not empty.empty:
        section = run.split(".", 1)[0]
        keys = sorted({f"{run}.{s}" if section == "retrieval" else f"{run}.settings.{s}" for s in empty["setting"]})
        present = ", ".join(f"{split} ({n})" for split, n in sorted(counts.items())) or "none"
        raise ValueError(
            f"{run} reads split(s) {', '.join(map(repr, empty['split']))}, but the manifest {manifest_path} has no "
            f"clip in them (its splits: {present}); fix config key {' / '.join(map(repr, keys))} to name splits "
            "of the list, or the list that should hold them"
        )
    return table
