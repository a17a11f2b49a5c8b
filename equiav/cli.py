"""The `equiav` command: the user commands, and one sub-command per pipeline stage (called by
the Snakemake rules).

Rules pass file paths, and a data set's resolved config section as JSON (`--settings`), so every
stage can also be run by hand on the same files. One parser holds every command: `equiav X
--help` shows X's options with their defaults. Logging is set up here, once, for every command:
INFO to stderr (the rules send it to the rule's log), `-v` for DEBUG, `-q` for warnings only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from equiav.options import HelpFormatter, add_settings, read_settings, setup_logging

log = logging.getLogger("equiav.cli")

USER, STAGE = "user", "stage"
GROUP_TITLES = {
    USER: "user commands",
    STAGE: "workflow stages (run by the Snakemake rules; also by hand on the same files)",
}

Run = Callable[[argparse.Namespace], "int | None"]
Arguments = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    """A sub-command: its arguments and its body, as functions or as "module:function" names
    (imported only when that command runs, so that `equiav fetch` never imports torch)."""

    name: str
    group: str
    help: str
    arguments: Arguments | str
    run: Run | str

    def _resolve(self, target: Callable | str) -> Callable:
        if callable(target):
            return target
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self._resolve(self.arguments)(p)

    def runner(self) -> Run:
        return self._resolve(self.run)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Arguments, group: str = STAGE):
    """Register a sub-command defined here; ``arguments`` declares its options, the function runs it."""

    def register(run: Run) -> Run:
        COMMANDS[name] = Command(name, group, help, arguments, run)
        return run

    return register


def _module_command(name: str, group: str, help: str, module: str, prefix: str = "") -> None:
    """A sub-command whose options and body live in ``module`` (``add_{prefix}arguments``, ``run{_prefix}``)."""
    run = f"run_{prefix.rstrip('_')}" if prefix else "run"
    COMMANDS[name] = Command(name, group, help, f"{module}:add_{prefix}arguments", f"{module}:{run}")


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
    group=USER,
)
def _validate_config(args: argparse.Namespace) -> int | None:
    from equiav.config import ConfigError, load_config

    try:
        config = load_config(*args.configs, workflow_config=not args.replace_workflow_config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"valid: run {', '.join(config['run'])}")


def _demo_data_args(p: argparse.ArgumentParser) -> None:
    add_settings(p, "the config's demo section")
    p.add_argument("--out-dir", required=True, help="where the demo clips and their list go")


@command("demo-data", "generate the demo clips and their list", _demo_data_args)
def _demo_data(args: argparse.Namespace) -> None:
    from equiav.data.demo import DemoSettings, generate_demo

    generate_demo(args.out_dir, DemoSettings.from_config(args.settings))


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="where to download the file from")
    p.add_argument("--out", required=True, help="where the file goes")
    p.add_argument("--sha256", help="expected SHA-256 of the file (default: not checked)")


@command("fetch", "download one file over HTTP (an official list), atomically", _fetch_args)
def _fetch(args: argparse.Namespace) -> None:
    from equiav.data.archives import fetch_url

    path = fetch_url(args.url, args.out, sha256=args.sha256)
    log.info("fetched %s -> %s", args.url, path)
    print(path)


def _fetch_archive_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="where to download the archive from")
    source.add_argument("--path", help="a local archive file (zip or tar[.gz]) to unpack instead")
    p.add_argument("--out-dir", required=True, help="where the archive is unpacked")
    p.add_argument("--sha256", help="expected SHA-256 of the archive (default: not checked)")


@command("fetch-archive", "download (or take a local file), check and unpack a data set archive", _fetch_archive_args)
def _fetch_archive(args: argparse.Namespace) -> None:
    from equiav.data.archives import fetch_archive, unpack_local_archive

    if args.path is not None:
        unpack_local_archive(args.path, args.out_dir, sha256=args.sha256)
    else:
        fetch_archive(args.url, args.out_dir, sha256=args.sha256)


def _manifest_args(p: argparse.ArgumentParser) -> None:
    add_settings(p, "the data set's config section")
    p.add_argument("--out-dir", required=True, help="where manifest.csv, classes.csv and list_problems.csv go")
    p.add_argument("--shards-dir", required=True, help="where the per-shard clip lists go")


@command("manifest", "parse a data set's lists into its manifest, class table and shards", _manifest_args)
def _manifest(args: argparse.Namespace) -> None:
    from equiav.data.manifest import build_manifest

    build_manifest(args.settings, args.out_dir, args.shards_dir)
    shards = sorted(Path(args.shards_dir).glob("*.csv"))
    log.info("wrote the manifest to %s and %d shard list(s) to %s", args.out_dir, len(shards), args.shards_dir)


def _catalog_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, type=json.loads, help="the source's config entry (JSON)")
    p.add_argument("--out", required=True, help="the catalogue (CSV)")


@command("catalog", "list the media files or archive members of one source and the clips they serve", _catalog_args)
def _catalog(args: argparse.Namespace) -> None:
    from equiav.data.sources import Source, write_catalog

    write_catalog(Source(**args.source), args.out)
    log.info("wrote the catalogue of source %s to %s", args.source["name"], args.out)


def _download_args(p: argparse.ArgumentParser) -> None:
    add_settings(p, "the data set's config section")
    p.add_argument("--shard", required=True, help="the shard's clip list (CSV)")
    p.add_argument("--media-dir", required=True, help="where the shard's media and journal live")
    p.add_argument("--out", required=True, help="the shard's status rows (CSV)")


@command("download", "fetch the clips of one shard and record a status row per clip", _download_args)
def _download(args: argparse.Namespace) -> None:
    from equiav.data.download import DownloadSettings, download_shard
    from equiav.data.sources import parse_sources

    settings = DownloadSettings.from_config(args.settings["download"], args.settings["modalities"])
    sources = parse_sources("", args.settings, check_files=False)
    download_shard(args.shard, args.media_dir, args.out, settings, sources)
    log.info("wrote the status rows of %s to %s", args.shard, args.out)


def _features_args(p: argparse.ArgumentParser) -> None:
    add_settings(p, "the data set's config section")
    p.add_argument("--downloads", required=True, help="the shard's download status rows (CSV)")
    p.add_argument("--out-h5", required=True, help="the shard's features (HDF5)")
    p.add_argument("--out-status", required=True, help="per-clip extraction status (CSV)")


@command("features", "extract fbank and frames of one shard into HDF5", _features_args)
def _features(args: argparse.Namespace) -> None:
    import pandas as pd

    from equiav.data.features import FeatureSettings, extract_shard

    f = args.settings["features"]
    settings = FeatureSettings(
        target_frames=f["target_frames"],
        num_frames=f["num_frames"],
        frame_size=f["frame_size"],
        jpeg_quality=f["jpeg_quality"],
    )
    downloads = pd.read_csv(
        args.downloads, dtype={"clip_id": str, "labels": str, "split": str, "file": str}, keep_default_na=False
    )
    for column in ("offset", "duration"):
        downloads[column] = pd.to_numeric(downloads[column], errors="coerce")
    statuses = extract_shard(downloads, Path(args.out_h5), settings, workers=f.get("workers", 1))
    Path(args.out_status).parent.mkdir(parents=True, exist_ok=True)
    statuses.to_csv(args.out_status, index=False)
    log.info("wrote %d status row(s) to %s", len(statuses), args.out_status)


def _availability_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="the data set's name (shown in the report)")
    p.add_argument("--manifest", required=True, help="manifest.csv of the manifest stage")
    p.add_argument("--downloads", nargs="+", required=True, help="status CSVs of every download shard")
    p.add_argument("--features", nargs="+", required=True, help="status CSVs of every feature shard, in shard order")
    p.add_argument("--h5", nargs="+", required=True, help="HDF5 shards, in the same order as --features")
    p.add_argument("--out-dir", required=True, help="where status.csv, usable.csv and the availability report go")


@command("availability", "gather status rows into the usable-clip manifest and availability report", _availability_args)
def _availability(args: argparse.Namespace) -> None:
    from equiav.data.availability import gather, write_availability

    if len(args.features) != len(args.h5):
        raise SystemExit("--features and --h5 must list the same shards in the same order")
    status, usable = gather(args.manifest, args.downloads, args.features, args.h5)
    write_availability(args.dataset, status, usable, args.out_dir)
    log.info("%s: %d of %d listed clips usable -> %s", args.dataset, len(usable), len(status), args.out_dir)


def _transient_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", type=Path, help="the workflow's results_dir (default config: results)")
    p.add_argument("--dataset", action="append", help="only this data set (repeatable; default: all)")


@command(
    "transient",
    "print the download status files of shards with transient clips, for `snakemake --forcerun`",
    _transient_args,
    group=USER,
)
def _transient(args: argparse.Namespace) -> None:
    from equiav.data.availability import transient_shards

    pending = transient_shards(args.results_dir, args.dataset)
    for path in pending:
        print(path)
    shards = len(pending)
    log.info(
        "%d transient clip(s) in %d shard(s)%s", sum(pending.values()), shards,
        ": `snakemake ... --forcerun <these files>` fetches them again" if shards else "",
    )  # fmt: skip


def _check_splits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="manifest.csv of the run's data set")
    p.add_argument("--splits", type=read_settings, required=True, metavar="JSON", help="setting -> split names")
    p.add_argument("--config-key", required=True, help="the run's config key, e.g. finetune.esc50_audio")
    p.add_argument("--out", required=True, help="where the clips per split go (CSV)")


@command("check-splits", "check that every split a run reads has clips in the manifest", _check_splits_args)
def _check_splits(args: argparse.Namespace) -> None:
    from equiav.data.manifest import check_run_splits

    try:
        table = check_run_splits(args.manifest, args.splits, args.config_key)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    table.to_csv(args.out, index=False)
    log.info("%s reads %s", args.config_key, ", ".join(f"{r.split} ({r.clips} clips)" for r in table.itertuples()))


def _norm_args(p: argparse.ArgumentParser) -> None:
    add_settings(p, "the data set's config section")
    p.add_argument("--usable", required=True, help="usable.csv from the availability stage")
    p.add_argument("--out", required=True, help="where norm_stats.json goes")


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
    log.info(
        "fbank mean %.4f, std %.4f (%s; measured %.4f/%.4f, paper %.4f/%.4f) -> %s",
        result["mean"], result["std"], norm["use"], measured["mean"], measured["std"], paper["mean"], paper["std"],
        args.out,
    )  # fmt: skip


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.json files of fine-tuning and retrieval runs")
    p.add_argument("--out-md", required=True, help="where the summary table goes (Markdown)")
    p.add_argument("--out-csv", required=True, help="where the summary rows go (CSV)")


@command("summary", "gather every metric of a run beside its chance level", _summary_args)
def _summary(args: argparse.Namespace) -> None:
    from equiav.eval.summary import summary_markdown, summary_rows

    table = summary_rows(args.metrics)
    table.to_csv(args.out_csv, index=False)
    text = summary_markdown(table)
    Path(args.out_md).write_text(text)
    print(text)
    log.info("%d metric(s) of %d file(s) -> %s, %s", len(table), len(args.metrics), args.out_md, args.out_csv)


# Commands whose options and body live in their own modules (training, evaluation, embedding).
_module_command(
    "embed", USER, "write audio and visual embeddings of video files (.npz)", "equiav.embed_commands", "embed_"
)
_module_command(
    "retrieve", USER, "rank a folder of clips by a query clip across modalities", "equiav.embed_commands", "retrieve_"
)
_module_command("tables", USER, "the paper's tables: our numbers beside the paper's", "equiav.eval.tables")
_module_command(
    "report", USER, "pages and pictures for `snakemake --report`: curves, examples, Figure 3", "equiav.eval.report"
)
_module_command(
    "pretrain", STAGE, "pre-train EquiAV on HDF5 features (resumes from its work dir)", "equiav.train.pretrain"
)
_module_command(
    "import-model",
    STAGE,
    "a pre-trained model not trained here: the authors' release, MAE, or scratch",
    "equiav.train.imported",
)
_module_command("finetune", STAGE, "fine-tune a pre-trained model and write its metrics", "equiav.train.finetune")
_module_command(
    "retrieval", STAGE, "zero-shot audio-visual retrieval metrics of a pre-trained model", "equiav.eval.retrieval"
)
_module_command("launch", STAGE, "run a training command on the job's GPUs and nodes (torchrun, srun)", "equiav.launch")

# The order of `equiav --help`: user commands first, then the stages in pipeline order.
ORDER = (
    "embed", "retrieve", "validate-config", "transient", "tables", "report",
    "demo-data", "fetch", "fetch-archive", "catalog", "manifest", "check-splits", "download", "features",
    "availability", "norm-stats", "pretrain", "import-model", "finetune", "retrieval", "summary", "launch",
)  # fmt: skip


class _TopFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help keeps the command list's layout (two groups)."""


