# Stage 1: official lists (fetched or local) and archives -> manifest, classes and shards.


rule demo_data:
    output:
        f"{DATA}/{{dataset}}/generated/list.csv",
    log:
        f"{RESULTS}/{{dataset}}/logs/demo_data.log",
    wildcard_constraints:
        dataset=one_of(GENERATED),
    conda:
        "../../envs/data.yaml"
    params:
        demo=lambda w: json.dumps(config["demo"]),
        out_dir=lambda w, output: os.path.dirname(output[0]),
    shell:
        "python -m equiav demo-data --settings {params.demo:q} --out-dir {params.out_dir} 2> {log}"


rule fetch_list:
    output:
        f"{DATA}/{{dataset}}/lists/{{file}}",
    log:
        f"{RESULTS}/{{dataset}}/logs/fetch_list/{{file}}.log",
    retries: 2
    conda:
        "../../envs/data.yaml"
    params:
        url=url_of_fetched,
    shell:
        "python -m equiav fetch --url {params.url:q} --out {output} 2> {log}"


# An archive fetched over HTTP, or a local archive file (`archive.path`), is checked and
# unpacked once into <data_dir>/<dataset>/archive; a local folder is used where it is instead.
rule fetch_archive:
    input:
        lambda w: [ARCHIVES[w.dataset][1]] if ARCHIVES[w.dataset][0] == "file" else [],
    output:
        directory(f"{DATA}/{{dataset}}/archive"),
    log:
        f"{RESULTS}/{{dataset}}/logs/fetch_archive.log",
    wildcard_constraints:
        dataset=one_of(ARCHIVED),
    conda:
        "../../envs/data.yaml"
    params:
        source=archive_option,
        sha256=lambda w: (
            f"--sha256 {dataset(w.dataset)['archive']['sha256']}" if dataset(w.dataset)["archive"]["sha256"] else ""
        ),
    shell:
        "python -m equiav fetch-archive {params.source} {params.sha256} --out-dir {output} 2> {log}"


# Each source other than youtube is catalogued once: which of its files or archive members
# serves which clip (a hub source is fetched into the user's cache first). Its archive files
# are inputs, so a changed or added archive catalogues it again.
rule catalog:
    input:
        catalog_inputs,
    output:
        f"{DATA}/{{dataset}}/sources/{{number}}.csv",
    log:
        f"{RESULTS}/{{dataset}}/logs/catalog/{{number}}.log",
    wildcard_constraints:
        number=r"\d+",
    conda:
        "../../envs/data.yaml"
    params:
        source=source_setting,
    shell:
        "python -m equiav catalog --source {params.source:q} --out {output} 2> {log}"


checkpoint manifest:
    input:
        unpack(manifest_inputs),
    output:
        manifest=f"{RESULTS}/{{dataset}}/manifest.csv",
        classes=f"{RESULTS}/{{dataset}}/classes.csv",
        problems=f"{RESULTS}/{{dataset}}/list_problems.csv",
        shards=directory(f"{DATA}/{{dataset}}/shards"),
    log:
        f"{RESULTS}/{{dataset}}/logs/manifest.log",
    conda:
        "../../envs/data.yaml"
    params:
        settings=settings,
        out_dir=lambda w, output: os.path.dirname(output.manifest),
    shell:
        "python -m equiav manifest --settings {params.settings:q} --out-dir {params.out_dir}"
        " --shards-dir {output.shards} 2> {log}"
