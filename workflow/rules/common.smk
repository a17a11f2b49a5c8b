# Helpers shared by every stage: paths, resolved settings and the shard fan-out.
import json
import os
import re
import shlex
import sys
from pathlib import Path

# Rules run `python -m equiav`: put the Python that runs Snakemake first on the jobs' PATH, so
# a venv works without being activated (a conda env of `--sdm conda` is activated on top of it).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

from equiav.config import active_runs, run_splits
from equiav.data.archives import ArchiveError, archive_source
from equiav.data.sources import archive_files, parse_sources

RESULTS = config["results_dir"]
DATA = config["data_dir"]
REPORT = f"{RESULTS}/report"  # the report's pages and pictures (report.smk)


def warn_of_stale_locks():
    """Snakemake stops with LockException after a run of it was killed (SIGKILL, power loss),
    before any hook of the workflow runs (not even `onerror:`); parsing happens first, so the
    advice is given here. Not in jobs (they parse this file too) nor in the --unlock run."""
    locks = Path(".snakemake/locks")
    if workflow.remote_exec or workflow.subprocess_exec or "--unlock" in sys.argv or not locks.is_dir():
        return
    if any(locks.iterdir()):
        print(
            f"Note: {locks.resolve()} holds the locks of another Snakemake run in this directory. If none is"
            " running any more (it was killed), this run stops with LockException: run the same command once"
            " with --unlock added, then again as it was.",
            file=sys.stderr,
        )


warn_of_stale_locks()

GENERATED = [name for name, d in config["datasets"].items() if d.get("generate") == "demo"]


def dataset(name):
    return config["datasets"][name]


def archive_of(name):
    """("url" | "file" | "folder", where) of a data set's archive, for the data sets of this run;
    a missing `archive.path` stops the workflow here, before any job."""
    archive = dataset(name)["archive"]
    try:
        kind, where = archive_source(archive)
    except ArchiveError as e:
        raise ValueError(f"config key 'datasets.{name}.archive.path': {e}") from None
    if kind == "folder" and archive.get("sha256"):
        print(
            f"Note: datasets.{name}.archive.sha256 is not checked: {where} is a folder, used as it is.", file=sys.stderr
        )
    return kind, where


ARCHIVES = {n: archive_of(n) for n in config["run"] if "archive" in dataset(n)}
# Archives unpacked into <data_dir>/<dataset>/archive; a folder is used where it is.
ARCHIVED = [n for n, (kind, _) in ARCHIVES.items() if kind != "folder"]


# The data sets' sources (checked, files included, by validate_config before this).
SOURCES = {n: parse_sources(n, dataset(n), check_files=False) for n in config["run"]}


def catalog_file(name, number):
    return f"{DATA}/{name}/sources/{number}.csv"


def catalogued(name):
    """Numbers of the data set's sources that have a catalogue (all but youtube)."""
    return [i for i, s in enumerate(SOURCES.get(name, [])) if s.catalogued]


def catalog_inputs(wildcards):
    """What a catalogue is made from and must follow: an archive source's files, an index file."""
    source = SOURCES[wildcards.dataset][int(wildcards.number)]
    files = archive_files(source.path) if source.type == "archive" else []
    return files + ([source.index] if source.index else [])


def source_setting(wildcards):
    """The source's entry as `equiav catalog --source` takes it."""
    source = SOURCES[wildcards.dataset][int(wildcards.number)]
    return json.dumps({k: v for k, v in vars(source).items() if k != "catalog"}, sort_keys=True)


def archive_root(name):
    """The folder of a data set's unpacked archive."""
    kind, where = ARCHIVES[name] if name in ARCHIVES else archive_of(name)
    return os.path.normpath(where) if kind == "folder" else f"{DATA}/{name}/archive"


def archive_option(wildcards):
    """`equiav fetch-archive`'s source option: --url, or --path for a local archive file."""
    kind, where = ARCHIVES[wildcards.dataset]
    return f"--{'path' if kind == 'file' else 'url'} {shlex.quote(where)}"


def is_inside(path, folder):
    return path == folder or path.startswith(folder + os.sep)


