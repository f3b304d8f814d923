# Classification network of a method (image-level labels only), resumable.


rule train_classifier:
    input:
        manifest=rules.prepare_dataset.output.manifest,
        weights=weights_inputs("classifier"),
        saliency=lambda w: saliency_inputs(w.dataset, w.experiment),
        scn=classifier_scn_inputs,
    output:
        model=out("classifier"),
    params:
        job=job_params("classifier"),
    threads: 2
    resources:
        gpu=train_gpus("classifier"),  # n_procs: one DDP process per GPU
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/train_classifier.log",
    script:
        "../workflow_scripts/train_classifier.py"
