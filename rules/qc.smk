localrules:
    qc_page,


rule qc_page:
    """The cohort QC page (static HTML): one row per participant x pipeline."""
    input:
        summary=PLAN.summary(),
        records=PLAN.all_finalize_records(),
    output:
        report(PLAN.qc_page(), caption="../docs/report/qc_page.rst", category="QC"),
    log:
        PLAN.log("qc_page", "group"),
    conda:
        "../envs/tables.yaml"
    script:
        "../scripts/qc_page.py"
