from wsss_core.stages.classifier import train_classifier

p = snakemake.params
train_classifier(
    prepared=p.prepared,
    split=p.split,
    method=p.method,
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
    saliency=p.saliency,
)
