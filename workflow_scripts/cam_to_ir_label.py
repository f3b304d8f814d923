from wsss_core.stages.irn import cam_to_ir_label

p, w = snakemake.params, snakemake.wildcards
cam_to_ir_label(
    prepared=p.prepared,
    cam_shards=list(snakemake.input.cams),
    cam_eval=snakemake.input.cam_eval,
    split=p.split,
    shard=int(w.shard),
    n_shards=int(w.nshards),
    cfg=p.cfg,
    out=snakemake.output[0],
    config_hash=p.hash,
    log=snakemake.log[0],
    threads=snakemake.threads,
)
