localrules:
    qc_page,


rule qc_page:
    """The cohort QC page (static HTML): one row per participant x pipeline."""
    input:
        summary=PLAN.summary(),
    output:
        report(PLAN.qc_page(), caption="../docs/report/qc_page.rst", category="QC"),
    params:
        **PLAN.job_params(SCRIPTS / "qc_page.py", JOB_PYTHON),
        # not inputs: the page follows the summary, so `--batch aggregate=i/n` leaves it for the last batch
        records=PLAN.all_finalize_records(),
    log:
        PLAN.log("qc_page", "group"),
    conda:
        "../envs/tables.yaml"
    shell:
        STEP + " {input.summary:q} {output:q} {params.records:q}"
