# Datasets: the generated toy dataset; lists, image-level labels and manifest of every dataset.


rule make_toy_dataset:
    output:
        root=directory(out("toy_source")),
    params:
        job=job_params(generator=lambda w: dataset_cfg(w.dataset).get("generator", {}),
                       format=lambda w: dataset_cfg(w.dataset)["kind"]),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/make_toy_dataset.log",
    script:
        "../workflow_scripts/make_toy.py"


rule prepare_dataset:
    input:
        unpack(dataset_inputs),
    output:
        manifest=out("manifest"),
        labels=out("labels"),
        lists=directory(out("lists")),
    params:
        job=job_params(ds=lambda w: dataset_for_prepare(w.dataset)),
    threads: 2
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/prepare_dataset.log",
    script:
        "../workflow_scripts/prepare_dataset.py"


rule coco_masks:
    input:
        annotations=coco_instances,
    output:
        marker=out("coco_masks"),
    params:
        job=job_params("coco_masks", masks=lambda w: dataset_cfg(w.dataset).get("masks") or {},
                       toy=lambda w: generated(w.dataset),
                       instances=lambda w: coco_annotations(w.dataset)[w.split]),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/coco_masks/{{split}}_{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/coco_masks.py"
