# Stages 6-7: fine-tuning runs and zero-shot retrieval, each writing one metrics file.


rule finetune:
    input:
        unpack(lambda w: dataset_inputs(FINETUNE[w.run]["dataset"])),
        pretrained=lambda w: f"{RESULTS}/pretrain/{FINETUNE[w.run]['pretrained']}/model.pt",
        splits=splits_check("finetune"),
        h5=per_shard(f"{DATA}/{{dataset}}/features/{{shard}}.h5", lambda w: FINETUNE[w.run]["dataset"]),
    output:
        f"{RESULTS}/finetune/{{run}}/metrics.json",
    log:
        f"{RESULTS}/finetune/{{run}}/finetune.log",
    benchmark:
        f"{RESULTS}/finetune/{{run}}/benchmark.tsv"
    wildcard_constraints:
        run=one_of(FINETUNE),
    conda:
        "../../envs/train.yaml"
    threads: training_threads(FINETUNE)
    resources:
        **training_resources(FINETUNE),
    params:
        settings=lambda w: json.dumps(finetune_settings(w.run), sort_keys=True),
        work_dir=lambda w: f"{DATA}/finetune/{w.run}",
        launch=lambda w: launcher(FINETUNE[w.run]["resources"]),
    shell:
        "{params.launch} finetune --settings {params.settings:q} --pretrained {input.pretrained}"
        " --usable {input.usable} --norm-stats {input.norm} --classes {input.classes}"
        " --out {output} --work-dir {params.work_dir} 2> {log}"


rule retrieval:
    input:
        unpack(lambda w: dataset_inputs(RETRIEVAL[w.run]["dataset"])),
        pretrained=lambda w: f"{RESULTS}/pretrain/{RETRIEVAL[w.run]['pretrained']}/model.pt",
        splits=splits_check("retrieval"),
        h5=per_shard(f"{DATA}/{{dataset}}/features/{{shard}}.h5", lambda w: RETRIEVAL[w.run]["dataset"]),
    output:
        metrics=f"{RESULTS}/retrieval/{{run}}/metrics.json",
        ids=f"{RESULTS}/retrieval/{{run}}/ids.txt",
        matches=f"{RESULTS}/retrieval/{{run}}/matches.csv",
    log:
        f"{RESULTS}/retrieval/{{run}}/retrieval.log",
    wildcard_constraints:
        run=one_of(RETRIEVAL),
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=lambda w: RETRIEVAL[w.run]["resources"]["gpus"],
    params:
        run=lambda w: RETRIEVAL[w.run],
        ids=lambda w: f"--ids {RETRIEVAL[w.run]['ids']}" if RETRIEVAL[w.run]["ids"] else "",
    shell:
        "python -m equiav retrieval --pretrained {input.pretrained} --usable {input.usable}"
        " --norm-stats {input.norm} --classes {input.classes} --split {params.run[split]}"
        " --per-class {params.run[per_class]} {params.ids} --seed {params.run[seed]}"
        " --samples {params.run[samples]} --out {output.metrics} --ids-out {output.ids}"
        " --matches-out {output.matches} 2> {log}"


rule summary:
    input:
        [f"{RESULTS}/finetune/{run}/metrics.json" for run in FINETUNE]
        + [f"{RESULTS}/retrieval/{run}/metrics.json" for run in RETRIEVAL],
    output:
        md=f"{RESULTS}/summary.md",
        csv=f"{RESULTS}/summary.csv",
    log:
        f"{RESULTS}/logs/summary.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m equiav summary --metrics {input} --out-md {output.md} --out-csv {output.csv} > {log} 2>&1"
