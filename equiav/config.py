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
    for section in ("pretrain", "finetune", "retrieval"):
        for name, run in config.get(section, {}).items():
            if run["dataset"] not in datasets:
                problems.append(
                    f"config key '{section}.{name}.dataset': {run['dataset']!r} is not defined under `datasets`"
                )
            if section != "pretrain" and run["pretrained"] not in config.get("pretrain", {}):
                problems.append(
                    f"config key '{section}.{name}.pretrained': {run['pretrained']!r} is not a `pretrain` run"
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


def check_run_settings(config: dict) -> None:
    """Build the settings of every training and evaluation run, so a bad field stops the
    workflow at start-up rather than hours later, when its job finally runs."""
    from equiav.settings.finetune import FinetuneSettings
    from equiav.settings.pretrain import PretrainSettings

    problems = []
    for section, build in (
        ("pretrain", lambda run: PretrainSettings.from_dict(run["settings"])),
        ("finetune", lambda run: FinetuneSettings.from_dict({"recipe": run["recipe"], **run["settings"]})),
    ):
        for name, run in config.get(section, {}).items():
            try:
                build(run)
            except (TypeError, ValueError, KeyError) as e:
                problems.append(f"config key '{section}.{name}.settings': {e}")
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
