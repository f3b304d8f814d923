# Pseudo-masks of `refine: crf`: CAMs + chosen background threshold + dense CRF (pydensecrf2), sharded; of
# `refine: none`: the thresholded CAMs; and the
# evaluation of every experiment's pseudo-masks, whichever refinement made them.


rule refine_crf:
    input:
        cams=shards("cams", "train"),
        cam_eval=rules.eval_cams.output.json,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        masks=out("crf_masks"),
    params:
        job=job_params("crf_masks"),
    threads: 2
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/refine_crf/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/refine_crf.py"


rule threshold_masks:
    input:
        cams=shards("cams", "train"),
        cam_eval=rules.eval_cams.output.json,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        masks=out("cam_masks"),
    params:
        job=job_params("cam_masks"),
    threads: 1
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/threshold_masks/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/threshold_masks.py"


rule eval_pseudo_masks:
    input:
        masks=shards("pseudo_masks"),
        manifest=rules.prepare_dataset.output.manifest,
    output:
        json=out("mask_eval"),
    params:
        job=job_params(what="pseudo_masks", role="mask_eval"),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/eval_pseudo_masks.log",
    script:
        "../workflow_scripts/eval_masks.py"
