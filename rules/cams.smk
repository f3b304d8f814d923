# Multi-scale + flip CAMs (sharded HDF5) and their evaluation (threshold curve, chosen background threshold).


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
