from wsss_core.stages import run_job

run_job(snakemake, "import_masks")
