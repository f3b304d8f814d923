# Optional AffinityNet refinement (PSA): train on confident CAM labels, random-walk the CAMs into pseudo-masks.
# Used instead of the CRF pseudo-masks when affinity.enabled is true for an experiment.


rule train_affinity:
    input:
        cams=lambda w: cam_shards(w.dataset, w.experiment, split_name(w.dataset, "train")),
        manifest=lambda w: manifest(w.dataset),
        weights=lambda w: weights_inputs(scfg(w.dataset, w.experiment, "affinity")),
    output:
        model=f"{R}/{{dataset}}/{{experiment}}/affinity/model.pt",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "train"),
        cfg=lambda w: scfg(w.dataset, w.experiment, "affinity"),
        state=lambda w: f"{R}/{w.dataset}/{w.experiment}/affinity/state",
        hash=lambda w: stage_hash(w.dataset, w.experiment, "classifier", "cams", "affinity"),
        seed=config["seed"],
        device=config["device"],
        locks=GPU_LOCKS,
        weights_dir=config["weights_dir"],
    threads: 2
    resources:
        gpu=lambda w: train_gpus(w.dataset, w.experiment, "affinity"),  # n_procs: one DDP process per GPU
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/train_affinity.log",
    script:
        "../workflow_scripts/train_affinity.py"


rule random_walk:
    input:
        cams=lambda w: cam_shards(w.dataset, w.experiment, split_name(w.dataset, "train")),
        cam_eval=f"{R}/{{dataset}}/{{experiment}}/eval/cams.json",
        model=f"{R}/{{dataset}}/{{experiment}}/affinity/model.pt",
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/pseudo_masks_rw/{{shard}}-of-{{nshards}}.h5",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "train"),
        cfg=lambda w: scfg(w.dataset, w.experiment, "affinity"),
        hash=lambda w: rw_hash(w.dataset, w.experiment),
        seed=config["seed"],
        device=config["device"],
        locks=GPU_LOCKS,
    threads: 2
    resources:
        gpu=1,
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/random_walk/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/random_walk.py"
