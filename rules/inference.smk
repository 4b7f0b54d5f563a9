rule infer:
    """One shard of sessions, every pipeline in turn: load a pipeline's fold models once, stream the
    prepared inputs, average the folds, free the models for the next pipeline. The SLURM profile
    gives this rule the GPU."""
    input:
        PLAN.shard_record("prepare", "{shard}"),
    output:
        PLAN.infer_record("{shard}"),
    params:
        **PLAN.job_params(SCRIPTS / "infer.py", JOB_PYTHON),
        settings=PLAN.step_params,
    log:
        PLAN.log("infer", "shard-{shard}"),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=PLAN.runtime("infer"),  # grows with the shard size (job_minutes)
    conda:
        "../envs/tensorflow.yaml"
    shell:
        STEP + " {input:q} {output:q}"
