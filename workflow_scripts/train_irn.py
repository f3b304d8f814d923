from wsss_core.stages.irn import train_irn

p = snakemake.params
train_irn(
    prepared=p.prepared,
    ir_label_shards=list(snakemake.input.ir_labels),
    split=p.split,
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
    classifier_model=p.classifier_model,
    mean_shift_split=p.mean_shift_split,
)
