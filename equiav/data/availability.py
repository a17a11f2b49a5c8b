"""Stage 3: gather per-clip outcomes into the usable-clip manifest and the availability report.

A clip's outcome is its download status, replaced by its feature-extraction status when
the download succeeded: a clip is usable only when its features are in an HDF5 shard.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from equiav.data import status as st


class AvailabilityError(RuntimeError):
    """The status rows disagree with the manifest (a clip missing or recorded twice)."""


def _read(paths: list[str | Path], what: str) -> pd.DataFrame:
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False).assign(_from=str(p)) for p in paths]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["clip_id", "status", "_from"])
    twice = table["clip_id"][table["clip_id"].duplicated()]
    if len(twice):
        raise AvailabilityError(f"{len(twice)} clip(s) have more than one {what} row, e.g. {twice.iloc[0]!r}")
    return table


def gather(
    manifest_csv: str | Path,
    download_csvs: list[str | Path],
    feature_csvs: list[str | Path],
    feature_h5s: list[str | Path],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (one status row per manifest clip, the usable clips with their HDF5 shard).

    ``feature_csvs[i]`` and ``feature_h5s[i]`` are the outputs of the same feature job.
    """
    manifest = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False)
    downloads = _read(download_csvs, "download")
    features = _read(feature_csvs, "feature")
    h5_of = {str(c): str(h) for c, h in zip(feature_csvs, feature_h5s)}

    missing = set(manifest["clip_id"]) - set(downloads["clip_id"])
    extra = set(downloads["clip_id"]) - set(manifest["clip_id"])
    if missing or extra:
        raise AvailabilityError(
            f"download status rows do not match the manifest: {len(missing)} clip(s) without a row "
            f"(e.g. {sorted(missing)[:3]}), {len(extra)} row(s) for unknown clips (e.g. {sorted(extra)[:3]}); "
            "re-run the download shards (delete their status files to force it)"
        )
    if "source_name" not in downloads:  # status rows written before sources existed
        downloads["source_name"] = ""
    status = manifest[["clip_id", "split", "labels"]].merge(
        downloads[["clip_id", "source_name", "status", "detail"]], on="clip_id", how="left", validate="one_to_one"
    )
    status["stage"] = "download"
    extracted = features.set_index("clip_id")
    downloaded_ok = status["status"] == st.OK
    unseen = set(status.loc[downloaded_ok, "clip_id"]) - set(extracted.index)
    if unseen:
        raise AvailabilityError(
            f"{len(unseen)} downloaded clip(s) have no feature row (e.g. {sorted(unseen)[:3]}); re-run the feature shards"
        )
    ids = status.loc[downloaded_ok, "clip_id"]
    status.loc[downloaded_ok, "status"] = extracted.loc[ids, "status"].to_numpy()
    status.loc[downloaded_ok, "detail"] = extracted.loc[ids, "detail"].to_numpy()
    status.loc[downloaded_ok, "stage"] = "features"
    unknown = set(status["status"]) - set(st.VOCABULARY)
    if unknown:
        raise AvailabilityError(f"status rows hold values outside the vocabulary: {sorted(unknown)}")
    status["final"] = status["status"].isin(st.FINAL)

    usable_ids = status.loc[status["status"] == st.OK, "clip_id"]
    usable = manifest.set_index("clip_id").loc[usable_ids].reset_index()
    usable["h5"] = extracted.loc[usable_ids, "_from"].map(h5_of).to_numpy()
    columns = ["clip_id", "split", "labels", "source_name", "stage", "status", "final", "detail"]
    return status[columns], usable


def availability_table(status: pd.DataFrame) -> pd.DataFrame:
    """Counts per split and outcome (every vocabulary entry that occurs), with shares of the split."""
    counts = status.groupby(["split", "status"]).size().rename("clips").reset_index()
    totals = status.groupby("split").size()
    counts["share"] = (counts["clips"] / counts["split"].map(totals)).round(4)
    order = {s: i for i, s in enumerate(st.VOCABULARY)}
    counts = counts.sort_values(["split", "status"], key=lambda c: c.map(order) if c.name == "status" else c)
    overall = status.groupby("status").size().rename("clips").reset_index().assign(split="all")
    overall["share"] = (overall["clips"] / len(status)).round(4)
    overall = overall.sort_values("status", key=lambda c: c.map(order))
    return pd.concat([counts, overall], ignore_index=True)[["split", "status", "clips", "share"]]


