# DeepLab-V2 trained on the pseudo-masks (resumable), sharded inference on the eval split, evaluation.


rule train_segmentation:
    input:
        masks=lambda w: pseudo_mask_shards(w.dataset, w.experiment),
        manifest=lambda w: manifest(w.dataset),
        weights=lambda w: weights_inputs(scfg(w.dataset, w.experiment, "segmentation")),
    output:
        model=f"{R}/{{dataset}}/{{experiment}}/segmentation/model.pt",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "train"),
        cfg=lambda w: scfg(w.dataset, w.experiment, "segmentation"),
        state=lambda w: f"{R}/{w.dataset}/{w.experiment}/segmentation/state",
        hash=lambda w: seg_hash(w.dataset, w.experiment),
        seed=config["seed"],
        device=config["device"],
        locks=GPU_LOCKS,
        weights_dir=config["weights_dir"],
    threads: 2
    resources:
        gpu=lambda w: train_gpus(w.dataset, w.experiment, "segmentation"),  # n_procs: one DDP process per GPU
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/train_segmentation.log",
    script:
        "../workflow_scripts/train_segmentation.py"


rule infer_segmentation:
    input:
        model=f"{R}/{{dataset}}/{{experiment}}/segmentation/model.pt",
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/segmentation/pred/{{split}}/{{shard}}-of-{{nshards}}.h5",
    params:
        prepared=lambda w: prepared(w.dataset),
        cfg=lambda w: scfg(w.dataset, w.experiment, "segmentation"),
        hash=lambda w: seg_hash(w.dataset, w.experiment),
        seed=config["seed"],
        device=config["device"],
        locks=GPU_LOCKS,
    threads: 2
    resources:
        gpu=1,
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/infer_segmentation/{{split}}_{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/infer_segmentation.py"


rule eval_segmentation:
    input:
        masks=lambda w: seg_pred_shards(w.dataset, w.experiment, split_name(w.dataset, "eval")),
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/eval/segmentation.json",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "eval"),
        what="segmentation",
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/eval_segmentation.log",
    script:
        "../workflow_scripts/eval_masks.py"
