from wsss_core.stages.dataset import make_toy

make_toy(out_dir=snakemake.output[0], generator=snakemake.params.generator, log=snakemake.log[0])
