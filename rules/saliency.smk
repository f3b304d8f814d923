# Saliency maps (a dataset artifact for EPS-style methods): stand-in maps for the toy dataset, a verified
# folder of precomputed maps (PoolNet / PFAN "SALImages") for VOC / COCO.


rule saliency:
    input:
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/saliency/manifest.json",
    params:
        ds=lambda w: {**dataset_for_prepare(w.dataset), "saliency": dataset_cfg(w.dataset).get("saliency")},
        prepared=lambda w: prepared(w.dataset),
        splits=lambda w: [split_name(w.dataset, "train")],
        seed=config["seed"],
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/saliency.log",
    script:
        "../workflow_scripts/saliency.py"
