# Stage 3-4: per-shard features into HDF5, then the availability report and norm statistics.


rule features:
    input:
        f"{RESULTS}/{{dataset}}/download/{{shard}}.csv",
    output:
        h5=f"{DATA}/{{dataset}}/features/{{shard}}.h5",
        status=f"{RESULTS}/{{dataset}}/features/{{shard}}.csv",
    log:
        f"{RESULTS}/{{dataset}}/logs/features/{{shard}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/features/{{shard}}.tsv"
    conda:
        "../../envs/data.yaml"
    threads: lambda w: dataset(w.dataset)["features"]["workers"]
    params:
        settings=settings,
    shell:
        "python -m equiav features --settings {params.settings:q} --downloads {input}"
        " --out-h5 {output.h5} --out-status {output.status} 2> {log}"


rule availability:
    input:
        manifest=f"{RESULTS}/{{dataset}}/manifest.csv",
        downloads=per_shard(f"{RESULTS}/{{dataset}}/download/{{shard}}.csv"),
        features=per_shard(f"{RESULTS}/{{dataset}}/features/{{shard}}.csv"),
        h5=per_shard(f"{DATA}/{{dataset}}/features/{{shard}}.h5"),
    output:
        report=f"{RESULTS}/{{dataset}}/availability.md",
        table=f"{RESULTS}/{{dataset}}/availability.csv",
        status=f"{RESULTS}/{{dataset}}/status.csv",
        usable=f"{RESULTS}/{{dataset}}/usable.csv",
        obtained=directory(f"{RESULTS}/{{dataset}}/obtained"),
    log:
        f"{RESULTS}/{{dataset}}/logs/availability.log",
    conda:
        "../../envs/data.yaml"
    params:
        out_dir=lambda w, output: os.path.dirname(output.report),
    shell:
        "python -m equiav availability --dataset {wildcards.dataset} --manifest {input.manifest}"
        " --downloads {input.downloads} --features {input.features} --h5 {input.h5}"
        " --out-dir {params.out_dir} 2> {log}"


rule norm_stats:
    input:
        usable=f"{RESULTS}/{{dataset}}/usable.csv",
        h5=per_shard(f"{DATA}/{{dataset}}/features/{{shard}}.h5"),
    output:
        f"{RESULTS}/{{dataset}}/norm_stats.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/norm_stats.log",
    conda:
        "../../envs/data.yaml"
    params:
        settings=settings,
    shell:
        "python -m equiav norm-stats --settings {params.settings:q} --usable {input.usable} --out {output} 2> {log}"
