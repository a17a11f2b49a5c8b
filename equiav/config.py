"""Loading and checking the pipeline configuration against its JSON schema.

The schema (``workflow/schemas/config.schema.yaml``) is the one description of every key;
this module fills its defaults and turns validation failures into messages that name the
key, the bad value and what is allowed.

Snakemake's ``snakemake.utils.validate(config, schema, set_default=True)`` cannot fill them:
it only fills a key whose own property schema has a ``default``, so a key given as a bare
``$ref`` stays missing (a data set without ``download`` or ``features``, as in the esc50 and
spc_v1 presets, and a pretrain, finetune or retrieval run without ``resources``), although
the definition it points to (``$defs/download``, ``$defs/features``, ``$defs/resources``)
has ``default: {}``. That is why this module fills the defaults itself, following ``$ref``;
they are still written only in the schema.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
# The workflow's own configuration (the demo), which the Snakefile loads before any --configfile.
WORKFLOW_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


class ConfigError(ValueError):
    """The configuration cannot be used; the message lists every problem found."""


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref are supported in the config schema, got {ref!r}")
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def _fill_defaults(instance: Any, schema: dict, root: dict) -> None:
    """Insert schema defaults into ``instance`` in place, following $ref (jsonschema does not)."""
    schema = _resolve(schema, root)
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            sub = _resolve(sub, root)
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                _fill_defaults(instance[key], sub, root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, value in instance.items():
                if key not in properties:
                    _fill_defaults(value, extra, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill_defaults(item, schema["items"], root)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _describe(error: jsonschema.ValidationError, root: dict) -> str:
    where = _key_path(error)
    schema = _resolve(error.schema, root) if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"config key {where!r}: unknown key(s) {', '.join(map(repr, unknown))}{hint}"
    alternatives = [sub.get("required") for sub in error.validator_value] if error.validator == "anyOf" else []
    if alternatives and all(len(keys or []) == 1 for keys in alternatives):
        keys = " or ".join(f"`{keys[0]}`" for keys in alternatives)
        return f"config key {where!r}: give {keys} ({' '.join(str(schema.get('description', '')).split())})"
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        return f"config key {where!r}: give exactly one of `lists` (clip lists) or `generate` (a data set the pipeline makes)"
    text = f"config key {where!r}: {error.message}"
    description = schema.get("description")
    if description:
        text += f" ({' '.join(str(description).split())})"
    return text


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Fill defaults into ``config`` (in place) and check it; raise ConfigError listing all problems."""
    schema = schema if schema is not None else load_schema()
    _fill_defaults(config, schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = [_describe(e, schema) for e in errors]
    problems += _semantic_problems(config) if not problems else []
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return config


def _semantic_problems(config: dict) -> list[str]:
    """Checks that need more than one key at a time."""
    problems = []
    datasets = config.get("datasets", {})
    for name in config.get("run", []):
        if name not in datasets:
            known = ", ".join(sorted(datasets)) or "none"
            problems.append(f"config key 'run': {name!r} is not defined under `datasets` (defined: {known})")
    problems += _pretrain_problems(config)
    for section in ("pretrain", "finetune", "retrieval"):
        for name, run in config.get(section, {}).items():
            if "dataset" in run and run["dataset"] not in datasets:
                problems.append(
                    f"config key '{section}.{name}.dataset': {run['dataset']!r} is not defined under `datasets`"
                )
            if section != "pretrain" and run["pretrained"] not in config.get("pretrain", {}):
                problems.append(
                    f"config key '{section}.{name}.pretrained': {run['pretrained']!r} is not a `pretrain` entry"
                )
    for name, dataset in datasets.items():
        if not all(ch.isalnum() or ch in "_-" for ch in name):
            problems.append(f"config key 'datasets.{name}': data set names may hold only letters, digits, '_' and '-'")
        for i, entry in enumerate(dataset.get("lists", [])):
            if "path" not in entry and "url" not in entry:
                problems.append(
                    f"config key 'datasets.{name}.lists.{i}': give `path` (a local file, or folder for speechcommands) or `url` (to fetch it)"
                )
            if entry["format"] == "audioset" and "split" not in entry:
                problems.append(
                    f"config key 'datasets.{name}.lists.{i}': an audioset list needs `split` (e.g. train or eval)"
                )
        classes = dataset.get("classes", {})
        if classes.get("format") in ("audioset", "vggsound_stat") and not ({"path", "url"} & set(classes)):
            problems.append(
                f"config key 'datasets.{name}.classes': give `path` or `url` for the {classes['format']} class list"
            )
        if name in config.get("run", []) and "generate" not in dataset:
            from equiav.data.sources import SourceError, parse_sources

            try:
                parse_sources(name, dataset)
            except SourceError as e:
                problems.append(str(e))
        features = dataset.get("features", {})
        if "video" in dataset.get("modalities", []) and features.get("num_frames") == 0:
            problems.append(
                f"config key 'datasets.{name}.features.num_frames': 0 frames but `modalities` includes video"
            )
        if "video" not in dataset.get("modalities", ["video"]) and features.get("num_frames", 0) > 0:
            problems.append(
                f"config key 'datasets.{name}.features.num_frames': an audio-only data set keeps no frames; set it to 0"
            )
    return problems


def _is_audio_only(config: dict, name: str) -> bool:
    return "video" not in config.get("datasets", {}).get(name, {}).get("modalities", ["audio", "video"])


def _pretrain_problems(config: dict) -> list[str]:
    """A `pretrain` entry trains (`dataset`, audio-visual) or imports (`import`), never both."""
    problems = []
    for name, run in config.get("pretrain", {}).items():
        key = f"config key 'pretrain.{name}"
        if ("dataset" in run) == ("import" in run):
            problems.append(
                f"{key}': give `dataset` (pre-train on that data set) or `import` (take the authors' release, "
                f"MAE weights or a random initialisation as it is), {'not both' if 'dataset' in run else 'one of them'}"
            )
        elif "import" in run and run.get("settings"):
            problems.append(
                f"{key}.settings': an imported model is not trained, so it has no pre-training settings; "
                "drop them (its size is `import.model`)"
            )
        elif "dataset" in run and _is_audio_only(config, run["dataset"]):
            problems.append(
                f"config key 'pretrain.{name}.dataset': data set {run['dataset']!r} is audio-only (modalities: "
                "[audio]) and EquiAV pre-trains on audio-visual clips; pre-train on an audio-visual data set, or "
                f"fine-tune {run['dataset']!r} from an imported model (`pretrain.<name>.import`, docs/training.md)"
            )
    return problems


def active_runs(config: dict) -> dict[str, dict[str, dict]]:
    """The runs this configuration makes, by section: `trained` and `imported` (the `pretrain`
    entries), `finetune`, `retrieval`.

    A run takes part only when its data set is built in this run (presets replace `run`, so the
    demo's runs, merged in from config.yaml, drop out by themselves) and its pre-trained model
    takes part; an imported model only when a fine-tuning or retrieval run uses it.
    """
    built = set(config.get("run", []))
    pretrain = config.get("pretrain", {})
    trained = {n: r for n, r in pretrain.items() if "dataset" in r and r["dataset"] in built}
    starts = set(trained) | {n for n, r in pretrain.items() if "import" in r}
    runs = {
        section: {
            n: r for n, r in config.get(section, {}).items() if r["dataset"] in built and r["pretrained"] in starts
        }
        for section in ("finetune", "retrieval")
    }
    used = {r["pretrained"] for section in runs.values() for r in section.values()}
    imported = {n: r for n, r in pretrain.items() if "import" in r and n in used}
    return {"trained": trained, "imported": imported, **runs}


def run_splits(section: str, run: dict) -> dict[str, list[str]]:
    """The splits a run reads, by the setting that names them: a pre-training run's `splits`,
    a fine-tuning run's `train_splits` and `eval_splits` or its cross-validation `folds`, a
    retrieval run's `split` (``section``: trained, finetune or retrieval, as in active_runs)."""
    from equiav.settings.finetune import FinetuneSettings
    from equiav.settings.pretrain import PretrainSettings

    if section == "trained":
        return {"splits": list(PretrainSettings.from_dict(run["settings"]).splits)}
    if section == "finetune":
        settings = FinetuneSettings.from_dict({"recipe": run["recipe"], **run["settings"]})
        if settings.folds:
            return {"folds": list(settings.folds)}
        return {"train_splits": list(settings.train_splits), "eval_splits": list(settings.eval_splits)}
    return {"split": [run["split"]]}


def _missing_file_problems(config: dict) -> list[str]:
    """Files that the runs of this configuration read and that are not there (relative paths are
    read in the workflow's working directory)."""
    problems = []
    active = active_runs(config)
    for name, run in active["imported"].items():
        path = run["import"].get("path")
        if path is not None and not Path(path).is_file():
            problems.append(
                f"config key 'pretrain.{name}.import.path': no file {path!r} (from {Path.cwd()}); give the "
                f"{'released checkpoint' if run['import']['type'] == 'release' else 'MAE weights file'}'s path"
            )
    for name, run in active["trained"].items():
        weights = run["settings"].get("mae_weights", "hub")
        if weights not in (None, "hub") and not Path(weights).is_file():
            problems.append(
                f"config key 'pretrain.{name}.settings.mae_weights': no file {weights!r} (from {Path.cwd()}); give "
                "the path of a local copy of timm's vit_base_patch16_224.mae weights, 'hub' (online) or null"
            )
    for name, run in active["retrieval"].items():
        if run["ids"] is not None and not Path(run["ids"]).is_file():
            problems.append(f"config key 'retrieval.{name}.ids': no file {run['ids']!r} (from {Path.cwd()})")
    return problems


def check_run_settings(config: dict) -> None:
    """Build the settings of every training and evaluation run and check them against their data
    sets and files, so that what the configuration alone decides stops the workflow at start-up
    rather than hours later, when the job finally runs (the splits a run reads are checked
    against the manifest, rule check_splits)."""
    from equiav.settings.finetune import FinetuneSettings
    from equiav.settings.pretrain import ImportSettings, PretrainSettings

    problems = []
    for name, run in config.get("pretrain", {}).items():
        try:
            if "import" in run:
                ImportSettings.from_dict(run["import"])
            else:
                PretrainSettings.from_dict(run["settings"])
        except (TypeError, ValueError, KeyError) as e:
            problems.append(f"config key 'pretrain.{name}.{'import' if 'import' in run else 'settings'}': {e}")
    for name, run in config.get("finetune", {}).items():
        try:
            settings = FinetuneSettings.from_dict({"recipe": run["recipe"], **run["settings"]})
        except (TypeError, ValueError, KeyError) as e:
            problems.append(f"config key 'finetune.{name}.settings': {e}")
            continue
        if settings.modality != "audio" and _is_audio_only(config, run["dataset"]):
            problems.append(
                f"config key 'finetune.{name}.settings.modality': {settings.modality!r} needs video, but data set "
                f"{run['dataset']!r} is audio-only; set modality: audio"
            )
    for name, run in config.get("retrieval", {}).items():
        if _is_audio_only(config, run["dataset"]):
            problems.append(
                f"config key 'retrieval.{name}.dataset': audio-visual retrieval needs video, but data set "
                f"{run['dataset']!r} is audio-only"
            )
    problems += _missing_file_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def load_config(*paths: str | Path, workflow_config: bool = True) -> dict:
    """The configuration `snakemake --configfile <paths>` runs with, validated.

    As Snakemake builds it: the user's files merged left to right, then laid over the workflow's
    own config.yaml (WORKFLOW_CONFIG; left out with ``workflow_config=False``, Snakemake's
    --replace-workflow-config). Merging is Snakemake's own: mappings are merged key by key,
    any other value (lists included) replaces the earlier one.
    """
    from snakemake.common.configfile import load_configfile
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import update_config

    given: dict = {}
    for path in paths:
        try:
            update_config(given, load_configfile(str(path)))
        except WorkflowError as e:  # neither YAML nor JSON, or not a mapping
            raise ConfigError(f"{path}: {e}") from None
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
    config = copy.deepcopy(given)
    if workflow_config:
        # Snakemake's `configfile:` directive: the workflow's file, then the given ones on top.
        update_config(config, load_configfile(str(WORKFLOW_CONFIG)))
        update_config(config, copy.deepcopy(given))
    validate_config(config)
    check_run_settings(config)
    return config
