from wsss_core.stages.irn import make_sem_seg_labels

p, w = snakemake.params, snakemake.wildcards
make_sem_seg_labels(
    prepared=p.prepared,
    cam_shards=list(snakemake.input.cams),
    cam_eval=snakemake.input.cam_eval,
    irn_model=snakemake.input.model,
    split=p.split,
    shard=int(w.shard),
    n_shards=int(w.nshards),
    cfg=p.cfg,
    out=snakemake.output[0],
    seed=p.seed,
    device=p.device,
    lock_dir=p.locks,
    config_hash=p.hash,
    log=snakemake.log[0],
    threads=snakemake.threads,
)
