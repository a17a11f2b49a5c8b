# Stage 5: pre-training. Rolling checkpoints and logs live in <data_dir>/pretrain/<run>/,
# outside the declared output (Snakemake deletes the outputs of a failed job); a re-run
# resumes from the newest checkpoint and only the finished weights are the output.


rule pretrain:
    input:
        unpack(lambda w: dataset_inputs(PRETRAIN[w.run]["dataset"])),
        splits=splits_check("pretrain"),
        h5=per_shard(f"{DATA}/{{dataset}}/features/{{shard}}.h5", lambda w: PRETRAIN[w.run]["dataset"]),
    output:
        model=f"{RESULTS}/pretrain/{{run}}/model.pt",
        # The whole run's per-step metrics (resumed parts included), for the report's curves.
        history=f"{RESULTS}/pretrain/{{run}}/metrics.csv",
    log:
        f"{RESULTS}/pretrain/{{run}}/pretrain.log",
    benchmark:
        f"{RESULTS}/pretrain/{{run}}/benchmark.tsv"
    wildcard_constraints:
        run=one_of(PRETRAIN),
    conda:
        "../../envs/train.yaml"
    threads: training_threads(PRETRAIN)
    resources:
        **training_resources(PRETRAIN),
    params:
        settings=lambda w: json.dumps(PRETRAIN[w.run]["settings"], sort_keys=True),
        work_dir=lambda w: f"{DATA}/pretrain/{w.run}",
        launch=lambda w: launcher(PRETRAIN[w.run]["resources"]),
    shell:
        "{params.launch} pretrain --settings {params.settings:q} --usable {input.usable}"
        " --norm-stats {input.norm} --out {output.model} --work-dir {params.work_dir} 2> {log}"
        " && cp {params.work_dir}/metrics.csv {output.history}"


# A pre-trained model taken as it is (`pretrain.<run>.import`): the authors' release, MAE
# weights or a random initialisation, written as pre-training writes its model.pt. Run where
# Snakemake runs (a login node has the network that timm's download may need, and it is quick).
rule import_model:
    input:
        lambda w: [IMPORTED[w.run]["import"]["path"]] if "path" in IMPORTED[w.run]["import"] else [],
    output:
        model=f"{RESULTS}/pretrain/{{run}}/model.pt",
    log:
        f"{RESULTS}/pretrain/{{run}}/import.log",
    wildcard_constraints:
        run=one_of(IMPORTED),
    localrule: True
    conda:
        "../../envs/train.yaml"
    params:
        settings=lambda w: json.dumps(IMPORTED[w.run]["import"], sort_keys=True),
    shell:
        "python -m equiav import-model --settings {params.settings:q} --out {output.model} 2> {log}"


# Every split a run reads has clips in its data set's manifest: checked as soon as the manifest
# is made, so that a split or fold the list lacks stops the workflow before any training job.
rule check_splits:
    input:
        lambda w: f"{RESULTS}/{SECTIONS[w.section][w.run]['dataset']}/manifest.csv",
    output:
        f"{RESULTS}/{{section}}/{{run}}/splits.csv",
    log:
        f"{RESULTS}/{{section}}/{{run}}/check_splits.log",
    wildcard_constraints:
        section="pretrain|finetune|retrieval",
        run=one_of([*PRETRAIN, *FINETUNE, *RETRIEVAL]),
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        splits=run_split_option,
    shell:
        "python -m equiav check-splits --manifest {input} --splits {params.splits:q}"
        " --config-key {wildcards.section}.{wildcards.run} --out {output} 2> {log} || (cat {log} >&2; exit 1)"
