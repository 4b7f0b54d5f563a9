localrules:
    aggregate,


rule aggregate:
    """Cohort tables assembled from the shards' parts (finalize), written once (no concurrent
    appends): one row per planned participant/session; every group table as CSV + Parquet."""
    input:
        records=PLAN.all_finalize_records(),
        ratings=PLAN.ratings_input(),
    output:
        summary=report(PLAN.summary(), caption="../docs/report/summary.rst", category="Cohort tables"),
        provenance=PLAN.group("summary.json"),
        tables=PLAN.group_tables(),
    params:
        **PLAN.job_params(SCRIPTS / "aggregate.py", JOB_PYTHON),
    log:
        PLAN.log("aggregate", "group"),
    conda:
        "../envs/tables.yaml"
    shell:
        STEP + " {output.summary:q} {input.records:q} --ratings {input.ratings:q}"
