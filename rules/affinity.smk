# Pseudo-masks of `refine: affinity` (PSA's AffinityNet): train on confident CAM labels, random-walk the CAMs.


rule train_affinity:
    input:
        cams=shards("cams", "train"),
        manifest=rules.prepare_dataset.output.manifest,
        weights=weights_inputs("affinity"),
    output:
        model=out("affinity"),
    params:
        job=job_params("affinity"),
    threads: 2
    resources:
        gpu=train_gpus("affinity"),  # n_procs: one DDP process per GPU
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/train_affinity.log",
    script:
        "../workflow_scripts/train_affinity.py"


rule random_walk:
    input:
        cams=shards("cams", "train"),
        cam_eval=rules.eval_cams.output.json,
        model=rules.train_affinity.output.model,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        masks=out("rw_masks"),
    params:
        job=job_params("rw_masks"),
    threads: 2
    resources:
        gpu=1,
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/random_walk/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/random_walk.py"
