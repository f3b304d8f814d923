# Superpixel networks (SCN) of the superpixel methods (SP-CAM, MSA): training, the GT-reconstruction score and the
# Q maps of the eval split (sharded HDF5).


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



rule superpixels:
    input:
        model=rules.train_scn.output.model,
        manifest=rules.prepare_dataset.output.manifest,
    output:
        q=out("q_maps"),
    params:
        job=job_params("q_maps"),
    threads: 2
    resources:
        gpu=1,
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/superpixels/{{scn}}/superpixels/{{split}}_{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/superpixels.py"
