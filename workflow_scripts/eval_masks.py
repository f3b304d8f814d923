from wsss_core.stages.evaluate import eval_masks

p = snakemake.params
eval_masks(
    prepared=p.prepared,
    mask_shards=list(snakemake.input.masks),
    split=p.split,
    out=snakemake.output[0],
    what=p.what,
    log=snakemake.log[0],
)
