from wsss_core.stages.classifier import infer_cams

p, w = snakemake.params, snakemake.wildcards
infer_cams(
    prepared=p.prepared,
    split=w.split,
    shard=int(w.shard),
    n_shards=int(w.nshards),
    model_path=snakemake.input.model,
    cfg=p.cfg,
    out=snakemake.output[0],
    seed=p.seed,
    device=p.device,
    lock_dir=p.locks,
    config_hash=p.hash,
    log=snakemake.log[0],
    threads=snakemake.threads,
)
