"""The `equiav` command: one sub-command per pipeline stage, called by the Snakemake rules.

Rules pass file paths, and a data set's resolved config section as JSON (`--settings`),
so every command can also be run by hand on the same files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

Command = Callable[[argparse.Namespace], "int | None"]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a sub-command; ``arguments`` declares its options, the function runs it."""

    def register(run: Command) -> Command:
        _COMMANDS[name] = (run, arguments, help)
        return run

    return register


def _options(*names: str, settings: bool = False) -> Callable[[argparse.ArgumentParser], None]:
    """Required string options by name (``"--out"``), plus ``--settings`` when asked."""

    def declare(p: argparse.ArgumentParser) -> None:
        if settings:
            _settings(p)
        for name in names:
            p.add_argument(name, required=True)

    return declare


def _settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", type=json.loads, required=True, help="the data set's config section, as JSON")


def _validate_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", type=Path, help="the files given to snakemake's --configfile, in that order")
    p.add_argument(
        "--replace-workflow-config",
        action="store_true",
        help="leave out the workflow's config.yaml, as snakemake's option of that name does",
    )


@command(
    "validate-config",
    "check the configuration that `snakemake --configfile FILE...` runs with: the workflow's"
    " config.yaml, then the FILEs left to right, merged as Snakemake merges them",
    _validate_config_args,
)
def _validate_config(args: argparse.Namespace) -> int | None:
    from equiav.config import ConfigError, load_config

    try:
        config = load_config(*args.configs, workflow_config=not args.replace_workflow_config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"valid: run {', '.join(config['run'])}")


@command("demo-data", "generate the demo clips and their list", _options("--out-dir", settings=True))
def _demo_data(args: argparse.Namespace) -> None:
    from equiav.data.demo import DemoSettings, generate_demo

    generate_demo(args.out_dir, DemoSettings.from_config(args.settings))


def _fetch_args(p: argparse.ArgumentParser) -> None:
    _options("--url", "--out")(p)
    p.add_argument("--sha256", help="expected SHA-256 of the file")


@command("fetch", "download one file over HTTP (an official list), atomically", _fetch_args)
def _fetch(args: argparse.Namespace) -> None:
    from equiav.data.archives import fetch_url

    print(fetch_url(args.url, args.out, sha256=args.sha256))


def _fetch_archive_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="where to download the archive from")
    source.add_argument("--path", help="a local archive file (zip or tar[.gz]) to unpack instead")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--sha256", help="expected SHA-256 of the archive")


@command("fetch-archive", "download (or take a local file), check and unpack a data set archive", _fetch_archive_args)
def _fetch_archive(args: argparse.Namespace) -> None:
    from equiav.data.archives import fetch_archive, unpack_local_archive

    if args.path is not None:
        unpack_local_archive(args.path, args.out_dir, sha256=args.sha256)
    else:
        fetch_archive(args.url, args.out_dir, sha256=args.sha256)


def _manifest_args(p: argparse.ArgumentParser) -> None:
    _settings(p)
    p.add_argument("--out-dir", required=True, help="where manifest.csv, classes.csv and list_problems.csv go")
    p.add_argument("--shards-dir", required=True, help="where the per-shard clip lists go")


@command("manifest", "parse a data set's lists into its manifest, class table and shards", _manifest_args)
def _manifest(args: argparse.Namespace) -> None:
    from equiav.data.manifest import build_manifest

    build_manifest(args.settings, args.out_dir, args.shards_dir)


def _download_args(p: argparse.ArgumentParser) -> None:
    _settings(p)
    p.add_argument("--shard", required=True, help="the shard's clip list (CSV)")
    p.add_argument("--media-dir", required=True, help="where the shard's media and journal live")
    p.add_argument("--out", required=True, help="the shard's status rows (CSV)")


@command("download", "fetch the clips of one shard and record a status row per clip", _download_args)
def _download(args: argparse.Namespace) -> None:
    from equiav.data.download import DownloadSettings, download_shard

    settings = DownloadSettings.from_config(args.settings["download"], args.settings["modalities"])
    download_shard(args.shard, args.media_dir, args.out, settings)


def _features_args(p: argparse.ArgumentParser) -> None:
    _settings(p)
    p.add_argument("--downloads", required=True, help="the shard's download status rows (CSV)")
    p.add_argument("--out-h5", required=True)
    p.add_argument("--out-status", required=True, help="per-clip extraction status (CSV)")


