# Stage 2: one job per shard fetches its clips and records a status row for each.
# Media and the resumable journal live beside the shard's folder, outside the declared
# output, so a failed or killed job loses nothing: its re-run skips every final clip.


rule download:
    input:
        shard=f"{DATA}/{{dataset}}/shards/{{shard}}.csv",
    output:
        f"{RESULTS}/{{dataset}}/download/{{shard}}.csv",
    log:
        f"{RESULTS}/{{dataset}}/logs/download/{{shard}}.log",
    conda:
        "../../envs/data.yaml"
    resources:
        # Bound the downloads running at once across the workflow: --resources downloads=N.
        downloads=1,
    params:
        settings=settings,
        media_dir=lambda w: f"{DATA}/{w.dataset}/media/{w.shard}",
    shell:
        "python -m equiav download --settings {params.settings:q} --shard {input.shard}"
        " --media-dir {params.media_dir} --out {output} 2> {log}"


# At the end of a run, say how many clips are still transient and the command that retries them
# (a plain rerun does not: their shards are done).
onsuccess:
    from equiav.data.availability import transient_shards

    pending = transient_shards(RESULTS, list(config["run"]))
    if pending:
        print(
            f"{sum(pending.values())} clip(s) in {len(pending)} download shard(s) failed for a passing reason"
            " (sign-in, rate-limited, other; see availability.md). To retry them, run the workflow again with"
            f" --forcerun $(python -m equiav transient {RESULTS})  (docs/data.md)",
            file=sys.stderr,
        )
