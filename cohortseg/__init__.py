"""cohortseg: cohort-scale MRI segmentation; the science lives here, Snakemake rules only call it."""

__version__ = "0.1.0"
