from wsss_core.stages import run_job

run_job(snakemake, "make_sem_seg_labels")
