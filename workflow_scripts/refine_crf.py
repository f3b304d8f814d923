from wsss_core.stages.refine import refine_crf

p, w = snakemake.params, snakemake.wildcards
refine_crf(
    prepared=p.prepared,
    cam_shards=list(snakemake.input.cams),
    split=p.split,
    shard=int(w.shard),
    n_shards=int(w.nshards),
    cfg=p.cfg,
    cam_eval=snakemake.input.cam_eval,
    out=snakemake.output[0],
    config_hash=p.hash,
    log=snakemake.log[0],
    threads=snakemake.threads,
)
