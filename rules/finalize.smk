rule finalize:
    """Back to native space, thresholds, metrics, QC snapshots and BIDS-derivatives outputs for
    every pipeline of one shard of sessions (a process per thread), then the shard's part of the
    cohort tables and of the QC page (work/shards/tables/shard-<k>/, beside the declared record)."""
    input:
        prep=PLAN.shard_record("prepare", "{shard}"),
        infer=PLAN.shard_infer_inputs_wc,
    output:
        PLAN.shard_record("finalize", "{shard}"),
    params:
        **PLAN.job_params(SCRIPTS / "finalize.py", JOB_PYTHON),
        settings=PLAN.step_params,
    log:
        PLAN.log("finalize", "shard-{shard}"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=PLAN.runtime("finalize"),  # grows with the shard size (job_minutes)
    conda:
        "../envs/imaging.yaml"
    shell:
        STEP + " {input.prep:q} {output:q}"
