# DeepLab-V2 trained on the pseudo-masks (resumable), sharded inference on the eval split, evaluation.


rule train_segmentation:
    input:
        masks=shards("pseudo_masks"),
        manifest=rules.prepare_dataset.output.manifest,
        weights=weights_inputs("segmentation"),
    output:
        model=out("segmentation"),
    params:
        job=job_params("segmentation"),
    threads: 2
    resources:
        gpu=train_gpus("segmentation"),  # n_procs: one DDP process per GPU
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/train_segmentation.log",
    script:
        "../workflow_scripts/train_segmentation.py"


rule infer_segmentation:
    input:
        model=rules.train_segmentation.output.model,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        masks=out("seg_pred"),
    params:
        job=job_params("seg_pred"),
    threads: 2
    resources:
        gpu=1,
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/infer_segmentation/{{split}}_{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/infer_segmentation.py"


rule eval_segmentation:
    input:
        masks=shards("seg_pred", "eval"),
        manifest=rules.prepare_dataset.output.manifest,
    output:
        json=out("seg_eval"),
    params:
        job=job_params(what="segmentation", role="eval"),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/eval_segmentation.log",
    script:
        "../workflow_scripts/eval_masks.py"
