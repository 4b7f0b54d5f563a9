rule prepare:
    """Input checks, reorientation, registration, resampling and normalisation for every pipeline of
    one session. Bad data is recorded in the output record, never raised."""
    input:
        PLAN.inputs_of_wc,
    output:
        PLAN.prep_record("{session}"),
    params:
        settings=PLAN.step_params(),
    log:
        PLAN.log("prepare", "{session}"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/imaging.yaml"
    script:
        "../scripts/prepare.py"
