# Stage 5: pre-training. Rolling checkpoints and logs live in <data_dir>/pretrain/<run>/,
# outside the declared output (Snakemake deletes the outputs of a failed job); a re-run
# resumes from the newest checkpoint and only the finished weights are the output.


rule pretrain:
    input:
        unpack(lambda w: dataset_inputs(PRETRAIN[w.run]["dataset"])),
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
