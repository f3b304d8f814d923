# Datasets: the generated toy dataset; lists, image-level labels and manifest of every dataset.


rule make_toy_dataset:
    output:
        directory(f"{R}/{{dataset}}/source"),
    params:
        generator=lambda w: dataset_cfg(w.dataset).get("generator", {}),
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/make_toy_dataset.log",
    script:
        "../workflow_scripts/make_toy.py"


rule prepare_dataset:
    input:
        unpack(dataset_inputs),
    output:
        manifest=f"{R}/{{dataset}}/dataset/manifest.json",
        labels=f"{R}/{{dataset}}/dataset/labels.json",
        lists=directory(f"{R}/{{dataset}}/dataset/lists"),
    params:
        ds=lambda w: dataset_for_prepare(w.dataset),
        out_dir=lambda w: prepared(w.dataset),
    threads: 2
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/prepare_dataset.log",
    script:
        "../workflow_scripts/prepare_dataset.py"
