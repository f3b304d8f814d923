# Classification network of a method (image-level labels only), resumable.


rule train_classifier:
    input:
        manifest=lambda w: manifest(w.dataset),
        weights=lambda w: weights_inputs(scfg(w.dataset, w.experiment, "classifier")),
        saliency=lambda w: saliency_inputs(w.dataset, w.experiment),
    output:
        model=f"{R}/{{dataset}}/{{experiment}}/classifier/model.pt",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "train"),
        method=lambda w: config["experiments"][w.experiment]["method"],
        cfg=lambda w: scfg(w.dataset, w.experiment, "classifier"),
        state=lambda w: f"{R}/{w.dataset}/{w.experiment}/classifier/state",
        hash=lambda w: stage_hash(w.dataset, w.experiment, "classifier"),
        seed=config["seed"],
        device=config["device"],
        locks=GPU_LOCKS,
        weights_dir=config["weights_dir"],
        saliency=lambda w: (saliency_inputs(w.dataset, w.experiment) or [None])[0],
    threads: 2
    resources:
        gpu=lambda w: train_gpus(w.dataset, w.experiment, "classifier"),  # n_procs: one DDP process per GPU
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/train_classifier.log",
    script:
        "../workflow_scripts/train_classifier.py"
