from wsss_core.stages.affinity import random_walk_masks

p, w = snakemake.params, snakemake.wildcards
random_walk_masks(
    prepared=p.prepared,
    split=p.split,
    shard=int(w.shard),
    n_shards=int(w.nshards),
    cam_shards=list(snakemake.input.cams),
    model_path=snakemake.input.model,
    cfg=p.cfg,
    cam_eval=snakemake.input.cam_eval,
    out=snakemake.output[0],
    seed=p.seed,
    device=p.device,
    lock_dir=p.locks,
    config_hash=p.hash,
    log=snakemake.log[0],
    threads=snakemake.threads,
)
