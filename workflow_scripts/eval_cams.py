from wsss_core.stages.evaluate import eval_cams

p = snakemake.params
eval_cams(
    prepared=p.prepared,
    cam_shards=list(snakemake.input.cams),
    threshold_split=p.threshold_split,
    eval_split=p.eval_split,
    cfg=p.cfg,
    out=snakemake.output[0],
    log=snakemake.log[0],
)
