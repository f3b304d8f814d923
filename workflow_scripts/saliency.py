from wsss_core.stages.dataset import make_saliency

p = snakemake.params
make_saliency(dict(p.ds), p.prepared, list(p.splits), snakemake.output[0], seed=p.seed, log=snakemake.log[0])
