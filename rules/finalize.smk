rule finalize:
    """Back to native space, thresholds, metrics, QC snapshots and BIDS-derivatives outputs for
    every pipeline of one session."""
    input:
        prep=PLAN.prep_record("{session}"),
        shards=PLAN.session_shards_wc,
    output:
        PLAN.session_record("{session}"),
    params:
        settings=PLAN.step_params(),
    log:
        PLAN.log("finalize", "{session}"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/imaging.yaml"
    script:
        "../scripts/finalize.py"
