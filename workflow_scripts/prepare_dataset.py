from wsss_core.stages.dataset import prepare

prepare(
    ds=snakemake.params.ds,
    name=snakemake.wildcards.dataset,
    out_dir=snakemake.params.out_dir,
    log=snakemake.log[0],
    threads=snakemake.threads,
)
