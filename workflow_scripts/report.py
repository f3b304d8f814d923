from wsss_core.stages.report import build_report

i, o, p = snakemake.input, snakemake.output, snakemake.params
build_report(
    experiments=list(p.experiments),
    suite=p.suite,
    dataset=p.dataset,
    prepared=p.prepared,
    eval_split=p.eval_split,
    mask_split=p.mask_split,
    methods=dict(p.methods),
    config=p.config,
    cam_evals=i.cam_evals,
    mask_evals=i.mask_evals,
    seg_evals=i.seg_evals,
    cams=i.cams,
    masks=i.masks,
    preds=i.preds,
    classifiers=i.classifiers,
    segmenters=i.segmenters,
    saliency=i.saliency,
    out_md=o.md,
    out_json=o.json,
    out_curves=o.curves,
    out_per_class=o.per_class,
    out_qualitative=o.qualitative,
    out_training=o.training,
    log=snakemake.log[0],
)
