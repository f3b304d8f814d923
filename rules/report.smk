# Per-suite report: Markdown + JSON + plots, registered with report() for `snakemake --report report.html`.


def report_inputs(wildcards):
    ds, exps = wildcards.dataset, suite_experiments(wildcards.suite)
    ev = split_name(ds, "eval")
    return {
        "manifest": manifest(ds),
        "cam_evals": [f"{R}/{ds}/{e}/eval/cams.json" for e in exps],
        "mask_evals": [f"{R}/{ds}/{e}/eval/pseudo_masks.json" for e in exps],
        "seg_evals": [f"{R}/{ds}/{e}/eval/segmentation.json" for e in exps],
        "cams": [p for e in exps for p in cam_shards(ds, e, ev)],
        "masks": [p for e in exps for p in pseudo_mask_shards(ds, e)],
        "preds": [p for e in exps for p in seg_pred_shards(ds, e, ev)],
        "classifiers": [f"{R}/{ds}/{e}/classifier/model.pt" for e in exps],
        "segmenters": [f"{R}/{ds}/{e}/segmentation/model.pt" for e in exps],
    }


rule report:
    input:
        unpack(report_inputs),
    output:
        md=f"{R}/{{dataset}}/reports/{{suite}}/report.md",
        json=f"{R}/{{dataset}}/reports/{{suite}}/report.json",
        curves=report(
            f"{R}/{{dataset}}/reports/{{suite}}/threshold_curves.png",
            category="{dataset} {suite}",
            caption="../report/threshold_curves.rst",
        ),
        per_class=report(
            f"{R}/{{dataset}}/reports/{{suite}}/per_class_iou.png",
            category="{dataset} {suite}",
            caption="../report/per_class_iou.rst",
        ),
        qualitative=report(
            f"{R}/{{dataset}}/reports/{{suite}}/qualitative.png",
            category="{dataset} {suite}",
            caption="../report/qualitative.rst",
        ),
        training=report(
            f"{R}/{{dataset}}/reports/{{suite}}/training.png",
            category="{dataset} {suite}",
            caption="../report/training.rst",
        ),
    params:
        experiments=lambda w: suite_experiments(w.suite),
        suite=lambda w: w.suite,
        dataset=lambda w: w.dataset,
        prepared=lambda w: prepared(w.dataset),
        eval_split=lambda w: split_name(w.dataset, "eval"),
        mask_split=lambda w: split_name(w.dataset, "train"),
        methods=lambda w: {e: config["experiments"][e]["method"] for e in suite_experiments(w.suite)},
        config=config,
    log:
        f"{L}/{{dataset}}/reports/{{suite}}.log",
    script:
        "../workflow_scripts/report.py"
