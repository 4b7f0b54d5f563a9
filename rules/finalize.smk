rule finalize:
    """Back to native space, thresholds, metrics, QC snapshots and BIDS-derivatives outputs for
    every pipeline of one session."""
    input:
        prep=PLAN.prep_record("{session}"),
        shards=PLAN.session_shards_wc,
    output:
        PLAN.session_record("{session}"),
    params:
        rows=lambda wc: PLAN.session_rows(wc.session),
        shard_map=lambda wc: PLAN.shard_map(wc.session),
        settings=PLAN.step_params(),
    log:
        PLAN.log("finalize", "{session}"),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        "../envs/imaging.yaml"
    script:
        "../scripts/finalize.py"
