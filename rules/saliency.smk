# Saliency maps (a dataset artifact for EPS-style methods): stand-in maps for the toy dataset, a verified
# folder of precomputed maps (PoolNet / PFAN "SALImages") for VOC / COCO.


rule saliency:
    input:
        manifest=rules.prepare_dataset.output.manifest,
    output:
        manifest=out("saliency"),
    params:
        job=job_params(ds=lambda w: {**dataset_for_prepare(w.dataset), "saliency": dataset_cfg(w.dataset).get("saliency")}),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/saliency.log",
    script:
        "../workflow_scripts/saliency.py"
