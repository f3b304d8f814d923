# Superpixel networks (SCN) of the superpixel methods (SP-CAM, MSA): training and the GT-reconstruction score.


rule train_scn:
    input:
        unpack(scn_inputs),
        manifest=rules.prepare_dataset.output.manifest,
        weights=weights_inputs("scn"),
    output:
        model=out("scn"),
    params:
        job=job_params("scn"),
    threads: 2
    resources:
        gpu=1,
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/superpixels/{{scn}}/train_scn.log",
    script:
        "../workflow_scripts/train_scn.py"


rule eval_superpixels:
    input:
        model=rules.train_scn.output.model,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        json=out("scn_eval"),
    params:
        job=job_params("scn_eval"),
    threads: 2
    resources:
        gpu=1,
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/superpixels/{{scn}}/eval_superpixels.log",
    script:
        "../workflow_scripts/eval_superpixels.py"

