from wsss_core.stages import run_job

run_job(snakemake, "cam_to_ir_label")