def one_of(names):
    """A wildcard constraint matching exactly these names (and nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


def fetched_name(url, prefix):
    return f"{prefix}-{Path(url.split('?')[0]).name}"


def list_file(name, index, entry):
    """Where a `lists` entry lives: generated, inside the unpacked archive, local, or fetched."""
    d = dataset(name)
    if d.get("generate") == "demo":
        return f"{DATA}/{name}/generated/list.csv"
    if "path" in entry:
        return in_archive(name, entry["path"])
    return f"{DATA}/{name}/lists/{fetched_name(entry['url'], index)}"


def in_archive(name, path):
    """A configured path: relative ones are inside the data set's archive when it has one."""
    if "archive" in dataset(name) and not os.path.isabs(path):
        return os.path.normpath(os.path.join(archive_root(name), path))
    return path


def classes_file(name):
    classes = dataset(name).get("classes", {})
    if "path" in classes:
        return classes["path"]
    if "url" in classes:
        return f"{DATA}/{name}/lists/{fetched_name(classes['url'], 'classes')}"
    return None


def resolved(name):
    """The data set's config with every list and class path resolved, as the commands get it."""
    d = json.loads(json.dumps(dataset(name)))
    entries = d.get("lists") or [{"format": "user"}]
    d["lists"] = [{**e, "path": list_file(name, i, e)} for i, e in enumerate(entries)]
    for e in d["lists"]:
        if "audio_dir" in e:
            e["audio_dir"] = in_archive(name, e["audio_dir"])
    if classes_file(name):
        d["classes"]["path"] = classes_file(name)
    if name in SOURCES:
        d["sources"] = [
            {**vars(s), "catalog": catalog_file(name, i) if s.catalogued else None} for i, s in enumerate(SOURCES[name])
        ]
    return d


def settings(wildcards):
    return json.dumps(resolved(wildcards.dataset), sort_keys=True)


def url_of_fetched(wildcards):
    """The official URL behind a file under <data_dir>/<dataset>/lists/."""
    d = dataset(wildcards.dataset)
    for i, entry in enumerate(d.get("lists", [])):
        if "url" in entry and "path" not in entry and fetched_name(entry["url"], i) == wildcards.file:
            return entry["url"]
    classes = d.get("classes", {})
    if "url" in classes and "path" not in classes and fetched_name(classes["url"], "classes") == wildcards.file:
        return classes["url"]
    raise ValueError(f"no list of data set {wildcards.dataset!r} is fetched as {wildcards.file!r}")


def manifest_inputs(wildcards):
    name = wildcards.dataset
    inputs = {}
    if "archive" in dataset(name):
        inputs["archive"] = archive_root(name)
    for i, e in enumerate(resolved(name)["lists"]):
        # Lists inside the archive come with it; others (local or fetched) are inputs of their own.
        if "archive" not in dataset(name) or not is_inside(e["path"], archive_root(name)):
            inputs[f"list{i}"] = e["path"]
    if classes_file(name):
        inputs["classes"] = classes_file(name)
    for i in catalogued(name):
        inputs[f"catalog{i}"] = catalog_file(name, i)
    return inputs


def shard_names(name):
    """The shards the manifest checkpoint cut the data set into."""
    folder = checkpoints.manifest.get(dataset=name).output.shards
    return sorted(f[: -len(".csv")] for f in os.listdir(folder) if f.endswith(".csv"))


def per_shard(pattern, dataset_of=lambda wildcards: wildcards.dataset):
    """Input function: ``pattern`` formatted for every shard of the job's data set."""

    def inputs(wildcards):
        name = dataset_of(wildcards)
        return [pattern.format(dataset=name, shard=s) for s in shard_names(name)]

    return inputs


# The runs that take part (equiav.config.active_runs): pre-training runs whose data set is built,
# the imported models a fine-tuning or retrieval run uses, and those runs.
ACTIVE = active_runs(config)
PRETRAIN, IMPORTED, FINETUNE, RETRIEVAL = (ACTIVE[s] for s in ("trained", "imported", "finetune", "retrieval"))
SECTIONS = {"pretrain": PRETRAIN, "finetune": FINETUNE, "retrieval": RETRIEVAL}