@command("features", "extract fbank and frames of one shard into HDF5", _features_args)
def _features(args: argparse.Namespace) -> None:
    import pandas as pd

    from equiav.data.features import FeatureSettings, extract_shard

    f = args.settings["features"]
    settings = FeatureSettings(
        target_frames=f["target_frames"], num_frames=f["num_frames"], frame_size=f["frame_size"], jpeg_quality=f["jpeg_quality"]
    )
    downloads = pd.read_csv(args.downloads, dtype={"clip_id": str, "labels": str, "split": str, "file": str}, keep_default_na=False)
    for column in ("offset", "duration"):
        downloads[column] = pd.to_numeric(downloads[column], errors="coerce")
    statuses = extract_shard(downloads, Path(args.out_h5), settings, workers=f.get("workers", 1))
    Path(args.out_status).parent.mkdir(parents=True, exist_ok=True)
    statuses.to_csv(args.out_status, index=False)


def _availability_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--downloads", nargs="+", required=True, help="status CSVs of every download shard")
    p.add_argument("--features", nargs="+", required=True, help="status CSVs of every feature shard, in shard order")
    p.add_argument("--h5", nargs="+", required=True, help="HDF5 shards, in the same order as --features")
    p.add_argument("--out-dir", required=True)


@command("availability", "gather status rows into the usable-clip manifest and availability report", _availability_args)
def _availability(args: argparse.Namespace) -> None:
    from equiav.data.availability import gather, write_availability

    if len(args.features) != len(args.h5):
        raise SystemExit("--features and --h5 must list the same shards in the same order")
    status, usable = gather(args.manifest, args.downloads, args.features, args.h5)
    write_availability(args.dataset, status, usable, args.out_dir)


def _transient_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", type=Path, help="the workflow's results_dir (default config: results)")
    p.add_argument("--dataset", action="append", help="only this data set (repeatable; default: all)")


@command(
    "transient",
    "print the download status files of shards with transient clips, for `snakemake --forcerun`",
    _transient_args,
)
def _transient(args: argparse.Namespace) -> None:
    from equiav.data.availability import transient_shards

    pending = transient_shards(args.results_dir, args.dataset)
    for path in pending:
        print(path)
    shards = len(pending)
    logging.getLogger("equiav.transient").info(
        "%d transient clip(s) in %d shard(s)%s", sum(pending.values()), shards,
        ": `snakemake ... --forcerun <these files>` fetches them again" if shards else "",
    )  # fmt: skip


def _norm_args(p: argparse.ArgumentParser) -> None:
    _settings(p)
    p.add_argument("--usable", required=True, help="usable.csv from the availability stage")
    p.add_argument("--out", required=True)


@command("norm-stats", "measure fbank mean/std on the training split, beside the paper's constants", _norm_args)
def _norm_stats(args: argparse.Namespace) -> None:
    import pandas as pd

    from equiav.data.store import compute_norm_stats

    norm = args.settings["norm"]
    usable = pd.read_csv(args.usable, dtype=str, keep_default_na=False)
    measured = compute_norm_stats(sorted(set(usable["h5"])), norm["splits"])
    paper = {"mean": norm["mean"], "std": norm["std"]}
    chosen = measured if norm["use"] == "measured" else paper
    result = {
        "use": norm["use"],
        "mean": chosen["mean"],
        "std": chosen["std"],
        "measured": measured,
        "paper": paper,
        "splits": norm["splits"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.json files of fine-tuning and retrieval runs")
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-csv", required=True)


@command("summary", "gather every metric of a run beside its chance level", _summary_args)
def _summary(args: argparse.Namespace) -> None:
    from equiav.eval.summary import summary_markdown, summary_rows

    table = summary_rows(args.metrics)
    table.to_csv(args.out_csv, index=False)
    text = summary_markdown(table)
    Path(args.out_md).write_text(text)
    print(text)


# Stages with their own `main(argv)` (training, evaluation, embedding; "module:function" names
# another entry point): `equiav NAME ...` passes the rest of the command line through, so
# `equiav NAME --help` shows the stage's own options.
DELEGATED = {
    "launch": ("equiav.launch", "run a training command on the job's GPUs and nodes (torchrun, srun)"),
    "pretrain": ("equiav.train.pretrain", "pre-train EquiAV on HDF5 features (resumes from its work dir)"),
    "finetune": ("equiav.train.finetune", "fine-tune a pre-trained model and write its metrics"),
    "retrieval": ("equiav.eval.retrieval", "zero-shot audio-visual retrieval metrics of a pre-trained model"),
    "tables": ("equiav.eval.tables", "the paper's tables: our numbers beside the paper's"),
    "embed": ("equiav.embed:main_embed", "write audio and visual embeddings of video files (.npz)"),
    "retrieve": ("equiav.embed:main_retrieve", "rank a folder of clips by a query clip across modalities"),
    "report": ("equiav.eval.report", "pages and pictures for `snakemake --report`: curves, examples, Figure 3"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equiav", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (run, arguments, help) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        arguments(p)
        p.set_defaults(run=run)
    for name, (module, help) in DELEGATED.items():
        sub.add_parser(name, help=f"{help} (`equiav {name} --help`: {module})", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module, _, function = DELEGATED[argv[0]][0].partition(":")
        return getattr(importlib.import_module(module), function or "main")(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
