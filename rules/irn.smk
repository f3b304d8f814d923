# Pseudo-masks of `refine: irn` (IRN, jiwoon-ahn/irn, as SIPE / SFC use it): CAMs -> confident-region labels
# (cam_to_ir_label, CPU CRFs) -> IRN boundary network -> random walk of the CAMs along the boundaries.


rule cam_to_ir_label:
    input:
        cams=shards("cams", "train"),
        cam_eval=rules.eval_cams.output.json,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        masks=out("ir_labels"),
    params:
        job=job_params("ir_labels"),
    threads: 2
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/cam_to_ir_label/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/cam_to_ir_label.py"


rule train_irn:
    input:
        ir_labels=shards("ir_labels"),
        manifest=rules.prepare_dataset.output.manifest,
        weights=weights_inputs("irn"),
        classifier=irn_classifier_inputs,
    output:
        model=out("irn"),
    params:
        job=job_params("irn"),
    threads: 2
    resources:
        gpu=train_gpus("irn"),  # n_procs: one DDP process per GPU
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/train_irn.log",
    script:
        "../workflow_scripts/train_irn.py"


rule make_sem_seg_labels:
    input:
        cams=shards("cams", "train"),
        cam_eval=rules.eval_cams.output.json,
        model=rules.train_irn.output.model,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        masks=out("irn_masks"),
    params:
        job=job_params("irn_masks"),
    threads: 2
    resources:
        gpu=1,
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/make_sem_seg_labels/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/make_sem_seg_labels.py"


rule eval_sem_seg:
    input:
        masks=shards("ir_labels"),
        manifest=rules.prepare_dataset.output.manifest,
    output:
        json=out("ir_label_eval"),
    params:
        job=job_params(what="ir_labels", role="mask_eval"),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/eval_sem_seg.log",
    script:
        "../workflow_scripts/eval_sem_seg.py"
