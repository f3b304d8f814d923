from wsss_core.stages.affinity import train_affinity

p = snakemake.params
train_affinity(
    prepared=p.prepared,
    split=p.split,
    cam_shards=list(snakemake.input.cams),
    cfg=p.cfg,
    out_model=snakemake.output.model,
    ckpt_dir=f"{p.state}/checkpoints",
    metrics=f"{p.state}/metrics.jsonl",
    seed=p.seed,
    device=p.device,
    lock_dir=p.locks,
    weights_dir=p.weights_dir,
    config_hash=p.hash,
    log=snakemake.log[0],
    threads=snakemake.threads,
)
