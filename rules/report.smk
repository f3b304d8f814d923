# Per-suite report: Markdown + JSON + plots, registered with report() for `snakemake --report report.html`.


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
        methods=lambda w: {e: experiment_label(e) for e in suite_experiments(w.suite)},
        config=config,
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/reports/{{suite}}.log",
    script:
        "../workflow_scripts/report.py"
