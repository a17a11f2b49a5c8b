# EquiAV end to end: official clip lists -> media -> features -> (training, evaluation, tables).
# Run the demo with `make demo`; paper runs add `--configfile workflow/presets/<preset>.yaml`.
import os

from snakemake.utils import min_version

from equiav.config import check_run_settings, validate_config

min_version("9.0")


# The workflow's own config.yaml (the demo's defaults), found beside this file: a bare
# "config.yaml" would be looked up in the working directory, and skipped without a word under
# --directory when --configfile is given. The --configfile files are merged on top, left to
# right (`python -m equiav validate-config` merges them the same way).
configfile: os.path.join(workflow.basedir, "config.yaml")


# `snakemake --report report.html` after a run: the tables, the data obtained, the curves and
# pictures (workflow/rules/report.smk), with this description on its front page.
report: "workflow/report/workflow.rst"


# The jobs find `python -m equiav` through PATH (see workflow/rules/common.smk).
envvars:
    "PATH",


# Fills defaults and stops with every bad key named before any job is planned.
validate_config(config)
check_run_settings(config)


include: "workflow/rules/common.smk"
include: "workflow/rules/lists.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
        report_targets(),