def _command_list() -> str:
    width = max(map(len, COMMANDS)) + 4
    lines = []
    for group, title in GROUP_TITLES.items():
        lines += ["", f"{title}:"]
        for name in ORDER:
            if COMMANDS[name].group == group:
                text = textwrap.wrap(COMMANDS[name].help, 100 - width)
                lines += [f"  {name:<{width - 2}}{text[0]}", *(" " * width + rest for rest in text[1:])]
    return "\n".join(lines[1:]) + "\n\n`equiav COMMAND --help` shows a command's options and their defaults."


def build_parser(populate: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The whole command tree. ``populate``: the commands whose options are declared (None: all);
    the others only have their name and help, which spares `equiav fetch` the imports of `equiav
    pretrain`."""
    wanted = set(ORDER if populate is None else populate)
    parser = argparse.ArgumentParser(
        prog="equiav",
        description="EquiAV: user commands, and the workflow's stages that the Snakemake rules run.",
        epilog=_command_list(),
        formatter_class=_TopFormatter,
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v", "--verbose", dest="verbosity", action="store_const", const=1, default=0, help="log DEBUG lines too"
    )
    verbosity.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, help="log warnings only")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of the commands below (default logging: INFO)"
    )
    for name in ORDER:
        spec = COMMANDS[name]
        # No help= here: the list is the epilog's two groups, not argparse's single one.
        p = sub.add_parser(name, description=spec.help, formatter_class=HelpFormatter)
        if name in wanted:
            spec.add_arguments(p)
            p.set_defaults(run=spec.runner())
    return parser


def _chosen(argv: Sequence[str]) -> str | None:
    """The sub-command of ``argv``: the top-level options take no value, so the first word."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _chosen(argv)
    args = build_parser(populate=[chosen] if chosen in COMMANDS else []).parse_args(argv)
    setup_logging(args.verbosity)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
