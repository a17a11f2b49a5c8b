# EquiAV end to end: official clip lists -> media -> features -> (training, evaluation, tables).
# Run the demo with `make demo`; paper runs add `--configfile workflow/presets/<preset>.yaml`.
from snakemake.utils import min_version

from equiav.config import check_run_settings, validate_config

min_version("9.0")


configfile: "config.yaml"


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
    input:
        all_targets(),
        report_targets(),
    default_target: True