def by_source_table(status: pd.DataFrame) -> pd.DataFrame:
    """Clips per source that decided them (rows) and outcome (columns), in vocabulary order."""
    wide = status.assign(source=status["source_name"].replace("", "-")).pivot_table(
        index="source", columns="status", values="clip_id", aggfunc="count", fill_value=0
    )
    return wide[[s for s in st.VOCABULARY if s in wide.columns]].astype(int)


def _markdown_table(wide: pd.DataFrame, first: str) -> list[str]:
    header = f"| {first} | " + " | ".join(map(str, wide.columns)) + " |"
    rule = "|" + "---|" * (len(wide.columns) + 1)
    return [header, rule] + ["| " + " | ".join(map(str, (key, *values))) + " |" for key, *values in wide.itertuples()]


def availability_markdown(dataset: str, table: pd.DataFrame, by_source: pd.DataFrame | None = None) -> str:
    """The report a reader sees beside the tables: per split, how many clips were obtained and why not."""
    wide = table.pivot_table(index="split", columns="status", values="clips", fill_value=0, aggfunc="sum").astype(int)
    wide = wide[[s for s in st.VOCABULARY if s in wide.columns]]
    wide = wide.loc[[s for s in wide.index if s != "all"] + ["all"]]  # the total last
    wide.insert(0, "listed", wide.sum(axis=1))
    ok = wide[st.OK] if st.OK in wide.columns else 0
    wide.insert(1, "obtained %", (100 * ok / wide["listed"]).round(1))
    transient = int(wide.loc["all", [s for s in wide.columns if s in st.VOCABULARY and s not in st.FINAL]].sum())
    lines = [
        f"# Availability of {dataset}",
        "",
        "Clips listed per split and what became of them. `ok` clips have features and are used;",
        "every other column is a reason from the fixed vocabulary (see docs/data.md). The ids",
        "obtained per split are in `obtained/<split>.txt` beside this file.",
        "",
        *_markdown_table(wide, "split"),
        "",
    ]
    if by_source is not None and len(by_source):
        lines += [
            "Per source: the source that decided each clip (it served the clip, or its outcome is the",
            "clip's; `none`: in no source). `detail` in `status.csv` names every source tried.",
            "",
            *_markdown_table(by_source, "source"),
            "",
        ]
    if transient:
        lines += [
            f"{transient} clip(s) failed for a passing reason (sign-in, rate-limited, other) and may still be had:",
            "run the workflow again with `--forcerun $(python -m equiav transient <results_dir>)` (docs/data.md).",
            "",
        ]
    return "\n".join(lines)


def transient_shards(results_dir: str | Path, datasets: list[str] | None = None) -> dict[Path, int]:
    """The download status files under ``results_dir`` whose shard holds transient clips
    (download or feature outcome not final), with how many: forcing these jobs again
    (``snakemake --forcerun``) retries exactly those clips, the final ones being skipped."""
    results_dir = Path(results_dir)
    pending: dict[Path, int] = {}
    for download in sorted(results_dir.glob("*/download/*.csv")):
        if datasets and download.parent.parent.name not in datasets:
            continue
        outcomes = pd.read_csv(download, dtype=str, keep_default_na=False).set_index("clip_id")["status"]
        extracted = download.parent.parent / "features" / download.name
        if extracted.exists():
            features = pd.read_csv(extracted, dtype=str, keep_default_na=False).set_index("clip_id")["status"]
            outcomes.update(features)  # a clip's outcome is its feature stage's once it was downloaded
        count = int((~outcomes.isin(st.FINAL)).sum())
        if count:
            pending[download] = count
    return pending


def write_availability(dataset: str, status: pd.DataFrame, usable: pd.DataFrame, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    (out_dir / "obtained").mkdir(parents=True, exist_ok=True)
    status.to_csv(out_dir / "status.csv", index=False)
    usable.to_csv(out_dir / "usable.csv", index=False)
    table = availability_table(status)
    table.to_csv(out_dir / "availability.csv", index=False)
    (out_dir / "availability.md").write_text(availability_markdown(dataset, table, by_source_table(status)))
    for split, ids in usable.groupby("split")["clip_id"]:
        (out_dir / "obtained" / f"{split}.txt").write_text("\n".join(ids) + "\n")
