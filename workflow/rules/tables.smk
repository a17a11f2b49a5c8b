# Stage 8: the paper's tables (ours beside the paper's numbers) under <results_dir>/tables/.
# The tables a run fills follow from its run names (equiav/eval/tables.py, docs/tables.md):
# the paper preset fills Tables 1-3, the ablation preset Tables 4-8, the demo the demo table.
from equiav.eval.tables import planned_tables, table_files

TABLES_DIR = f"{RESULTS}/tables"
TABLE_KEYS = planned_tables(FINETUNE, RETRIEVAL)


rule tables:
    input:
        metrics=[f"{RESULTS}/finetune/{run}/metrics.json" for run in FINETUNE]
        + [f"{RESULTS}/retrieval/{run}/metrics.json" for run in RETRIEVAL],
        availability=[f"{RESULTS}/{name}/availability.csv" for name in config["run"]],
    output:
        index=f"{TABLES_DIR}/tables.md",
        tables=[str(path) for key in TABLE_KEYS for path in table_files(TABLES_DIR, key)],
    log:
        f"{RESULTS}/logs/tables.log",
    conda:
        "../../envs/data.yaml"
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.index),
    shell:
        "python -m equiav tables --metrics {input.metrics} --availability {input.availability}"
        " --out-dir {params.out_dir} > {log} 2>&1"