def splits_check(section):
    """Input function: the check that the run's splits have clips in the manifest (rule check_splits)."""
    return lambda w: f"{RESULTS}/{section}/{w.run}/splits.csv"


def run_split_option(wildcards):
    """The run's splits by role, as `equiav check-splits --splits` takes them."""
    section = "trained" if wildcards.section == "pretrain" else wildcards.section
    return json.dumps(run_splits(section, SECTIONS[wildcards.section][wildcards.run]), sort_keys=True)


def dataset_inputs(name):
    """What every training or evaluation job reads of a data set."""
    return {
        "usable": f"{RESULTS}/{name}/usable.csv",
        "norm": f"{RESULTS}/{name}/norm_stats.json",
        "classes": f"{RESULTS}/{name}/classes.csv",
    }


def finetune_settings(run):
    """The run's recipe name and overrides, as `equiav finetune --settings` takes them."""
    return {"recipe": FINETUNE[run]["recipe"], **FINETUNE[run]["settings"]}


def launcher(resources):
    """`equiav launch` for a training job: one process, torchrun with one per GPU, or one
    torchrun per node under SLURM (equiav/launch.py).

    The job's shell ignores SLURM's stop signals first, so that it outlives training, which
    saves a checkpoint on them and exits (the shell would otherwise die first and take it along).
    """
    return f"trap '' TERM USR1; python -m equiav launch --gpus {resources['gpus']} --nodes {resources['nodes']} --"


def training_threads(runs):
    """Threads (the CPUs of each node) of a training rule over the runs table `runs`."""
    return lambda w: max(1, runs[w.run]["resources"]["gpus"]) * runs[w.run]["resources"]["cpus_per_gpu"]


def training_resources(runs):
    """Resources of a training rule over the runs table `runs` (`gpus` in the config counts per
    node). One node: `gpu`, SLURM's --gpus. Several: `gres` gpu:<gpus>, SLURM's --gres, which
    counts per node, so that every node gets its share (a job's total may land unevenly)."""
    of = lambda w: runs[w.run]["resources"]
    several = lambda w: of(w)["nodes"] > 1
    return {
        "gpu": lambda w: 0 if several(w) else of(w)["gpus"],
        "gres": lambda w: f"gpu:{of(w)['gpus']}" if several(w) and of(w)["gpus"] else "",
        "nodes": lambda w: of(w)["nodes"],
        "runtime": lambda w: of(w)["runtime"],
    }


def all_targets():
    targets = []
    for name in config["run"]:
        targets += [
            f"{RESULTS}/{name}/availability.md",
            f"{RESULTS}/{name}/norm_stats.json",
        ]
    targets += [f"{RESULTS}/pretrain/{run}/model.pt" for run in {**PRETRAIN, **IMPORTED}]
    targets += [f"{RESULTS}/finetune/{run}/metrics.json" for run in FINETUNE]
    targets += [f"{RESULTS}/retrieval/{run}/metrics.json" for run in RETRIEVAL]
    if FINETUNE or RETRIEVAL:
        targets.append(f"{RESULTS}/summary.md")
    # Also without any run: the tables then show the clips obtained beside the paper's numbers.
    targets.append(f"{RESULTS}/tables/tables.md")
    return targets


def report_targets():
    """Every page and picture of the report, so that a run makes them before `--report`
    (TABLE_KEYS: tables.smk)."""
    targets = [f"{REPORT}/availability/{name}.html" for name in config["run"]]
    targets += [f"{REPORT}/tables/{key}.html" for key in TABLE_KEYS]
    targets += [f"{REPORT}/pretrain/{run}.png" for run in PRETRAIN]
    if FINETUNE:
        targets.append(f"{REPORT}/finetune_curves.png")
    for run in RETRIEVAL:
        targets += [f"{REPORT}/retrieval/{run}_{d}.png" for d in ("v2a", "a2v")]
        targets.append(f"{REPORT}/qualitative/{run}.png")
    return targets
