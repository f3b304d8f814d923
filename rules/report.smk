# Per-suite report: Markdown + JSON + plots, registered with report() for `snakemake --report report.html`.


rule report:
    input:
        unpack(report_inputs),
    output:
        md=f"{out('report')}/report.md",
        json=f"{out('report')}/report.json",
        curves=report(
            f"{out('report')}/threshold_curves.png",
            category="{dataset} {suite}",
            caption="../report/threshold_curves.rst",
        ),
        per_class=report(
            f"{out('report')}/per_class_iou.png",
            category="{dataset} {suite}",
            caption="../report/per_class_iou.rst",
        ),
        qualitative=report(
            f"{out('report')}/qualitative.png",
            category="{dataset} {suite}",
            caption="../report/qualitative.rst",
        ),
        training=report(
            f"{out('report')}/training.png",
            category="{dataset} {suite}",
            caption="../report/training.rst",
        ),
        superpixels=report(
            f"{out('report')}/superpixels.png",
            category="{dataset} {suite}",
            caption="../report/superpixels.rst",
        ),
    params:
        job=job_params(
            suite=lambda w: w.suite,
            experiments=lambda w: suite_runs(w.suite),
            labels=experiment_labels,
            groups=seed_groups,
            files=report_groups,
            settings=lambda w: {e: {**experiment_config(config, e), "refine": P.refine(e, w.dataset)}
                                for e in suite_runs(w.suite)},
            provenance=lambda w: {e: P.provenance(w.dataset, e, g["seeds"]) for e, g in seed_groups(w).items()},
            superpixels=superpixel_settings,
            seed=config["seed"],
            eval_stage=config["stages"]["eval"],
        ),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/reports/{{suite}}.log",
    script:
        "../workflow_scripts/report.py"
