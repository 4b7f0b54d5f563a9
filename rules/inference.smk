rule infer:
    """One shard of sessions for one pipeline: load the fold models once, stream the prepared inputs,
    average the folds. The SLURM profile gives this rule the GPU."""
    input:
        PLAN.shard_record("prepare", "{shard}"),
    output:
        PLAN.infer_record("{pipeline}", "{shard}"),
    params:
        settings=lambda wc: PLAN.step_params([wc.pipeline]),
    log:
        PLAN.log("infer", "{pipeline}_shard-{shard}"),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
    conda:
        "../envs/tensorflow.yaml"
    script:
        "../scripts/infer.py"
