localrules:
    aggregate,


rule aggregate:
    """Cohort tables, written once (no concurrent appends): one row per participant/session."""
    input:
        records=PLAN.all_finalize_records(),
        ratings=PLAN.ratings_input(),
    output:
        summary=report(PLAN.summary(), caption="../docs/report/summary.rst", category="Cohort tables"),
        provenance=PLAN.group("summary.json"),
        tables=PLAN.group_tables(),
    params:
        expected=lambda wc: PLAN.expected_sessions(),  # evaluated for this job only, not in every cluster job's parse
    log:
        PLAN.log("aggregate", "group"),
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/aggregate.py"
