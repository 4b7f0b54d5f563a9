rule prepare:
    """Input checks, reorientation, registration, resampling and normalisation for every pipeline of
    one shard of sessions (a process per thread). Bad data is recorded per session, never raised;
    sessions already prepared with the same inputs and settings are reused."""
    input:
        PLAN.shard_inputs_record("{shard}"),  # its BIDS files with size and mtime (one file, not every image)
    output:
        PLAN.shard_record("prepare", "{shard}"),
    params:
        **PLAN.job_params(SCRIPTS / "prepare.py", JOB_PYTHON),
        settings=PLAN.step_params,
    log:
        PLAN.log("prepare", "shard-{shard}"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=PLAN.runtime("prepare"),  # grows with the shard size (job_minutes)
    conda:
        "../envs/imaging.yaml"
    shell:
        STEP + " {input:q} {output:q}"
