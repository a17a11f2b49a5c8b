# Stage 8 (continued): the pages and pictures that `snakemake --report` gathers beside the
# rule graph; captions in workflow/report/. The report shows HTML and images, not Markdown,
# so the tables and availability reports are converted to HTML pages.


rule availability_page:
    input:
        f"{RESULTS}/{{dataset}}/availability.md",
    output:
        report(
            f"{REPORT}/availability/{{dataset}}.html",
            caption="../report/availability.rst",
            category="Data",
            labels={"data set": "{dataset}"},
        ),
    log:
        f"{RESULTS}/logs/report/availability_{{dataset}}.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m equiav report page --markdown {input} --title 'Availability of {wildcards.dataset}'"
        " --out {output} > {log} 2>&1"


rule table_page:
    input:
        f"{TABLES_DIR}/{{table}}.md",
    output:
        report(
            f"{REPORT}/tables/{{table}}.html",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}"},
        ),
    log:
        f"{RESULTS}/logs/report/table_{{table}}.log",
    wildcard_constraints:
        table=one_of(TABLE_KEYS),
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m equiav report page --markdown {input} --title 'Table {wildcards.table}' --out {output} > {log} 2>&1"


rule pretrain_curves:
    input:
        f"{RESULTS}/pretrain/{{run}}/metrics.csv",
    output:
        report(
            f"{REPORT}/pretrain/{{run}}.png",
            caption="../report/pretrain_curves.rst",
            category="Training",
            subcategory="pre-training",
            labels={"run": "{run}"},
        ),
    log:
        f"{RESULTS}/logs/report/pretrain_{{run}}.log",
    wildcard_constraints:
        run=one_of(PRETRAIN),
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m equiav report curves --history {input} --title 'pre-training {wildcards.run}'"
        " --out {output} > {log} 2>&1"


rule finetune_curves:
    input:
        [f"{RESULTS}/finetune/{run}/metrics.json" for run in FINETUNE],
    output:
        report(
            f"{REPORT}/finetune_curves.png",
            caption="../report/finetune_curves.rst",
            category="Training",
            subcategory="fine-tuning",
            labels={"runs": "all"},
        ),
    log:
        f"{RESULTS}/logs/report/finetune_curves.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m equiav report finetune-curves --metrics {input} --out {output} > {log} 2>&1"


rule retrieval_examples:
    input:
        unpack(lambda w: dataset_inputs(RETRIEVAL[w.run]["dataset"])),
        matches=f"{RESULTS}/retrieval/{{run}}/matches.csv",
        h5=per_shard(f"{DATA}/{{dataset}}/features/{{shard}}.h5", lambda w: RETRIEVAL[w.run]["dataset"]),
    output:
        report(
            f"{REPORT}/retrieval/{{run}}_{{direction}}.png",
            caption="../report/retrieval_examples.rst",
            category="Retrieval",
            labels={"run": "{run}", "direction": "{direction}"},
        ),
    log:
        f"{RESULTS}/logs/report/retrieval_{{run}}_{{direction}}.log",
    wildcard_constraints:
        run=one_of(RETRIEVAL),
        direction="v2a|a2v",
    conda:
        "../../envs/train.yaml"
    params:
        shown=lambda w: RETRIEVAL[w.run]["report"],
    shell:
        "python -m equiav report retrieval-examples --matches {input.matches} --usable {input.usable}"
        " --classes {input.classes} --norm-stats {input.norm} --direction {wildcards.direction}"
        " --queries {params.shown[queries]} --top {params.shown[top]} --out {output} > {log} 2>&1"


rule qualitative:
    input:
        unpack(lambda w: dataset_inputs(RETRIEVAL[w.run]["dataset"])),
        pretrained=lambda w: f"{RESULTS}/pretrain/{RETRIEVAL[w.run]['pretrained']}/model.pt",
        ids=f"{RESULTS}/retrieval/{{run}}/ids.txt",
        h5=per_shard(f"{DATA}/{{dataset}}/features/{{shard}}.h5", lambda w: RETRIEVAL[w.run]["dataset"]),
    output:
        report(
            f"{REPORT}/qualitative/{{run}}.png",
            caption="../report/qualitative.rst",
            category="Qualitative",
            labels={"run": "{run}"},
        ),
    log:
        f"{RESULTS}/logs/report/qualitative_{{run}}.log",
    wildcard_constraints:
        run=one_of(RETRIEVAL),
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=lambda w: min(1, RETRIEVAL[w.run]["resources"]["gpus"]),
    params:
        shown=lambda w: RETRIEVAL[w.run]["report"],
        seed=lambda w: RETRIEVAL[w.run]["seed"],
    shell:
        "python -m equiav report qualitative --pretrained {input.pretrained} --ids {input.ids}"
        " --usable {input.usable} --classes {input.classes} --norm-stats {input.norm}"
        " --clips {params.shown[clips]} --candidates {params.shown[candidates]} --seed {params.seed}"
        " --out {output} > {log} 2>&1"
