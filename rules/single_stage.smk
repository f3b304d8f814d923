# Single-stage methods (RTC): the method's own segmentation output, evaluated without DeepLab: score maps on the
# threshold and eval splits, their background-threshold curve, CRF labels and their scores; on the train split, the
# CRF labels are the pseudo-masks of `refine: single_stage` (the two-stage path to DeepLab).


rule infer_single_stage:
    input:
        model=rules.train_classifier.output.model,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        maps=out("ss_maps"),
    params:
        job=job_params("ss_maps"),
    threads: 2
    resources:
        gpu=1,
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/infer_single_stage/{{split}}_{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/infer_single_stage.py"


rule eval_single_stage:
    input:
        cams=ss_eval_shards,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        json=out("ss_eval"),
    params:
        job=job_params("ss_eval"),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/eval_single_stage.log",
    script:
        "../workflow_scripts/eval_cams.py"


rule single_stage_crf:
    input:
        maps=lambda w: shard_paths("ss_maps", w.dataset, w.experiment, w.split),
        ss_eval=rules.eval_single_stage.output.json,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        masks=out("ss_crf"),
    params:
        job=job_params("ss_crf"),
    threads: 2
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/single_stage_crf/{{split}}_{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/single_stage_crf.py"


rule single_stage_masks:
    input:
        maps=shards("ss_maps", "train"),
        ss_eval=rules.eval_single_stage.output.json,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        masks=out("ss_masks"),
    params:
        job=job_params("ss_masks"),
    threads: 2
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/single_stage_masks/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/single_stage_crf.py"


rule eval_single_stage_crf:
    input:
        masks=shards("ss_crf", "eval"),
        manifest=rules.prepare_dataset.output.manifest,
    output:
        json=out("ss_crf_eval"),
    params:
        job=job_params(what="single-stage CRF labels", role="eval"),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/eval_single_stage_crf.log",
    script:
        "../workflow_scripts/eval_masks.py"
