from wsss_core.stages.irn import eval_ir_labels

p = snakemake.params
eval_ir_labels(
    prepared=p.prepared,
    ir_label_shards=list(snakemake.input.ir_labels),
    split=p.split,
    out=snakemake.output[0],
    log=snakemake.log[0],
)
