# Multi-scale + flip CAMs (sharded HDF5) and their evaluation (threshold curve, chosen background threshold); for
# superpixel methods, the (walk steps, threshold) grid.


rule infer_cams:
    input:
        model=rules.train_classifier.output.model,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        cams=out("cams"),
    params:
        job=job_params("cams"),
    threads: 2
    resources:
        gpu=1,
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/infer_cams/{{split}}_{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/infer_cams.py"


rule eval_cams:
    input:
        cams=all_cam_shards,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        json=out("cam_eval"),
    params:
        job=job_params("cam_eval"),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/eval_cams.log",
    script:
        "../workflow_scripts/eval_cams.py"


rule rw_grid:
    input:
        model=rules.train_classifier.output.model,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        json=out("rw_grid"),
    params:
        job=job_params("rw_grid", eval=lambda w: scfg(w.dataset, w.experiment, "cam_eval")),
    threads: 2
    resources:
        gpu=1,
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/rw_grid.log",
    script:
        "../workflow_scripts/rw_grid.py"
