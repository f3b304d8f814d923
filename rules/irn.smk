# IRN refinement (SIPE / SFC; spec irn.md): CAMs -> confident-region labels (cam2ir, CPU CRFs) -> IRN boundary
# network -> random walk of the CAMs along the boundaries -> pseudo-masks (pseudo_masks_irn). Used instead of the
# CRF pseudo-masks when irn.enabled is true for an experiment; eval_pseudo_masks scores them as usual.


rule cam_to_ir_label:
    input:
        cams=lambda w: cam_shards(w.dataset, w.experiment, split_name(w.dataset, "train")),
        cam_eval=f"{R}/{{dataset}}/{{experiment}}/eval/cams.json",
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/irn/ir_label/{{shard}}-of-{{nshards}}.h5",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "train"),
        cfg=lambda w: irn_cfg(w.dataset, w.experiment, walk=False),
        hash=lambda w: ir_label_hash(w.dataset, w.experiment),
    threads: 2
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/cam_to_ir_label/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/cam_to_ir_label.py"


rule train_irn:
    input:
        ir_labels=lambda w: ir_label_shards(w.dataset, w.experiment),
        manifest=lambda w: manifest(w.dataset),
        weights=lambda w: weights_inputs(scfg(w.dataset, w.experiment, "irn")),
        classifier=irn_classifier_inputs,
    output:
        model=f"{R}/{{dataset}}/{{experiment}}/irn/model.pt",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "train"),
        mean_shift_split=lambda w: split_name(w.dataset, "mask_eval"),
        cfg=lambda w: irn_cfg(w.dataset, w.experiment, walk=False),
        state=lambda w: f"{R}/{w.dataset}/{w.experiment}/irn/state",
        hash=lambda w: ir_label_hash(w.dataset, w.experiment),
        classifier_model=lambda w: (irn_classifier_inputs(w) or [None])[0],
        seed=config["seed"],
        device=config["device"],
        locks=GPU_LOCKS,
        weights_dir=config["weights_dir"],
    threads: 2
    resources:
        gpu=lambda w: train_gpus(w.dataset, w.experiment, "irn"),  # n_procs: one DDP process per GPU
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/train_irn.log",
    script:
        "../workflow_scripts/train_irn.py"


rule make_sem_seg_labels:
    input:
        cams=lambda w: cam_shards(w.dataset, w.experiment, split_name(w.dataset, "train")),
        cam_eval=f"{R}/{{dataset}}/{{experiment}}/eval/cams.json",
        model=f"{R}/{{dataset}}/{{experiment}}/irn/model.pt",
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/pseudo_masks_irn/{{shard}}-of-{{nshards}}.h5",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "train"),
        cfg=lambda w: scfg(w.dataset, w.experiment, "irn"),
        hash=lambda w: irn_mask_hash(w.dataset, w.experiment),
        seed=config["seed"],
        device=config["device"],
        locks=GPU_LOCKS,
    threads: 2
    resources:
        gpu=1,
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/make_sem_seg_labels/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/make_sem_seg_labels.py"


rule eval_sem_seg:
    input:
        ir_labels=lambda w: ir_label_shards(w.dataset, w.experiment),
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/eval/ir_labels.json",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "mask_eval"),
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/eval_sem_seg.log",
    script:
        "../workflow_scripts/eval_sem_seg.py"
